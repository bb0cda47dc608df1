"""Hallucination scoring against ground truth: hand-built cases, the world's own captions,
a store built through the store's API, the simulator through the real runner, flags, CLI."""

from __future__ import annotations

import copy
import json
import random

import pytest

from good4cir.cli import main
from pipeline.scoring import (
    caption_matches_edit,
    check_captions,
    check_descriptors,
    format_table,
    parse_descriptor_target,
    score_flags,
    score_run,
    score_runs,
)
from store import annotations as store_ann
from store.db import open_db
from store.demo_world import generate_world, random_edits, random_scene, scene_objects
from store.demo_world.captions import TEMPLATES, phrase_edit
from store.demo_world.vocab import COLOURS, FLOORS, PATTERNS, POSITIONS, SIZES, WALL_COLOURS
from store.errors import NotFoundError
from store.importers import import_dataset
from store.review import add_flag, list_captions

SCENE = {
    "wall": "light blue", "floor": "wooden",
    "objects": [
        {"kind": "bed", "colour": "red", "pattern": "striped", "size": "large", "position": "centre", "count": 1},
        {"kind": "lamp", "colour": "yellow", "pattern": "plain", "size": "small", "position": "left", "count": 2},
        {"kind": "painting", "colour": "blue", "pattern": "plain", "size": "small", "position": "right", "count": 1},
    ],
}
LAMP = SCENE["objects"][1]
EDITS = [
    {"op": "recolour", "kind": "lamp", "attribute": "colour", "from": "yellow", "to": "green", "object": LAMP},
    {"op": "remove", "kind": "painting", "object": SCENE["objects"][2]},
]


# ---------------------------------------------------------------- descriptor lists


def test_a_correct_descriptor_list_scores_zero():
    check = check_descriptors(scene_objects(SCENE), SCENE)
    assert (check.hallucinated_objects, check.hallucinated_descriptors, check.missed_objects) == (0, 0, 0)
    assert check.objects == 5 and check.checked_descriptors == check.descriptors
    # free wording and synonyms agree with the scene too
    loose = [{"name": "Double bed", "descriptors": ["red and white stripes", "big", "center of the room"]},
             {"name": "table lamps", "descriptors": ["yellow shades", "two of them", "left side"]},
             {"name": "Walls", "descriptors": ["pale blue", "blue"]},
             {"name": "floor", "descriptors": ["hardwood", "warm light"]}]
    check = check_descriptors(loose, SCENE)
    assert (check.hallucinated_objects, check.hallucinated_descriptors) == (0, 0)
    assert check.missed_objects == 1  # the painting is left out: an omission, not a hallucination
    assert check.checked_descriptors == check.descriptors - 1  # "warm light" names no world value


def test_invented_objects_and_wrong_attributes_are_counted():
    objects = scene_objects(SCENE)
    objects.insert(1, {"name": "television", "descriptors": ["black", "large"]})
    objects.insert(2, {"name": "sofa", "descriptors": ["white"]})
    lamp = next(o for o in objects if o["name"] == "lamp")
    lamp["descriptors"] = ["purple", "small", "on the right", "two", "soft glow"]
    check = check_descriptors(objects, SCENE)
    assert check.hallucinated_objects == 2
    assert check.hallucinated_descriptors == 2  # purple (is yellow), on the right (is left)
    assert {(o, d) for o, d, _ in check.items if d is not None} == {(objects.index(lamp), 0), (objects.index(lamp), 2)}
    # every descriptor of an invented object counts as hallucinated for flag scoring
    assert {(1, 0), (1, 1), (2, 0)} <= check.hallucinated_keys()
    wrong_room = [{"name": "wall", "descriptors": ["navy"]}, {"name": "floor", "descriptors": ["marble"]}]
    assert check_descriptors(wrong_room, SCENE).hallucinated_descriptors == 2


# ---------------------------------------------------------------- captions


def test_correct_captions_score_zero_hallucinations():
    captions = ["Make the yellow lamps green.", "Remove the small blue painting on the right.",
                "The lamps should be green instead of yellow."]
    check = check_captions(captions, EDITS)
    assert check.invented == [] and check.missed == []
    assert check.matched == [[0], [1], [0]]


def test_invented_and_missed_changes_are_counted():
    captions = ["Make the yellow lamps green.", "Add a red chair on the left.", "Make the bed blue.",
                "Add a second pillow.", "Move the painting to the left."]
    check = check_captions(captions, EDITS)
    assert check.invented == [1, 2, 3, 4]   # no chair added, bed unchanged, no pillow, painting removed not moved
    assert check.unparsed == [3]            # "pillow" is not a word of this world
    assert check.missed == [1]              # nobody removed the painting
    # a wrong new value: the change is missed and the caption invented
    check = check_captions(["Paint the lamps purple."], EDITS[:1])
    assert check.invented == [0] and check.missed == [0]


