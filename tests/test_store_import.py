"""Importing each format from the small fixtures in tests/fixtures: rows as expected,
idempotent, --split filtering or setting, and the CLI's report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from good4cir.cli import main
from store import FormatError, PairRecord, open_db
from store.images import hash_file, url_image_id
from store.importers import import_dataset, pair_id_for

FIXTURES = Path(__file__).parent / "fixtures"


def pairs_of(db) -> dict[str, PairRecord]:
    cursor = db.execute("SELECT * FROM pairs")
    names = [d[0] for d in cursor.description]
    return {r.external_id: r for r in (PairRecord.from_row(dict(zip(names, row))) for row in cursor.fetchall())}


def image_names(db) -> dict[str, str]:
    return dict(db.execute("SELECT id, name FROM images").fetchall())


def test_pairs_folder(tmp_path):
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", FIXTURES / "pairs")
    assert (report.pairs_added, report.images_added, report.problems) == (3, 8, [])
    pairs = pairs_of(db)
    assert set(pairs) == {"p0", "p1", "p2"}
    p0, p1 = pairs["p0"], pairs["p1"]
    assert p0.source == "pairs" and p0.id == pair_id_for("pairs", "p0")
    assert p0.split == "train" and p0.original_captions == ["make the lamp red", "the lamp is red now"]
    assert p0.ground_truth == [{"op": "recolour", "object": "lamp", "to": "red"}]
    assert p0.reference_id == hash_file(FIXTURES / "pairs/images/room0.png")
    names = image_names(db)
    assert [names[i] for i in p1.img_set] == [
        "images/room1.png", "images/room1_edit.png", "images/room1_near_a.png", "images/room1_near_b.png"]
    assert names[pairs["p2"].reference_id] == "images/chambre_étoile.png"
    scene = db.execute("SELECT scene_json FROM images WHERE id = ?", [p0.reference_id]).fetchone()[0]
    assert json.loads(scene) == {"wall": "colour0", "objects": []}
    again = import_dataset(db, "pairs", FIXTURES / "pairs")
    assert (again.pairs_added, again.images_added, again.pairs_skipped) == (0, 0, 3)
    assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 3


def test_pairs_split_filter_and_demo_source(tmp_path):
    world = tmp_path / "world"
    shutil.copytree(FIXTURES / "pairs", world)
    (world / "world.json").write_text("{}")
    with (world / "pairs.jsonl").open("a") as handle:
        handle.write('{"reference": "images/room0.png", "target": "images/room1.png"}\n')
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", world, split="val")
    pairs = pairs_of(db)
    # "val" keeps the val line and gives the split-less line that split.
    assert report.pairs_added == 2 and set(pairs) == {"p1", "images/room0.png|images/room1.png"}
    assert {p.split for p in pairs.values()} == {"val"} and {p.source for p in pairs.values()} == {"demo"}
    assert import_dataset(db, "pairs", world).pairs_added == 2  # the other splits, later


def test_good4cir_json_with_paths_and_urls(tmp_path):
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "good4cir", FIXTURES / "good4cir" / "dataset.json", split="train")
    assert report.pairs_added == 3 and report.problems == []
    # The URL pair imports without a download and says so, per image.
    assert [w.item for w in report.warnings] == ["dataset.json[2]", "dataset.json[2]"]
    assert "without downloading" in report.warnings[0].reason
    pairs = pairs_of(db)
    by_ref = {p.reference_id: p for p in pairs.values()}
    url = "https://example.org/hotel/101.jpg"
    url_pair = by_ref[url_image_id(url)]
    assert url_pair.original_captions == ["the lamp is switched off"]
    row = db.execute("SELECT url, path, width FROM images WHERE id = ?", [url_image_id(url)]).fetchone()
    assert row == (url, None, None)
    local = by_ref[hash_file(FIXTURES / "good4cir/images/hotel_a.jpg")]
    assert local.original_captions == ["the bed has a blue cover", "add two pillows"]
    assert {p.split for p in pairs.values()} == {"train"} and {p.source for p in pairs.values()} == {"dataset"}
    assert import_dataset(db, "good4cir", FIXTURES / "good4cir" / "dataset.json").pairs_skipped == 3


def test_cirr_root(tmp_path):
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "cirr", FIXTURES / "cirr")
    assert (report.pairs_added, report.images_added, report.problems) == (5, 11, [])
    pairs = pairs_of(db)
    assert set(pairs) == {"train:0", "train:1", "val:0", "val:1", "test1:0"}
    names = image_names(db)
    val0 = pairs["val:0"]
    assert (names[val0.reference_id], names[val0.target_id]) == ("dev-0-0-img0", "dev-0-0-img1")
    assert val0.original_captions == ["same bird but flying"]
    assert [names[i] for i in val0.img_set] == ["dev-0-0-img0", "dev-0-0-img1", "dev-0-0-img2", "dev-0-0-img3"]
    assert val0.extra["pairid"] == 0 and val0.extra["img_set_id"] == 0
    test = pairs["test1:0"]
    assert test.target_id is None and test.split == "test1"  # CIRR withholds test targets
    assert pairs["train:1"].extra["target_soft"] == {"train-2-1-img1": 1.0, "train-2-1-img0": 0.5}
    assert import_dataset(db, "cirr", FIXTURES / "cirr").pairs_skipped == 5


def test_cirr_split_filter_and_missing_member(tmp_path):
    root = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", root)
    (root / "dev" / "dev-0-0-img3.png").unlink()
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "cirr", root, split="val")
    # val:1's target is gone: that pair is reported; val:0 imports with a smaller img_set.
    assert report.pairs_added == 1
    items = sorted(p.item for p in report.problems)
    assert items == ["val pairid 0 img_set member dev-0-0-img3", "val pairid 1"]
    assert all("file not found" in p.reason for p in report.problems)
    assert len(pairs_of(db)["val:0"].img_set) == 3
    with pytest.raises(FormatError, match="not a CIRR root"):
        import_dataset(db, "cirr", FIXTURES / "pairs")


def test_circo_root_and_annotation_file(tmp_path):
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "circo", FIXTURES / "circo")
    assert (report.pairs_added, report.problems) == (3, [])
    pairs = pairs_of(db)
    assert set(pairs) == {"val:0", "val:1", "test:0"}
    names = image_names(db)
    val0 = pairs["val:0"]
    assert (names[val0.reference_id], names[val0.target_id]) == ("11", "12")
    assert val0.original_captions == ["is on a red plate"]
    assert val0.extra["shared_concept"] == "a slice of cake"
    assert val0.extra["gt_img_ids"] == [12, 13, 14]
    assert [names[i] for i in val0.extra["gt_image_ids"]] == ["12", "13", "14"]
    assert pairs["test:0"].target_id is None

    other = open_db(tmp_path / "t.db")
    images = FIXTURES / "circo/COCO2017_unlabeled/unlabeled2017"
    report = import_dataset(other, "circo", FIXTURES / "circo/annotations/val.json", images_dir=images,
                            split="dev")
    assert report.pairs_added == 2 and {p.split for p in pairs_of(other).values()} == {"dev"}
    assert import_dataset(db, "circo", FIXTURES / "circo", split="val").pairs_skipped == 2


def test_cli_import_prints_summary_and_problems(tmp_path, capsys):
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    (folder / "images" / "room1_edit.png").write_bytes(b"")
    db_path = tmp_path / "s.db"
    assert main(["import", "--db", str(db_path), "--format", "pairs", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "imported 2 pairs" in out and "1 problems" in out
    assert "problem: pair 'p1'" in out and "0 bytes" in out
    assert main(["import", "--db", str(db_path), "--format", "pairs", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs_added"] == 0 and report["pairs_skipped"] == 2


def test_reimport_after_moving_the_dataset_updates_image_paths(tmp_path):
    first = tmp_path / "first" / "world"
    shutil.copytree(FIXTURES / "pairs", first)
    db = open_db(tmp_path / "s.db")
    assert import_dataset(db, "pairs", first, source="w").pairs_added == 3
    moved = tmp_path / "moved" / "world"
    moved.parent.mkdir()
    first.rename(moved)
    report = import_dataset(db, "pairs", moved, source="w")
    assert (report.pairs_added, report.pairs_skipped, report.images_moved) == (0, 3, 8)
    paths = [r[0] for r in db.execute("SELECT path FROM images")]
    assert len(paths) == 8 and all(p.startswith(str(moved.resolve())) and Path(p).is_file() for p in paths)


def test_another_dataset_under_the_same_source_is_reported_not_skipped(tmp_path):
    world = tmp_path / "world"
    shutil.copytree(FIXTURES / "pairs", world)
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "pairs", world, source="demo")
    # A regenerated world: same pair ids, other pictures.
    (world / "images" / "room0.png").write_bytes((FIXTURES / "pairs/images/room1.png").read_bytes())
    report = import_dataset(db, "pairs", world, source="demo")
    assert report.pairs_skipped == 2 and [p.item.split("'")[1] for p in report.problems] == ["p0"]
    assert "--source" in report.problems[0].reason
    assert import_dataset(db, "pairs", world, source="demo-2").pairs_added == 3


def test_pairs_line_with_captions_or_img_set_of_the_wrong_type_is_a_problem_not_a_crash(tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    with (folder / "pairs.jsonl").open("a") as handle:
        handle.write('{"id": "c5", "reference": "images/room0.png", "target": "images/room1.png", "captions": 5}\n')
        handle.write('{"id": "s7", "reference": "images/room1.png", "target": "images/room0.png", "img_set": 7}\n')
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder)
    # the good lines (before and after) import; each bad one is reported by id and line
    assert report.pairs_added == 3 and set(pairs_of(db)) == {"p0", "p1", "p2"}
    problems = {p.item: p.reason for p in report.problems}
    assert set(problems) == {"pair 'c5' (pairs.jsonl line 4)", "pair 's7' (pairs.jsonl line 5)"}
    assert '"captions"' in problems["pair 'c5' (pairs.jsonl line 4)"]
    assert '"img_set"' in problems["pair 's7' (pairs.jsonl line 5)"]
