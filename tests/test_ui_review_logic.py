"""The review page's logic, without Gradio: real SQLite stores in tmp dirs."""

from __future__ import annotations

import pytest

from store.db import open_db
from store.models import PIPELINE_FLAG_REASONS, PIPELINE_REVIEWER, DescribedObject
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


def test_split_filter_says_which_splits_hold_nothing_to_review(store):
    # CIRR's test1 withholds its targets, so its pairs are never annotated; the Split
    # filter offered it like any other split and choosing it showed an empty queue.
    from pathlib import Path

    from store.importers import import_dataset

    db = store["db"]
    cirr = Path(__file__).parent / "fixtures" / "cirr"
    import_dataset(db, "cirr", cirr, split="test1")
    import_dataset(db, "cirr", cirr, split="train", source="cirr-holdout")
    with db.conn:  # a split with targets that no run has reached yet
        db.execute("UPDATE pairs SET split = 'holdout' WHERE source = 'cirr-holdout'")
    choices = rl.filter_choices(db)["splits"]
    labels = {c[1] if isinstance(c, tuple) else c: c[0] if isinstance(c, tuple) else c for c in choices}
    assert set(labels) == {rl.ANY, "train", "val", "test1", "holdout"}
    assert labels["train"] == "train" and labels["val"] == "val"            # annotated: offered as they are
    assert labels["test1"] == "test1 · nothing to review: no pair has a target image (withheld)"
    assert labels["holdout"] == "holdout · nothing to review yet: no pair annotated"
    # the value is still the split: choosing it filters (to an empty queue), as before
    assert rl.first_in_queue(db, rl.make_filter("all", None, None, "test1")) is None


def test_an_image_recorded_by_url_only_says_import_download_fetches_it(tmp_path):
    # An image the authors' dataset.json names by URL is only recorded unless the import
    # had --download; the review page said 'no local file for this image', with no word
    # of the option that fetches it.
    import json

    from PIL import Image

    from store.annotations import create_run, ensure_annotations
    from store.importers import import_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (32, 24), "white").save(folder / "a.png")
    url = "https://images.example.com/rooms/room0.jpg"  # never fetched: no --download
    (folder / "dataset.json").write_text(json.dumps([
        {"reference_image": url, "target_image": "a.png", "difference_captions": ["x"]}]))
    db = open_db(tmp_path / "s.db")
    import_dataset(db, "good4cir", folder / "dataset.json")
    run = create_run(db, "simulator", "sim-1")
    ensure_annotations(db, run.id, [r[0] for r in db.execute("SELECT id FROM pairs").fetchall()])
    [annotation_id] = [r[0] for r in db.execute("SELECT id FROM annotations").fetchall()]
    view = rl.load_pair(db, annotation_id)
    assert view.reference.url is None and view.target.url  # the local target is shown
    html = rl.render_images_html(view)
    reference, target = html.split("<figure")[1:]
    assert "not downloaded" in reference and "good4cir import --download" in reference
    assert "no local file" not in reference and "--download" not in target


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


def test_a_note_saved_by_someone_else_meanwhile_is_not_overwritten(store):
    db, ann = store["db"], store["annotation_ids"][0]
    # ann and bob both see an empty note; ann saves hers first
    assert rl.save_note(db, ann, "the lamp is not there", "ann", expected="") is True
    with pytest.raises(rl.ReviewActionError, match="NOT SAVED: ann changed the note of pair p0"):
        rl.save_note(db, ann, "looks fine", "bob", expected="")
    assert db.execute("SELECT note FROM annotations WHERE id = ?", [ann]).fetchone()[0] == "the lamp is not there"
    # once bob's page shows ann's note, his edit of it is saved
    assert rl.save_note(db, ann, "lamp missing; otherwise fine", "bob", expected="the lamp is not there") is True
    events = db.execute("SELECT value, reviewer FROM review_events WHERE annotation_id = ? AND action = 'note'",
                        [ann]).fetchall()
    assert events == [("the lamp is not there", "ann"), ("lamp missing; otherwise fine", "bob")]