def test_the_worlds_own_phrasings_match_their_edit_and_wrong_values_do_not():
    rng = random.Random(7)
    values = {"colour": COLOURS, "pattern": PATTERNS, "size": SIZES, "position": POSITIONS,
              "wall": WALL_COLOURS, "floor": FLOORS}
    checked = 0
    for _ in range(60):
        scene = random_scene(rng)
        edits, _ = random_edits(rng, scene, 3)
        for k, edit in enumerate(edits):
            wrong = copy.deepcopy(edit)
            if edit["op"] in ("add", "remove"):
                wrong["object"]["colour"] = next(c for c in COLOURS if c != edit["object"]["colour"])
            elif edit["op"] == "count":
                wrong["to"] = next((n for n in (1, 2, 3) if n not in (edit["from"], edit["to"])), None)
            else:
                wrong["to"] = next((v for v in values[edit["attribute"]]
                                    if v not in (edit["from"], edit["to"])
                                    and v not in edit["to"].split() and edit["to"] not in v.split()), None)
            for i in range(len(TEMPLATES[edit["op"]])):
                caption = phrase_edit(edit, f"{edit['op']}.{i}", rng)
                assert caption_matches_edit(caption, edit), (caption, edit)
                assert not any(caption_matches_edit(caption, e) for j, e in enumerate(edits) if j != k)
                if wrong.get("to", 0) is not None:
                    bad = phrase_edit(wrong, f"{edit['op']}.{i}", None)
                    assert not caption_matches_edit(bad, edit), (bad, edit)
                checked += 1
    assert checked > 800


_UNSTRIPE = {"op": "pattern", "kind": "chair", "attribute": "pattern", "from": "striped", "to": "plain",
             "object": {"kind": "chair", "colour": "blue", "pattern": "striped", "size": "large",
                        "position": "right", "count": 2}}
_REMOVE_CHAIRS = {"op": "remove", "kind": "chair", "object": _UNSTRIPE["object"]}


@pytest.mark.parametrize("caption, edit, states_it", [
    ("Remove the stripes from the chairs", _UNSTRIPE, True),
    ("Get rid of the pattern on the chairs", _UNSTRIPE, True),
    ("Make the chairs plain", _UNSTRIPE, True),
    ("Remove the dots from the chairs", _UNSTRIPE, False),       # they were striped
    ("Remove the striped chairs", _UNSTRIPE, False),             # that removes the chairs
    ("Remove the striped chairs", _REMOVE_CHAIRS, True),
    ("Remove the stripes from the chairs", _REMOVE_CHAIRS, False),  # the chairs stay
])
def test_removing_a_pattern_is_a_pattern_change_not_a_removal(caption, edit, states_it):
    assert caption_matches_edit(caption, edit) is states_it


def test_parts_and_fixtures_the_renderer_draws_are_not_invented_objects():
    # A room with a bed (drawn with pillows, a headboard and a blanket) and a plant in a
    # pot; a VLM that lists those parts and the ceiling describes what is in the picture.
    scene = {"wall": "pink", "floor": "wooden", "objects": [
        {"kind": "bed", "colour": "brown", "pattern": "striped", "size": "large", "position": "centre", "count": 2},
        {"kind": "plant", "colour": "purple", "pattern": "plain", "size": "small", "position": "right", "count": 1}]}
    listed = [
        {"name": "bed", "descriptors": ["brown", "striped", "two of them"]},
        {"name": "pillows", "descriptors": ["white", "two on each bed"]},   # part of the bed
        {"name": "Headboard", "descriptors": ["wooden"]},                   # part of the bed
        {"name": "white bed sheets", "descriptors": ["white"]},             # part of the bed
        {"name": "ceiling", "descriptors": ["white"]},                      # the room's
        {"name": "plant pot", "descriptors": ["purple"]},                   # part of the plant
        {"name": "screen", "descriptors": ["black"]},                       # a TV's: no TV here
        {"name": "sofa", "descriptors": ["red"]},                           # no such thing
        {"name": "nightstand with drawers", "descriptors": ["white"]},      # a nightstand: none
        {"name": "wall", "descriptors": ["pink"]},
    ]
    check = check_descriptors(listed, scene)
    assert check.objects == 10 and check.part_objects == 5
    assert check.hallucinated_objects == 3
    assert [(o, d) for o, d, _ in check.items] == [(6, None), (7, None), (8, None)]
    assert "screen (part of a tv)" in check.items[0][2]
    # the bed's own descriptors are still checked; the parts' are not (white pillows on a brown bed)
    assert check.descriptors == 3 + 1 and check.hallucinated_descriptors == 0
    assert check.missed_objects == 2  # the plant itself and the floor were not listed


