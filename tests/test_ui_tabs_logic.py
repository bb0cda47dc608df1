"""The Pipeline, Stats, Export and Retrieve tabs' logic, without Gradio or a browser."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from store.db import open_db
from ui import export_logic as el
from ui import pipeline_logic as pl
from ui import review_logic as rl
from ui import stats_logic as sl
from ui.retrieve_logic import (DatasetQuery, RetrieveError, RetrieveService, dataset_queries, load_upload,
                               render_results_html)
from ui_store_builder import build_review_store


@pytest.fixture
def store(tmp_path):
    info = build_review_store(tmp_path, 4)
    info["db"] = open_db(info["db_path"])
    return info


# ---------------------------------------------------------------- pipeline

def test_base_url_from_the_app_must_be_this_machine():
    assert pl.check_base_url("") is None
    assert pl.check_base_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert pl.check_base_url("http://localhost:11434/v1")
    with pytest.raises(pl.PipelineControlError, match="not this machine"):
        pl.check_base_url("https://evil.example.com/v1")
    with pytest.raises(pl.PipelineControlError, match="look like"):
        pl.check_base_url("ftp://127.0.0.1/")


def test_run_form_is_checked():
    options = pl.options_from_form(pl.RunForm(backend="simulator", limit="5", concurrency=" 4 ", error_rate=0.2))
    assert (options.limit, options.concurrency, options.error_rate) == (5, 4, 0.2)
    for bad, message in [(pl.RunForm(limit="0"), "at least 1"), (pl.RunForm(limit="2.5"), "whole number"),
                         (pl.RunForm(concurrency="many"), "whole number"), (pl.RunForm(backend="gpt"), "backend"),
                         (pl.RunForm(error_rate=1.5), "between 0 and 1")]:
        with pytest.raises(pl.PipelineControlError, match=message):
            pl.options_from_form(bad)


def test_progress_text():
    assert "No run" in pl.format_progress(None)
    text = pl.format_progress({"run_id": 3, "status": "running", "pairs_total": 10, "pairs_done": 4,
                               "pairs_failed": 1, "pairs_pending": 5, "calls": 12, "calls_reused": 2,
                               "call_errors": 1, "cost_usd": 0.0123, "failures": {"invalid: x": 1},
                               "last_error": "429", "thread_running": True, "started_by": "ann"})
    assert "4 done + 1 failed of 10 (50%)" in text and "$0.0123" in text and "invalid: x: 1" in text
    assert text.splitlines()[0] == "run 3 · running · started by ann"  # "running" once
    winding = pl.format_progress({"run_id": 3, "status": "stopped", "thread_running": True, "started_by": "ann"})
    assert winding.splitlines()[0] == "run 3 · stopped · still finishing · started by ann"


def test_controller_runs_one_background_run_against_a_real_http_server(store, monkeypatch):
    from openai_server import start_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    server = start_server(latency=0.2)
    try:
        controller = pl.PipelineController(str(store["db_path"]))
        form = pl.RunForm(backend="openai", model="gpt-4o-mini", base_url=server.url, concurrency=2, limit=3)
        handle = controller.start(form, "ann")
        with pytest.raises(pl.PipelineControlError, match="still going"):
            controller.start(form, "bob")
        deadline = time.time() + 60
        while controller.running and time.time() < deadline:
            time.sleep(0.1)
        snapshot = controller.snapshot()
        assert snapshot["status"] == "finished" and snapshot["pairs_done"] == 3, snapshot
        assert snapshot["started_by"] == "ann"
        db = store["db"]
        done = db.execute("SELECT COUNT(*) FROM annotations WHERE run_id = ? AND status = 'done'",
                          [handle.run_id]).fetchone()[0]
        assert done == 3
        # the new pairs are in the review queue
        assert rl.queue_status(db, rl.QueueFilter("all"), None).queue_total == 4 + 3
        assert [row[0] for row in pl.runs_table(str(store["db_path"]))] == [1, handle.run_id]
        assert controller.stop() == "no run is going"
    finally:
        server.stop()


def test_a_run_stopped_for_a_reason_it_explains_puts_no_traceback_in_the_apps_log(store, monkeypatch, caplog):
    # The Pipeline tab says why a run stopped (server unreachable, key refused, quota); the
    # terminal running `good4cir app` showed it as 'pipeline run failed' and a traceback.
    import logging

    from ui.server import free_port

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    controller = pl.PipelineController(str(store["db_path"]))
    with caplog.at_level(logging.WARNING, logger="good4cir"):
        controller.start(pl.RunForm(backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", limit=1,
                                    new_run=True), "ann")
        deadline = time.time() + 90
        while controller.running and time.time() < deadline:
            time.sleep(0.1)
    assert "cannot reach the server" in pl.format_progress(controller.snapshot())
    records = [r for r in caplog.records if r.name.startswith("good4cir")]
    assert any("cannot reach the server" in r.getMessage() for r in records), records
    assert not any(r.exc_info for r in records)


@contextlib.contextmanager
def _slow_run_started(store, monkeypatch):
    """A controller whose new openai run (by ann) is going against a slow local server;
    the run is waited for to end when the block leaves."""
    from openai_server import start_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    server = start_server(latency=1.5)
    try:
        controller = pl.PipelineController(str(store["db_path"]))
        controller.start(pl.RunForm(backend="openai", base_url=server.url, concurrency=1, new_run=True), "ann")
        yield controller, server
        deadline = time.time() + 60
        while controller.running and time.time() < deadline:
            time.sleep(0.1)
    finally:
        server.stop()


def test_controller_stops_a_run(store, monkeypatch):
    with _slow_run_started(store, monkeypatch) as (controller, _):
        assert controller.running
        assert controller.stop().startswith("stopping run")
    snapshot = controller.snapshot()
    assert snapshot["status"] == "stopped" and snapshot["pairs_done"] < 4, snapshot
    assert "stopped" in pl.format_progress(snapshot)


def test_a_start_while_a_stopped_run_winds_down_says_it_is_stopping(store, monkeypatch):
    # After Stop the run finishes its in-flight calls; a Start then said "stop it first",
    # telling the reviewer to do what they had just done.
    with _slow_run_started(store, monkeypatch) as (controller, server):
        controller.stop()
        with pytest.raises(pl.PipelineControlError) as caught:
            controller.start(pl.RunForm(backend="openai", base_url=server.url, concurrency=1), "bob")
        assert "is stopping" in str(caught.value) and "stop it first" not in str(caught.value)
        assert "stopping run" in controller.stop()


def test_a_start_says_whether_it_resumed_a_run_and_what_it_did(store, monkeypatch):
    # Limit N takes the store's first N pairs (done ones skipped). The tab said "Limit
    # (pairs) · empty = all pending pairs", so a reviewer asking for 2 more pairs got a
    # start that did nothing and said nothing (the box showed the same finished run),
    # and could not tell a resumed run from a new one re-annotating reviewed pairs.
    from openai_server import start_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    # a reviewed pair: the new run's annotation of it is what exports take from now on
    rl.set_status(store["db"], store["annotation_ids"][0], "approved", "ann")
    server = start_server()
    try:
        controller = pl.PipelineController(str(store["db_path"]))
        form = pl.RunForm(backend="openai", model="gpt-4o-mini", base_url=server.url, limit=2)
        for _ in range(2):
            controller.start(form, "ann")
            deadline = time.time() + 60
            while controller.running and time.time() < deadline:
                time.sleep(0.1)
            if _ == 0:
                first = pl.format_progress(controller.snapshot())
        again = pl.format_progress(controller.snapshot())
        run_id = controller.snapshot()["run_id"]
        # 'start a new run' ticked: the same settings, a new run, and it does not say
        # that no earlier run had them
        controller.start(pl.RunForm(backend="openai", model="gpt-4o-mini", base_url=server.url, limit=2,
                                    new_run=True), "ann")
        deadline = time.time() + 60
        while controller.running and time.time() < deadline:
            time.sleep(0.1)
        forced = pl.format_progress(controller.snapshot())
    finally:
        server.stop()
    forced_id = controller.snapshot()["run_id"]
    assert forced_id != run_id
    assert f"new run {forced_id} (a new run, as asked; run {run_id} has these settings)" in forced
    assert f"new run {run_id} (no earlier run has these settings): 2 pairs annotated by this start" in first
    assert ("1 of its pairs was reviewed in an earlier run: exports take each pair's newest annotation, "
            f"so review it again in run {run_id}") in first
    assert "reviewed in an earlier run" not in again
    assert f"resumed run {run_id} (same settings): 0 pairs annotated by this start" in again
    assert "nothing was left to do: Limit 2 takes the store's first 2 pairs, and they are done" in again
    assert "the store's first N pairs" in pl.LIMIT_LABEL


# ---------------------------------------------------------------- stats

def test_human_flag_rates_count_decided_pairs_only(store):
    db, ids = store["db"], store["annotation_ids"]
    view = rl.load_pair(db, ids[0])
    rl.set_flag(db, ids[0], "descriptor", view.stage2[0].descriptors[0].target_id, True, "ann")
    rl.set_flag(db, ids[0], "caption", view.individual[0].id, True, "ann")
    rl.set_flag(db, ids[0], "caption", view.compound[0].id, True, "ann")
    rl.set_flag(db, ids[1], "caption", rl.load_pair(db, ids[1]).individual[0].id, True, "ann")  # undecided
    rl.set_status(db, ids[0], "approved", "ann")
    rl.set_status(db, ids[2], "rejected", "ann")
    [row] = sl.human_flag_counts(db)
    assert row["pairs"] == 2
    assert row["stage 1 descriptors"] == {"items": 14, "flagged": 0}
    assert row["stage 2 descriptors"] == {"items": 14, "flagged": 1}
    assert row["stage 3 captions"] == {"items": 8, "flagged": 1}
    assert row["stage 4 compounds"] == {"items": 4, "flagged": 1}
    by_model = sl.human_rates_by([row], "model")
    assert by_model["sim-1"]["stage 3 captions"] == pytest.approx(1 / 8)
    progress = sl.review_progress(db)
    label = rl.run_labels(db, progress=False)[1]
    assert progress[label] == {"approved": 1, "rejected": 1, "unreviewed": 2, "flagged": 2,
                                            "annotating": 0, "failed": 0}
    table = sl.summary_rows([row], sl.caption_stats(db))
    assert table[0][:4] == [label, "sim-1", "-", 2] and table[0][6] == "12.5%"


def test_caption_stats_use_current_text(store):
    db, ann = store["db"], store["annotation_ids"][0]
    label = rl.run_labels(db, progress=False)[1]
    before = sl.caption_stats(db)[label]
    rl.save_caption(db, f"{ann}:c0", "one two three four five six seven eight nine ten eleven twelve", "ann", 0)
    after = sl.caption_stats(db)[label]
    assert after["captions"] == before["captions"] == 16
    assert max(after["lengths"]) == 12 and after["mean_words"] > before["mean_words"]
    assert 0 < after["distinct_1"] <= 1 and 0 < after["distinct_2"] <= 1


def test_plots_render(store):
    db = store["db"]
    rows = sl.human_flag_counts(db)
    for fig in (sl.plot_human_rates(rows), sl.plot_ground_truth({}), sl.plot_review_progress(sl.review_progress(db)),
                sl.plot_caption_stats(sl.caption_stats(db))):
        fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
        assert fig.axes


def test_stats_and_pipeline_tabs_label_runs_of_one_name_as_the_run_filter_does(store):
    # Two simulator runs named 'demo' (error rates 0.1 and 0.3) read 'run 2 (demo)' and
    # 'run 3 (demo)' in the Stats tab, and 'demo' in the Pipeline tab's runs table: only
    # the number told them apart, while the Review tab's Run filter named the setting.
    from store.annotations import create_run, ensure_annotations, update_run

    db = store["db"]
    pair_ids = [r[0] for r in db.execute("SELECT id FROM pairs ORDER BY id").fetchall()]
    low = create_run(db, "simulator", "sim-1", name="demo", settings={"error_rate": 0.1, "seed": 0})
    high = create_run(db, "simulator", "sim-1", name="demo", settings={"error_rate": 0.3, "seed": 0})
    update_run(db, low.id, started_at="2026-11-20T09:15:00.000+00:00")
    ensure_annotations(db, low.id, pair_ids[:2])
    ensure_annotations(db, high.id, pair_ids[:2])
    stats = {row["run_id"]: row["label"] for row in sl.human_flag_counts(db)}
    table = {row[0]: row for row in pl.runs_table(str(store["db_path"]))}
    for shown in (stats, {run_id: row[1] for run_id, row in table.items()}):
        assert "error_rate 0.1" in shown[low.id] and "error_rate 0.3" in shown[high.id]
        assert "started 2026-11-20 09:15" in shown[low.id] and "simulator / sim-1" in shown[high.id]
    assert set(sl.review_progress(db)) >= {stats[low.id], stats[high.id]}
    # the labelling of the Run filter, less its annotated-pairs count
    labels = rl.run_labels(db, progress=False)
    choices = dict((value, label) for label, value in rl.run_choices(db))
    assert choices[str(low.id)].startswith(labels[low.id] + " · ") and "annotated" not in labels[low.id]
    assert stats == labels and pl.RUNS_HEADERS[1] == "label"
    assert all(table[run_id][1] == label for run_id, label in labels.items())
    assert table[1][1] == labels[1] and "test run" in labels[1]


# ---------------------------------------------------------------- export

def test_export_download_keeps_edits_and_drops_flagged(store, tmp_path):
    db, ids = store["db"], store["annotation_ids"]
    rl.save_caption(db, f"{ids[0]}:c0", "An edited caption.", "ann", 0)
    rl.set_flag(db, ids[0], "caption", f"{ids[0]}:c3", True, "ann")
    rl.set_status(db, ids[0], "approved", "ann")
    path, stats = el.export_to_download(db, "good4cir", out_dir=tmp_path)
    data = json.loads(path.read_text())
    assert path.name == "dataset.json" and stats["pairs"] == 1 and len(data) == 1
    texts = data[0]["difference_captions"]
    assert "An edited caption." in texts and "Add a potted plant." not in texts
    assert "flagged captions left out" in el.describe_export(stats)
    path, stats = el.export_to_download(db, "jsonl", include_unreviewed=True, include_flagged=True, out_dir=tmp_path)
    assert stats["pairs"] == 4 and len(path.read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="unknown export format"):
        el.export_to_download(db, "csv", out_dir=tmp_path)
    assert "nothing to export" in el.describe_export({"pairs": 0, "format": "cirr"})


def test_export_says_which_approved_pairs_a_newer_runs_annotation_keeps_out(store, tmp_path):
    # A reviewer approved two pairs of run 1; run 2 annotated one of them again. An export
    # takes each pair's newest annotation, so the approved one was left out and the
    # summary only said "1 pair": the approval seemed lost.
    from store.annotations import complete_annotation, create_run, ensure_annotations

    db, ids = store["db"], store["annotation_ids"]
    rl.set_status(db, ids[0], "approved", "ann")
    rl.set_status(db, ids[1], "approved", "ann")
    pair_id = ids[0].split(":", 1)[1]
    run2 = create_run(db, "simulator", "sim-2", name="again")
    ensure_annotations(db, run2.id, [pair_id])
    complete_annotation(db, f"{run2.id}:{pair_id}", stage1_id=None, stage2_id=None, captions=["Add a lamp."])
    path, stats = el.export_to_download(db, "good4cir", out_dir=tmp_path)
    assert stats["pairs"] == 1
    text = el.describe_export(stats)
    assert f"1 approved pair left out: run {run2.id} annotated it again" in text
    assert f"approve it in run {run2.id}" in text and f"choose run {store['run_id']} in Run" in text
    assert "nothing to export" not in text
    # with unreviewed pairs included, the newer run's text goes out instead: said too
    path, stats = el.export_to_download(db, "good4cir", include_unreviewed=True, out_dir=tmp_path)
    assert f"1 approved pair exported with run {run2.id}'s unreviewed captions" in el.describe_export(stats)
    # the run chosen: nothing to explain
    path, stats = el.export_to_download(db, "good4cir", run_id=store["run_id"], out_dir=tmp_path)
    assert stats["pairs"] == 2 and "approved pair" not in el.describe_export(stats)
    # the newer run annotated one pair: its export holds that pair alone, and says why
    path, stats = el.export_to_download(db, "good4cir", run_id=run2.id, include_unreviewed=True, out_dir=tmp_path)
    total = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
    assert stats["pairs"] == 1
    assert f"{total - 1} pairs the chosen run did not annotate left out" in el.describe_export(stats)
    # a split that does not hold the pair: not mentioned
    split = db.execute("SELECT split FROM pairs WHERE id = ?", [pair_id]).fetchone()[0]
    other = "val" if split == "train" else "train"
    path, stats = el.export_to_download(db, "good4cir", split=other, out_dir=tmp_path)
    assert "approved pair" not in el.describe_export(stats)


def test_export_downloads_keep_only_the_newest_folders(store, tmp_path, monkeypatch):
    # Each click used to leave its export in a new /tmp folder for good.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(el, "_export_root", None)
    paths = [el.export_to_download(store["db"], "jsonl", include_unreviewed=True)[0]
             for _ in range(el.KEEP_EXPORTS + 3)]
    root = paths[0].parent.parent
    assert root.parent == tmp_path and len({p.parent for p in paths}) == len(paths)
    kept = sorted(p.parent for p in paths if p.exists())
    assert kept == sorted(p.parent for p in paths[-el.KEEP_EXPORTS:])
    assert sorted(root.iterdir()) == kept
    assert all(len(p.read_text().splitlines()) == 4 for p in paths[-el.KEEP_EXPORTS:])


# ---------------------------------------------------------------- retrieve

def test_dataset_queries_and_missing_index(store):
    db = store["db"]
    queries = dataset_queries(db)
    assert len(queries) == 4 and queries[0].text.startswith("Make the box")  # the current first caption
    service = RetrieveService(str(store["db_path"]), None)
    assert not service.available
    with pytest.raises(RetrieveError, match="--index"):
        service.query(db, pair=queries[0], upload=None, text="make it blue", k=5)
    with pytest.raises(RetrieveError, match="modification text"):
        service.query(db, pair=queries[0], upload=None, text="  ", k=5)


def test_an_uploaded_file_that_is_not_an_image_is_named_plainly(store, tmp_path, monkeypatch):
    # The Retrieve tab hands the upload over undecoded ({'path', 'orig_name'}, Gradio's
    # preprocessing off); a text file renamed .png must give one plain sentence.
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # uploads lie in Gradio's upload folder
    db = store["db"]
    bad = tmp_path / "cached-upload.png"
    bad.write_text("this is not an image")
    service = RetrieveService(str(store["db_path"]), None)
    with pytest.raises(RetrieveError, match=r"uploaded file 'notes\.png' is not an image"):
        service.query(db, pair=None, upload={"path": str(bad), "orig_name": "notes.png"}, text="add a lamp", k=5)
    good = tmp_path / "upload.png"
    good.write_bytes(next(Path(store["image_dir"]).glob("ref*.png")).read_bytes())
    # A real image it cannot use says why, not "upload a PNG" (it is one), and names no temp file.
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RetrieveError, match=r"^the uploaded file 'room\.png' cannot be used: truncated or corrupt"):
        load_upload({"path": str(cut), "orig_name": "room.png"})
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 5_001)).save(huge)
    with pytest.raises(RetrieveError, match=r"^the uploaded file 'scan\.png' cannot be used: refused, "
                                            r"10000x5001 is 50,010,000 pixels, more than the limit"):
        load_upload({"path": str(huge), "orig_name": "scan.png"})
    image = load_upload({"path": str(good), "orig_name": good.name})
    assert image.mode == "RGB" and image.size == (256, 256)


def test_results_html_marks_the_true_target_and_escapes():
    pair = DatasetQuery("p", "p1 · test · x", "ref", "/x/ref.png", "tgt", "<b>target</b>", "text")
    hits = [{"rank": 1, "name": "<img src=x>", "score": 0.5, "image_id": "aaa", "is_target": False},
            {"rank": 2, "name": "t.png", "score": 0.4, "image_id": "tgt", "is_target": True}]
    html = render_results_html(hits, pair, uploaded=False)
    assert "rank 2" in html and "g4c-true" in html and "<img src=x>" not in html and "&lt;b&gt;" in html


def test_a_run_that_cannot_start_says_why(store, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    controller = pl.PipelineController(str(store["db_path"]))
    with pytest.raises(pl.PipelineControlError, match="OPENAI_API_KEY"):
        controller.start(pl.RunForm(backend="openai"), "ann")
    assert not controller.running


def test_a_missing_key_names_the_apps_field_and_where_the_key_goes_not_a_cli_flag(store, monkeypatch):
    # The backend's own message said "pass --base-url", a flag the app has no box for.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    controller = pl.PipelineController(str(store["db_path"]))
    with pytest.raises(pl.PipelineControlError) as caught:
        controller.start(pl.RunForm(backend="openai", model="gpt-4o-mini"), "ann")
    said = str(caught.value)
    assert "--base-url" not in said
    assert "OPENAI_API_KEY" in said and "Base URL" in said and "good4cir app" in said
    assert not controller.running


def test_export_tab_says_a_cirr_file_of_several_splits_mixes_them(tmp_path):
    # CIRR has no split field (the file name says it): the Export tab's CIRR file of a
    # whole store held train, val and test1 with no word of it.
    from store.importers import import_dataset

    db = open_db(tmp_path / "s.db")
    import_dataset(db, "cirr", Path(__file__).parent / "fixtures" / "cirr")
    _, stats = el.export_to_download(db, "cirr", include_unreviewed=True, out_dir=tmp_path)
    assert "mixes splits test1, train, val" in el.describe_export(stats)
    _, stats = el.export_to_download(db, "cirr", include_unreviewed=True, split="val", out_dir=tmp_path)
    assert "mixes" not in el.describe_export(stats)


def test_retrieve_tab_queries_with_a_caption_reviewers_kept(tmp_path):
    # A caption flagged as a hallucination, or a pair reviewers rejected, is not what
    # the Retrieve tab should offer as the modification to search with.
    from store.review import add_flag, list_captions, set_review_status
    from ui.retrieve_logic import dataset_queries

    info = build_review_store(tmp_path, 2)
    db = open_db(info["db_path"])
    annotation = info["annotation_ids"][0]
    pair_id = db.execute("SELECT pair_id FROM annotations WHERE id = ?", [annotation]).fetchone()[0]

    def text_of_pair():
        return next(q.text for q in dataset_queries(db) if q.pair_id == pair_id)

    individual = [c for c in list_captions(db, annotation) if c.kind == "individual"]
    assert text_of_pair() == individual[0].text
    add_flag(db, annotation, "caption", individual[0].id, "ann")
    assert text_of_pair() == individual[1].text
    set_review_status(db, annotation, "rejected", "ann")
    originals = json.loads(db.execute("SELECT original_captions FROM pairs WHERE id = ?",
                                      [pair_id]).fetchone()[0] or "[]")
    assert text_of_pair() == (originals[0] if originals else "")