def test_live_refresh_replaces_the_note_only_when_the_stored_note_moved():
    # another reviewer's new note replaces an untouched box
    assert rl.live_note("check the lamp", "", "") == "check the lamp"
    assert rl.live_note("", "old note", "old note") == ""
    # the pair changed otherwise (a flag, an approval): the box is left alone, so text
    # typed while the refresh was in flight survives
    assert rl.live_note("old note", "old note", "old note") is None
    assert rl.live_note(None, "", "") is None
    # a note being typed is never replaced
    assert rl.live_note("check the lamp", "", "I was writing this") is None
    assert rl.live_note(" same ", "same", "same ") is None


def test_goto_by_external_id_and_activity_of_others(store):
    db, ann = store["db"], store["annotation_ids"][2]
    assert rl.resolve_goto(db, "p2") == ann
    assert rl.resolve_goto(db, "nope") is None
    since = rl.pair_watermark(db, ann)
    caption = rl.load_pair(db, ann).individual[0]
    rl.save_caption(db, caption.id, "Something else.", "dave", 0)
    rl.set_status(db, ann, "approved", "dave")
    lines = rl.activity_since(db, ann, since, "erin")
    assert any("dave edited caption" in line for line in lines) and any("dave marked it approved" in line for line in lines)
    assert rl.activity_since(db, ann, since, "dave") == []


def test_activity_says_when_someone_else_removes_or_sets_a_flag(store):
    # Ann flags caption c1; Bob, on his own page, unflags it. Ann's "since you opened this
    # pair" line said nothing (only flags *set* by others counted), so her flag vanished
    # from her screen with no word of who removed it.
    db, ann_id = store["db"], store["annotation_ids"][3]
    view = rl.load_pair(db, ann_id)
    c1, c2 = view.individual[1].id, view.individual[2].id
    rl.set_flag(db, ann_id, "caption", c1, True, "ann", "wrong count")
    since = rl.pair_watermark(db, ann_id)
    rl.set_flag(db, ann_id, "caption", c1, False, "bob")
    rl.set_flag(db, ann_id, "caption", c2, True, "bob")
    lines = rl.activity_since(db, ann_id, since, "ann")
    assert "bob unflagged caption c1" in lines and "bob flagged caption c2" in lines
    assert rl.activity_since(db, ann_id, since, "bob") == []


def test_a_decision_that_replaces_another_reviewers_later_one_says_so(store):
    # Bob rejected the pair after Ann opened it; Ann's approve (her page not yet
    # refreshed) replaced his decision without a word, and her page moved on.
    db, ann_id = store["db"], store["annotation_ids"][4]
    opened = rl.pair_watermark(db, ann_id)
    assert rl.set_status(db, ann_id, "rejected", "bob", seen_since=opened) == ""
    note = rl.set_status(db, ann_id, "approved", "ann", seen_since=opened)
    assert "bob rejected this pair at" in note and "after you opened it; your decision replaces theirs" in note
    assert rl.load_pair(db, ann_id).review_status == "approved"
    # her own earlier decision, the same decision, or one made before she opened it: nothing to say
    assert rl.set_status(db, ann_id, "rejected", "ann", seen_since=opened) == ""
    rl.set_status(db, ann_id, "approved", "bob")
    assert rl.set_status(db, ann_id, "approved", "ann", seen_since=opened) == ""
    later = rl.pair_watermark(db, ann_id)
    assert rl.set_status(db, ann_id, "rejected", "ann", seen_since=later) == ""


def test_pipeline_is_not_a_reviewer_name(store):
    # Flags the pipeline sets carry reviewer 'pipeline': Stats leaves them out of the
    # reviewers' rates and the page calls them the pipeline's. A reviewer who typed
    # 'pipeline' as their name had their own flags counted as the pipeline's.
    db, ann_id = store["db"], store["annotation_ids"][1]
    caption = rl.load_pair(db, ann_id).individual[0]
    for name in (PIPELINE_REVIEWER, " Pipeline "):
        with pytest.raises(rl.ReviewActionError, match="the pipeline's own name"):
            rl.set_flag(db, ann_id, "caption", caption.id, True, name)
        with pytest.raises(rl.ReviewActionError, match="the pipeline's own name"):
            rl.set_status(db, ann_id, "approved", name)
    assert rl.load_pair(db, ann_id).flags == []