_LAMP = {"kind": "lamp", "colour": "red", "pattern": "plain", "size": "small", "position": "left", "count": 1}
_CHAIRS = {"kind": "chair", "colour": "blue", "pattern": "striped", "size": "large", "position": "right", "count": 2}


@pytest.mark.parametrize("caption, edit, states_it", [
    ("Add a red lamp on the left", {"op": "add", "kind": "lamp", "object": _LAMP}, True),
    ("Add red lamps", {"op": "add", "kind": "lamp", "object": _LAMP}, False),
    ("Add two red lamps", {"op": "add", "kind": "lamp", "object": _LAMP}, False),
    ("Add a lamp", {"op": "add", "kind": "lamp", "object": {**_LAMP, "count": 2}}, False),
    ("Add one lamp", {"op": "add", "kind": "lamp", "object": {**_LAMP, "count": 2}}, False),
    ("Add a pair of lamps", {"op": "add", "kind": "lamp", "object": {**_LAMP, "count": 2}}, True),
    ("Remove the blue chairs", {"op": "remove", "kind": "chair", "object": _CHAIRS}, True),
    ("Remove the blue chair", {"op": "remove", "kind": "chair", "object": _CHAIRS}, False),
    ("Take away the lamps", {"op": "remove", "kind": "lamp", "object": _LAMP}, False),
    ("Add striped curtains", {"op": "add", "kind": "curtains",
                              "object": {**_LAMP, "kind": "curtains", "colour": "blue", "pattern": "striped"}}, True),
    ("Add a TV", {"op": "add", "kind": "tv", "object": {**_LAMP, "kind": "tv", "colour": "black"}}, True),
    ("Add two bedside tables", {"op": "add", "kind": "nightstand",
                                "object": {**_LAMP, "kind": "nightstand", "colour": "white", "count": 2}}, True),
])
def test_an_added_or_removed_objects_count_is_read_from_the_nouns_number(caption, edit, states_it):
    # "add a lamp" where two lamps were added states a different target: it is an
    # invented change and the real one is missed, as "add two lamps" for one lamp is.
    assert caption_matches_edit(caption, edit) is states_it


# ---------------------------------------------------------------- runs in a store


@pytest.fixture
def hand_run(tmp_path):
    """A store with one demo pair and one staged run written through the store's API."""
    db = open_db(tmp_path / "s.db")
    target = copy.deepcopy(SCENE)
    target["objects"][1]["colour"] = "green"
    target["objects"] = target["objects"][:2]
    now = "2026-01-01T00:00:00"
    db.execute("INSERT INTO images (id, name, scene_json, created_at) VALUES ('ref', 'ref.png', ?, ?)",
               [json.dumps(SCENE), now])
    db.execute("INSERT INTO images (id, name, scene_json, created_at) VALUES ('tgt', 'tgt.png', ?, ?)",
               [json.dumps(target), now])
    db.execute("INSERT INTO pairs (id, source, external_id, reference_id, target_id, ground_truth, created_at)"
               " VALUES ('p1', 'demo', '1', 'ref', 'tgt', ?, ?)", [json.dumps(EDITS), now])
    run = store_ann.create_run(db, "simulator", "hand", method="staged", name="hand")
    store_ann.ensure_annotations(db, run.id, ["p1"])
    stage1 = scene_objects(SCENE) + [{"name": "clock", "descriptors": ["white", "small"]}]
    stage2 = scene_objects(target)
    stage2[1] = {"name": "lamp", "descriptors": ["green", "large", "on the left", "two"]}  # size wrong
    store_ann.save_description(db, "d1", 1, "ref", stage1)
    store_ann.save_description(db, "d2", 2, "tgt", stage2, pair_id="p1")
    captions = ["Make the yellow lamps green.", "Add a clock on the wall.", "Make the bed purple."]
    store_ann.complete_annotation(db, f"{run.id}:p1", stage1_id="d1", stage2_id="d2", captions=captions,
                                  compounds=[("Make the yellow lamps green and add a clock.", [0, 1], 12),
                                             ("Make the yellow lamps green.", [0], 8)])
    return db, run.id, stage2


