"""Importing each format from the small fixtures in tests/fixtures: rows as expected,
idempotent, --split filtering or setting, and the CLI's report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from good4cir.cli import CommandError, main
from good4cir.cli_store import EXIT_PROBLEMS
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
    # The URL pair imports without a download and says so, once for all URL images.
    assert [w.item for w in report.warnings] == ["https://example.org/hotel/101.jpg"]
    assert "2 images named by URL" in report.warnings[0].reason
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



def test_circo_images_may_name_the_coco_folder_above_unlabeled2017(tmp_path):
    """`--images /data/CIRCO/COCO2017_unlabeled`, the folder CIRCO's layout names, failed
    every query ('no file 000000000011.jpg in .../COCO2017_unlabeled'): the images are in
    its unlabeled2017/, where a CIRCO root import already looks."""
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "circo", FIXTURES / "circo/annotations/val.json",
                            images_dir=FIXTURES / "circo/COCO2017_unlabeled")
    assert (report.pairs_added, report.problems) == (2, [])

def test_cli_import_prints_summary_and_problems(tmp_path, capsys):
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    (folder / "images" / "room1_edit.png").write_bytes(b"")
    db_path = tmp_path / "s.db"
    # Exit status 3: the good pairs are stored, but a script must notice the bad one.
    assert main(["import", "--db", str(db_path), "--format", "pairs", str(folder)]) == EXIT_PROBLEMS == 3
    out = capsys.readouterr().out
    assert "imported 2 pairs" in out and "1 problems" in out
    assert "problem: pair 'p1'" in out and "0 bytes" in out
    assert main(["import", "--db", str(db_path), "--format", "pairs", str(folder), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["pairs_added"] == 0 and report["pairs_skipped"] == 2
    assert [p["item"] for p in report["problems"]] == ["pair 'p1' (pairs.jsonl line 2)"]
    assert main(["import", "--db", str(db_path), "--format", "pairs", str(FIXTURES / "pairs")]) == 0


def test_cli_import_that_stores_nothing_leaves_no_new_store(tmp_path, capsys):
    """Every line bad, or no pairs file: the import used to exit 0 (or fail) and leave an
    empty store file behind that later commands took for a real one."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pairs.jsonl").write_text('not json\n{"reference": "a.png"}\n')
    db_path = tmp_path / "new" / "s.db"
    with pytest.raises(CommandError, match=r"nothing imported: all 2 items of .* had problems.*"
                                           r"removed the new store .*s\.db"):
        main(["import", "--db", str(db_path), "--format", "pairs", str(bad)])
    out = capsys.readouterr().out
    assert "problem: pairs.jsonl line 1: not valid JSON" in out and "pairs.jsonl line 2" in out
    assert not (tmp_path / "new").exists()  # neither the store nor the folder made for it

    with pytest.raises(FormatError, match="pairs.jsonl: not found"):
        main(["import", "--db", str(db_path), "--format", "pairs", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        main(["import", "--db", str(db_path), "--format", "pairs", str(tmp_path / "nowhere")])
    (bad / "pairs.jsonl").write_text("")
    with pytest.raises(CommandError, match="nothing imported: .*the file is empty"):
        main(["import", "--db", str(db_path), "--format", "pairs", str(bad)])
    assert not (tmp_path / "new").exists()

    # A store that was there before is never removed: its pairs stay, the problems exit 3.
    kept = tmp_path / "kept.db"
    assert main(["import", "--db", str(kept), "--format", "pairs", str(FIXTURES / "pairs")]) == 0
    (bad / "pairs.jsonl").write_text("not json\n")
    assert main(["import", "--db", str(kept), "--format", "pairs", str(bad)]) == 3
    assert open_db(kept).execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 3


def test_cli_import_of_a_demo_world_has_no_problems(tmp_path, capsys):
    """`make demo` runs this import under make: a problem would now stop it (exit 3)."""
    from store.demo_world import generate_world

    generate_world(tmp_path / "world", 24, seed=0, workers=1, progress=False)
    assert main(["import", "--db", str(tmp_path / "s.db"), "--format", "pairs", str(tmp_path / "world")]) == 0
    out = capsys.readouterr().out
    assert "imported 24 pairs" in out and "0 problems" in out and "note:" not in out


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


def test_cirr_official_layout_with_images_under_img_raw(tmp_path):
    # CIRR's README: image_splits paths ("./train/34/x.png") are relative to img_raw/.
    root = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", root)
    (root / "img_raw").mkdir()
    for folder in ("train", "dev", "test1"):
        (root / folder).rename(root / "img_raw" / folder)
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "cirr", root)
    assert (report.pairs_added, report.images_added, report.problems) == (5, 11, [])


def _append_json(path: Path, *entries) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data + list(entries)))


