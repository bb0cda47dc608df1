"""The review page's logic, without Gradio: real SQLite stores in tmp dirs."""

from __future__ import annotations

import pytest

from store.db import open_db
from store.models import DescribedObject
from ui import review_logic as rl
from ui_store_builder import build_review_store


@pytest.fixture
def store(tmp_path):
    info = build_review_store(tmp_path, 5)
    info["db"] = open_db(info["db_path"])
    return info


def test_diff_objects_tells_unchanged_changed_new_and_removed_apart():
    s1 = [DescribedObject(name="Lamp", descriptors=["brass", "tall"]),
          DescribedObject(name="bed", descriptors=["white sheets"]),
          DescribedObject(name="chair", descriptors=["red"])]
    s2 = [DescribedObject(name="lamp", descriptors=["brass", "tall"]),
          DescribedObject(name="bed", descriptors=["white sheets", "blue blanket"]),
          DescribedObject(name="plant", descriptors=["green"])]
    left, right = rl.diff_objects("a", s1, "b", s2)
    assert [o.state for o in right] == ["unchanged", "changed", "new"]
    assert [o.state for o in left] == ["kept", "changed", "removed"]
    assert [d.state for d in right[1].descriptors] == ["same", "new"]
    assert [d.state for d in left[2].descriptors] == ["gone"]
    assert right[1].descriptors[1].target_id == "b/1/1"
    assert left[0].descriptors[1].target_id == "a/0/1"


def test_diff_matches_repeated_names_in_order():
    s1 = [DescribedObject(name="lamp", descriptors=["left"]), DescribedObject(name="lamp", descriptors=["right"])]
    s2 = [DescribedObject(name="lamp", descriptors=["left"])]
    left, right = rl.diff_objects("a", s1, "b", s2)
    assert right[0].state == "unchanged"
    assert [o.state for o in left] == ["kept", "removed"]


def test_load_pair_and_queue_navigation(store):
    db, ids = store["db"], store["annotation_ids"]
    flt = rl.QueueFilter()
    assert rl.first_in_queue(db, flt) == ids[0]
    assert rl.step_from(db, flt, ids[0], "next") == ids[1]
    assert rl.step_from(db, flt, ids[0], "previous") is None
    view = rl.load_pair(db, ids[1])
    assert len(view.individual) == 4 and len(view.compound) == 2
    assert view.reference.url.startswith("/g4c/image/")
    assert [o.state for o in view.stage2] == ["changed", "unchanged", "new"]
    status = rl.queue_status(db, flt, ids[1])
    assert (status.position, status.queue_total, status.reviewed) == (2, 5, 0)
    assert "2 / 5 in 'unreviewed'" in status.text() and "0 / 5 reviewed" in status.text()


def test_approve_moves_pair_between_queues_with_reviewer(store):
    db, ids = store["db"], store["annotation_ids"]
    rl.set_status(db, ids[0], "approved", "alice")
    row = db.execute("SELECT review_status, reviewer, reviewed_at FROM annotations WHERE id = ?", [ids[0]]).fetchone()
    assert row[0] == "approved" and row[1] == "alice" and row[2]
    assert rl.first_in_queue(db, rl.QueueFilter("unreviewed")) == ids[1]
    assert rl.first_in_queue(db, rl.QueueFilter("approved")) == ids[0]
    status = rl.queue_status(db, rl.QueueFilter("unreviewed"), ids[0])
    assert status.position == 0 and status.reviewed == 1
    with pytest.raises(rl.ReviewActionError, match="Reviewer"):
        rl.set_status(db, ids[1], "rejected", "  ")


def test_filters_by_split_and_model(store):
    db = store["db"]
    flt = rl.make_filter("all", f"{store['run_id']}: test run (sim-1)", "sim-1", "val")
    first = rl.first_in_queue(db, flt)
    assert rl.load_pair(db, first).split == "val"
    assert rl.first_in_queue(db, rl.make_filter("all", None, "other-model", None)) is None
    choices = rl.filter_choices(db)
    assert choices["splits"] == [rl.ANY, "train", "val"] and "sim-1" in choices["models"]


def test_flags_on_descriptor_and_caption_toggle_and_count(store):
    db, ann = store["db"], store["annotation_ids"][0]
    view = rl.load_pair(db, ann)
    descriptor = view.stage2[2].descriptors[0].target_id
    caption = view.individual[1].id
    assert rl.toggle_flag(db, ann, "descriptor", descriptor, "bob", "object not there") is True
    assert rl.set_flag(db, ann, "caption", caption, True, "bob", "wrong attribute") is True
    view = rl.load_pair(db, ann)
    assert view.stage2[2].descriptors[0].flagged and view.stage2[2].descriptors[0].reason == "object not there"
    assert view.individual[1].flagged
    assert db.execute("SELECT flag_count FROM annotations WHERE id = ?", [ann]).fetchone()[0] == 2
    assert rl.first_in_queue(db, rl.QueueFilter("flagged")) == ann
    assert rl.toggle_flag(db, ann, "descriptor", descriptor, "bob") is False
    assert db.execute("SELECT flag_count FROM annotations WHERE id = ?", [ann]).fetchone()[0] == 1
    removed = db.execute("SELECT removed_by FROM flags WHERE target_id = ?", [descriptor]).fetchone()
    assert removed[0] == "bob"  # the row is kept, marked removed