def test_score_run_counts_per_stage(hand_run):
    db, run_id, stage2 = hand_run
    score = score_run(db, run_id, detail=True)
    assert score["pairs"] == score["pairs_scored"] == 1
    s1, s2, caps = score["stage1"], score["stage2"], score["captions"]
    assert (s1["objects"], s1["hallucinated_objects"], s1["hallucinated_attributes"]) == (6, 1, 0)
    assert s1["object_rate"] == round(1 / 6, 4) and s1["list_rate"] == 1.0
    assert (s2["objects"], s2["hallucinated_objects"], s2["hallucinated_attributes"]) == (4, 0, 1)
    assert s2["descriptors"] == sum(len(o["descriptors"]) for o in stage2)
    assert (caps["captions"], caps["changes"], caps["invented_captions"], caps["missed_changes"]) == (3, 2, 2, 1)
    assert caps["invented_rate"] == round(2 / 3, 4) and caps["missed_rate"] == 0.5
    detail = score["annotations"][0]
    assert detail["captions"]["invented"] == [f"{run_id}:p1:c1", f"{run_id}:p1:c2"]
    assert detail["captions"]["missed_changes"] == [1]
    table = format_table([score])
    assert "16.7%" in table and "66.7%" in table and "hand" in table


def test_score_refuses_a_missing_run_before_scoring_any_and_keeps_the_order_given(hand_run, tmp_path, capsys):
    """`score --run 1 --run 2` with no run 2 scored run 1 first, then failed with only
    'run 2 does not exist'."""
    db, run_id, _ = hand_run
    other = store_ann.create_run(db, "simulator", "other", method="single", name="other").id
    db_path = str(tmp_path / "s.db")
    capsys.readouterr()
    with pytest.raises(NotFoundError, match=rf"run 7 does not exist \(this store's runs: {run_id}, {other}\)"):
        main(["score", "--db", db_path, "--run", str(run_id), "--run", "7"])
    assert "scoring run" not in capsys.readouterr().err  # refused before any work
    with pytest.raises(NotFoundError, match=r"runs 9, 7 do not exist"):
        score_runs(db, [9, run_id, 7])
    assert [s["run_id"] for s in score_runs(db, [other, run_id])] == [other, run_id]
    assert main(["score", "--db", db_path, "--run", str(other), "--run", str(run_id)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:4]]
    assert rows == [str(other), str(run_id)]


def test_score_flags_gives_precision_and_recall_of_human_flags(hand_run):
    db, run_id, _ = hand_run
    aid = f"{run_id}:p1"
    captions = {c.text: c for c in list_captions(db, aid)}
    empty = score_flags(db, aid)
    assert empty["captions"]["hallucinated"] == 3  # two individual captions and the compound with one
    assert empty["captions"]["recall"] == 0.0 and empty["captions"]["precision"] is None
    assert empty["descriptors"]["hallucinated"] == 3  # the clock's two descriptors, the lamp's size
    add_flag(db, aid, "caption", captions["Add a clock on the wall."].id, "ann", "not a real difference")
    add_flag(db, aid, "caption", captions["Make the yellow lamps green."].id, "ann")  # a false flag
    add_flag(db, aid, "descriptor", "d1/5", "ann", "object not there")               # the whole clock
    add_flag(db, aid, "descriptor", "d2/1/1", "ann", "wrong attribute")              # "large": right
    add_flag(db, aid, "descriptor", "d2/0/0", "ann")                                  # a false flag
    result = score_flags(db, aid)
    assert result["captions"]["caught"] == 1 and result["captions"]["flagged"] == 2
    assert result["captions"]["precision"] == 0.5 and result["captions"]["recall"] == round(1 / 3, 4)
    assert result["descriptors"]["caught"] == 3 and result["descriptors"]["flagged"] == 4
    assert result["descriptors"]["recall"] == 1.0 and result["descriptors"]["false_flags"] == ["d2/0/0"]
    assert result["all"]["caught"] == 4 and result["all"]["hallucinated"] == 6
    assert score_flags(db, run_id=run_id)["all"] == result["all"]
    assert score_flags(db, annotation_ids=[aid]) == result
    assert (result["caught"], result["hallucinated"], result["precision"]) == (4, 6, round(4 / 6, 4))
    with pytest.raises(ValueError, match="give one of"):
        score_flags(db, aid, run_id=run_id)
    assert parse_descriptor_target("s1:abc/2/3") == ("s1:abc", 2, 3)
    with pytest.raises(ValueError, match="not '<description>/<object>/<descriptor>'"):
        parse_descriptor_target("garbage")