def test_shortening_a_caption_the_pipeline_flagged_as_too_long_clears_that_flag(store):
    # The pipeline flags a stage 3 caption still over 77 CLIP tokens after its repair;
    # shortening it is the fix, but the flag stayed and kept the caption out of exports.
    db, ann = store["db"], store["annotation_ids"][0]
    caption = rl.load_pair(db, ann).individual[0]
    db.execute("INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
               " VALUES (?, 'caption', ?, ?, ?, '2026-11-27T00:00:00Z')",
               [ann, caption.id, PIPELINE_FLAG_REASONS[0], PIPELINE_REVIEWER])
    db.conn.commit()
    assert rl.load_pair(db, ann).individual[0].flagged

    long_text = "Make the box " + " ".join(["very"] * 80) + " yellow."
    result = rl.save_caption(db, caption.id, long_text, "ann", caption.version)
    assert result.saved and "over the 77" in result.message and "cuts the rest off" in result.message
    assert rl.load_pair(db, ann).individual[0].flagged

    result = rl.save_caption(db, caption.id, "Make the box yellow.", "ann", result.version)
    assert result.saved and "flag is cleared" in result.message
    assert not rl.load_pair(db, ann).individual[0].flagged
    removed = db.execute("SELECT reviewer, removed_by FROM flags WHERE target_id = ?", [caption.id]).fetchall()
    assert removed == [(PIPELINE_REVIEWER, "ann")]
    # A reviewer's own flag is theirs to lift: an edit leaves it alone.
    rl.set_flag(db, ann, "caption", caption.id, True, "bob", "other")
    result = rl.save_caption(db, caption.id, "Make the box orange.", "ann", result.version)
    assert result.saved and "flag" not in result.message
    assert rl.load_pair(db, ann).individual[0].flagged


def test_the_pipelines_own_flags_say_they_are_the_pipelines_and_what_they_mean(store):
    # Flags the pipeline set (a caption still over 77 CLIP tokens, a stage 2 object that
    # looks like a reference object under another name) looked like any reviewer's flag:
    # the caption's line said "flagged: over 77 CLIP tokens" and a descriptor said so only
    # in a tooltip, so reviewers took them for a colleague's hallucination call.
    db, ann = store["db"], store["annotation_ids"][0]
    view = rl.load_pair(db, ann)
    caption, other = view.individual[0], view.individual[1]
    plant = next(o for o in view.stage2 if o.name == "plant")
    rows = [("caption", caption.id, PIPELINE_FLAG_REASONS[0])]
    rows += [("descriptor", cell.target_id, PIPELINE_FLAG_REASONS[1]) for cell in plant.descriptors]
    for kind, target, reason in rows:
        db.execute("INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
                   " VALUES (?, ?, ?, ?, ?, '2026-11-27T00:00:00Z')", [ann, kind, target, reason, PIPELINE_REVIEWER])
    db.conn.commit()
    rl.set_flag(db, ann, "caption", other.id, True, "bob", "wrong count")
    view = rl.load_pair(db, ann)
    captions = rl.render_captions_html(view)
    assert "flagged by the pipeline: over 77 CLIP tokens" in captions
    assert "flagged by bob: wrong count" in captions
    board = rl.render_board_html(view)
    card = board.split(">plant<", 1)[1].split("g4c-obj ", 1)[0]
    assert "flagged by the pipeline: renamed a reference object" in card          # visible, not a tooltip only
    assert "title='flagged by the pipeline: renamed a reference object'" in card
    assert "pipeline" not in board.split(">plant<", 1)[0].split("g4c-cols", 1)[1]  # other objects: nothing