def test_wrongly_typed_fields_are_problems_naming_the_item_not_a_crash(tmp_path):
    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    _append_json(cirr / "captions/cap.rc2.val.json",
                 {"pairid": 10, "reference": ["dev-0-0-img0"], "target_hard": "dev-0-0-img1"},
                 {"pairid": 11, "reference": "dev-0-0-img0", "target_hard": "dev-0-0-img1", "caption": 5},
                 {"pairid": 12, "reference": "dev-0-0-img0", "img_set": {"id": 1, "members": "dev-0-0-img0"}})
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "cirr", cirr, split="val")
    assert report.pairs_added == 2 and set(pairs_of(db)) == {"val:0", "val:1"}
    reasons = {p.item: p.reason for p in report.problems}
    assert reasons == {"val pairid 10": "reference must be a string, not list",
                       "val pairid 11": "caption must be a string, not int",
                       "val pairid 12": 'img_set must be {"id": ..., "members": [image names]}'}

    circo = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", circo)
    _append_json(circo / "annotations/val.json",
                 {"id": 7, "reference_img_id": 11, "target_img_id": 12, "gt_img_ids": 12},
                 {"id": 8, "reference_img_id": 11.5, "target_img_id": 12},
                 {"id": 9, "reference_img_id": True, "target_img_id": 12})
    report = import_dataset(db, "circo", circo, split="val")
    assert report.pairs_added == 2
    reasons = {p.item: p.reason for p in report.problems}
    assert reasons["val query 7"] == "gt_img_ids must be a list of image ids, not int"
    assert "not a CIRCO image id" in reasons["val query 8"] and "not a CIRCO image id" in reasons["val query 9"]

    g4c = tmp_path / "g4c"
    shutil.copytree(FIXTURES / "good4cir", g4c)
    _append_json(g4c / "dataset.json",
                 {"reference_image": {"path": "images/hotel_a.jpg"}, "target_image": "images/hotel_b.jpg"},
                 {"id": "g9", "reference_image": "images/hotel_a.jpg", "target_image": "images/hotel_b.jpg",
                  "difference_captions": [None, 3]})
    report = import_dataset(db, "good4cir", g4c / "dataset.json", split="train")
    assert report.pairs_added == 3
    assert [(p.item, p.reason.split(",")[0]) for p in report.problems] == [
        ("dataset.json[3]", "reference_image must be an image path or URL (a string)"),
        ("dataset.json[4]", "difference_captions must be a list of strings")]

    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    with (folder / "pairs.jsonl").open("a") as handle:
        handle.write('{"id": "t", "reference": "images/room0.png", "target": 7}\n')
        handle.write('{"id": "c", "reference": "images/room0.png", "target": "images/room1.png", "captions": [1]}\n')
    report = import_dataset(db, "pairs", folder)
    assert report.pairs_added == 3
    assert [p.item for p in report.problems] == ["pairs.jsonl line 4", "pair 'c' (pairs.jsonl line 5)"]
    assert report.problems[0].reason == '"target" must be an image path or URL (a string), not int'