# ---------------------------------------------------------------- the simulator through the runner


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_world(root / "world", pairs=24, seed=5, workers=1, progress=False)
    db_path = root / "demo.db"
    db = open_db(db_path)
    report = import_dataset(db, "pairs", root / "world")
    assert report.pairs_added == 24 and not report.problems
    db.conn.close()
    return root, db_path


def test_simulator_runs_score_zero_at_rate_zero_and_clearly_more_at_0_3(demo_store, capsys):
    from pipeline.runner import RunOptions, run_pipeline

    root, db_path = demo_store
    runs = {}
    for rate in (0.0, 0.3):
        for method in ("staged", "single"):
            progress = run_pipeline(db_path, RunOptions(backend="simulator", method=method, error_rate=rate,
                                                        seed=1, concurrency=4, new_run=True))
            assert progress.pairs_done == 24 and progress.pairs_failed == 0
            runs[(rate, method)] = progress.run_id
    db = open_db(db_path)
    clean = score_run(db, runs[(0.0, "staged")])
    assert clean["pairs_scored"] == 24
    for stage in ("stage1", "stage2"):
        assert clean[stage]["hallucinated_objects"] == 0 and clean[stage]["hallucinated_attributes"] == 0
    assert clean["captions"]["invented_captions"] == 0 and clean["captions"]["missed_changes"] == 0
    clean_single = score_run(db, runs[(0.0, "single")])
    assert clean_single["stage1"] is None and clean_single["captions"]["invented_captions"] == 0
    noisy = score_run(db, runs[(0.3, "staged")])
    noisy_single = score_run(db, runs[(0.3, "single")])
    assert noisy["stage1"]["attribute_rate"] > 0.02 and noisy["stage2"]["hallucinated_objects"] > 0
    for score in (noisy, noisy_single):
        assert score["captions"]["invented_rate"] > 0.25 and score["captions"]["missed_rate"] > 0.15
    # compounds are stored and respect the CLIP limit
    tokens = [r[0] for r in db.execute(
        "SELECT token_count FROM captions WHERE kind = 'compound' AND annotation_id LIKE ?",
        [f"{runs[(0.3, 'staged')]}:%"])]
    assert tokens and max(tokens) <= 77

    # the CLI: a table, JSON, several runs, a plot
    png = root / "plot.png"
    ids = [str(runs[k]) for k in sorted(runs)]
    assert main(["score", "--db", str(db_path), "--json", "--plot", str(png),
                 *sum((["--run", i] for i in ids), [])]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    out = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in out["runs"]] == [int(i) for i in ids]
    assert out["runs"][ids.index(str(runs[(0.3, "staged")]))]["captions"] == noisy["captions"]
    assert main(["score", "--db", str(db_path)]) == 0  # every run, as a table
    table = capsys.readouterr().out
    assert table.count("simulator") >= 4 and "invented" in table
    with pytest.raises(Exception, match="run 999 does not exist"):
        main(["score", "--db", str(db_path), "--run", "999"])



def test_runs_of_one_model_are_told_apart_by_the_setting_they_differ_in(demo_store, capsys):
    """Two simulator runs at error rates 0.1 and 0.4, unnamed: score's table and plot legend
    read '1 simulator simulator-v1 staged' and 'run 1: simulator-v1 (staged), 24 pairs' for
    both, told apart by number only; the Stats tab named the error rate."""
    from pipeline.plots import draw_scores
    from pipeline.runner import RunOptions, run_pipeline

    _, db_path = demo_store
    ids = [run_pipeline(db_path, RunOptions(backend="simulator", error_rate=rate, seed=1, concurrency=4,
                                            new_run=True)).run_id for rate in (0.1, 0.4)]
    assert main(["score", "--db", str(db_path), "--run", str(ids[0]), "--run", str(ids[1])]) == 0
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert rows[0].startswith(f"{ids[0]} (error_rate 0.1) ") and rows[1].startswith(f"{ids[1]} (error_rate 0.4) ")
    db = open_db(db_path)
    fig = draw_scores([score_run(db, i) for i in ids])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"run {ids[0]}: simulator-v1 (staged), error_rate 0.1, 24 pairs",
                      f"run {ids[1]}: simulator-v1 (staged), error_rate 0.4, 24 pairs"]

def test_a_caption_is_read_once_per_table_not_once_per_change_of_its_pair():
    # check_captions reads every caption against each of its pair's changes with the same
    # phrase tables; the second reading of the same words is the first one's answer.
    from pipeline.scoring import KIND_TABLE, tokens

    words = tokens("Add a red lamp next to the bed and remove the two chairs")
    first = KIND_TABLE.find(words)
    assert [value for _, value in first] == ["lamp", "bed", "chair"]
    assert KIND_TABLE.find(list(words)) is first