def test_flag_targets_are_checked(store):
    db, ann, other = store["db"], store["annotation_ids"][0], store["annotation_ids"][1]
    other_caption = rl.load_pair(db, other).individual[0].id
    with pytest.raises(rl.ReviewActionError, match="not part of pair"):
        rl.set_flag(db, ann, "caption", other_caption, True, "bob")
    with pytest.raises(rl.ReviewActionError, match="not a descriptor"):
        rl.set_flag(db, ann, "descriptor", "s2-0/9/0", True, "bob")
    with pytest.raises(rl.ReviewActionError, match="not one of"):
        rl.set_flag(db, ann, "descriptor", "s2-0/0/0", True, "bob", "because")


def test_caption_edit_versions_and_conflict_message(store):
    db, ann = store["db"], store["annotation_ids"][0]
    caption = rl.load_pair(db, ann).individual[0]
    first = rl.save_caption(db, caption.id, "Make the box yellow.", "alice", caption.version)
    assert first.saved and first.version == 1
    # the same text again (blur after Enter) writes nothing
    again = rl.save_caption(db, caption.id, "Make the box yellow. ", "alice", 0)
    assert not again.saved and not again.conflict
    # bob started from version 0 too: refused, alice's text kept, a clear message
    stale = rl.save_caption(db, caption.id, "Paint the box blue.", "bob", 0)
    assert stale.conflict and not stale.saved
    assert "alice changed this caption" in stale.message and "Make the box yellow." in stale.message
    assert rl.load_pair(db, ann).individual[0].text == "Make the box yellow."
    rows = db.execute("SELECT version, editor FROM caption_edits WHERE caption_id = ?", [caption.id]).fetchall()
    assert rows == [(1, "alice")]
    undone = rl.undo_caption(db, caption.id, "alice", 1)
    assert undone.saved and undone.text == caption.original


def test_note_saved_only_when_changed(store):
    db, ann = store["db"], store["annotation_ids"][0]
    assert rl.save_note(db, ann, "box colour is off", "carol") is True
    assert rl.save_note(db, ann, "box colour is off", "carol") is False
    events = db.execute("SELECT action, value, reviewer FROM review_events WHERE annotation_id = ?", [ann]).fetchall()
    assert events == [("note", "box colour is off", "carol")]


def test_goto_by_external_id_and_activity_of_others(store):
    db, ann = store["db"], store["annotation_ids"][2]
    assert rl.resolve_goto(db, "p2") == ann
    assert rl.resolve_goto(db, "nope") is None
    since = rl.load_pair(db, ann).updated_at
    caption = rl.load_pair(db, ann).individual[0]
    rl.save_caption(db, caption.id, "Something else.", "dave", 0)
    rl.set_status(db, ann, "approved", "dave")
    lines = rl.activity_since(db, ann, since, "erin")
    assert any("dave edited caption" in line for line in lines) and any("dave marked it approved" in line for line in lines)
    assert rl.activity_since(db, ann, since, "dave") == []


def test_rendered_html_escapes_captions_and_descriptors(tmp_path):
    info = build_review_store(tmp_path, 1, script_caption=True)
    db = open_db(info["db_path"])
    view = rl.load_pair(db, info["annotation_ids"][0])
    view.stage2[0].descriptors[0].text = "<img src=x onerror=alert(1)> ${1+1} `x`"
    board = rl.render_board_html(view)
    assert "<img src=x" not in board and "&lt;img src=x" in board
    assert "${" not in board and "`" not in board
    view.ground_truth = [{"op": "<script>alert(1)</script>"}]
    gt = rl.render_ground_truth_html(view)
    assert "<script>" not in gt and "&lt;script&gt;" in gt


def test_captions_panel_carries_ids_versions_and_escapes(tmp_path):
    info = build_review_store(tmp_path, 1, script_caption=True)
    db = open_db(info["db_path"])
    ann = info["annotation_ids"][0]
    rl.save_caption(db, f"{ann}:c1", "Turn the square into a circle.", "ann", 0)
    html = rl.render_captions_html(rl.load_pair(db, ann))
    assert f"data-caption='{ann}:c1' data-version='1'" in html and "edited by ann" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "${" not in html
    assert html.count("<textarea") == 6


def test_pair_without_target_or_local_file_is_shown(store):
    db, ann = store["db"], store["annotation_ids"][0]
    pair_id = ann.split(":", 1)[1]
    db.execute("UPDATE pairs SET target_id = NULL WHERE id = ?", [pair_id])
    ref = db.execute("SELECT reference_id FROM pairs WHERE id = ?", [pair_id]).fetchone()[0]
    db.execute("UPDATE images SET path = NULL, url = 'https://example.com/a.png' WHERE id = ?", [ref])
    view = rl.load_pair(db, ann)
    assert view.target.url is None and "no target" in view.target.name
    assert view.reference.url is None  # remote images are never fetched or linked
    html = rl.render_images_html(view)
    assert "example.com" not in html and html.count("no local file") == 2