def test_text_that_is_not_utf8_names_the_file_or_line_and_a_bom_is_fine(tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    lines = (FIXTURES / "pairs/pairs.jsonl").read_bytes().splitlines()
    # line 2 in Latin-1; a caption holding U+2028 (valid raw inside a JSON string); a BOM
    lines[1] = lines[1].replace(b'"add a plant"', b'"caf\xe9"')
    lines[2] = lines[2].replace(b'"remove the chair"', '"remove\u2028the chair"'.encode())
    (folder / "pairs.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    (folder / "scenes.jsonl").write_bytes(b"\xff\xfe\n" + (FIXTURES / "pairs/scenes.jsonl").read_bytes())
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder)
    assert report.pairs_added == 2 and set(pairs_of(db)) == {"p0", "p2"}
    assert [(p.item, p.reason) for p in report.problems] == [
        ("pairs.jsonl line 2", "not UTF-8 text (byte 114: invalid continuation byte)")]
    assert [w.item for w in report.warnings] == ["scenes.jsonl line 1"]
    assert pairs_of(db)["p2"].original_captions == ["remove\u2028the chair"]

    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    (cirr / "captions/cap.rc2.val.json").write_bytes(b'[{"caption": "caf\xe9"}]')
    with pytest.raises(FormatError, match=r"cap\.rc2\.val\.json: not UTF-8 text"):
        import_dataset(db, "cirr", cirr, split="val")
    circo = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", circo)
    (circo / "annotations/val.json").write_bytes(b"\xef\xbb\xbf" + (FIXTURES / "circo/annotations/val.json").read_bytes())
    assert import_dataset(db, "circo", circo, split="val").pairs_added == 2


def test_a_duplicate_id_in_one_file_is_a_problem_and_reimport_adds_nothing(tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    with (folder / "pairs.jsonl").open("a") as handle:
        handle.write('{"id": "p0", "reference": "images/room1.png", "target": "images/room0.png"}\n')
    db = open_db(tmp_path / "s.db")
    for _ in range(2):
        report = import_dataset(db, "pairs", folder)
        assert [p.item for p in report.problems] == ["pair 'p0' (pairs.jsonl line 4)"]
        assert "duplicate id 'p0'" in report.problems[0].reason
    assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 3
    assert report.pairs_added == 0 and report.pairs_skipped == 3
    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    entries = json.loads((cirr / "captions/cap.rc2.val.json").read_text())
    _append_json(cirr / "captions/cap.rc2.val.json", dict(entries[0], caption="another caption"))
    report = import_dataset(db, "cirr", cirr, split="val")
    assert report.pairs_added == 2 and [p.item for p in report.problems] == ["val pairid 0"]


def test_images_outside_the_dataset_folder_are_noted_and_shown_only_when_named(tmp_path):
    from store.exporters import export_dataset
    from ui.security import ImageRefusedError, resolve_image

    # An export names its images by absolute path. Imported elsewhere, they are outside
    # that folder: the import says so once per folder, and the app shows them only when
    # --images names a folder that holds them (a dataset file cannot widen that itself).
    db = open_db(tmp_path / "a.db")
    import_dataset(db, "pairs", FIXTURES / "pairs")
    export = tmp_path / "out" / "export.jsonl"
    export_dataset(db, "jsonl", export, include_unreviewed=True)
    other = open_db(tmp_path / "b.db")
    report = import_dataset(other, "pairs", export)
    assert report.pairs_added == 3 and report.problems == []
    assert len(report.warnings) == 1 and "--images" in report.warnings[0].reason
    image_ids = [row[0] for row in other.execute("SELECT id FROM images").fetchall()]
    with pytest.raises(ImageRefusedError, match="outside"):
        resolve_image(other, image_ids[0])
    third = open_db(tmp_path / "c.db")
    report = import_dataset(third, "pairs", export, images_dir=FIXTURES / "pairs")
    assert report.pairs_added == 3 and report.warnings == []
    assert all(resolve_image(third, i).media_type == "image/png" for i in image_ids)
    # A file linked in from elsewhere is imported and noted (the app refuses it);
    # "../../etc/passwd" is a problem naming its line.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    elsewhere = tmp_path / "elsewhere.png"
    from PIL import Image
    Image.new("RGB", (32, 32), "teal").save(elsewhere)  # content of its own (ids are hashes)
    (folder / "images" / "link.png").symlink_to(elsewhere)
    deep = "../" * len(folder.resolve().parts) + "etc/passwd"
    with (folder / "pairs.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "l", "reference": "images/link.png", "target": "images/room0.png"}) + "\n")
        handle.write(json.dumps({"id": "x", "reference": deep, "target": "images/room0.png"}) + "\n")
    fourth = open_db(tmp_path / "d.db")
    report = import_dataset(fourth, "pairs", folder)
    assert report.pairs_added == 4 and [p.item for p in report.problems] == ["pair 'x' (pairs.jsonl line 5)"]
    assert "not an image" in report.problems[0].reason
    assert [w.item for w in report.warnings] == ["images/link.png"]
    with pytest.raises(ImageRefusedError, match="outside"):
        resolve_image(fourth, pairs_of(fourth)["l"].reference_id)


def test_cirr_images_folder_elsewhere_with_images(tmp_path):
    # The layout many CIR codebases use: annotations in cirr/, images beside it.
    base = tmp_path / "cirr_dataset"
    shutil.copytree(FIXTURES / "cirr", base / "cirr")
    for folder in ("train", "dev", "test1"):
        (base / "cirr" / folder).rename(base / folder)
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "cirr", base / "cirr", images_dir=base)
    assert (report.pairs_added, report.problems, report.warnings) == (5, [], [])
    from ui.security import resolve_image
    assert all(resolve_image(db, i).path.is_file() for (i,) in db.execute("SELECT id FROM images"))
    with pytest.raises(FormatError, match="no such folder"):
        import_dataset(db, "cirr", base / "cirr", images_dir=tmp_path / "nope")


def test_a_broken_split_file_is_a_problem_and_the_other_splits_import_whole(tmp_path, monkeypatch):
    import store.importers._session as session

    monkeypatch.setattr(session, "BATCH_PAIRS", 1)  # writes as a large import does, in batches
    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    (cirr / "captions/cap.rc2.test1.json").write_text("[{")
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "cirr", cirr)
    assert set(pairs_of(db)) == {"train:0", "train:1", "val:0", "val:1"} and report.pairs_added == 4
    assert [p.item for p in report.problems] == ["CIRR split test1"]
    assert "cap.rc2.test1.json: not valid JSON" in report.problems[0].reason
    (cirr / "image_splits/split.rc2.val.json").unlink()
    with pytest.raises(FormatError, match=r"split\.rc2\.val\.json: missing"):
        import_dataset(open_db(tmp_path / "t.db"), "cirr", cirr, split="val")  # the split asked for
    circo = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", circo)
    (circo / "annotations/test.json").write_text('{"not": "a list"}')
    report = import_dataset(db, "circo", circo)
    assert report.pairs_added == 2 and [p.item for p in report.problems] == ["test.json"]


def test_cli_import_into_a_file_that_is_not_a_store_is_a_clear_error(tmp_path):
    from store import StoreError

    notes = tmp_path / "notes.db"
    notes.write_text("these are notes, not a store\n" * 20)
    with pytest.raises(StoreError, match="notes.db: not a good4cir store"):
        main(["import", "--db", str(notes), "--format", "pairs", str(FIXTURES / "pairs")])
    assert notes.read_text().startswith("these are notes")  # left as it was


def test_cirr_img_set_ranks_survive_import_and_export(tmp_path):
    from store.exporters import export_dataset

    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    entries = json.loads((cirr / "captions/cap.rc2.test1.json").read_text())
    for entry in entries:  # as CIRR's own files have them
        entry["img_set"].update({"reference_rank": 3, "target_rank": 4})
    (cirr / "captions/cap.rc2.test1.json").write_text(json.dumps(entries))
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "cirr", cirr, split="test1")
    export_dataset(db, "cirr", tmp_path / "test1.json", include_unreviewed=True, split="test1")
    assert json.loads((tmp_path / "test1.json").read_text()) == entries


