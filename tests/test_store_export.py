"""Export: which annotations and captions go out, provenance without secrets, CIRR
written back exactly, and import -> export -> import keeping pairs and captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from good4cir.cli import main
from store import NotFoundError, open_db
from store import annotations as ann
from store import review
from store.exporters import export_dataset
from store.importers import import_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def annotate_all(db, model="sim-1", prefix=""):
    run = ann.create_run(db, "simulator", model, prompt_versions={"stage1": "p1", "stage3": "p3"},
                         settings={"api_key": "sk-live-123", "nested": {"token": "t0k"}, "concurrency": 4},
                         base_url="https://user:pw@vlm.example.org/v1")
    pair_ids = [r[0] for r in db.execute("SELECT id FROM pairs WHERE target_id IS NOT NULL ORDER BY rowid")]
    ann.ensure_annotations(db, run.id, pair_ids)
    for i, pair_id in enumerate(pair_ids):
        ann.complete_annotation(
            db, ann.annotation_id_for(run.id, pair_id), stage1_id=None, stage2_id=None,
            captions=[f"{prefix}pair {i} caption {j}" for j in range(3)],
            compounds=[(f"{prefix}pair {i} caption 0 and caption 1", [0, 1], 12)],
        )
    return run, [ann.annotation_id_for(run.id, p) for p in pair_ids]


def read_good4cir(path) -> dict[tuple[str, str], list[str]]:
    return {(Path(e["reference_image"]).name, Path(e["target_image"]).name): e["difference_captions"]
            for e in json.loads(Path(path).read_text())}


@pytest.fixture
def reviewed(tmp_path):
    """pairs fixture, one run; p0 approved with an edit and a flag, p1 unreviewed, p2 rejected."""
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "pairs", FIXTURES / "pairs")
    run, ids = annotate_all(db)
    captions = review.list_captions(db, ids[0])
    review.edit_caption(db, captions[0].id, "the lamp is now red", "ana", expected_version=0)
    review.add_flag(db, ids[0], "caption", captions[1].id, "ana", reason="not a real difference")
    review.set_review_status(db, ids[0], "approved", "ana")
    review.set_review_status(db, ids[2], "rejected", "ben")
    return db, run, ids


def test_defaults_approved_only_edits_win_flags_left_out(reviewed, tmp_path):
    db, run, ids = reviewed
    stats = export_dataset(db, "good4cir", tmp_path / "out.json")
    # caption 1 is flagged, and the compound built from it goes too.
    assert read_good4cir(tmp_path / "out.json") == {
        ("room0.png", "room0_edit.png"): ["the lamp is now red", "pair 0 caption 2"]}
    assert (stats["pairs"], stats["captions"], stats["flagged_captions_left_out"]) == (1, 2, 2)

    export_dataset(db, "good4cir", tmp_path / "flagged.json", include_flagged=True)
    # the compound of captions 0 and 1 stays out: it still quotes caption 0's replaced text
    assert read_good4cir(tmp_path / "flagged.json")[("room0.png", "room0_edit.png")] == [
        "the lamp is now red", "pair 0 caption 1", "pair 0 caption 2"]

    export_dataset(db, "good4cir", tmp_path / "all.json", include_unreviewed=True)
    everything = read_good4cir(tmp_path / "all.json")
    assert set(everything) == {("room0.png", "room0_edit.png"), ("room1.png", "room1_edit.png")}  # rejected p2 never
    assert everything[("room1.png", "room1_edit.png")][0] == "pair 1 caption 0"


def test_newest_run_wins_unless_run_is_given(reviewed, tmp_path):
    db, first_run, _ = reviewed
    second_run, second_ids = annotate_all(db, model="sim-2", prefix="v2 ")
    review.set_review_status(db, second_ids[1], "approved", "ana")
    export_dataset(db, "good4cir", tmp_path / "newest.json")
    # p0's newest annotation (run 2) is unreviewed now, so only p1 (approved in run 2) goes out.
    assert read_good4cir(tmp_path / "newest.json") == {
        ("room1.png", "room1_edit.png"): ["v2 pair 1 caption 0", "v2 pair 1 caption 1", "v2 pair 1 caption 2",
                                          "v2 pair 1 caption 0 and caption 1"]}
    export_dataset(db, "good4cir", tmp_path / "first.json", run_id=first_run.id)
    assert set(read_good4cir(tmp_path / "first.json")) == {("room0.png", "room0_edit.png")}
    with pytest.raises(NotFoundError):
        export_dataset(db, "good4cir", tmp_path / "x.json", run_id=99)


def test_jsonl_has_provenance_and_never_a_key(reviewed, tmp_path):
    db, run, ids = reviewed
    out = tmp_path / "out.jsonl"
    export_dataset(db, "jsonl", out, include_unreviewed=True)
    text = out.read_text()
    assert "sk-live-123" not in text and "t0k" not in text and "pw@" not in text and "api_key" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["id"] for line in lines] == ["p0", "p1"]
    p0 = lines[0]
    assert p0["captions"] == ["the lamp is now red", "pair 0 caption 2"]
    assert p0["edits"] == [{"object": "lamp", "op": "recolour", "to": "red"}]  # the ground truth
    prov = p0["provenance"]
    assert prov["run"]["id"] == run.id and prov["run"]["backend"] == "simulator"
    assert prov["run"]["model"] == "sim-1" and prov["run"]["prompt_versions"] == {"stage1": "p1", "stage3": "p3"}
    assert prov["run"]["base_url"] == "https://vlm.example.org/v1"
    assert prov["run"]["settings"] == {"nested": {}, "concurrency": 4}
    assert (prov["annotation"]["review_status"], prov["annotation"]["reviewer"]) == ("approved", "ana")
    edited = prov["captions"][0]
    assert edited["original_text"] == "pair 0 caption 0" and edited["text"] == "the lamp is now red"
    assert [(e["version"], e["editor"], e["action"]) for e in edited["edits"]] == [(1, "ana", "edit")]
    assert [f["reason"] for f in prov["flags"]] == ["not a real difference"]
    assert lines[1]["provenance"]["annotation"]["review_status"] == "unreviewed"


def test_cirr_import_exports_back_every_original_entry(tmp_path):
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "cirr", FIXTURES / "cirr")
    for split in ("train", "val", "test1"):
        out = tmp_path / f"cap.rc2.{split}.json"
        export_dataset(db, "cirr", out, include_unreviewed=True, split=split)
        original = json.loads((FIXTURES / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())
        assert json.loads(out.read_text()) == original, split
    # Without --include-unreviewed nothing has been approved, so nothing goes out.
    assert export_dataset(db, "cirr", tmp_path / "none.json")["captions"] == 0
    assert json.loads((tmp_path / "none.json").read_text()) == []


def test_cirr_export_of_generated_captions_numbers_entries(reviewed, tmp_path):
    db, run, ids = reviewed
    export_dataset(db, "cirr", tmp_path / "cap.json", include_unreviewed=True)
    entries = json.loads((tmp_path / "cap.json").read_text())
    assert [e["pairid"] for e in entries] == list(range(len(entries)))
    assert set(entries[0]) == {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"}
    assert entries[0]["reference"] == "images/room0.png" and entries[0]["target_hard"] == "images/room0_edit.png"
    p1 = [e for e in entries if e["reference"] == "images/room1.png"]
    assert p1[0]["img_set"]["members"] == ["images/room1.png", "images/room1_edit.png",
                                           "images/room1_near_a.png", "images/room1_near_b.png"]
    assert len({e["img_set"]["id"] for e in p1}) == 1


def test_cirr_pairids_of_generated_captions_are_unique_over_split_files_and_stable(tmp_path):
    # Each CIRR file numbered its generated captions from 0 (after the largest pairid kept
    # in that file): cap.rc2.train.json and cap.rc2.val.json both used 0, 1, 2, ..., and
    # those were pairids of the imported CIRR queries too. CIRR numbers its queries once
    # over all splits (val's first entries are 12060, 12062; a test1 one is 12063).
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "cirr", FIXTURES / "cirr")           # pairids 0 and 1 in each split
    imported = {json.loads(r[0])["pairid"] for r in db.execute("SELECT extra FROM pairs")}
    run, ids = annotate_all(db)                             # train and val: 4 pairs, 4 captions each

    def pairids(split=None, **kw) -> dict[str, int]:
        out = tmp_path / f"cap.{split}.json"
        export_dataset(db, "cirr", out, split=split, **kw)
        entries = json.loads(out.read_text())
        assert len({e["pairid"] for e in entries}) == len(entries)
        return {e["caption"]: e["pairid"] for e in entries}

    train, val = pairids("train", include_unreviewed=True), pairids("val", include_unreviewed=True)
    assert len(train) == len(val) == 8
    assert not set(train.values()) & set(val.values())      # one numbering over the split files
    assert not (set(train.values()) | set(val.values())) & imported
    # stable: the same caption keeps its pairid in a later export of another scope, after
    # more review, and after an edit (the same query, its text corrected)
    [val_annotation] = [a for a in ids if ann.get_annotation(db, a).pair_id in {
        r[0] for r in db.execute("SELECT id FROM pairs WHERE split = 'val'")}][-1:]
    review.set_review_status(db, val_annotation, "approved", "ana")
    caption = review.list_captions(db, val_annotation)[0]
    review.edit_caption(db, caption.id, caption.text + ", fixed", "ana")
    everything = pairids(include_unreviewed=True)
    assert {c: everything[c] for c in train} == train
    assert everything[caption.text + ", fixed"] == val[caption.text]
    approved = pairids("val")
    # (its compound still quotes the edited caption, and is left out)
    assert approved == {c: everything[c] for c in approved} and len(approved) == 3
    # test1's pair was not annotated: its imported caption goes out under its own pairid
    test1 = pairids("test1", include_unreviewed=True)
    assert list(test1.values()) == [0]


def stored_pairs(db) -> dict[tuple[str, str], tuple]:
    rows = db.execute("SELECT reference_id, target_id, original_captions, split, img_set FROM pairs").fetchall()
    return {(r[0], r[1]): (json.loads(r[2]), r[3], json.loads(r[4]) if r[4] else None) for r in rows}


@pytest.mark.parametrize("fmt", ["good4cir", "jsonl"])
def test_round_trip_import_export_import(tmp_path, fmt):
    db = open_db(tmp_path / "a.db")
    import_dataset(db, "pairs", FIXTURES / "pairs")
    import_dataset(db, "good4cir", FIXTURES / "good4cir" / "dataset.json", split="train")
    run, ids = annotate_all(db)
    review.edit_caption(db, review.list_captions(db, ids[0])[2].id, "an edited caption", "ana")
    review.set_review_status(db, ids[0], "approved", "ana")
    for annotation_id in ids[1:]:  # the rest: reset to no annotation, so originals go out
        db.execute("UPDATE annotations SET status = 'failed' WHERE id = ?", [annotation_id])
    out = tmp_path / ("dataset.json" if fmt == "good4cir" else "export.jsonl")
    export_dataset(db, fmt, out, include_unreviewed=True)

    again = open_db(tmp_path / "b.db")
    report = import_dataset(again, "good4cir" if fmt == "good4cir" else "pairs", out)
    assert report.problems == [] and report.pairs_added == 6
    before, after = stored_pairs(db), stored_pairs(again)
    assert set(after) == set(before)
    approved_key = db.execute("SELECT reference_id, target_id FROM pairs WHERE id = ?",
                              [ann.get_annotation(db, ids[0]).pair_id]).fetchone()
    for key, (captions, split, img_set) in before.items():
        if key == approved_key:  # the approved annotation's captions replace the originals
            captions = ["pair 0 caption 0", "pair 0 caption 1", "an edited caption",
                        "pair 0 caption 0 and caption 1"]
        assert after[key][0] == captions, key
        if fmt == "jsonl":  # jsonl also carries split and image sets
            assert after[key][1:] == (split, img_set)


def test_cli_export(reviewed, tmp_path, capsys):
    db, run, ids = reviewed
    db_path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    out = tmp_path / "cli.json"
    assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(out)]) == 0
    assert "wrote 1 pairs, 2 captions" in capsys.readouterr().out
    assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(out),
                 "--include-unreviewed", "--include-flagged", "--run", str(run.id)]) == 0
    assert len(read_good4cir(out)) == 2


def _jsonl_round_trip(tmp_path, fmt, root):
    """A store imported from `root` (no problems), its JSONL export of every pair, and a
    second store importing that file: (first store, second store, its report, the file)."""
    db = open_db(tmp_path / "a.db")
    assert import_dataset(db, fmt, root).problems == []
    out = tmp_path / f"{fmt}.jsonl"
    export_dataset(db, "jsonl", out, include_unreviewed=True)
    again = open_db(tmp_path / "b.db")
    return db, again, import_dataset(again, "pairs", out), out


def test_cirr_through_jsonl_keeps_every_pair_including_test1(tmp_path):
    db, again, report, _ = _jsonl_round_trip(tmp_path, "cirr", FIXTURES / "cirr")
    assert report.problems == [] and report.pairs_added == 5
    assert stored_pairs(again) == stored_pairs(db)
    assert again.execute("SELECT COUNT(*) FROM pairs WHERE target_id IS NULL").fetchone()[0] == 1
    # ... and back out as CIRR: the same test1 entry, minus CIRR's pairid bookkeeping.
    export_dataset(again, "cirr", tmp_path / "test1.json", include_unreviewed=True, split="test1")
    assert json.loads((tmp_path / "test1.json").read_text()) == json.loads(
        (FIXTURES / "cirr/captions/cap.rc2.test1.json").read_text())


def test_cli_export_to_a_path_it_cannot_write_is_a_clear_error(reviewed, tmp_path, capsys, monkeypatch):
    db, run, ids = reviewed
    db_path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)  # the CLI re-raises under pytest
    monkeypatch.delenv("GOOD4CIR_RAISE", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker / "out.json", tmp_path):  # a folder that is a file; an existing folder
        assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write the export to {out}:"), err
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no half-written file


def test_a_compound_still_quoting_a_caption_the_reviewer_edited_is_left_out(tmp_path):
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "pairs", FIXTURES / "pairs")
    run, ids = annotate_all(db)
    caps = {c.id.rsplit(":", 1)[1]: c for c in review.list_captions(db, ids[0])}
    review.edit_caption(db, caps["c0"].id, "the lamp is now green", "ana", expected_version=0)
    review.set_review_status(db, ids[0], "approved", "ana")
    out = tmp_path / "out.json"
    stats = export_dataset(db, "good4cir", out)
    # k0 joins c0 and c1 and still reads "pair 0 caption 0": the text the reviewer replaced
    assert read_good4cir(out)[("room0.png", "room0_edit.png")] == [
        "the lamp is now green", "pair 0 caption 1", "pair 0 caption 2"]
    assert stats["stale_compounds_left_out"] == 1
    export_dataset(db, "good4cir", out, include_flagged=True)  # not a flag: left out all the same
    assert len(read_good4cir(out)[("room0.png", "room0_edit.png")]) == 3
    # once the reviewer edits the compound too, it is their text and goes out
    review.edit_caption(db, caps["k0"].id, "the lamp is now green and caption 1", "ana", expected_version=0)
    export_dataset(db, "good4cir", out)
    assert read_good4cir(out)[("room0.png", "room0_edit.png")][-1] == "the lamp is now green and caption 1"
    # a source edit undone leaves nothing stale
    review.undo_caption_edit(db, caps["k0"].id, "ana")
    review.undo_caption_edit(db, caps["c0"].id, "ana")
    stats = export_dataset(db, "good4cir", out)
    assert read_good4cir(out)[("room0.png", "room0_edit.png")] == [
        "pair 0 caption 0", "pair 0 caption 1", "pair 0 caption 2", "pair 0 caption 0 and caption 1"]
    assert stats["stale_compounds_left_out"] == 0


def test_an_export_gets_the_usual_file_mode_not_a_private_one(reviewed, tmp_path):
    # It was written through mkstemp and kept its 0600: a colleague on the same machine
    # or a shared folder could not read the dataset.
    import os
    import stat

    db, _, _ = reviewed
    old = os.umask(0o022)
    try:
        out = tmp_path / "export" / "dataset.jsonl"
        export_dataset(db, "jsonl", out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["dataset.jsonl"]  # no temporary file left


def test_cli_export_before_review_says_why_nothing_was_written(tmp_path, capsys):
    # A new user exporting straight after `annotate` (or `import`) got 'wrote 0 pairs ...;
    # left out: 0 flagged captions, ...' and an empty file, with no word of the review step.
    db_path = tmp_path / "s.db"
    db = open_db(db_path)
    import_dataset(db, "pairs", FIXTURES / "pairs")
    out = tmp_path / "out.json"
    assert main(["export", "--db", str(db_path), "--format", "good4cir", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote 0 pairs" in said and "3 pairs never annotated" in said and "--include-unreviewed" in said
    annotate_all(db)
    assert main(["export", "--db", str(db_path), "--format", "good4cir", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs_awaiting_review"] == 3
    assert main(["export", "--db", str(db_path), "--format", "good4cir", "--out", str(out), "--split", "train"]) == 0
    said = capsys.readouterr().out
    assert "1 annotated pair awaiting review" in said and "good4cir app --db" in said
    assert "never annotated" not in said


def test_cli_export_says_which_older_run_holds_approvals_the_newest_run_hides(reviewed, tmp_path, capsys):
    # A reviewer approved run 1's annotations, then a newer run covered the same pairs: the
    # export (each pair's newest annotation) wrote nothing and said to approve the pairs in
    # the app, where what was wanted is --run 1.
    db, first_run, _ = reviewed
    annotate_all(db, model="sim-2", prefix="v2 ")
    db_path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    out = tmp_path / "out.json"
    assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote 0 pairs" in said and "3 annotated pairs awaiting review" in said
    assert f"1 of them has an approved annotation of the older run {first_run.id}" in said
    assert f"--run {first_run.id}" in said
    assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["awaiting_approved_in_runs"] == {str(first_run.id): 1}


def test_export_of_a_split_the_store_does_not_have_is_a_clear_error(reviewed, tmp_path):
    # A mistyped --split ('tran') wrote an empty file and said 'wrote 0 pairs'.
    db, _, _ = reviewed
    with pytest.raises(ValueError, match=r"no pairs of split 'tran' \(splits present: test, train, val\)"):
        export_dataset(db, "good4cir", tmp_path / "out.json", split="tran")
    assert not (tmp_path / "out.json").exists()


def test_cli_export_of_cirr_test1_does_not_say_to_annotate_it(tmp_path, capsys):
    # test1 withholds its targets, so annotate leaves its pairs out; export said '1 pair
    # never annotated left out: annotate them (good4cir annotate)', which cannot work.
    db_path = tmp_path / "s.db"
    db = open_db(db_path)
    import_dataset(db, "cirr", FIXTURES / "cirr")
    annotate_all(db)
    out = tmp_path / "cap.rc2.test1.json"
    assert main(["export", "--db", str(db_path), "--format", "cirr", "--out", str(out), "--split", "test1"]) == 0
    said = capsys.readouterr().out
    assert "wrote 0 pairs" in said and "good4cir annotate" not in said and "never annotated" not in said
    assert "1 pair without a target image (its split withholds it" in said and "--include-unreviewed" in said
    assert main(["export", "--db", str(db_path), "--format", "cirr", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["pairs_not_annotated"], report["pairs_withheld_target"]) == (0, 1)


def _second_run_over_one_pair(db, first_ids):
    """Run 2 annotated one pair (the first run's first) with one caption."""
    run = ann.create_run(db, "simulator", "sim-2")
    p0 = first_ids[0].split(":", 1)[1]
    ann.ensure_annotations(db, run.id, [p0])
    ann.complete_annotation(db, ann.annotation_id_for(run.id, p0), stage1_id=None, stage2_id=None,
                            captions=["v2 pair 0 caption 0"])
    return run


def test_a_runs_export_holds_that_runs_pairs_only(reviewed, tmp_path):
    # Exporting one run with unreviewed pairs included wrote every pair that run did not
    # annotate with its imported captions (the demo world's ground truth, a dataset's
    # old captions) as if they were the run's: 39 pairs for a 20-pair run.
    db, first_run, first_ids = reviewed
    run = _second_run_over_one_pair(db, first_ids)
    stats = export_dataset(db, "good4cir", tmp_path / "run2.json", run_id=run.id, include_unreviewed=True)
    assert read_good4cir(tmp_path / "run2.json") == {("room0.png", "room0_edit.png"): ["v2 pair 0 caption 0"]}
    total = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
    assert stats["pairs"] == 1 and stats["pairs_not_in_run"] == total - 1
    # without a run, a pair no run annotated still goes out with its imported captions
    stats = export_dataset(db, "good4cir", tmp_path / "all.json", include_unreviewed=True)
    assert stats["pairs_not_in_run"] == 0


def test_cli_export_of_a_run_says_which_pairs_it_left_out(reviewed, tmp_path, capsys):
    db, first_run, first_ids = reviewed
    run = _second_run_over_one_pair(db, first_ids)
    db_path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    total = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
    assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(tmp_path / "r.json"),
                 "--include-unreviewed", "--run", str(run.id)]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 pairs" in out and f"{total - 1} pairs run {run.id} did not annotate left out" in out


