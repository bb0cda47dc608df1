"""The store's schema and migrations, review history with undo and conflicts, flags,
approvals and the review queue, on real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from store import ConflictError, NotFoundError, StoreError, migrations, open_db, schema_version
from store import annotations as ann
from store import queue, review
from store.importers import import_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def test_fresh_store_has_every_table_and_the_latest_version(tmp_path):
    db = open_db(tmp_path / "s.db")
    assert schema_version(db) == len(migrations.MIGRATIONS) >= 2
    tables = set(db.table_names())
    assert {"images", "pairs", "runs", "calls", "batches", "descriptions", "annotations", "captions",
            "caption_edits", "flags", "review_events", "_migrations"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    open_db(tmp_path / "s.db")  # reopening applies nothing twice
    assert db.execute("SELECT COUNT(*) FROM _migrations").fetchone()[0] == len(migrations.MIGRATIONS)


def test_v1_store_with_data_migrates_and_keeps_rows_and_foreign_keys(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
    old = open_db(path)
    assert schema_version(old) == 1
    import_dataset(old, "pairs", FIXTURES / "pairs")
    run = ann.create_run(old, "simulator", "sim-1")
    pair_ids = [r[0] for r in old.execute("SELECT id FROM pairs ORDER BY rowid")]
    ann.ensure_annotations(old, run.id, pair_ids)
    ann.complete_annotation(old, f"{run.id}:{pair_ids[0]}", stage1_id=None, stage2_id=None,
                            captions=["a", "b"])
    with pytest.raises(sqlite3.IntegrityError):  # v1: a pair needs a target
        old.execute("INSERT INTO pairs (id, source, reference_id, created_at) VALUES ('x', 's', ?, 'now')",
                    [old.execute("SELECT id FROM images LIMIT 1").fetchone()[0]])
    old.conn.close()
    monkeypatch.undo()

    db = open_db(path)
    assert schema_version(db) == len(migrations.MIGRATIONS)
    assert [r[0] for r in db.execute("SELECT id FROM pairs ORDER BY rowid")] == pair_ids
    assert db.execute("SELECT COUNT(*) FROM captions").fetchone()[0] == 2
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'pairs'")}
    assert {"pairs_split", "pairs_reference", "pairs_source_external"} <= indexes
    image_id = db.execute("SELECT id FROM images LIMIT 1").fetchone()[0]
    db.execute("INSERT INTO pairs (id, source, reference_id, created_at) VALUES ('x', 's', ?, 'now')", [image_id])
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys still enforced after the rebuild
        db.execute("INSERT INTO annotations (id, run_id, pair_id, updated_at) VALUES ('z', ?, 'nope', 'now')",
                   [run.id])
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("DELETE FROM pairs WHERE id = ?", [pair_ids[0]])


@pytest.fixture
def annotated(tmp_path):
    """A store with the pairs fixture and one finished run: 3 done annotations."""
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "pairs", FIXTURES / "pairs")
    run = ann.create_run(db, "simulator", "sim-1", prompt_versions={"stage3": "abc"},
                         settings={"api_key": "sk-secret", "concurrency": 4})
    pair_ids = [r[0] for r in db.execute("SELECT id FROM pairs ORDER BY rowid")]
    ann.ensure_annotations(db, run.id, pair_ids)
    for i, pair_id in enumerate(pair_ids):
        ann.complete_annotation(
            db, ann.annotation_id_for(run.id, pair_id), stage1_id=None, stage2_id=None,
            captions=[f"pair {i} caption {j}" for j in range(3)],
            compounds=[(f"pair {i} caption 0 and caption 1", [0, 1], 12)],
        )
    return db, run, pair_ids


def test_edit_history_and_undo(annotated):
    db, run, pair_ids = annotated
    annotation_id = ann.annotation_id_for(run.id, pair_ids[0])
    first = review.list_captions(db, annotation_id)
    assert [c.kind for c in first] == ["individual"] * 3 + ["compound"]
    caption_id = first[0].id
    assert (first[0].current_text, first[0].version) == ("pair 0 caption 0", 0)

    assert review.edit_caption(db, caption_id, " the lamp is red ", "ana", expected_version=0).current_text == "the lamp is red"
    review.edit_caption(db, caption_id, "the lamp is dark red", "ben", expected_version=1)
    undone = review.undo_caption_edit(db, caption_id, "ana")
    assert (undone.current_text, undone.version, undone.text) == ("the lamp is red", 3, "pair 0 caption 0")
    review.edit_caption(db, caption_id, "a red lamp", "ana", expected_version=3)
    assert review.undo_caption_edit(db, caption_id, "ana").current_text == "the lamp is red"
    assert review.undo_caption_edit(db, caption_id, "ana").current_text == "pair 0 caption 0"
    with pytest.raises(StoreError, match="original"):
        review.undo_caption_edit(db, caption_id, "ana")
    history = review.caption_history(db, caption_id)
    assert [(e.version, e.action, e.editor, e.text) for e in history] == [
        (1, "edit", "ana", "the lamp is red"), (2, "edit", "ben", "the lamp is dark red"),
        (3, "undo", "ana", "the lamp is red"), (4, "edit", "ana", "a red lamp"),
        (5, "undo", "ana", "the lamp is red"), (6, "undo", "ana", "pair 0 caption 0"),
    ]
    # The VLM's text is never overwritten.
    assert db.execute("SELECT text FROM captions WHERE id = ?", [caption_id]).fetchone()[0] == "pair 0 caption 0"


def test_stale_edit_is_a_conflict_and_writes_nothing(annotated):
    db, run, pair_ids = annotated
    caption_id = review.list_captions(db, ann.annotation_id_for(run.id, pair_ids[1]))[0].id
    review.edit_caption(db, caption_id, "ana's text", "ana", expected_version=0)
    with pytest.raises(ConflictError, match="reload"):
        review.edit_caption(db, caption_id, "ben's text", "ben", expected_version=0)
    with pytest.raises(ConflictError):
        review.undo_caption_edit(db, caption_id, "ben", expected_version=0)
    assert review.get_caption(db, caption_id).current_text == "ana's text"
    assert len(review.caption_history(db, caption_id)) == 1
    with pytest.raises(StoreError, match="empty"):
        review.edit_caption(db, caption_id, "   ", "ana")
    with pytest.raises(NotFoundError):
        review.edit_caption(db, "nope", "text", "ana")


def test_flags_approvals_and_notes(annotated):
    db, run, pair_ids = annotated
    annotation_id = ann.annotation_id_for(run.id, pair_ids[0])
    caption_id = review.list_captions(db, annotation_id)[1].id
    flag = review.add_flag(db, annotation_id, "caption", caption_id, "ana", reason="wrong count")
    again = review.add_flag(db, annotation_id, "caption", caption_id, "ben")
    assert again.id == flag.id and again.reason == "wrong count"
    review.add_flag(db, annotation_id, "descriptor", "d1/0/1", "ana", reason="object not there")
    assert ann.get_annotation(db, annotation_id).flag_count == 2
    removed = review.remove_flag(db, flag.id, "ben")
    assert removed.removed_by == "ben" and ann.get_annotation(db, annotation_id).flag_count == 1
    assert len(review.list_flags(db, annotation_id)) == 1
    assert len(review.list_flags(db, annotation_id, include_removed=True)) == 2
    with pytest.raises(StoreError, match="flag reason"):
        review.add_flag(db, annotation_id, "caption", caption_id, "ana", reason="ugly")

    review.set_review_status(db, annotation_id, "approved", "ana")
    review.set_note(db, annotation_id, "lamp colour checked", "ana")
    record = ann.get_annotation(db, annotation_id)
    assert (record.review_status, record.reviewer, record.note) == ("approved", "ana", "lamp colour checked")
    assert [(e.action, e.value) for e in review.review_history(db, annotation_id)] == [
        ("status", "approved"), ("note", "lamp colour checked")]
    with pytest.raises(StoreError):
        review.set_review_status(db, annotation_id, "maybe", "ana")
    with pytest.raises(NotFoundError):
        review.set_review_status(db, "9:nope", "approved", "ana")


def test_queue_order_filters_and_counts(annotated):
    db, run, pair_ids = annotated
    ids = [ann.annotation_id_for(run.id, p) for p in pair_ids]
    first = queue.step(db)
    assert first.id == ids[0]
    second = queue.step(db, after_seq=first.seq)
    assert second.id == ids[1]
    assert queue.step(db, after_seq=second.seq, direction="previous").id == ids[0]
    review.set_review_status(db, ids[0], "approved", "ana")
    review.add_flag(db, ids[2], "caption", f"{ids[2]}:c0", "ana")
    assert queue.step(db).id == ids[1]                       # the approved one left the queue
    assert queue.step(db, queue="flagged").id == ids[2]
    assert queue.step(db, split="test").id == ids[2]
    assert queue.step(db, model="other-model") is None
    assert queue.position(db, second.seq) == 2
    assert queue.counts(db) == {"all": 3, "unreviewed": 2, "flagged": 1, "approved": 1,
                                "rejected": 0, "pending": 0, "failed": 0}
    with pytest.raises(ValueError):
        queue.step(db, queue="everything")


def test_queue_queries_use_their_indexes_and_counts_match_brute_force(annotated):
    db, run, pair_ids = annotated
    ids = [ann.annotation_id_for(run.id, p) for p in pair_ids]
    review.add_flag(db, ids[1], "caption", f"{ids[1]}:c0", "ana")
    review.set_review_status(db, ids[2], "rejected", "ana")
    plans = {
        "unreviewed": "SELECT a.* FROM annotations a WHERE a.status = 'done' AND a.review_status = 'unreviewed'"
                      " AND a.seq > 0 ORDER BY a.seq LIMIT 1",
        "flagged": "SELECT a.* FROM annotations a WHERE a.status = 'done' AND a.flag_count > 0"
                   " AND a.seq > 0 ORDER BY a.seq LIMIT 1",
    }
    for name, index in (("unreviewed", "annotations_queue"), ("flagged", "annotations_flagged")):
        detail = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + plans[name]).fetchall())
        assert index in detail and "TEMP B-TREE" not in detail, (name, detail)
    rows = db.execute("SELECT a.status, a.review_status, a.flag_count, p.split FROM annotations a"
                      " JOIN pairs p ON p.id = a.pair_id").fetchall()
    for split in (None, "train", "val", "test"):
        mine = [r for r in rows if split is None or r[3] == split]
        expected = {"all": sum(r[0] == "done" for r in mine),
                    "unreviewed": sum(r[0] == "done" and r[1] == "unreviewed" for r in mine),
                    "flagged": sum(r[0] == "done" and r[2] > 0 for r in mine),
                    "approved": sum(r[0] == "done" and r[1] == "approved" for r in mine),
                    "rejected": sum(r[0] == "done" and r[1] == "rejected" for r in mine),
                    "pending": 0, "failed": 0}
        assert queue.counts(db, split=split) == expected, split
    assert queue.counts(db, run_id=run.id + 1)["all"] == 0


def test_nested_transactions_are_savepoints(tmp_path):
    from store import transaction

    db = open_db(tmp_path / "s.db")
    now = "2026-01-01T00:00:00"
    with transaction(db):
        db.execute("INSERT INTO runs (backend, model, created_at) VALUES ('a', 'm', ?)", [now])
        with pytest.raises(RuntimeError):
            with transaction(db):
                db.execute("INSERT INTO runs (backend, model, created_at) VALUES ('b', 'm', ?)", [now])
                raise RuntimeError("inner fails alone")
        run = ann.create_run(db, "c", "m")  # a store function inside the caller's transaction
    assert [r[0] for r in db.execute("SELECT backend FROM runs ORDER BY id")] == ["a", "c"]
    assert run.backend == "c" and not db.conn.in_transaction
    with pytest.raises(RuntimeError):
        with transaction(db):
            db.execute("INSERT INTO runs (backend, model, created_at) VALUES ('d', 'm', ?)", [now])
            raise RuntimeError("outer fails: everything inside goes")
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
