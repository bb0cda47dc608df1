"""The demo world: determinism, splits, image sets, captions, held-out items, on-disk format."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from good4cir import cli_demo
from store.demo_world import (
    HELDOUT_COMBOS,
    describe_edit,
    describe_edits,
    generate_world,
    plan_world,
    render_png,
    render_scene,
    scene_objects,
    validate_scene,
)
from store.demo_world.captions import CONNECTIVES, HELDOUT_TEMPLATES, TEMPLATES
from store.demo_world.scene import apply_edits, has_combo, scene_key, single_changes, change_scene
from store.demo_world.vocab import COLOURS, FLOORS, NOUNS, NUMBER_WORDS, PATTERNS, SIZES, WALL_COLOURS


@pytest.fixture(scope="module")
def plan():
    """A planned (not rendered) world, big enough to hold every kind of test pair."""
    return plan_world(400, seed=11)


def _run_demo_world_command(argv: list[str]) -> int:
    """Our subcommand's parser and handler, as good4cir.cli wires them (without importing
    every other area's CLI module, some of which load torch when they register)."""
    parser = argparse.ArgumentParser(prog="good4cir")
    cli_demo.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small rendered world on disk, written by the demo-world command."""
    out = tmp_path_factory.mktemp("demo") / "world"
    assert _run_demo_world_command(["demo-world", "--out", str(out), "--pairs", "30", "--seed", "5",
                                    "--workers", "2"]) == 0
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- format and files


def test_cli_writes_the_pairs_format(world):
    pairs = _read_jsonl(world / "pairs.jsonl")
    scenes = {row["image"]: row for row in _read_jsonl(world / "scenes.jsonl")}
    meta = json.loads((world / "world.json").read_text())
    assert len(pairs) == 30 == meta["pairs"]
    assert meta["images"] == len(scenes) == len(list((world / "images").glob("*.png")))
    assert {p["split"] for p in pairs} == {"train", "val", "test"}
    for pair in pairs:
        assert set(pair) >= {"id", "reference", "target", "split", "captions", "edits", "heldout"}
        assert pair["reference"] != pair["target"]
        assert pair["reference"] in scenes and pair["target"] in scenes
        assert 1 <= len(pair["edits"]) <= 3 and len(pair["captions"]) >= 2
        assert all(name in scenes for name in pair["img_set"])
    assert len({p["id"] for p in pairs}) == 30
    for name, row in scenes.items():
        validate_scene(row["scene"])
        with Image.open(world / name) as img:
            assert img.format == "PNG" and img.size == (256, 256) and img.mode == "RGB"
            img.verify()
    assert {c["phrase"] for c in meta["heldout"]["combos"]} >= {"striped chair", "green lamp"}
    assert meta["heldout"]["phrasings"] and all(p["id"] in HELDOUT_TEMPLATES for p in meta["heldout"]["phrasings"])


def test_same_seed_gives_identical_bytes_whatever_the_workers(world, tmp_path):
    # the module fixture rendered with 2 worker processes; this renders inline
    again = tmp_path / "again"
    generate_world(again, 30, seed=5, workers=1, progress=False)
    assert _tree_digest(again) == _tree_digest(world)
    other = tmp_path / "other"
    generate_world(other, 30, seed=6, workers=1, progress=False)
    assert (other / "pairs.jsonl").read_bytes() != (world / "pairs.jsonl").read_bytes()


def test_ctrl_c_in_a_terminal_stops_the_renderers_without_a_traceback(tmp_path):
    # A terminal's Ctrl-C reaches the whole process group: each rendering worker printed
    # its own KeyboardInterrupt traceback (and, told to end by its pool, another one)
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "world"
    process = subprocess.Popen([sys.executable, "-m", "good4cir", "demo-world", "--pairs", "300", "--out", str(out),
                                "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"})
    deadline = time.time() + 120
    while len(list((out / "images").glob("*.png"))) < 40:
        assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()[-3000:]
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr.decode()[-3000:]


def test_plan_is_deterministic():
    a, b = plan_world(60, seed=3), plan_world(60, seed=3)
    assert a.pairs == b.pairs and a.images == b.images and a.meta == b.meta
    assert plan_world(60, seed=4).pairs != a.pairs


def test_plan_does_not_depend_on_the_hash_seed():
    import subprocess
    import sys

    code = ("import hashlib, json; from store.demo_world import plan_world; p = plan_world(40, seed=2); "
            "print(hashlib.sha256(json.dumps([p.pairs, p.images, p.meta]).encode()).hexdigest())")
    digests = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": hs}, check=True,
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
        for hs in ("1", "2")
    }
    assert len(digests) == 1


def test_regenerating_replaces_an_earlier_world(tmp_path):
    out = tmp_path / "w"
    generate_world(out, 12, seed=5, workers=1, progress=False)
    meta = generate_world(out, 4, seed=5, workers=1, progress=False)
    on_disk = sorted(p.name for p in (out / "images").iterdir())
    assert len(on_disk) == meta["images"] == len(_read_jsonl(out / "scenes.jsonl"))
    assert len(_read_jsonl(out / "pairs.jsonl")) == 4


def test_reference_and_target_render_differently(world):
    pairs = _read_jsonl(world / "pairs.jsonl")
    for pair in pairs:
        ref = Image.open(world / pair["reference"]).convert("RGB")
        tgt = Image.open(world / pair["target"]).convert("RGB")
        assert ImageChops.difference(ref, tgt).getbbox() is not None, pair["id"]
    digests = _tree_digest(world / "images")
    assert len(set(digests.values())) == len(digests)  # no two image files are the same


def test_every_single_attribute_change_is_visible():
    rng = random.Random(0)
    from store.demo_world import random_scene

    for _ in range(3):
        scene = random_scene(rng)
        base = render_scene(scene)
        for change in single_changes(scene):
            changed = render_scene(change_scene(scene, change))
            assert ImageChops.difference(base, changed).getbbox() is not None, change


def test_generate_refuses_a_folder_of_user_pairs(tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"reference": "a.png", "target": "b.png"}\n')
    with pytest.raises(ValueError, match="not a demo world"):
        generate_world(tmp_path, 3, seed=0, workers=1, progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        plan_world(0, seed=0)


# ---------------------------------------------------------------- splits and image sets


def test_splits_have_disjoint_images(plan):
    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for pair in plan.pairs:
        names = {pair["reference"], pair["target"], *pair.get("img_set", [])}
        by_split[pair["split"]] |= names
    assert by_split["train"] and by_split["val"] and by_split["test"]
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    image_split = {i["image"]: i["split"] for i in plan.images}
    for split, names in by_split.items():
        assert all(image_split[n] == split for n in names)
    keys = [scene_key(i["scene"]) for i in plan.images]
    assert len(set(keys)) == len(keys)  # no scene is drawn twice, across splits either


def _differences(a: dict, b: dict) -> list[tuple]:
    diffs = [(f,) for f in ("wall", "floor") if a[f] != b[f]]
    objs_a = {o["kind"]: o for o in a["objects"]}
    objs_b = {o["kind"]: o for o in b["objects"]}
    diffs += [("presence", k) for k in sorted(set(objs_a) ^ set(objs_b))]
    for kind in sorted(set(objs_a) & set(objs_b)):
        diffs += [(kind, f) for f in objs_a[kind] if objs_a[kind][f] != objs_b[kind][f]]
    return diffs


def test_img_set_holds_six_with_hard_negatives(plan):
    scenes = {i["image"]: i["scene"] for i in plan.images}
    checked = 0
    for pair in plan.pairs:
        img_set = pair["img_set"]
        assert len(img_set) == len(set(img_set)) == 6
        assert pair["reference"] in img_set and pair["target"] in img_set
        target = scenes[pair["target"]]
        for name in img_set:
            if name in (pair["reference"], pair["target"]):
                continue
            diffs = _differences(target, scenes[name])
            assert len(diffs) == 1 and diffs[0][0] != "presence", (pair["id"], diffs)
            assert scene_key(scenes[name]) != scene_key(scenes[pair["reference"]])
            checked += 1
    assert checked >= 4 * 60


def test_edits_turn_reference_into_target(plan):
    scenes = {i["image"]: i["scene"] for i in plan.images}
    ops = set()
    for pair in plan.pairs:
        ref, tgt = scenes[pair["reference"]], scenes[pair["target"]]
        assert apply_edits(ref, pair["edits"]) == tgt
        assert scene_key(ref) != scene_key(tgt)
        touched = [e.get("kind") or e["op"] for e in pair["edits"]]
        assert len(touched) == len(set(touched))  # one edit per kind
        ops |= {e["op"] for e in pair["edits"]}
    assert ops == {"add", "remove", "recolour", "pattern", "move", "count", "resize", "wall", "floor"}


# ---------------------------------------------------------------- captions


_WORDS = r"[a-z' -]+?"
_POS = r"(?:on the left|in the centre|on the right)"
_VALUE = "(?:" + "|".join(sorted(set(COLOURS) | set(PATTERNS) | set(SIZES) | set(WALL_COLOURS) | set(FLOORS)
                                 | set(NUMBER_WORDS.values()) | {"left", "centre", "right", "1", "2", "3"},
                                 key=len, reverse=True)) + ")"
_FIELD = {
    "ref": "the " + _WORDS, "np": _WORDS, "pos": _POS, "to_pos": _POS, "from_pos": _POS,
    "to_dir": r"to the (?:left|centre|right)", "from": _VALUE, "to": _VALUE, "it": "(?:it|them)",
    "one_to": r"(?:an? [a-z]+ one|[a-z]+ ones)", "comparative": "(?:larger|smaller)", "bigger": "(?:bigger|smaller)",
    "enlarge": "(?:enlarge|shrink)", "updown": "(?:up|down)", "adj": "(?:[a-z]+ )*", "nouns": "[a-z]+",
    "noun_to": "[a-z]+", "from_w": "(?:one|two|three)", "to_w": "(?:one|two|three)",
    "count_delta": r"(?:add (?:one|two) more|remove (?:one|two) of the) " + _WORDS,
}


def _placeholder_regex(template: str) -> re.Pattern:
    """A template as an anchored regex; each {field} matches what that field can hold."""
    parts = re.split(r"\{([a-z_]+)\}", template)
    body = "".join(_FIELD[p] if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return re.compile(f"^{body}$")


_REGEXES = {f"{op}.{i}": _placeholder_regex(t) for op, ts in TEMPLATES.items() for i, t in enumerate(ts)}
_SPLIT = re.compile("|".join(re.escape(c) for c in sorted(CONNECTIVES, key=len, reverse=True)))


def _clause_templates(caption: str) -> list[set[str]]:
    """For each clause of a caption, the template ids it fits."""
    assert caption.endswith(".")
    text = caption[:-1].lower()
    return [{t for t, rx in _REGEXES.items() if rx.match(clause)} for clause in _SPLIT.split(text)]


def _change_words(edit: dict) -> list[set[str]]:
    """Word sets a caption must touch for this edit: each set needs one member present."""
    op = edit["op"]
    if op in ("wall", "floor"):
        return [{edit["to"]}]
    nouns = set(NOUNS[edit["kind"]])
    nouns = {n.lower() for n in nouns}
    if op == "add":
        obj = edit["object"]
        return [nouns, {obj["colour"]}, {obj["size"]}]
    if op == "remove":
        return [nouns]
    to = edit["to"]
    if op in ("recolour", "pattern"):
        return [nouns, {to}]
    if op == "move":
        return [nouns, {f"the {to}", f"in the {to}"}]
    if op == "count":
        delta = NUMBER_WORDS[abs(to - edit["from"])]
        return [nouns, {NUMBER_WORDS[to], f"{delta} more", f"{delta} of the"}]
    if op == "resize":
        words = {"larger", "bigger", "enlarge", "large", " up"} if to == "large" else {"smaller", "shrink", "small", " down"}
        return [nouns, words]
    raise AssertionError(op)


def test_captions_name_every_change_and_never_the_images(plan):
    for pair in plan.pairs:
        assert len(set(pair["captions"])) == len(pair["captions"]) >= 2
        for caption in pair["captions"]:
            low = caption.lower()
            assert not re.search(r"\b(image|picture|photo)\b|\bfirst\b|\bsecond\b", low), caption
            assert len(_clause_templates(caption)) == len(pair["edits"]), caption
            for edit in pair["edits"]:
                for words in _change_words(edit):
                    assert any(w in low for w in words), (caption, edit["op"], words)


def test_captions_are_fine_grained(plan):
    text = " ".join(c.lower() for p in plan.pairs for c in p["captions"])
    for word in list(COLOURS) + list(PATTERNS[1:]) + list(SIZES) + ["two", "three", "on the left", "on the right"]:
        assert re.search(rf"\b{word}\b", text), word


def test_describe_edit_is_canonical_and_full():
    chair = {"kind": "chair", "colour": "red", "pattern": "striped", "size": "large", "position": "left", "count": 2}
    recolour = {"op": "recolour", "kind": "chair", "attribute": "colour", "from": "red", "to": "blue", "object": chair}
    assert describe_edit(recolour) == "change the colour of the two large striped chairs on the left from red to blue"
    add = {"op": "add", "kind": "lamp", "object": {**chair, "kind": "lamp", "count": 1, "colour": "orange"}}
    assert describe_edit(add) == "add a large orange striped lamp on the left"
    wall = {"op": "wall", "attribute": "wall", "from": "cream", "to": "navy"}
    assert describe_edits([wall, add]) == (
        "Change the wall colour from cream to navy, and add a large orange striped lamp on the left.")


def test_scene_objects_lists_most_prominent_first():
    scene = {"wall": "cream", "floor": "tiled", "objects": [
        {"kind": "bed", "colour": "blue", "pattern": "checked", "size": "large", "position": "centre", "count": 1},
        {"kind": "clock", "colour": "red", "pattern": "plain", "size": "small", "position": "left", "count": 1},
        {"kind": "chair", "colour": "green", "pattern": "plain", "size": "large", "position": "right", "count": 3},
    ]}
    validate_scene(scene)
    assert scene_objects(scene) == [
        {"name": "bed", "descriptors": ["blue", "checked", "large", "in the centre", "one"]},
        {"name": "chair", "descriptors": ["green", "large", "on the right", "three"]},
        {"name": "clock", "descriptors": ["red", "small", "on the left", "one"]},
        {"name": "wall", "descriptors": ["cream"]},
        {"name": "floor", "descriptors": ["tiled"]},
    ]


def test_validate_scene_names_the_problem():
    good = {"wall": "cream", "floor": "tiled", "objects": [
        {"kind": "tv", "colour": "red", "pattern": "plain", "size": "small", "position": "left", "count": 1}]}
    validate_scene(good)
    for bad, message in [
        ({**good, "wall": "tartan"}, "wall colour"),
        ({**good, "objects": [{**good["objects"][0], "pattern": "striped"}]}, "tv: invalid pattern"),
        ({**good, "objects": [{**good["objects"][0], "count": 2}]}, "tv: count 2"),
        ({**good, "objects": good["objects"] + [{**good["objects"][0], "kind": "clock"}]}, "clock: position"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_scene(bad)


# ---------------------------------------------------------------- held-out phrasings and combos


def test_clause_check_tells_heldout_phrasings_apart(plan):
    """The check below can fail: each phrasing is recognised as itself, held out or not."""
    from store.demo_world.captions import phrase_edit

    rng = random.Random(1)
    for pair in plan.pairs[:120]:
        for edit in pair["edits"]:
            for i in range(len(TEMPLATES[edit["op"]])):
                template_id = f"{edit['op']}.{i}"
                clause = phrase_edit(edit, template_id, rng)
                (fits,) = _clause_templates(clause[0].upper() + clause[1:] + ".")
                assert template_id in fits, (template_id, clause)
                assert bool(fits & HELDOUT_TEMPLATES) == (template_id in HELDOUT_TEMPLATES), (clause, fits)


def test_heldout_phrasings_only_in_test(plan):
    seen_heldout_pairs = 0
    for pair in plan.pairs:
        phrasing = "phrasing" in pair["heldout"]
        for caption in pair["captions"]:
            fits = _clause_templates(caption)
            assert all(fits), caption  # every clause fits some template: the check can see
            if phrasing:
                assert all(f <= HELDOUT_TEMPLATES for f in fits), caption
            else:
                assert not any(f & HELDOUT_TEMPLATES for f in fits), caption
        if pair["split"] != "test":
            assert pair["heldout"] == []
        seen_heldout_pairs += phrasing
    assert seen_heldout_pairs >= 5


def test_heldout_combos_never_in_train_or_val(plan):
    for image in plan.images:
        if image["split"] != "test":
            assert not any(has_combo(o, HELDOUT_COMBOS) for o in image["scene"]["objects"]), image["image"]
    combo_pairs = [p for p in plan.pairs if "combo" in p["heldout"]]
    assert len(combo_pairs) >= 5
    from store.demo_world import edit_shows_combo

    for pair in plan.pairs:
        assert ("combo" in pair["heldout"]) == (
            pair["split"] == "test" and any(edit_shows_combo(e, HELDOUT_COMBOS) for e in pair["edits"]))
    combo_text = " ".join(c.lower() for p in combo_pairs for c in p["captions"])
    assert any(f"{v} {NOUNS[k][0].lower()}" in combo_text for k, _a, v in HELDOUT_COMBOS)


def test_render_png_is_deterministic():
    scene = {"wall": "sage green", "floor": "wooden", "objects": [
        {"kind": "curtains", "colour": "pink", "pattern": "dotted", "size": "large", "position": "right", "count": 1}]}
    first = render_png(scene)
    assert first == render_png(scene)
    import io

    import numpy as np

    decoded = Image.open(io.BytesIO(first))
    assert decoded.size == (256, 256)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(render_scene(scene)))
    for wall in WALL_COLOURS:
        for floor in FLOORS:
            if (wall, floor) != ("sage green", "wooden"):
                assert render_png({**scene, "wall": wall, "floor": floor}) != first


def test_a_rerun_removes_images_a_killed_run_left_half_written(tmp_path):
    # A `kill -9` while rendering leaves NNNNNN.png.tmp in images/; a rerun with fewer
    # pairs never wrote those names again, so they stayed for good.
    out = tmp_path / "world"
    (out / "images").mkdir(parents=True)
    (out / "images" / "099999.png.tmp").write_bytes(b"half a png")
    (out / "images" / "my_notes.png.tmp").write_bytes(b"not ours")
    generate_world(out, pairs=5, progress=False, workers=1)
    assert sorted(p.name for p in (out / "images").glob("*.tmp")) == ["my_notes.png.tmp"]
