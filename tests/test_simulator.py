"""The simulator backend: answers from demo-world ground truth, with errors at one rate
for every stage and for the single-stage baseline."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import pytest

from pipeline.backends import create_backend
from pipeline.backends.base import PermanentError
from pipeline.backends.simulator import MODEL_NAME, SimulatorBackend
from pipeline.scoring import check_captions, check_descriptors, resolve_name
from pipeline.stages import parse_answer, single_request, stage1_request, stage2_request, stage3_request
from store.db import open_db, transaction, utc_now
from store.demo_world import random_edits, random_scene, scene_objects


def build_truth_db(path, pairs: int, seed: int) -> list[dict]:
    """A store holding demo-world scenes and edit lists (rows only: the simulator never
    opens an image). Returns [{"pair_id", "reference_id", "target_id", "reference",
    "target", "edits"}]."""
    rng = random.Random(seed)
    db = open_db(path)
    now = utc_now()
    out = []
    with transaction(db):
        for i in range(pairs):
            reference = random_scene(rng)
            edits, target = random_edits(rng, reference, rng.randint(1, 3))
            ids = []
            for role, scene in (("ref", reference), ("tgt", target)):
                image_id = hashlib.sha256(f"{role}{i}{json.dumps(scene, sort_keys=True)}".encode()).hexdigest()
                db.execute("INSERT INTO images (id, name, path, scene_json, created_at) VALUES (?, ?, ?, ?, ?)",
                           [image_id, f"{role}{i:04d}.png", f"/nowhere/{role}{i}.png", json.dumps(scene), now])
                ids.append(image_id)
            pair_id = f"pair{i:04d}"
            db.execute("INSERT INTO pairs (id, source, external_id, reference_id, target_id, split,"
                       " ground_truth, created_at) VALUES (?, 'demo', ?, ?, ?, 'train', ?, ?)",
                       [pair_id, str(i), ids[0], ids[1], json.dumps(edits), now])
            out.append({"pair_id": pair_id, "reference_id": ids[0], "target_id": ids[1],
                        "reference": reference, "target": target, "edits": edits})
    db.conn.close()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "truth.db"
    return path, build_truth_db(path, pairs=240, seed=11)


def ask(backend: SimulatorBackend, request):
    response = asyncio.run(backend.complete(request))
    return response, parse_answer(request.stage, response.text, response.finish_reason)


def staged(backend, item):
    """Stages 1-3 as the runner chains them; returns (stage1 objects, stage2 objects, captions)."""
    _, a1 = ask(backend, stage1_request(item["reference_id"], "/nowhere/r.png"))
    objects1 = [o.model_dump() for o in a1.objects]
    _, a2 = ask(backend, stage2_request(item["pair_id"], item["target_id"], "/nowhere/t.png", objects1))
    objects2 = [o.model_dump() for o in a2.objects]
    _, a3 = ask(backend, stage3_request(item["pair_id"], objects1, objects2))
    return objects1, objects2, a3.captions


def single(backend, item):
    _, answer = ask(backend, single_request(item["pair_id"], (item["reference_id"], "/a.png"),
                                            (item["target_id"], "/b.png")))
    return answer.captions


def test_error_free_answers_are_the_ground_truth(world):
    path, items = world
    backend = create_backend("simulator", db_path=str(path), error_rate=0.0, seed=0)
    assert backend.name == "simulator" and backend.supports_images and backend.supports_json_schema
    for item in items[:40]:
        objects1, objects2, captions = staged(backend, item)
        assert objects1 == scene_objects(item["reference"])
        assert objects2 == scene_objects(item["target"])
        assert 3 <= len(captions) <= 8
        check = check_captions(captions, item["edits"])
        assert check.invented == [] and check.missed == [], (captions, item["edits"])
        check = check_captions(single(backend, item), item["edits"])
        assert check.invented == [] and check.missed == []


def test_stage2_copies_stage1_entries_for_unchanged_objects_mistakes_included(world):
    path, items = world
    noisy = SimulatorBackend(str(path), error_rate=0.6, seed=4)
    exact = SimulatorBackend(str(path), error_rate=0.0, seed=4)
    copied_wrong = 0
    for item in items[:40]:
        _, a1 = ask(noisy, stage1_request(item["reference_id"], "/r.png"))
        objects1 = [o.model_dump() for o in a1.objects]
        _, a2 = ask(exact, stage2_request(item["pair_id"], item["target_id"], "/t.png", objects1))
        objects2 = [o.model_dump() for o in a2.objects]
        truth1 = {o["name"]: o for o in scene_objects(item["reference"])}
        truth2 = {o["name"]: o for o in scene_objects(item["target"])}
        by_name1 = {o["name"]: o for o in objects1}
        for obj in objects2:
            name = obj["name"]
            if name in truth1 and name in truth2 and truth1[name] == truth2[name]:
                assert obj == by_name1[name]  # reused word for word
                copied_wrong += obj != truth2[name]
            elif name in truth2:
                assert obj == truth2[name]     # changed or new: described afresh
            else:
                assert name in by_name1 and name not in truth1  # stage 1's invention carried on
    assert copied_wrong > 5


def test_stage3_reads_only_the_descriptor_lists_in_the_request(world):
    path, items = world
    backend = SimulatorBackend(str(path), error_rate=0.0)
    reference = [{"name": "lamp", "descriptors": ["red", "small", "on the left", "one"]},
                 {"name": "wall", "descriptors": ["cream"]}]
    target = [{"name": "lamp", "descriptors": ["blue", "small", "on the left", "one"]},
              {"name": "clock", "descriptors": ["black", "large", "on the right", "two"]},
              {"name": "wall", "descriptors": ["cream"]}]
    # a pair id the store has never seen: stage 3 needs nothing but its text
    _, answer = ask(backend, stage3_request("not-a-pair", reference, target))
    edits = [
        {"op": "recolour", "kind": "lamp", "attribute": "colour", "from": "red", "to": "blue",
         "object": {"kind": "lamp", "colour": "red", "pattern": "plain", "size": "small",
                    "position": "left", "count": 1}},
        {"op": "add", "kind": "clock", "object": {"kind": "clock", "colour": "black", "pattern": "plain",
                                                 "size": "large", "position": "right", "count": 2}},
    ]
    check = check_captions(answer.captions, edits)
    assert check.invented == [] and check.missed == [], answer.captions
    # identical lists: nothing to say, so the simulated model invents a difference
    _, answer = ask(backend, stage3_request("not-a-pair", reference, reference))
    assert len(answer.captions) >= 3
    assert check_captions(answer.captions, []).invented == list(range(len(answer.captions)))


def test_answers_are_deterministic_per_seed_and_request(world):
    path, items = world
    a = SimulatorBackend(str(path), error_rate=0.3, seed=1)
    b = SimulatorBackend(str(path), error_rate=0.3, seed=1)
    c = SimulatorBackend(str(path), error_rate=0.3, seed=2)
    same = different = 0
    for item in items[:30]:
        ra = staged(a, item)
        assert ra == staged(b, item)
        assert single(a, item) == single(b, item)
        rc = staged(c, item)
        same += ra == rc
        different += ra != rc
    assert different > 10


def test_every_kind_of_error_is_injected_at_a_nonzero_rate(world):
    path, items = world
    backend = SimulatorBackend(str(path), error_rate=0.3, seed=0)
    invented_objects = wrong_attributes = missed = invented = 0
    for item in items[:60]:
        objects1, objects2, captions = staged(backend, item)
        for objects, scene in ((objects1, item["reference"]), (objects2, item["target"])):
            check = check_descriptors(objects, scene)
            invented_objects += check.hallucinated_objects
            wrong_attributes += check.hallucinated_descriptors
            assert all(resolve_name(o["name"]) for o in objects)  # names the world knows
        check = check_captions(captions, item["edits"])
        missed += len(check.missed)
        invented += len(check.invented)
    assert min(invented_objects, wrong_attributes, missed, invented) > 3


def _rates(backend, items, method):
    captions = changes = missed = invented = 0
    for item in items:
        caps = staged(backend, item)[2] if method == "staged" else single(backend, item)
        check = check_captions(caps, item["edits"])
        captions += check.captions
        changes += check.changes
        missed += len(check.missed)
        invented += len(check.invented)
    return missed / changes, invented / captions


def test_staged_and_single_share_one_error_rate(world):
    """Neither method is favoured by construction: at the same rate their caption error
    rates agree within sampling noise, and both grow with the rate."""
    path, items = world
    low = SimulatorBackend(str(path), error_rate=0.05, seed=3)
    high = SimulatorBackend(str(path), error_rate=0.3, seed=3)
    staged_low = _rates(low, items, "staged")
    single_low = _rates(low, items, "single")
    staged_high = _rates(high, items, "staged")
    single_high = _rates(high, items, "single")
    for s, g in ((staged_low, single_low), (staged_high, single_high)):
        assert abs(s[0] - g[0]) < 0.08 and abs(s[1] - g[1]) < 0.08, (s, g)
    for lo, hi in ((staged_low, staged_high), (single_low, single_high)):
        assert hi[0] > lo[0] + 0.1 and hi[1] > lo[1] + 0.1


def test_responses_name_the_simulator_and_estimate_tokens(world):
    path, items = world
    backend = SimulatorBackend(str(path))
    assert backend.error_rate == 0.15 and backend.cache_params == {"error_rate": 0.15, "seed": 0}
    response, _ = ask(backend, stage1_request(items[0]["reference_id"], "/r.png"))
    assert response.model == MODEL_NAME == "simulator-v1"
    assert response.tokens_in > 85 + 100 and 20 < response.tokens_out < 1000
    response2, _ = ask(backend, single_request(items[0]["pair_id"], (items[0]["reference_id"], "/a"),
                                               (items[0]["target_id"], "/b")))
    assert response2.tokens_in > response.tokens_in - 85  # two images


def test_an_image_without_ground_truth_is_a_permanent_error_naming_it(tmp_path):
    db = open_db(tmp_path / "own.db")
    with transaction(db):
        db.execute("INSERT INTO images (id, name, path, created_at) VALUES ('abc', 'holiday.jpg', '/x.jpg', ?)",
                   [utc_now()])
    backend = SimulatorBackend(str(tmp_path / "own.db"))
    with pytest.raises(PermanentError, match=r"simulator needs demo-world ground truth.*holiday\.jpg"):
        asyncio.run(backend.complete(stage1_request("abc", "/x.jpg")))
    with pytest.raises(PermanentError, match=r"simulator needs demo-world ground truth.*nope"):
        asyncio.run(backend.complete(single_request("nope", ("abc", "/x.jpg"), ("abc", "/x.jpg"))))
    with pytest.raises(ValueError, match="error rate"):
        SimulatorBackend(str(tmp_path / "own.db"), error_rate=1.5)