def test_a_cirr_export_of_several_splits_says_cirr_keeps_one_per_file(tmp_path, capsys):
    # CIRR has no split field: its file name says the split. An export without --split
    # wrote train, val and test1 entries into one file with no word, and importing that
    # file back put every pair, val and test1's too, under one split.
    db_path = tmp_path / "s.db"
    import_dataset(open_db(db_path), "cirr", FIXTURES / "cirr")
    out = tmp_path / "cap.rc2.train.json"
    args = ["export", "--db", str(db_path), "--format", "cirr", "--out", str(out), "--include-unreviewed"]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == ["test1", "train", "val"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "mixes splits test1, train, val" in said and "--split" in said
    assert main(args + ["--split", "val"]) == 0
    assert "mixes" not in capsys.readouterr().out


def _authors_export_of(tmp_path, capsys, fmt, path):
    """What `export --format good4cir --include-unreviewed` says of a store imported from
    `path`, and its arguments."""
    db_path = tmp_path / "s.db"
    import_dataset(open_db(db_path), fmt, path)
    args = ["export", "--db", str(db_path), "--format", "good4cir", "--out", str(tmp_path / "d.json"),
            "--include-unreviewed"]
    assert main(args) == 0
    return capsys.readouterr().out, args


def test_a_good4cir_export_of_pairs_with_splits_says_the_format_keeps_none(tmp_path, capsys):
    # The authors' dataset.json has no split field: an export of train and test pairs
    # wrote them into one list with no word, and importing it back lost which was which.
    said, _ = _authors_export_of(tmp_path, capsys, "pairs", FIXTURES / "pairs")
    assert "no split field" in said and "--format jsonl" in said, said


def test_a_good4cir_export_says_generated_captions_took_the_place_of_imported_ones(tmp_path, capsys):
    # The authors' dataset.json came with its own difference_captions; once annotated, an
    # export in that format held only the generated captions and did not say so.
    db_path = tmp_path / "s.db"
    db = open_db(db_path)
    import_dataset(db, "good4cir", FIXTURES / "good4cir" / "dataset.json")
    run = ann.create_run(db, backend="simulator", model="m", settings={}, prompt_versions={})
    pair_id = db.execute("SELECT id FROM pairs WHERE original_captions != '[]' LIMIT 1").fetchone()[0]
    ann.ensure_annotations(db, run.id, [pair_id])
    ann.complete_annotation(db, ann.annotation_id_for(run.id, pair_id), stage1_id=None, stage2_id=None,
                            captions=["a generated caption"])
    args = ["export", "--db", str(db_path), "--format", "good4cir", "--out", str(tmp_path / "d.json"),
            "--include-unreviewed"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "1 pair had captions of its own" in said and "--format jsonl" in said, said
    assert main(args[:4] + ["jsonl", "--out", str(tmp_path / "d.jsonl"), "--include-unreviewed"]) == 0
    assert "captions of its own" not in capsys.readouterr().out  # jsonl keeps them


def test_a_good4cir_export_says_it_left_out_the_pairs_without_a_target(tmp_path, capsys):
    # The authors' format has no target-less query: CIRR's test1 pairs were dropped from
    # an --include-unreviewed export ("wrote 4 pairs" of 5) with no word of the other one.
    said, args = _authors_export_of(tmp_path, capsys, "cirr", FIXTURES / "cirr")
    assert "wrote 4 pairs" in said
    assert "1 pair without a target image left out: the authors' format has no" in said, said
    assert "--format jsonl" in said
    assert main(args + ["--split", "val"]) == 0
    assert "without a target" not in capsys.readouterr().out


def _gt_ids(db) -> dict[tuple[str, str], list[str]]:
    rows = db.execute("SELECT reference_id, target_id, extra FROM pairs").fetchall()
    return {(r[0], r[1]): json.loads(r[2]).get("gt_image_ids") for r in rows}


def test_circo_ground_truths_survive_jsonl_and_are_read_from_it(tmp_path):
    # A CIRCO query's ground truths beyond its target were written as this store's image
    # ids only: a store importing the JSONL back (or `--data` reading it) held no image
    # under them, so eval dropped them and the mAP of several ground truths was gone.
    import shutil

    from PIL import Image

    from retrieval.data import load_file_triplets
    from store.images import hash_file

    root = tmp_path / "circo"
    shutil.copytree(FIXTURES / "circo", root)
    only_truth = root / "COCO2017_unlabeled/unlabeled2017/000000000030.jpg"
    Image.new("RGB", (32, 24), (9, 99, 199)).save(only_truth)
    queries = json.loads((root / "annotations/val.json").read_text())
    queries[1]["gt_img_ids"].append(30)  # an image that is no query's reference or target
    (root / "annotations/val.json").write_text(json.dumps(queries))
    db, again, report, out = _jsonl_round_trip(tmp_path, "circo", root)
    assert report.problems == [] and report.pairs_added == 3
    assert _gt_ids(again) == _gt_ids(db)
    stored = {row[0] for row in again.execute("SELECT id FROM images")}
    assert hash_file(only_truth) in stored
    assert stored == {row[0] for row in db.execute("SELECT id FROM images")}

    data = load_file_triplets(out, keep_targetless=True)
    truths = {key for t in data.triplets for key in t.extra.get("gt_image_ids") or []}
    assert hash_file(only_truth) in truths
    assert truths <= set(data.gallery_keys(data.split("val")))


def test_generated_captions_read_back_from_jsonl_do_not_take_cirrs_pairids(tmp_path):
    # An annotated CIRR pair exported to JSONL carries its generated captions and, in
    # extra, the pairid of CIRR's own caption. Imported back, the first generated caption
    # went out in a CIRR export under that pairid: CIRR's query 0 with another text.
    db = open_db(tmp_path / "a.db")
    import_dataset(db, "cirr", FIXTURES / "cirr")
    annotate_all(db)
    export_dataset(db, "jsonl", tmp_path / "all.jsonl", include_unreviewed=True)
    again = open_db(tmp_path / "b.db")
    assert import_dataset(again, "pairs", tmp_path / "all.jsonl").problems == []
    export_dataset(again, "cirr", tmp_path / "val.json", include_unreviewed=True, split="val")
    entries = json.loads((tmp_path / "val.json").read_text())
    cirr_own = {e["pairid"]: e["caption"] for split in ("train", "val", "test1")
                for e in json.loads((FIXTURES / f"cirr/captions/cap.rc2.{split}.json").read_text())}
    assert len(entries) == 8 and all(e["caption"].startswith("pair ") for e in entries)
    # new pairids, after CIRR's own (as in the store the file came from)
    assert min(e["pairid"] for e in entries) > max(cirr_own)
    assert len({e["pairid"] for e in entries}) == len(entries)
    # test1 was never annotated: its own caption keeps its pairid, for the test server
    export_dataset(again, "cirr", tmp_path / "test1.json", include_unreviewed=True, split="test1")
    assert json.loads((tmp_path / "test1.json").read_text()) == json.loads(
        (FIXTURES / "cirr/captions/cap.rc2.test1.json").read_text())


def test_a_cirr_pairid_given_as_a_string_is_written_back_as_it_was(tmp_path):
    # The importer takes a pairid written as a string ("7"); the export gave that caption
    # a new number instead, so the file no longer matched the dataset it came from.
    root = tmp_path / "cirr"
    import shutil

    shutil.copytree(FIXTURES / "cirr", root)
    captions_file = root / "captions/cap.rc2.val.json"
    entries = json.loads(captions_file.read_text())
    entries[1]["pairid"] = "7"
    captions_file.write_text(json.dumps(entries))
    db = open_db(tmp_path / "s.db")
    assert import_dataset(db, "cirr", root, split="val").problems == []
    export_dataset(db, "cirr", tmp_path / "val.json", include_unreviewed=True, split="val")
    assert json.loads((tmp_path / "val.json").read_text()) == entries


def test_a_jsonl_export_of_a_store_of_several_datasets_imports_back_whole(tmp_path):
    # A store of CIRR and CIRCO (or two demo worlds) holds pairs with the same external
    # id under their own sources ("val:0" twice). Read back from JSONL under one source,
    # every second one was refused as a duplicate id and lost. Each line's source (our
    # export writes it) now keeps them apart, and the pairs keep their ids.
    db = open_db(tmp_path / "a.db")
    import_dataset(db, "circo", FIXTURES / "circo", source="circo_a")
    import_dataset(db, "circo", FIXTURES / "circo", source="circo_b")
    import_dataset(db, "cirr", FIXTURES / "cirr")
    out = tmp_path / "all.jsonl"
    export_dataset(db, "jsonl", out, include_unreviewed=True)
    again = open_db(tmp_path / "b.db")
    report = import_dataset(again, "pairs", out)
    assert report.problems == [] and report.pairs_added == 11

    def rows(store):
        return sorted(store.execute("SELECT id, source, external_id, split FROM pairs").fetchall())

    assert rows(again) == rows(db)
    # idempotent, and --source still names one dataset for the whole file
    assert import_dataset(again, "pairs", out).pairs_skipped == 11
    other = open_db(tmp_path / "c.db")
    report = import_dataset(other, "pairs", FIXTURES / "pairs")
    assert {r[0] for r in other.execute("SELECT DISTINCT source FROM pairs")} == {"pairs"}


def test_a_ground_truth_the_store_holds_no_image_for_is_kept_and_exports_still(tmp_path):
    # A store read from a JSONL export made before gt_images lists ground truths by ids it
    # holds no image for: exporting it crashed (LookupError) once gt_images were written.
    db = open_db(tmp_path / "a.db")
    import_dataset(db, "circo", FIXTURES / "circo", split="val")
    pair_id, extra = db.execute("SELECT id, extra FROM pairs WHERE external_id = 'val:0'").fetchone()
    extra = json.loads(extra)
    extra["gt_image_ids"].append("f" * 64)
    db.execute("UPDATE pairs SET extra = ? WHERE id = ?", [json.dumps(extra), pair_id])
    db.conn.commit()
    out = tmp_path / "out.jsonl"
    export_dataset(db, "jsonl", out, include_unreviewed=True)
    line = next(json.loads(t) for t in out.read_text().splitlines() if json.loads(t)["id"] == "val:0")
    assert len(line["gt_images"]) == len(extra["gt_image_ids"]) - 1
    again = open_db(tmp_path / "b.db")
    assert import_dataset(again, "pairs", out).problems == []
    assert _gt_ids(again) == _gt_ids(db)


def test_cli_export_counts_rejected_pairs_among_those_left_out(reviewed, tmp_path, capsys):
    # 'wrote 1 pairs ...; 1 annotated pair awaiting review left out' and not a word of the
    # rejected pair: the counts did not add up to the store's pairs.
    db, _, _ = reviewed
    db_path = db.conn.execute("PRAGMA database_list").fetchone()[2]
    out = tmp_path / "out.json"
    assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "1 pair rejected in review left out" in said, said
    assert main(["export", "--db", db_path, "--format", "good4cir", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs_rejected"] == 1


def test_an_export_removes_the_temporary_file_a_killed_export_left(reviewed, tmp_path):
    # A `kill -9` while writing leaves .<name>.<random>.tmp beside the file; every rerun
    # wrote another name, so nothing ever removed it.
    import os
    import time

    db, _, _ = reviewed
    out = tmp_path / "export" / "dataset.jsonl"
    out.parent.mkdir()
    stale = out.parent / f".dataset.jsonl.{'ab' * 16}.tmp"
    stale.write_text("half an export")
    others = [out.parent / f".other.jsonl.{'ab' * 16}.tmp", out.parent / ".dataset.jsonl.mine.tmp"]
    for path in [stale, *others]:
        path.write_text("x")
        os.utime(path, (time.time() - 600, time.time() - 600))
    export_dataset(db, "jsonl", out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["dataset.jsonl", *(p.name for p in others)])