def test_a_compound_that_quotes_an_edited_caption_says_exports_leave_it_out(store, tmp_path):
    # Exports drop a stage 4 compound that still quotes a caption a reviewer edited (it
    # carries the replaced text), but neither the captions panel nor the Export tab's
    # summary said so: the reviewer approved and the compound was silently missing.
    from ui import export_logic as el

    db, ann = store["db"], store["annotation_ids"][0]
    rl.save_caption(db, f"{ann}:c0", "Make the box yellow.", "ann", 0)
    view = rl.load_pair(db, ann)
    stale, fine = view.compound[0], view.compound[1]   # built from captions 0+1 and 2+3
    assert "quotes edited caption c0: exports leave it out until it is edited too" in rl.caption_meta(stale)
    assert "quotes edited" not in rl.caption_meta(fine)
    assert "quotes edited caption c0" in rl.render_captions_html(view)
    rl.save_caption(db, stale.id, "Make the box yellow and round.", "ann", stale.version)
    assert "quotes edited" not in rl.caption_meta(rl.load_pair(db, ann).compound[0])
    # the same for a compound built on a flagged caption (exports leave both out)
    rl.set_flag(db, ann, "caption", f"{ann}:c3", True, "ann")
    assert "built on flagged caption c3: exports leave it out" in rl.caption_meta(rl.load_pair(db, ann).compound[1])
    rl.set_flag(db, ann, "caption", f"{ann}:c3", False, "ann")
    rl.save_caption(db, f"{ann}:c2", "Remove the lamp.", "ann", 0)
    rl.set_status(db, ann, "approved", "ann")
    _, stats = el.export_to_download(db, "good4cir", out_dir=tmp_path)
    assert ("1 compound caption left out: it quotes a caption a reviewer edited (edit the compound in the Review "
            "tab to keep it)") in el.describe_export(stats)


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
    assert "example.com" not in html and html.count("no local file") == 1   # the target
    assert html.count("good4cir import --download") == 1                      # the URL-only reference


def test_undo_reverts_the_last_edit_and_refuses_a_stale_version(store):
    db, ann = store["db"], store["annotation_ids"][3]
    caption = rl.load_pair(db, ann).individual[0]
    assert not caption.can_undo and "nothing to undo" in rl.undo_caption(db, caption.id, "alice", 0).message
    rl.save_caption(db, caption.id, "First try.", "alice", 0)
    rl.save_caption(db, caption.id, "Second try.", "alice", 1)
    undone = rl.undo_caption(db, caption.id, "alice", 2)
    assert undone.saved and (undone.version, undone.text) == (3, "First try.")
    assert undone.message.startswith("caption c0: undone")
    # bob saves meanwhile; alice's page still shows version 3: nothing is undone
    rl.save_caption(db, caption.id, "Bob's text.", "bob", 3)
    stale = rl.undo_caption(db, caption.id, "alice", 3)
    assert stale.conflict and not stale.saved
    assert stale.message.startswith("NOT UNDONE: bob changed caption c0 after your page showed it")
    assert "now version 4, you saw version 3" in stale.message and "“Bob's text.”" in stale.message
    assert rl.load_caption(db, caption.id).text == "Bob's text."
    # undo walks back through what was shown: v1's text, then the pipeline's, then stops
    assert rl.undo_caption(db, caption.id, "alice", 4).text == "First try."
    back = rl.undo_caption(db, caption.id, "alice", 5)
    assert back.saved and back.text == caption.original and not rl.load_caption(db, caption.id).can_undo
    end = rl.undo_caption(db, caption.id, "alice", 6)
    assert not end.saved and not end.conflict and "nothing to undo" in end.message
    rows = db.execute("SELECT version, action, restores, editor FROM caption_edits WHERE caption_id = ?"
                      " ORDER BY version", [caption.id]).fetchall()
    assert rows == [(1, "edit", 1, "alice"), (2, "edit", 2, "alice"), (3, "undo", 1, "alice"),
                    (4, "edit", 4, "bob"), (5, "undo", 1, "alice"), (6, "undo", 0, "alice")]
    with pytest.raises(rl.ReviewActionError, match="Reviewer"):
        rl.undo_caption(db, caption.id, " ", 6)
    with pytest.raises(rl.ReviewActionError, match="does not exist"):
        rl.undo_caption(db, caption.id + "9", "alice", 0)