def test_an_empty_file_says_so(tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    (folder / "pairs.jsonl").write_text("\n  \n")
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder)
    assert report.pairs_added == 0
    assert [(w.item, w.reason) for w in report.warnings] == [("pairs.jsonl", "the file is empty: no pairs to import")]
    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    (cirr / "captions/cap.rc2.val.json").write_text("")
    with pytest.raises(FormatError, match=r"cap\.rc2\.val\.json: the file is empty"):
        import_dataset(db, "cirr", cirr, split="val")
    good = tmp_path / "dataset.json"
    good.write_text(" \n")
    with pytest.raises(FormatError, match="dataset.json: the file is empty"):
        import_dataset(db, "good4cir", good)


def test_a_pair_whose_reference_and_target_are_one_image_is_a_problem(tmp_path):
    # A typo (the same file twice) or a byte copy under another name: a CIR pair of one
    # image has no modification to describe, and the VLM would be paid to say so.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    shutil.copy(folder / "images/room0.png", folder / "images/room0_copy.png")
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in [
        {"reference": "images/room0.png", "target": "images/room0.png"},
        {"reference": "images/room0.png", "target": "images/room0_copy.png"},
        {"reference": "images/room0.png", "target": "images/room0_edit.png"},
    ]) + "\n")
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder)
    assert report.pairs_added == 1
    assert [p.item for p in report.problems] == [
        "pair 'images/room0.png|images/room0.png' (pairs.jsonl line 1)",
        "pair 'images/room0.png|images/room0_copy.png' (pairs.jsonl line 2)"]
    assert all("same image" in p.reason for p in report.problems)
    (folder / "dataset.json").write_text(json.dumps([
        {"reference_image": "images/room1.png", "target_image": "images/room1.png"}]))
    report = import_dataset(db, "good4cir", folder / "dataset.json")
    assert report.pairs_added == 0 and "same image" in report.problems[0].reason


