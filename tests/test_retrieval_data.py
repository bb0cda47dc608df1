"""Which captions training reads: --source, --captions, review state, edits and flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_retrieval_world import make_world_store

from retrieval.data import load_file_triplets, load_store_triplets, load_triplets, train_val_split
from store.annotations import annotation_id_for, complete_annotation, create_run, ensure_annotations
from store.db import open_db
from store.review import add_flag, edit_caption, set_review_status


@pytest.fixture()
def annotated(tmp_path):
    """A store where pair p0000 has an approved annotation (caption c0 edited, c1
    flagged; compounds of c0+c1, c0+c2 and c2+c3), p0001 an unreviewed one, p0002 a
    rejected one."""
    db_path = make_world_store(tmp_path, pairs=12)
    db = open_db(db_path)
    run = create_run(db, "simulator", "sim-1")
    ensure_annotations(db, run.id, ["p0000", "p0001", "p0002"])
    for pair_id in ("p0000", "p0001", "p0002"):
        complete_annotation(
            db, annotation_id_for(run.id, pair_id), stage1_id=None, stage2_id=None,
            captions=[f"{pair_id} first", f"{pair_id} second", f"{pair_id} third", f"{pair_id} fourth"],
            compounds=[(f"{pair_id} first and second", [0, 1], 9), (f"{pair_id} first and third", [0, 2], 9),
                       (f"{pair_id} third and fourth", [2, 3], 9)],
        )
    first = annotation_id_for(run.id, "p0000")
    edit_caption(db, f"{first}:c0", "p0000 first, edited", "ann")
    add_flag(db, first, "caption", f"{first}:c1", "ann", "object not there")
    set_review_status(db, first, "approved", "ann")
    set_review_status(db, annotation_id_for(run.id, "p0002"), "rejected", "ann")
    db.conn.close()
    return db_path


def _captions(data, pair_id):
    return next(t.captions for t in data.triplets if t.pair_id == pair_id)


def test_default_uses_approved_generated_else_original(annotated):
    data = load_store_triplets(annotated)
    assert len(data.triplets) == 12
    # approved: edited text wins; the flagged caption and the compound built on it are left
    # out, and so is the compound that still quotes the edited caption's old text
    assert _captions(data, "p0000") == ["p0000 first, edited", "p0000 third", "p0000 fourth",
                                        "p0000 third and fourth"]
    # unreviewed / rejected pairs fall back to their original captions
    original = json.loads(open_db(annotated).execute(
        "SELECT original_captions FROM pairs WHERE id = 'p0001'").fetchone()[0])
    assert _captions(data, "p0001") == original
    assert not any("p0002" in c for c in _captions(data, "p0002"))


def test_source_and_caption_kinds(annotated):
    generated = load_store_triplets(annotated, source="generated", captions="individual")
    assert [t.pair_id for t in generated.triplets] == ["p0000"]
    assert generated.triplets[0].captions == ["p0000 first, edited", "p0000 third", "p0000 fourth"]
    assert any("no caption for --source generated" in p for p in generated.problems)
    compound = load_store_triplets(annotated, source="generated", captions="compound")
    assert compound.triplets[0].captions == ["p0000 third and fourth"]
    both = load_store_triplets(annotated, source="both")
    original_count = len(_captions(load_store_triplets(annotated, source="original"), "p0000"))
    assert len(_captions(both, "p0000")) == original_count + 4
    original = load_store_triplets(annotated, source="original")
    assert not any("p0000" in c for c in _captions(original, "p0000"))
    unreviewed = load_store_triplets(annotated, source="generated", include_unreviewed=True)
    assert {t.pair_id for t in unreviewed.triplets} == {"p0000", "p0001"}  # never the rejected one
    with pytest.raises(ValueError, match="--source"):
        load_store_triplets(annotated, source="mine")


def test_training_reads_what_export_writes(annotated):
    from store.exporters import collect_items

    db = open_db(annotated)
    # A newer run's annotation of p0000, rejected: export does not fall back to the older
    # approved one, and neither does training.
    run = create_run(db, "simulator", "sim-2")
    ensure_annotations(db, run.id, ["p0000"])
    complete_annotation(db, annotation_id_for(run.id, "p0000"), stage1_id=None, stage2_id=None,
                        captions=["p0000 newer"], compounds=[])
    set_review_status(db, annotation_id_for(run.id, "p0000"), "rejected", "ann")
    for unreviewed in (False, True):
        exported = {item.pair.id: item.texts for item in collect_items(db, include_unreviewed=unreviewed)
                    if item.annotation is not None}
        data = load_store_triplets(annotated, source="generated", include_unreviewed=unreviewed)
        assert {t.pair_id: t.captions for t in data.triplets} == exported
    db.conn.close()
    assert load_store_triplets(annotated, source="generated").triplets == []
    assert not any("p0000" in c for c in _captions(load_store_triplets(annotated), "p0000"))


def test_mixing_stores_and_an_exported_file(tmp_path, annotated):
    other = make_world_store(tmp_path / "second", pairs=6, seed=3)
    images = sorted((tmp_path / "second" / "images").glob("*.png"))
    exported = tmp_path / "second" / "dataset.json"
    exported.write_text(json.dumps([
        {"reference_image": f"images/{images[0].name}", "target_image": str(images[1]),
         "difference_captions": ["make it different"]},
        {"reference_image": "images/missing.png", "target_image": f"images/{images[1].name}",
         "difference_captions": ["x"]},
        {"reference_image": f"images/{images[0].name}", "target_image": f"images/{images[2].name}"},
    ]))
    from_file = load_file_triplets(exported)
    assert len(from_file.triplets) == 1 and len(from_file.problems) == 2
    assert "missing.png not found" in from_file.problems[0]
    assert "no caption" in from_file.problems[1]
    soup = load_triplets([annotated, other], [exported])
    assert len(soup.triplets) == 12 + 6 + 1
    # the same file is one image, whichever dataset names it
    assert soup.triplets[-1].reference in soup.image_paths
    train, val = train_val_split(soup)
    assert {t.split for t in val} <= {"val", None} and len(train) > len(val) > 0
    with pytest.raises(ValueError, match="--db"):
        load_triplets([], [])


def test_withheld_targets_are_one_line_and_do_not_hide_other_problems(tmp_path, caplog):
    # A CIRR store: every train or eval logged its first 20 problems, one per pair, and
    # test1's thousands of withheld targets filled them, so a train pair whose image
    # is missing was never named (nor was there an 'and N more').
    from pathlib import Path

    db_path = make_world_store(tmp_path, pairs=40)
    db = open_db(db_path)
    db.execute("UPDATE pairs SET target_id = NULL, split = 'test1' WHERE id < 'p0030'")
    missing = db.execute("SELECT i.path FROM pairs p JOIN images i ON i.id = p.reference_id"
                         " WHERE p.id = 'p0039'").fetchone()[0]
    db.conn.commit()
    db.conn.close()
    Path(missing).unlink()
    caplog.set_level("WARNING", logger="retrieval.data")
    data = load_triplets([db_path])
    assert sum("withholds" in p for p in data.problems) == 30  # what eval's check reads
    lines = [r.getMessage() for r in caplog.records]
    withheld = [line for line in lines if "withhold" in line]
    assert len(withheld) == 1 and "30 pairs of split test1" in withheld[0], lines
    assert any("pair 39:" in line and "no local file" in line for line in lines), lines


def test_a_mix_refuses_a_dataset_that_gives_no_pairs(tmp_path, annotated):
    # `train --db w1.db --db w2.db --source generated` with w2 never annotated trained on
    # w1 alone: w2's pairs were 20 of the 'left out' lines, w2.db named nowhere, and the
    # run reported its triplets as if the soup were whole.
    other = make_world_store(tmp_path / "second", pairs=6, seed=3)
    with pytest.raises(ValueError, match=r"second/world\.db: none of its 6 pairs.*--source generated.*choose another --source"):
        load_triplets([annotated, other], source="generated")
    exported = tmp_path / "second" / "dataset.jsonl"
    exported.write_text(json.dumps({"reference": "images/missing.png", "target": "images/x.png",
                                    "captions": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"dataset\.jsonl: none of its 1 pair .*not found\); fix that"):
        load_triplets([annotated], [exported])
    # each dataset giving some pairs is a mix; one dataset alone keeps its own message
    assert len(load_triplets([annotated, other]).triplets) == 12 + 6
    assert load_triplets([other], source="generated").triplets == []


def test_a_file_that_cannot_tell_its_captions_apart_says_so(annotated, caplog):
    # The authors' dataset.json says nothing of where its captions come from: with
    # `--source original` or `--captions individual` it gave every caption, silently, so an
    # ablation run from it trained on the same captions as the run it was compared with.
    from good4cir.cli import main

    out = annotated.parent / "dataset.json"
    assert main(["export", "--db", str(annotated), "--format", "good4cir", "--out", str(out),
                 "--include-unreviewed"]) == 0
    caplog.set_level("WARNING", logger="retrieval.data")
    everything = load_file_triplets(out)
    assert not [r for r in caplog.records if "cannot pick" in r.getMessage()]
    for source, captions in (("original", "both"), ("generated", "individual"), ("auto", "compound")):
        caplog.clear()
        picked = load_file_triplets(out, source=source, captions=captions)
        assert [t.captions for t in picked.triplets] == [t.captions for t in everything.triplets]
        lines = [r.getMessage() for r in caplog.records if "cannot pick" in r.getMessage()]
        assert len(lines) == 1 and "dataset.json" in lines[0] and f"--source {source}" in lines[0], lines
        assert "--format jsonl" in lines[0]


def test_pairs_without_a_split_are_named_before_training_on_them(tmp_path, annotated, caplog):
    # dataset.json has no split: its pairs were split 90/10 at random without a word, so a
    # file exported with the test pairs in it trained on them, and eval on the store's test
    # split then scored pairs the model had seen.
    from good4cir.cli import main

    out = annotated.parent / "dataset.json"
    assert main(["export", "--db", str(annotated), "--format", "good4cir", "--out", str(out),
                 "--include-unreviewed"]) == 0
    caplog.set_level("WARNING", logger="retrieval.data")
    train, val = train_val_split(load_file_triplets(out))
    lines = [r.getMessage() for r in caplog.records if "no train, val or test split" in r.getMessage()]
    assert len(lines) == 1 and f"{len(train) + len(val)} pairs" in lines[0] and "--split train" in lines[0], lines
    caplog.clear()
    train_val_split(load_store_triplets(annotated))  # every pair has its split: nothing to say
    assert not [r for r in caplog.records if "no train, val or test split" in r.getMessage()]


def test_pairs_of_a_mix_keep_apart_when_their_datasets_reuse_ids(tmp_path):
    # Two demo worlds (or two CIRR-style stores) name their pairs alike, and a store's pair
    # id comes from (source, external id): in `eval --db w1.db --db w2.db` two different
    # pairs shared an id, and the bootstrap intervals (whole pairs resampled, by id) drew
    # them as one pair.
    first = make_world_store(tmp_path / "one", pairs=6, seed=1)
    second = make_world_store(tmp_path / "two", pairs=6, seed=2)
    exported = tmp_path / "two" / "dataset.jsonl"
    image = sorted((tmp_path / "two" / "images").glob("*.png"))
    exported.write_text(json.dumps({"id": "p0000", "reference": f"images/{image[0].name}",
                                    "target": f"images/{image[1].name}", "captions": ["x"]}) + "\n")
    soup = load_triplets([first, second], [exported])
    ids = [t.pair_id for t in soup.triplets]
    assert len(ids) == 13 and len(set(ids)) == 13, ids
    assert ids[:6] == [f"p000{i}" for i in range(6)]  # the first dataset keeps its own ids
    assert any(str(second) in pair_id for pair_id in ids[6:12]), ids


def test_left_out_pairs_and_images_are_named_as_the_user_knows_them(tmp_path):
    # 'pair 6dd645bfb52a0f061854317c: image 1716ec712e89 has no local file': two hashes,
    # where the user's dataset (and the review app) says val:1 and dev-0-0-img3.
    import shutil
    from pathlib import Path

    from store.importers import import_dataset

    root = tmp_path / "cirr"
    shutil.copytree(Path(__file__).parent / "fixtures" / "cirr", root)
    db_path = tmp_path / "s.db"
    import_dataset(open_db(db_path), "cirr", root)
    (root / "dev" / "dev-0-0-img3.png").unlink()
    problems = load_triplets([db_path]).problems
    (missing,) = [p for p in problems if "no local file" in p]
    assert missing.startswith("pair val:1: image dev-0-0-img3 has no local file"), missing
    assert str(root / "dev" / "dev-0-0-img3.png") in missing
    assert any(p.startswith("pair test1:0: no target") for p in problems), problems


def test_a_mix_that_trains_on_another_datasets_test_images_says_so(tmp_path, caplog):
    # Images are one key whatever dataset holds them: a second dataset that uses the first's
    # test and validation images in its train split trained on them with no word, and eval on
    # the first's test split then scored images the model had seen.
    import sqlite3

    from retrieval.train import TrainConfig, train

    first = make_world_store(tmp_path / "one", pairs=20, seed=1)
    conn = sqlite3.connect(first)
    held_out = conn.execute("SELECT r.path, t.path, p.split FROM pairs p JOIN images r ON r.id = p.reference_id"
                            " JOIN images t ON t.id = p.target_id WHERE p.split IN ('val', 'test')").fetchall()
    conn.close()
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "reference": ref, "target": tgt, "split": "train", "captions": ["x"]}) + "\n"
        for i, (ref, tgt, _) in enumerate(held_out)))
    from store.importers import import_dataset

    second = tmp_path / "two.db"
    import_dataset(open_db(second), "pairs", folder)
    tests = sum(split == "test" for *_, split in held_out)
    caplog.set_level("WARNING")
    train(TrainConfig(out=str(tmp_path / "model"), dbs=[str(first), str(second)], image_size=32, batch_size=8,
                      epochs=1, cache_dir=str(tmp_path / "cache"), progress=False, rerank=False))
    said = [r.getMessage() for r in caplog.records if "trains on" in r.getMessage()]
    assert len(said) == 2, said
    assert said[1].startswith(f"{tests} of the {tests} test pairs of {first} use an image that {second} trains on")
    assert "eval on split test scores images the model trained on" in said[1]
    assert said[0].startswith(f"{len(held_out) - tests} of the {len(held_out) - tests} validation pairs of {first}")
    caplog.clear()
    train(TrainConfig(out=str(tmp_path / "alone"), dbs=[str(first)], image_size=32, batch_size=8, epochs=1,
                      cache_dir=str(tmp_path / "cache"), progress=False, rerank=False))
    assert not [r for r in caplog.records if "trains on" in r.getMessage()]


def test_an_exported_file_keeps_a_pair_whose_image_set_member_is_gone(tmp_path):
    # train --db leaves a member without its file out of the image set and keeps the pair;
    # --data on the store's JSONL export left the whole pair out ("image ... not found"),
    # so the export trained on fewer triplets than the store it came from.
    import sqlite3

    from good4cir.cli import main

    db_path = make_world_store(tmp_path, pairs=20)
    out = tmp_path / "world.jsonl"
    assert main(["export", "--db", str(db_path), "--format", "jsonl", "--out", str(out), "--include-unreviewed"]) == 0
    conn = sqlite3.connect(db_path)
    used = {k for row in conn.execute("SELECT reference_id, target_id FROM pairs") for k in row}
    pair_id, members = next((pair_id, json.loads(img_set)) for pair_id, img_set in conn.execute(
        "SELECT id, img_set FROM pairs WHERE img_set IS NOT NULL ORDER BY rowid") if set(json.loads(img_set)) - used)
    gone = next(k for k in members if k not in used)
    path = conn.execute("SELECT path FROM images WHERE id = ?", [gone]).fetchone()[0]
    conn.close()
    Path(path).unlink()
    from_store, from_file = load_triplets([db_path]), load_triplets(files=[out])
    assert len(from_file.triplets) == len(from_store.triplets) == 20, from_file.problems
    pair = next(t for t in from_store.triplets if t.pair_id == pair_id)
    kept = next(t for t in from_file.triplets if (t.reference, t.target) == (pair.reference, pair.target))
    assert kept.img_set == pair.img_set
    assert gone not in kept.img_set and len(kept.img_set) == len(members) - 1
    assert any("image-set member" in p and "the pair kept" in p for p in from_file.problems)


def test_pairs_of_a_split_train_does_not_know_are_held_out_and_named(tmp_path, caplog):
    # A user's split named "validation" (or "dev"): its pairs were taken for pairs with no
    # split, 90% trained on, and the warning blamed the authors' dataset.json; eval
    # --split validation then scored pairs the model had trained on.
    import sqlite3

    db_path = make_world_store(tmp_path, pairs=20)
    conn = sqlite3.connect(db_path)
    renamed = conn.execute("UPDATE pairs SET split = 'validation' WHERE split = 'val'").rowcount
    conn.commit()
    conn.close()
    caplog.set_level("WARNING", logger="retrieval.data")
    data = load_store_triplets(db_path)
    train, val = train_val_split(data)
    assert renamed and not [t for t in train + val if t.split == "validation"]
    assert len(train) == len(data.split("train")) and not val
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{renamed} pairs of split validation not trained on") and "eval --split NAME" in m
               for m in said), said
    assert not any("dataset.json" in m for m in said), said


def test_training_names_captions_longer_than_the_text_encoder_reads(annotated, caplog):
    # Stage 4 keeps compounds under 77 CLIP tokens, but a reviewer's edit may not: training
    # cut it at 77 with no word (the review tab says so only to whoever opens that pair).
    from retrieval.train import TrainConfig, train

    db = open_db(annotated)
    run_id = db.execute("SELECT MAX(id) FROM runs").fetchone()[0]
    first = annotation_id_for(run_id, "p0000")
    long_text = "make the lamp on the left a shade greener and " * 9 + "the chair blue"
    edit_caption(db, f"{first}:k2", long_text, "ann")
    db.conn.close()
    caplog.set_level("WARNING")
    train(TrainConfig(out=str(annotated.parent / "model"), dbs=[str(annotated)], image_size=32, batch_size=4,
                      epochs=1, cache_dir=str(annotated.parent / "cache"), progress=False, rerank=False))
    said = [r.getMessage() for r in caplog.records if "over the text encoder's 77 tokens" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 training caption is over"), said
    assert "make the lamp on the left a shade greener" in said[0] and "tokens); shorten them" in said[0]


def test_a_dataset_named_twice_in_a_mix_is_refused(annotated, tmp_path, monkeypatch):
    # train --db a.db --db ./a.db trained (and validated) on every pair twice, under two ids.
    monkeypatch.chdir(annotated.parent)
    with pytest.raises(ValueError, match=r"\./world\.db is named twice \(--db world\.db and --db \./world\.db\)"):
        load_triplets(["world.db", "./world.db"])
    out = tmp_path / "x.jsonl"
    out.write_text("")
    with pytest.raises(ValueError, match="named twice"):
        load_triplets([], [out, str(out)])
    assert load_triplets(["world.db"]).triplets  # once is fine


def test_a_pair_left_out_of_generated_says_why(annotated):
    # 'pair 2: no caption for --source generated' for a pair whose captions a reviewer
    # rejected, as for one never annotated: the user could not tell a review from a gap.
    db = open_db(annotated)
    run_id = db.execute("SELECT MAX(id) FROM runs").fetchone()[0]
    first = annotation_id_for(run_id, "p0000")
    for position in range(4):  # the compounds of p0000 then all quote c0 (edited) or c1 (flagged)
        add_flag(db, first, "caption", f"{first}:c{position}", "ann", "object not there")
    db.conn.close()
    # Named as the user's dataset names them (external ids 0, 1, 2, ...).
    problems = {p.split(":")[0]: p for p in load_store_triplets(annotated, source="generated").problems}
    assert problems["pair 2"].endswith("no caption for --source generated (its generated captions were "
                                           "rejected in review)")
    assert problems["pair 0"].endswith("(every generated caption of it is flagged, or a compound quoting an "
                                           "edited caption)")
    assert problems["pair 3"].endswith("no caption for --source generated")  # never annotated