def test_caption_and_pair_history_are_complete_ordered_and_escaped(store):
    db, ann = store["db"], store["annotation_ids"][4]
    view = rl.load_pair(db, ann)
    caption, descriptor = view.individual[1], view.stage2[2].descriptors[0]
    rl.save_caption(db, caption.id, "<b>bold</b> ${x}", "<i>eve</i>", 0)
    rl.undo_caption(db, caption.id, "dan", 1)
    rl.set_flag(db, ann, "descriptor", descriptor.target_id, True, "dan", "object not there")
    rl.set_flag(db, ann, "descriptor", descriptor.target_id, False, "erin")
    rl.save_note(db, ann, "<script>x</script>", "dan")
    rl.set_status(db, ann, "rejected", "erin")
    view = rl.load_pair(db, ann)
    cell = view.individual[1]
    assert [(e.version, e.action, e.editor) for e in cell.history] == [(1, "edit", "<i>eve</i>"), (2, "undo", "dan")]
    assert rl.caption_meta(cell) == "2 · v2 · undone by dan (back to v0)"
    inner = rl.render_caption_history_html(cell)
    assert inner.startswith("<summary>History · 3 versions</summary>")
    assert inner.index("v2 · undo → text of v0 · dan") < inner.index("v1 · edit · &lt;i&gt;eve") < inner.index("v0 · original")
    assert "<b>bold" not in inner and "&lt;b&gt;bold&lt;/b&gt; &#36;&#123;x&#125;" in inner
    # times are kept to the millisecond, so writes this quick may tie: order by time only
    assert sorted((e.who, e.what) for e in view.events) == sorted([
        ("<i>eve</i>", "edited caption c1 (v1)"),
        ("dan", "undid caption c1 back to v0 (v2)"),
        ("dan", "flagged descriptor “green leaves” (plant) (object not there)"),
        ("erin", "unflagged descriptor “green leaves” (plant)"),
        ("dan", "note: “<script>x</script>”"),
        ("erin", "rejected the pair"),
    ])
    assert [e.at for e in view.events] == sorted(e.at for e in view.events)
    html = rl.render_pair_history_html(view)
    shown = [html.index(f"<td>{rl.escape_text(e.what)}</td>") for e in view.events]
    assert shown == sorted(shown, reverse=True)                     # newest first
    assert "<script>" not in html and "<i>eve" not in html and "&lt;script&gt;" in html
    assert rl.render_pair_history_html(rl.load_pair(db, store["annotation_ids"][0])).count("No review actions") == 1


def test_pair_stamp_moves_on_every_review_write_and_only_then(store):
    db, ann, other = store["db"], store["annotation_ids"][1], store["annotation_ids"][2]
    caption = rl.load_pair(db, ann).individual[0]
    descriptor = rl.load_pair(db, ann).stage1[0].descriptors[0].target_id
    seen = [rl.pair_stamp(db, ann)]
    assert rl.pair_stamp(db, ann) == seen[0]                   # nothing written: same stamp
    rl.save_caption(db, rl.load_pair(db, other).individual[0].id, "Elsewhere.", "bob", 0)
    rl.set_status(db, other, "approved", "bob")
    assert rl.pair_stamp(db, ann) == seen[0]                   # another pair's writes
    writes = [
        lambda: rl.save_caption(db, caption.id, "Edited.", "bob", 0),
        lambda: rl.undo_caption(db, caption.id, "bob", 1),
        lambda: rl.set_flag(db, ann, "descriptor", descriptor, True, "bob"),
        lambda: rl.set_flag(db, ann, "descriptor", descriptor, False, "bob"),
        lambda: rl.set_status(db, ann, "approved", "bob"),
        lambda: rl.save_note(db, ann, "a note", "bob"),
    ]
    for write in writes:
        write()
        stamp = rl.pair_stamp(db, ann)
        assert stamp not in seen
        seen.append(stamp)
    assert rl.pair_stamp(db, "no-such-annotation") == ""


def test_captions_panel_has_undo_history_and_marks_live_redraws(store):
    db, ann = store["db"], store["annotation_ids"][0]
    rl.save_caption(db, f"{ann}:c2", "Drop the lamp.", "ann", 0)
    view = rl.load_pair(db, ann)
    html = rl.render_captions_html(view)
    assert html.count("data-undo='1'") == 6 and html.count("data-undo='1' title") == 6
    assert html.count(" disabled>↶ Undo") == 5                 # only the edited caption can be undone
    assert html.count("<details class='g4c-caphist'>") == 6 and "History · 2 versions" in html
    assert "data-live" not in html and "data-live='1'" in rl.render_captions_html(view, live=True)
    tokens = {rl.render_captions_html(view).split("data-render='")[1][:12] for _ in range(3)}
    assert len(tokens) == 3                                      # each redraw is told apart
    state = rl.caption_state(rl.load_caption(db, f"{ann}:c2"))
    assert state["version"] == 1 and state["text"] == "Drop the lamp." and state["can_undo"]
    assert state["meta"] == "3 · v1 · edited by ann" and "History · 2 versions" in state["history_html"]