def test_a_cirr_pair_whose_reference_and_target_are_one_image_is_a_problem(tmp_path):
    # The pairs and good4cir importers refuse such a pair; the CIRR importer stored it,
    # and annotate would pay a VLM to describe no change.
    root = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", root)
    captions = root / "captions" / "cap.rc2.val.json"
    entries = json.loads(captions.read_text())
    entries[1]["target_hard"] = entries[1]["reference"]
    captions.write_text(json.dumps(entries))
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "cirr", root, split="val")
    assert report.pairs_added == 1
    assert [p.item for p in report.problems] == ["val pairid 1"]
    assert "same image" in report.problems[0].reason


def test_a_linked_image_folder_is_noted_once_not_once_per_subfolder(tmp_path):
    # CIRR's images are often a link (img_raw -> a big disk), and its train images lie in
    # a hundred subfolders: the import noted each subfolder, a hundred lines.
    root = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", root)
    disk = tmp_path / "disk" / "img_raw"
    disk.mkdir(parents=True)
    for folder in ("train", "dev", "test1"):
        (root / folder).rename(disk / folder)
    (root / "img_raw").symlink_to(disk)
    report = import_dataset(open_db(tmp_path / "a.db"), "cirr", root)
    assert (report.pairs_added, report.problems) == (5, [])
    (note,) = report.warnings
    assert "img_raw" in note.reason and f"--images {root / 'img_raw'}" in note.reason, note.reason
    report = import_dataset(open_db(tmp_path / "b.db"), "cirr", root, images_dir=root / "img_raw")
    assert (report.pairs_added, report.problems, report.warnings) == (5, [], [])
    # What the note says to do, into the same store: the pairs are there already, and the
    # images it stored are now shown (it changed nothing, and the app still refused them).
    from ui.security import resolve_image

    db = open_db(tmp_path / "a.db")
    report = import_dataset(db, "cirr", root, images_dir=root / "img_raw")
    assert (report.pairs_skipped, report.images_rerooted, report.warnings) == (5, 11, [])
    assert all(resolve_image(db, i).path.is_file() for (i,) in db.execute("SELECT id FROM images"))


def test_images_in_many_folders_outside_the_dataset_are_one_note(tmp_path):
    # An exported JSONL names its images by absolute path; a CIRR store's export spans a
    # hundred train subfolders, and its import noted each one, a hundred lines.
    from PIL import Image

    outside = tmp_path / "disk"
    lines = []
    for n in range(7):
        folder = outside / f"part{n}"
        folder.mkdir(parents=True)
        for side, colour in (("ref", (n * 30, 0, 0)), ("tgt", (0, n * 30, 200))):
            Image.new("RGB", (16, 16), colour).save(folder / f"{side}.png")
        lines.append({"id": str(n), "reference": str(folder / "ref.png"), "target": str(folder / "tgt.png")})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = import_dataset(open_db(tmp_path / "s.db"), "pairs", mine)
    assert (report.pairs_added, report.problems) == (7, [])
    (note,) = report.warnings
    assert "7 folders" in note.reason and str(outside) in note.reason and "--images" in note.reason