def test_runs_with_one_name_backend_and_model_have_labels_a_reviewer_can_tell_apart(store):
    # Two simulator runs named 'demo' with model sim-1 (error rates 0.1 and 0.3) showed in
    # the Run filter as '2: demo (sim-1)' and '3: demo (sim-1)': nothing said which was which.
    from store.annotations import create_run, ensure_annotations, update_run

    db = store["db"]
    pair_ids = [r[0] for r in db.execute("SELECT id FROM pairs ORDER BY id").fetchall()]
    low = create_run(db, "simulator", "sim-1", name="demo", settings={"error_rate": 0.1, "seed": 0})
    high = create_run(db, "simulator", "sim-1", name="demo", settings={"error_rate": 0.3, "seed": 0, "limit": 2})
    update_run(db, low.id, started_at="2026-11-20T09:15:00.000+00:00")
    update_run(db, high.id, started_at="2026-11-21T17:40:00.000+00:00")
    ensure_annotations(db, low.id, pair_ids[:2])
    runs = dict((value, label) for label, value in rl.filter_choices(db)["runs"])
    low_label, high_label = runs[str(low.id)], runs[str(high.id)]
    assert low_label.startswith(f"run {low.id} · demo") and "simulator / sim-1" in low_label
    assert "started 2026-11-20 09:15" in low_label and "started 2026-11-21 17:40" in high_label
    assert "error_rate 0.1" in low_label and "error_rate 0.3" in high_label
    assert "limit none" in low_label and "limit 2" in high_label
    assert "0 of 2 pairs annotated" in low_label and "0 of 0 pairs annotated" in high_label
    # a setting all such runs share says nothing, so it is left out
    assert "seed" not in low_label
    # apart from the run number, the labels still differ
    assert low_label.split(" · ", 1)[1] != high_label.split(" · ", 1)[1]
    assert runs[rl.ANY] == rl.ANY
    # the filter's value is the run id alone
    assert rl.make_filter("all", str(high.id), None, None).run_id == high.id
    with pytest.raises(rl.ReviewActionError, match="not a run"):
        rl.make_filter("all", "demo (sim-1)", None, None)


def test_a_caption_saved_with_line_breaks_is_stored_on_one_line_and_the_reviewer_told(store):
    # Shift+Enter (or a paste) put a line break into a caption, and it was stored as typed:
    # exports and the CLIP tokenizer take captions as one line.
    db, ann = store["db"], store["annotation_ids"][1]
    caption = rl.load_pair(db, ann).individual[0]
    result = rl.save_caption(db, caption.id, "Make the box\nyellow \r\n\n and round.\n", "alice", caption.version)
    assert result.saved and result.text == "Make the box yellow and round."
    assert "line breaks" in result.message and "one line" in result.message
    stored = db.execute("SELECT text FROM caption_edits WHERE caption_id = ?", [caption.id]).fetchall()
    assert stored == [("Make the box yellow and round.",)]
    assert rl.load_caption(db, caption.id).history[-1].text == "Make the box yellow and round."
    # only line breaks added to the stored text: nothing written, and the reviewer told why
    again = rl.save_caption(db, caption.id, "Make the box yellow\nand round.", "alice", result.version)
    assert not again.saved and not again.conflict and again.text == "Make the box yellow and round."
    assert "line breaks" in again.message
    assert db.execute("SELECT COUNT(*) FROM caption_edits WHERE caption_id = ?", [caption.id]).fetchone()[0] == 1