def test_a_circo_query_whose_target_is_its_reference_is_a_problem(tmp_path):
    # The CIRR, pairs and good4cir importers refuse a pair of one image; CIRCO's stored
    # it with no word, and annotate would pay a VLM to describe no change.
    circo = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", circo)
    _append_json(circo / "annotations/val.json",
                 {"id": 7, "reference_img_id": 11, "target_img_id": 11, "gt_img_ids": [11, 12],
                  "relative_caption": "is the same", "shared_concept": "a slice of cake"})
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "circo", circo, split="val")
    assert report.pairs_added == 2 and "val:7" not in pairs_of(db)
    assert [(p.item, p.reason.split(":")[0]) for p in report.problems] == [
        ("val query 7", "reference and target are the same image (same content)")]


def test_a_cirr_image_split_entry_that_is_not_a_path_says_so(tmp_path):
    # A number where the split file gives a path was looked up as a file: "cirr/5: file
    # not found", which names neither the image nor the file at fault.
    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    names_file = cirr / "image_splits/split.rc2.val.json"
    names = json.loads(names_file.read_text())
    names["dev-0-0-img1"] = 5
    names_file.write_text(json.dumps(names))
    report = import_dataset(open_db(tmp_path / "s.db"), "cirr", cirr, split="val")
    assert report.pairs_added == 1
    reasons = {p.item: p.reason for p in report.problems}
    assert reasons["val pairid 0"] == ("dev-0-0-img1: image_splits/split.rc2.val.json gives it 5, "
                                       "not a path to its image")


def test_a_circo_annotations_file_in_circos_layout_finds_its_images(tmp_path):
    # CIRCO/annotations/val.json with the images in CIRCO/COCO2017_unlabeled/unlabeled2017:
    # naming the file (as the README shows) said "no CIRCO images folder found".
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "circo", FIXTURES / "circo/annotations/val.json")
    assert report.problems == [] and report.pairs_added == 2
    assert set(pairs_of(db)) == {"val:0", "val:1"}


def test_a_cirr_split_that_is_not_there_names_the_splits_that_are(tmp_path):
    # --split test (CIRCO's name) or dev (CIRR's image folder) for CIRR said only that
    # cap.rc2.test.json was missing, not that the split is called test1.
    with pytest.raises(FormatError, match=r"cap\.rc2\.test\.json: missing .*CIRR's splits are train, val, "
                                          r"test1, and this root has captions for train, val, test1"):
        import_dataset(open_db(tmp_path / "s.db"), "cirr", FIXTURES / "cirr", split="test")


def test_an_id_that_is_a_fraction_or_a_list_is_named_as_such(tmp_path):
    # "pairid must be a number, not float" for 6.5: a float is a number; the id is not whole.
    cirr = tmp_path / "cirr"
    shutil.copytree(FIXTURES / "cirr", cirr)
    _append_json(cirr / "captions/cap.rc2.val.json", {"pairid": 6.5, "reference": "dev-0-0-img0"},
                 {"pairid": [6], "reference": "dev-0-0-img0"})
    db = open_db(tmp_path / "s.db")
    reasons = [p.reason for p in import_dataset(db, "cirr", cirr, split="val").problems]
    assert reasons == ["pairid must be a whole number, not 6.5", "pairid must be a whole number, not [6]"]
    circo = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", circo)
    _append_json(circo / "annotations/val.json", {"id": 2.5, "reference_img_id": 11})
    reasons = [p.reason for p in import_dataset(db, "circo", circo, split="val").problems]
    assert reasons == ["id must be a whole number, not 2.5"]


def test_an_image_set_or_ground_truth_entry_that_is_not_a_path_says_so(tmp_path):
    # [5, null] in img_set was looked up as files "5" and "None": "pairs/5: file not found".
    folder = tmp_path / "p"
    shutil.copytree(FIXTURES / "pairs", folder)
    line = json.loads((folder / "pairs.jsonl").read_text().splitlines()[0])
    line.update(id="typed", img_set=[line["reference"], 5, None], gt_images=[7])
    (folder / "pairs.jsonl").write_text(json.dumps(line) + "\n")
    report = import_dataset(open_db(tmp_path / "s.db"), "pairs", folder)
    assert report.pairs_added == 1
    assert [p.reason for p in report.problems] == [
        "left out of the image set: not an image path (a string), but int",
        "left out of the image set: not an image path (a string), but NoneType",
        "left out of its ground truths: not an image path (a string), but int"]