def test_what_others_did_in_the_millisecond_the_pair_was_opened_is_not_missed(store):
    # "Since you opened this pair" compared stored times (milliseconds) with the time the
    # page read the pair: an edit, flag or decision stored in that same millisecond was
    # never mentioned, and an approve replaced that decision without a word.
    from store.db import utc_now

    db, ann = store["db"], store["annotation_ids"][0]
    cap = rl.load_pair(db, ann).individual[0]
    rl.set_flag(db, ann, "caption", cap.id, True, "ann")   # hers, before she opened it
    opened_at = utc_now()
    mark = rl.pair_watermark(db, ann)
    rl.save_caption(db, cap.id, "Something else.", "bob", 0)
    rl.set_flag(db, ann, "caption", cap.id, False, "bob")
    rl.set_flag(db, ann, "descriptor", rl.load_pair(db, ann).stage2[0].descriptors[0].target_id, True,
                "carl")
    rl.set_status(db, ann, "rejected", "bob")
    with db.conn:  # every one of them in the millisecond the page read the pair
        for table, column in (("caption_edits", "created_at"), ("flags", "created_at"), ("flags", "removed_at"),
                              ("review_events", "created_at"), ("annotations", "reviewed_at")):
            db.execute(f"UPDATE {table} SET {column} = ? WHERE {column} IS NOT NULL", [opened_at])
    lines = rl.activity_since(db, ann, mark, "ann")
    assert sorted(lines) == sorted(["bob edited caption c0 (v1)", "bob unflagged caption c0",
                                    "carl flagged a descriptor", "bob marked it rejected"])
    assert "bob rejected this pair" in rl.set_status(db, ann, "approved", "ann", seen_since=mark)
    # a flag removed before she opened the pair is old news; no watermark, no lines
    later = rl.pair_watermark(db, ann)
    assert rl.activity_since(db, ann, later, "ann") == []
    assert rl.activity_since(db, ann, "", "ann") == []
    assert rl.activity_since(db, ann, opened_at, "ann") == []  # a page opened before watermarks


def test_an_emptied_caption_is_not_saved_and_the_message_names_it_as_the_page_does(store):
    # The message named the caption by its raw id ('caption 1:9f3c...:c0'), where every
    # other message on the page says 'caption c0'.
    db, ann = store["db"], store["annotation_ids"][2]
    caption = rl.load_pair(db, ann).individual[0]
    result = rl.save_caption(db, caption.id, " \n ", "alice", caption.version)
    assert not result.saved and result.text == caption.text
    assert result.message == "caption c0: an empty caption is not saved; flag it instead"
    assert db.execute("SELECT COUNT(*) FROM caption_edits WHERE caption_id = ?", [caption.id]).fetchone()[0] == 0


def test_pair_name_is_what_the_page_calls_the_pair(store):
    db, ann = store["db"], store["annotation_ids"][3]
    assert rl.pair_name(db, ann) == f"pair p3 (run {store['run_id']})"
    assert rl.pair_name(db, "9:nope") == "pair 9:nope"


def test_a_refused_note_names_its_pair_and_carries_the_text(store):
    # The note is saved when its box is left; leaving it for Next or Approve moves the
    # page to another pair, whose note replaces the box. The refusal said "Your text is
    # still in the box: copy it": it was not, and it was not in the message either.
    db, ann = store["db"], store["annotation_ids"][1]
    rl.save_note(db, ann, "the lamp is not there", "ann", expected="")
    with pytest.raises(rl.ReviewActionError) as refused:
        rl.save_note(db, ann, "bob's careful note", "bob", expected="")
    message = str(refused.value)
    assert message.startswith(f"NOT SAVED: ann changed the note of pair p1 (run {store['run_id']}) while you")
    assert "Your note was: “bob's careful note”" in message and "still in the box" not in message


def test_a_captions_clip_token_count_is_of_its_current_text(store):
    # A compound's line gave the token count stored by the pipeline for its original text
    # after a reviewer replaced the text, so a compound edited past CLIP's 77 tokens still
    # read '20 CLIP tokens'; and an edited stage 3 caption over 77 tokens said so only in
    # the editor's save message, never to the next reviewer, though training cuts it.
    from pipeline.compound import count_clip_tokens

    db, ann = store["db"], store["annotation_ids"][0]
    compound = rl.load_pair(db, ann).compound[0]
    assert f"{compound.token_count} CLIP tokens" in rl.caption_meta(compound)
    long_text = "Make the box " + " ".join(["very"] * 80) + " yellow."
    tokens = count_clip_tokens(long_text)
    rl.save_caption(db, compound.id, long_text, "ann", compound.version)
    rl.save_caption(db, f"{ann}:c1", long_text, "ann", 0)
    view = rl.load_pair(db, ann)
    for cap in (view.compound[0], view.individual[1]):
        assert (f"{tokens} CLIP tokens: over the 77 the retrieval model reads, training cuts the rest off"
                in rl.caption_meta(cap)), cap.id
    rl.save_caption(db, compound.id, "Make the box yellow.", "ann", view.compound[0].version)
    assert f" · {count_clip_tokens('Make the box yellow.')} CLIP tokens" in rl.caption_meta(
        rl.load_pair(db, ann).compound[0])
    assert "CLIP tokens" not in rl.caption_meta(view.individual[0])    # a stage 3 caption that fits: no count