def test_a_symlink_loop_in_pairs_jsonl_or_scenes_is_a_problem_naming_the_line_not_a_crash(tmp_path):
    # A folder copied with its links can hold a loop (a.jpg -> b.jpg -> a.jpg): Path.resolve
    # raised RuntimeError("Symlink loop"), a traceback that stopped the whole import.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    (folder / "loop1.png").symlink_to(folder / "loop2.png")
    (folder / "loop2.png").symlink_to(folder / "loop1.png")
    with (folder / "pairs.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "loop", "reference": "loop1.png", "target": "images/room0.png"}) + "\n")
    with (folder / "scenes.jsonl").open("a") as handle:
        handle.write(json.dumps({"image": "loop2.png", "scene": {"wall": "x"}}) + "\n")
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder)
    assert report.pairs_added == 3
    (problem,) = report.problems
    assert problem.item == "pair 'loop' (pairs.jsonl line 4)"
    assert "loop1.png" in problem.reason and "loop of links" in problem.reason, problem.reason


def test_a_name_in_the_other_unicode_form_or_with_windows_backslashes_finds_its_file(tmp_path):
    # macOS writes 'café' decomposed (NFD) on disk, an editor types it composed (NFC); a
    # pairs.jsonl written on Windows says 'photos\\a.png'. Both were 'file not found' for a
    # file the user sees when listing the folder.
    import unicodedata

    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    composed = unicodedata.normalize("NFC", "café crème.png")
    (folder / "images/room0.png").rename(folder / "images" / unicodedata.normalize("NFD", composed))
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in [
        {"id": "nfc", "reference": f"images/{composed}", "target": "images\\room1.png"},
        {"id": "dos", "reference": ".\\images\\room1.png", "target": "images\\room1_edit.png"},
        {"id": "gone", "reference": "images\\nothing.png", "target": "images/room1_edit.png"},
    ]) + "\n", encoding="utf-8")
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder)
    assert report.pairs_added == 2
    (problem,) = report.problems
    assert problem.item == "pair 'gone' (pairs.jsonl line 3)" and "nothing.png: file not found" in problem.reason
    pairs = pairs_of(db)
    paths = dict(db.execute("SELECT id, path FROM images").fetchall())
    assert Path(paths[pairs["nfc"].reference_id]).is_file() and Path(paths[pairs["dos"].target_id]).is_file()
    assert pairs["nfc"].target_id == pairs["dos"].reference_id
    again = import_dataset(db, "pairs", folder)
    assert (again.pairs_added, again.pairs_skipped, len(again.problems)) == (0, 2, 1)


def test_a_pairs_file_whose_paths_were_respelled_does_not_import_its_pairs_twice(tmp_path):
    # A pair with no "id" is known by its two paths as written: after tidying the file
    # ('images\\room0.png' -> 'images/room0.png', or './'), a rerun imported every pair
    # again, silently, to be annotated and paid for twice.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    write = lambda *pairs: (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    write({"reference": "images\\room0.png", "target": "images\\room0_edit.png"},
          {"reference": "images/room1.png", "target": "images/room1_edit.png"})
    db = open_db(tmp_path / "s.db")
    assert import_dataset(db, "pairs", folder).pairs_added == 2
    write({"reference": "images/room0.png", "target": "./images/room0_edit.png"},
          {"reference": "./images/room1.png", "target": "images/room1_edit.png"},
          {"reference": "images/room1.png", "target": "images/./room1_edit.png"},
          {"id": "kept", "reference": "images/room1.png", "target": "images/room1_edit.png"})
    report = import_dataset(db, "pairs", folder)
    assert (report.pairs_added, report.pairs_skipped) == (1, 2)  # an "id" makes it a pair of its own
    (problem,) = report.problems
    assert problem.item.endswith("(pairs.jsonl line 3)") and "line 2" in problem.reason
    (note,) = report.warnings
    assert "2 pairs with no id" in note.reason and "skipped as already there" in note.reason, note.reason
    assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 3


def test_a_json_array_saved_as_pairs_jsonl_is_refused_whole_not_half_imported(tmp_path):
    # json.dump(pairs, f, indent=2) into pairs.jsonl: each line with a trailing comma was a
    # problem, and the last pair (no comma) imported on its own.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    pairs = [{"reference": "images/room0.png", "target": "images/room0_edit.png"},
             {"reference": "images/room1.png", "target": "images/room1_edit.png"}]
    for text in (json.dumps(pairs, indent=2), json.dumps(pairs)):
        (folder / "pairs.jsonl").write_text(text + "\n")
        db = open_db(tmp_path / "s.db")
        with pytest.raises(FormatError, match="one JSON array of 2 items, not JSON Lines"):
            import_dataset(db, "pairs", folder)
        assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 0


def test_a_file_url_is_percent_decoded(tmp_path):
    # Path.as_uri() and every tool that writes file URLs encode a space as %20 and 'é' as
    # %C3%A9: such a line was 'file not found'.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    (folder / "images/room0.png").rename(folder / "images/room 0 é.png")
    (folder / "pairs.jsonl").write_text(json.dumps(
        {"reference": (folder / "images/room 0 é.png").as_uri(),
         "target": "file://localhost" + str(folder / "images/room0_edit.png")}) + "\n")
    report = import_dataset(open_db(tmp_path / "s.db"), "pairs", folder)
    assert (report.pairs_added, report.problems) == (1, [])


def test_a_windows_drive_path_says_so_instead_of_naming_a_made_up_file(tmp_path):
    # 'C:\\data\\a.png' was joined to the folder: '/.../mine/C:\\data\\a.png: file not found'.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    (folder / "pairs.jsonl").write_text(json.dumps(
        {"id": "w", "reference": "C:\\data\\room0.png", "target": "images/room0_edit.png"}) + "\n")
    report = import_dataset(open_db(tmp_path / "s.db"), "pairs", folder)
    (problem,) = report.problems
    assert problem.reason.startswith("C:\\data\\room0.png: a Windows drive path"), problem.reason


def test_files_concatenated_each_with_its_bom_import_every_line(tmp_path):
    # `cat a.jsonl b.jsonl > pairs.jsonl` of two files a Windows editor saved: b's first
    # line began with a BOM and was 'not valid JSON (Unexpected UTF-8 BOM ...)'.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    bom = b"\xef\xbb\xbf"
    a = json.dumps({"reference": "images/room0.png", "target": "images/room0_edit.png"}).encode()
    b = json.dumps({"reference": "images/room1.png", "target": "images/room1_edit.png"}).encode()
    (folder / "pairs.jsonl").write_bytes(bom + a + b"\r\n" + bom + b + b"\r\n")
    report = import_dataset(open_db(tmp_path / "s.db"), "pairs", folder)
    assert (report.pairs_added, report.problems) == (2, [])


def test_a_path_too_long_or_with_a_nul_byte_is_a_problem_naming_the_line(tmp_path):
    # Both stopped the whole import: OSError 'File name too long' from a stat, and
    # ValueError 'embedded null byte' from the scenes lookup.
    folder = tmp_path / "mine"
    shutil.copytree(FIXTURES / "pairs", folder)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in [
        {"id": "long", "reference": "x" * 300 + ".png", "target": "images/room0.png"},
        {"id": "nul", "reference": "a\u0000b.png", "target": "images/room0.png"},
        {"id": "ok", "reference": "images/room1.png", "target": "images/room0.png"}]))
    report = import_dataset(open_db(tmp_path / "s.db"), "pairs", folder)
    assert report.pairs_added == 1
    assert [p.item for p in report.problems] == ["pair 'long' (pairs.jsonl line 1)", "pair 'nul' (pairs.jsonl line 2)"]


def test_a_folder_with_other_jsonl_files_but_no_pairs_jsonl_names_them(tmp_path):
    # A folder of train.jsonl and val.jsonl was only 'pairs.jsonl: not found'.
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("val.jsonl", "train.jsonl"):
        (folder / name).write_text("")
    with pytest.raises(FormatError, match=r"holds train\.jsonl, val\.jsonl: pass the JSON-lines file itself"):
        import_dataset(open_db(tmp_path / "s.db"), "pairs", folder)