def test_next_free_passes_over_pairs_open_on_other_pages(store):
    from ui.presence import Presence

    db, ids = store["db"], store["annotation_ids"]
    flt = rl.make_filter("unreviewed", None, None, None)
    now = [0.0]
    presence = Presence(open_seconds=15, clock=lambda: now[0])
    presence.touch("page-a", ids[0], "ann")
    presence.touch("page-b", ids[1])                  # no name yet
    assert rl.next_free(db, flt, None, presence.open_elsewhere("page-c")) == ids[2]
    assert rl.next_free(db, flt, ids[0], presence.open_elsewhere("page-a")) == ids[2]
    assert rl.next_free(db, flt, None, presence.open_elsewhere("page-a")) == ids[0]  # its own pair is not busy
    assert presence.others_on(ids[1], "page-a") == ["someone"]
    presence.touch("page-b", ids[1], "bob")           # a tick brings the name
    presence.touch("page-c", ids[1], "cy")
    presence.touch("page-c", ids[1])                  # a move keeps the name the page gave
    assert presence.others_on(ids[1], "page-a") == ["bob", "cy"]
    # bob reloads: his old page is heard of until it times out, but is not 'someone else'
    presence.touch("page-b2", ids[1], "bob")
    assert presence.others_on(ids[1], "page-b2") == ["cy"]
    # every pair left is open elsewhere: the plain next one rather than none
    assert rl.next_free(db, flt, ids[3], set(ids)) == ids[4]
    assert rl.next_free(db, flt, ids[4], set(ids)) is None
    now[0] = 16.0                                     # pages not heard from have left
    presence.touch("page-a", ids[0])
    assert presence.open_elsewhere("page-a") == set() and presence.others_on(ids[1], None) == []


def test_a_pair_a_newer_run_annotated_again_says_exports_take_that_one(store):
    # Exports take each pair's newest finished annotation. A run started while reviewers
    # worked (Pipeline tab, CLI) annotated pairs again, and the page went on showing the
    # older run's annotations in the queue with nothing said: reviewers approved them and
    # the default export left every one out (only the Export tab said so, afterwards).
    from store.annotations import complete_annotation, create_run, ensure_annotations, get_annotation

    db, ids = store["db"], store["annotation_ids"]
    old = get_annotation(db, ids[0])
    status = rl.queue_status(db, rl.QueueFilter(), ids[0])
    assert "annotated this pair again" not in rl.render_info_html(rl.load_pair(db, ids[0]), status)
    run = create_run(db, "simulator", "sim-2", name="again")
    ensure_annotations(db, run.id, [old.pair_id, get_annotation(db, ids[1]).pair_id])
    html = rl.render_info_html(rl.load_pair(db, ids[0]), status)
    assert "annotated this pair again" not in html          # run 2 has not finished it: exports take run 1's
    complete_annotation(db, f"{run.id}:{old.pair_id}", stage1_id=old.stage1_id, stage2_id=old.stage2_id,
                        captions=["Make the box red."], compounds=[])
    html = rl.render_info_html(rl.load_pair(db, ids[0]), status)
    assert rl.escape_text(
        f"run {run.id} annotated this pair again: exports take run {run.id}'s annotation, not this one "
        f"(to export this review choose run {old.run_id} in the Export tab); Go to p0 opens run {run.id}'s") in html
    assert "annotated this pair again" not in rl.render_info_html(rl.load_pair(db, f"{run.id}:{old.pair_id}"), status)
    assert rl.resolve_goto(db, "p0") == f"{run.id}:{old.pair_id}"
