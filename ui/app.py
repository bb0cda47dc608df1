"""The good4cir review app: `build_app(db_path) -> gr.Blocks`. Nothing runs at import.

Callbacks are thin: they read widget values, call the plain functions of
review_logic / stats_logic / export_logic / pipeline_logic / retrieve_logic, and put the
results back. Launching (host, auth, image route) is server.py's job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # the app reaches no network

import gradio as gr  # noqa: E402

from store.models import FLAG_REASONS  # noqa: E402
from store.queue import QUEUES  # noqa: E402

from . import review_logic as rl  # noqa: E402
from .assets import BOARD_JS, CAPTIONS_JS, IMAGES_JS, SHORTCUTS_MD, URL_JS  # noqa: E402
from .connections import Connections  # noqa: E402
from .presence import Presence  # noqa: E402
from .security import login_user  # noqa: E402

# Reviewers each run several events at once (a blur, a click, a timer); Gradio's
# default of one event at a time per handler would make them wait on each other.
CONCURRENCY_LIMIT = 16
# How often each open review page asks whether someone else changed the shown pair.
LIVE_SECONDS = 4.0


def _theme():
    # System fonts: the default theme would fetch Google Fonts, and the app makes no
    # network requests.
    return gr.themes.Default(
        font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"],
    )


def build_app(db_path: str | Path, *, index_path: Optional[str] = None, auth_enabled: bool = False) -> gr.Blocks:
    """The Blocks app over the store at db_path. `index_path`: a retrieval index folder
    for the Retrieve tab. `auth_enabled`: reviewers are the logged-in users."""
    from .pipeline_logic import PipelineController
    from .retrieve_logic import RetrieveService
    from .stats_logic import GroundTruthCache

    conns = Connections(db_path)
    controller = PipelineController(str(db_path))
    presence = Presence()
    gt_cache = GroundTruthCache()
    service = RetrieveService(str(db_path), index_path)

    def reviewer_of(request, typed: Optional[str]) -> str:
        """The logged-in user when there is a login (never what the page claims), else
        the name typed in the Reviewer box."""
        if auth_enabled:
            user = login_user(request)
            if not user:
                raise gr.Error("your login has expired: reload the page and log in again")
            return user
        return (typed or "").strip()

    def page_name(request, typed: Optional[str]) -> str:
        """The name another reviewer sees for this page; "" while there is none."""
        return (login_user(request) or "") if auth_enabled else (typed or "").strip()

    # Gradio keeps a copy of every upload (Retrieve tab) and download (Export tab) in its
    # cache; a review app runs for days, so copies older than a day go, checked hourly.
    with gr.Blocks(title="good4cir review", analytics_enabled=False, fill_width=True,
                   delete_cache=(3600, 86400)) as demo:
        name_store = gr.BrowserState("", storage_key="g4c-reviewer")
        with gr.Row(equal_height=True):
            gr.Markdown("### good4cir · review, edit and export CIR captions")
            reviewer_box = gr.Textbox(
                label="Reviewer", placeholder="your name (recorded with every action)",
                scale=0, min_width=240, elem_id="g4c-reviewer", interactive=not auth_enabled,
            )

        with gr.Tabs():
            with gr.Tab("Review", id="review"):
                review = _review_tab(conns, reviewer_of, reviewer_box, presence, page_name)
            with gr.Tab("Pipeline", id="pipeline") as pipeline_tab:
                pipeline_refresh, pipeline_outputs = _pipeline_tab(conns, controller, reviewer_of, reviewer_box)
            with gr.Tab("Stats", id="stats") as stats_tab:
                stats_refresh, stats_outputs = _stats_tab(conns, gt_cache)
            with gr.Tab("Export", id="export") as export_tab:
                export_refresh, export_outputs = _export_tab(conns)
            with gr.Tab("Retrieve", id="retrieve") as retrieve_tab:
                retrieve_refresh, retrieve_outputs = _retrieve_tab(conns, service)
        # Each tab reads the store afresh when it is opened.
        pipeline_tab.select(pipeline_refresh, None, pipeline_outputs, api_name=False)
        stats_tab.select(stats_refresh, None, stats_outputs, api_name=False)
        export_tab.select(export_refresh, None, export_outputs, api_name=False)
        retrieve_tab.select(retrieve_refresh, None, retrieve_outputs, api_name=False)

        def on_name_typed(name):
            return (name or "").strip()

        reviewer_box.change(on_name_typed, reviewer_box, name_store, api_name=False, queue=False)

        def on_load(stored_name, request: gr.Request):
            user = getattr(request, "username", None)
            name = user or stored_name or ""
            wanted = request.query_params.get("pair") if request else None
            return [name, *review["load"](wanted, request, name)]

        demo.load(on_load, [name_store], [reviewer_box, *review["load_outputs"]], api_name="load")
        demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


# ---------------------------------------------------------------------- review tab

def _review_tab(conns, reviewer_of, reviewer_box, presence, page_name):
    cursor = gr.State(None)  # the shown annotation id

    def page_of(request) -> Optional[str]:
        return getattr(request, "session_hash", None)

    def busy(request) -> set[str]:
        """Pairs other pages show: a move onwards passes over them."""
        return presence.open_elsewhere(page_of(request))

    def info_line(db, annotation_id, flt, request, view=None, status=None):
        """The info panel and its line as shown (queue counts, and who else has the pair
        open): the live tick redraws the panel when the line moves."""
        status = status or rl.queue_status(db, flt, annotation_id)
        open_by = presence.others_on(annotation_id, page_of(request))
        line = status.text() + ("" if not open_by else " | also open for " + ", ".join(open_by))
        return rl.render_info_html(view, status, open_by), line

    def save_caption(payload: dict, request: gr.Request) -> dict:
        """Called from the captions panel's script: save one in-place edit."""
        if isinstance(payload, list):
            payload = payload[0]
        editor = reviewer_of(request, payload.get("reviewer"))
        try:
            result = rl.save_caption(conns.get(), str(payload["caption_id"]), str(payload.get("text", "")),
                                     editor, int(payload["version"]))
        except (rl.ReviewActionError, KeyError, ValueError, rl.StoreError) as exc:
            return {"saved": False, "conflict": False, "error": True, "message": f"NOT SAVED: {exc}"}
        return {"saved": result.saved, "conflict": result.conflict, "error": False, "version": result.version,
                "text": result.text, "editor": editor, "message": result.message,
                "state": None if result.conflict else _row_state(str(payload["caption_id"]))}

    def undo_caption(payload: dict, request: gr.Request) -> dict:
        """Called from the captions panel's script: revert one caption's last edit."""
        if isinstance(payload, list):
            payload = payload[0]
        editor = reviewer_of(request, payload.get("reviewer"))
        try:
            result = rl.undo_caption(conns.get(), str(payload["caption_id"]), editor, int(payload["version"]))
        except (rl.ReviewActionError, KeyError, ValueError, rl.StoreError) as exc:
            return {"saved": False, "conflict": False, "error": True, "message": f"NOT UNDONE: {exc}"}
        return {"saved": result.saved, "conflict": result.conflict, "error": not result.saved,
                "message": result.message,
                "state": _row_state(str(payload["caption_id"])) if result.saved else None}

    def _row_state(caption_id: str) -> Optional[dict]:
        try:
            return rl.caption_state(rl.load_caption(conns.get(), caption_id))
        except rl.StoreError:
            return None
    with gr.Row(equal_height=True):
        queue_radio = gr.Radio(list(QUEUES), value="unreviewed", label="Queue", scale=3, elem_id="g4c-queue")
        run_dd = gr.Dropdown([rl.ANY], value=rl.ANY, label="Run", scale=2, allow_custom_value=False)
        model_dd = gr.Dropdown([rl.ANY], value=rl.ANY, label="Model", scale=2)
        split_dd = gr.Dropdown([rl.ANY], value=rl.ANY, label="Split", scale=1)
        goto_box = gr.Textbox(label="Go to pair", placeholder="pair id or annotation id, Enter", scale=2)
    info_html = gr.HTML("", elem_id="g4c-info", js_on_load=None)
    opened_at = gr.State("")  # rl.pair_watermark of the shown pair as read, to tell others' later work apart
    shown_stamp = gr.State("")  # rl.pair_stamp of the pair as shown: the timer re-renders when it moves
    shown_note = gr.State("")   # the stored note as shown, to tell a note being typed apart
    shown_counts = gr.State("")  # the queue position and counts line as shown: the timer redraws it when it moves
    live_timer = gr.Timer(LIVE_SECONDS)
    images_html = gr.HTML("", elem_id="g4c-images", js_on_load=IMAGES_JS)
    with gr.Row():
        prev_btn = gr.Button("◀ Previous (k)", elem_id="g4c-prev", size="sm")
        next_btn = gr.Button("Next (j) ▶", elem_id="g4c-next", size="sm")
        approve_btn = gr.Button("✔ Approve (a)", elem_id="g4c-approve", variant="primary", size="sm")
        reject_btn = gr.Button("✘ Reject (r)", elem_id="g4c-reject", variant="stop", size="sm")
        reload_btn = gr.Button("⟳ Reload (u)", elem_id="g4c-reload", size="sm")
    with gr.Row(equal_height=True):
        message_box = gr.Textbox(label="Last action", interactive=False, elem_id="g4c-message", max_lines=3,
                                 scale=4)
        reason_dd = gr.Dropdown(["(none)", *FLAG_REASONS], value="(none)", label="Reason for the next flag",
                                scale=1, min_width=200, elem_id="g4c-reason")
        advance_box = gr.Checkbox(True, label="go on after approve / reject", scale=1, min_width=200)
    with gr.Row():
        with gr.Column(scale=5):
            board_html = gr.HTML("", elem_id="g4c-board", js_on_load=BOARD_JS)
        with gr.Column(scale=4):
            activity_html = gr.HTML("", elem_id="g4c-activity", js_on_load=None)
            captions_html = gr.HTML("", elem_id="g4c-captions", js_on_load=CAPTIONS_JS,
                                    server_functions=[save_caption, undo_caption])
            note_box = gr.Textbox(label="Note (saved when you leave the field)", lines=2, elem_id="g4c-note")
            with gr.Accordion("History of this pair (approve / reject / flags / notes / edits)", open=False,
                              elem_id="g4c-history-box"):
                history_html = gr.HTML("", elem_id="g4c-history", js_on_load=None)
            with gr.Row(equal_height=True):
                gt_toggle = gr.Checkbox(False, label="Show ground truth (demo world) (g)", elem_id="g4c-gt-toggle")
                score_btn = gr.Button("Score the flags against ground truth", size="sm")
            gt_html = gr.HTML("", elem_id="g4c-gt", js_on_load=None)
    gr.Markdown(SHORTCUTS_MD, elem_classes=["g4c-keys"])
    current_box = gr.Textbox(visible="hidden", elem_id="g4c-current")

    filters = [queue_radio, run_dd, model_dd, split_dd]
    pair_outputs = [cursor, info_html, images_html, board_html, captions_html, note_box,
                    gt_html, current_box, message_box, activity_html, opened_at, history_html,
                    shown_stamp, shown_note, shown_counts]

    def show(annotation_id, flt, gt_on, message="", request=None, name=None):
        db = conns.get()
        presence.touch(page_of(request), annotation_id, page_name(request, None) or name)
        # The stamp is read before the pair: a write landing in between makes the next
        # tick see a newer stamp and refresh, never the other way round.
        stamp = rl.pair_stamp(db, annotation_id) if annotation_id else ""
        opened = rl.pair_watermark(db, annotation_id) if annotation_id else ""
        view = rl.load_pair(db, annotation_id) if annotation_id else None
        info, line = info_line(db, annotation_id, flt, request, view)
        values = [annotation_id, info, rl.render_images_html(view), rl.render_board_html(view)]
        values.append(rl.render_captions_html(view))
        note = view.note if view else ""
        values += [note, rl.render_ground_truth_html(view) if gt_on else "",
                   annotation_id or "", message, "", opened, rl.render_pair_history_html(view), stamp, note,
                   line]
        return values

    def load(wanted, request, name=None):
        db = conns.get()
        flt = rl.QueueFilter()
        annotation_id = rl.resolve_goto(db, wanted) if wanted else None
        if annotation_id is None:
            annotation_id = rl.next_free(db, flt, None, busy(request))
        choices = rl.filter_choices(db)
        return [gr.update(choices=choices["runs"], value=rl.ANY), gr.update(choices=choices["models"], value=rl.ANY),
                gr.update(choices=choices["splits"], value=rl.ANY),
                *show(annotation_id, flt, False,
                      "" if not wanted or annotation_id else f"pair {wanted!r} not found", request, name)]

    def on_filter(queue, run, model, split, gt_on, request: gr.Request):
        flt = rl.make_filter(queue, run, model, split)
        first = rl.next_free(conns.get(), flt, None, busy(request))
        return show(first, flt, gt_on, "" if first else f"the '{flt.queue}' queue is empty", request)

    def on_step(direction):
        def handler(annotation_id, queue, run, model, split, gt_on, request: gr.Request):
            flt = rl.make_filter(queue, run, model, split)
            if direction == "next":
                target = rl.next_free(conns.get(), flt, annotation_id, busy(request))
            else:  # back is where the reviewer has been: no pair is passed over
                target = rl.step_from(conns.get(), flt, annotation_id, direction)
            if target is None:
                end = "end" if direction == "next" else "start"
                return show(annotation_id, flt, gt_on, f"{end} of the '{flt.queue}' queue", request)
            return show(target, flt, gt_on, request=request)
        return handler

    def on_reload(annotation_id, queue, run, model, split, gt_on, request: gr.Request):
        flt = rl.make_filter(queue, run, model, split)
        return show(annotation_id, flt, gt_on, "reloaded", request)

    def on_goto(text, queue, run, model, split, gt_on, request: gr.Request):
        flt = rl.make_filter(queue, run, model, split)
        target = rl.resolve_goto(conns.get(), text)
        if target is None:
            raise gr.Error(f"no annotated pair {text!r}")
        return show(target, flt, gt_on, f"opened {rl.pair_name(conns.get(), target)}", request)

    def on_status(status):
        def handler(annotation_id, queue, run, model, split, gt_on, advance, typed, since, request: gr.Request):
            if not annotation_id:
                raise gr.Error("no pair is shown")
            db = conns.get()
            flt = rl.make_filter(queue, run, model, split)
            try:
                replaced = rl.set_status(db, annotation_id, status, reviewer_of(request, typed), seen_since=since)
            except rl.ReviewActionError as exc:
                raise gr.Error(str(exc)) from None
            message = f"{rl.pair_name(db, annotation_id)}: {status}" + (f" · NOTE: {replaced}" if replaced else "")
            target = annotation_id
            if advance:
                nxt = rl.next_free(db, flt, annotation_id, busy(request))
                if nxt is None:
                    message += f" · end of the '{flt.queue}' queue"
                else:
                    target = nxt
            return show(target, flt, gt_on, message, request)
        return handler

    nav_inputs = [cursor, *filters, gt_toggle]
    for comp in filters:
        comp.input(on_filter, [*filters, gt_toggle], pair_outputs, api_name=False)

    # Runs, models and splits come and go while the page is open (the Pipeline tab, the
    # CLI): a filter offers what the store holds when it is opened, not at page load.
    def choices_of(key):
        return lambda: gr.update(choices=rl.filter_choices(conns.get())[key])

    for comp, key in ((run_dd, "runs"), (model_dd, "models"), (split_dd, "splits")):
        comp.focus(choices_of(key), None, comp, api_name=False, queue=False, show_progress="hidden")
    # always_last: a click (or a held-down key) while a move is under way is not dropped;
    # it runs once more from wherever the first move landed.
    next_btn.click(on_step("next"), nav_inputs, pair_outputs, api_name="review_next", trigger_mode="always_last")
    prev_btn.click(on_step("previous"), nav_inputs, pair_outputs, api_name="review_previous",
                   trigger_mode="always_last")
    reload_btn.click(on_reload, nav_inputs, pair_outputs, api_name="review_reload")
    goto_box.submit(on_goto, [goto_box, *filters, gt_toggle], pair_outputs, api_name="review_goto")
    status_inputs = [*nav_inputs, advance_box, reviewer_box, opened_at]
    approve_btn.click(on_status("approved"), status_inputs, pair_outputs, api_name="review_approve")
    reject_btn.click(on_status("rejected"), status_inputs, pair_outputs, api_name="review_reject")
    current_box.change(None, current_box, current_box, js=URL_JS, api_name=False)

    # -- flags
    def on_board_click(annotation_id, queue, run, model, split, reason, typed, evt: gr.EventData, request: gr.Request):
        data = getattr(evt, "_data", None) or {}
        item = data.get("item")
        if not item or not annotation_id:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if data.get("annotation") and data["annotation"] != annotation_id:
            return gr.skip(), gr.skip(), "that descriptor belongs to a pair no longer shown; nothing flagged", gr.skip()
        db = conns.get()
        try:
            if "flagged" in data:  # what the reviewer saw decides, not what is stored now
                now = rl.set_flag(db, annotation_id, "descriptor", item, bool(data["flagged"]),
                                  reviewer_of(request, typed), reason)
            else:
                now = rl.toggle_flag(db, annotation_id, "descriptor", item, reviewer_of(request, typed), reason)
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        view = rl.load_pair(db, annotation_id)
        flt = rl.make_filter(queue, run, model, split)
        return (rl.render_board_html(view), info_line(db, annotation_id, flt, request, view)[0],
                f"descriptor {'flagged' if now else 'unflagged'}", rl.render_pair_history_html(view))

    board_html.click(on_board_click, [cursor, *filters, reason_dd, reviewer_box],
                     [board_html, info_html, message_box, history_html], api_name="flag_descriptor")

    def on_caption_flag(annotation_id, queue, run, model, split, typed, evt: gr.EventData, request: gr.Request):
        data = getattr(evt, "_data", None) or {}
        caption_id = data.get("caption")
        if not caption_id or not annotation_id:
            return gr.skip(), gr.skip(), gr.skip()
        target = data.get("annotation") or annotation_id
        db = conns.get()
        try:
            now = rl.set_flag(db, target, "caption", caption_id, bool(data.get("flagged")),
                              reviewer_of(request, typed), data.get("reason"))
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        view = rl.load_pair(db, annotation_id)
        flt = rl.make_filter(queue, run, model, split)
        return (info_line(db, annotation_id, flt, request, view)[0],
                f"caption {caption_id.rsplit(':', 1)[-1]} {'flagged' if now else 'unflagged'}",
                rl.render_pair_history_html(view))

    captions_html.click(on_caption_flag, [cursor, *filters, reviewer_box], [info_html, message_box, history_html],
                        api_name="flag_caption")

    def on_note(annotation_id, note, note_shown, typed, request: gr.Request):
        if not annotation_id:
            return gr.skip(), gr.skip()
        try:
            # note_shown: the stored note this page last showed; a note someone else
            # saved since is not overwritten.
            changed = rl.save_note(conns.get(), annotation_id, note, reviewer_of(request, typed),
                                   expected=note_shown or "")
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        # The saved note is now the shown one: a later refresh may replace it again.
        return ("note saved", (note or "").strip()) if changed else (gr.skip(), gr.skip())

    note_box.blur(on_note, [cursor, note_box, shown_note, reviewer_box], [message_box, shown_note],
                  api_name="save_note")

    def on_gt(annotation_id, gt_on):
        view = rl.load_pair(conns.get(), annotation_id) if annotation_id else None
        return rl.render_ground_truth_html(view) if gt_on else ""

    gt_toggle.change(on_gt, [cursor, gt_toggle], gt_html, api_name=False)

    def on_score(annotation_id):
        db = conns.get()
        view = rl.load_pair(db, annotation_id) if annotation_id else None
        if view is None or not view.has_ground_truth:
            raise gr.Error("this pair has no ground truth to score against")
        try:
            score = rl.score_pair_flags(db, annotation_id)
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        return rl.render_ground_truth_html(view, score), True

    score_btn.click(on_score, cursor, [gt_html, gt_toggle], api_name="score_flags")

    live_outputs = [info_html, board_html, captions_html, history_html, activity_html, note_box, shown_note,
                    shown_stamp, shown_counts]

    def on_live(annotation_id, since, stamp, queue, run, model, split, note, note_shown, typed, counts_shown,
                request: gr.Request):
        """Redraw the shown pair when anyone changed it since it was drawn, and say what
        others did; redraw the position and counts line alone when only they moved (other
        reviewers' decisions, pairs the pipeline finished). Nothing is sent when nothing
        changed. Caption text being typed is kept by the captions panel's script; a note
        being typed is not replaced."""
        skip = [gr.skip()] * len(live_outputs)
        db = conns.get()
        # Each tick says this page is still open on this pair, and under which name.
        presence.touch(page_of(request), annotation_id, page_name(request, typed))
        flt = rl.make_filter(queue, run, model, split)
        status = rl.queue_status(db, flt, annotation_id)
        now_stamp = rl.pair_stamp(db, annotation_id) if annotation_id else ""
        if now_stamp == stamp:
            if info_line(db, annotation_id, flt, request, None, status)[1] == counts_shown:
                return skip
            view = rl.load_pair(db, annotation_id) if annotation_id else None
            info, line = info_line(db, annotation_id, flt, request, view, status)
            return [info, *skip[1:-1], line]
        view = rl.load_pair(db, annotation_id)
        lines = rl.activity_since(db, annotation_id, since, reviewer_of(request, typed)) if since else []
        new_note = rl.live_note(view.note, note_shown, note)
        keep_note = new_note is None
        info, line = info_line(db, annotation_id, flt, request, view, status)
        return [info, rl.render_board_html(view),
                rl.render_captions_html(view, live=True), rl.render_pair_history_html(view),
                rl.render_activity_html(lines), gr.skip() if keep_note else new_note,
                gr.skip() if keep_note else new_note, now_stamp, line]

    live_timer.tick(on_live, [cursor, opened_at, shown_stamp, *filters, note_box, shown_note, reviewer_box,
                              shown_counts], live_outputs, api_name=False, show_progress="hidden")

    return {"load": load, "load_outputs": [run_dd, model_dd, split_dd, *pair_outputs]}


# ---------------------------------------------------------------------- pipeline tab

def _pipeline_tab(conns, controller, reviewer_of, reviewer_box):
    from . import pipeline_logic as pl

    db = conns.get()
    has_truth = db.execute("SELECT 1 FROM pairs WHERE ground_truth IS NOT NULL LIMIT 1").fetchone() is not None
    gr.Markdown(
        "Annotate the store's pairs in the background. Finished pairs join the review queue as they "
        "complete (press Next or Reload on the Review tab). The **simulator** is an offline stand-in that "
        "answers from the demo world's ground truth with a set error rate: for demos and tests only, it "
        "says nothing about real VLMs. OpenAI runs read the key from OPENAI_API_KEY on the server.")
    with gr.Row():
        backend = gr.Dropdown(
            [("simulator (demo-world stand-in, not a VLM)", "simulator"), ("openai (chat completions)", "openai"),
             ("openai-batch (Batch API, half price, slow)", "openai-batch")],
            value="simulator" if has_truth else "openai", label="Backend", elem_id="g4c-run-backend")
        model = gr.Textbox(label="Model", placeholder="default for the backend (gpt-4o-mini)")
        base_url = gr.Textbox(label="Base URL", placeholder="empty: OpenAI · or a local server, http://127.0.0.1:8000/v1")
        method = gr.Radio(list(pl.METHODS), value="staged", label="Method (single = one-prompt ablation)")
    with gr.Row():
        concurrency = gr.Textbox(label="Concurrency (requests in flight)", placeholder="default 16")
        limit = gr.Textbox(label=pl.LIMIT_LABEL, placeholder="empty = all pairs", elem_id="g4c-run-limit")
        split = gr.Textbox(label="Split (empty = all)")
        error_rate = gr.Number(0.1, label="Simulator error rate", minimum=0, maximum=1)
        new_run = gr.Checkbox(False, label="start a new run (instead of resuming a matching one)")
    with gr.Row():
        start_btn = gr.Button("▶ Start run", variant="primary", elem_id="g4c-run-start")
        stop_btn = gr.Button("■ Stop run", variant="stop", elem_id="g4c-run-stop")
        refresh_btn = gr.Button("⟳ Refresh")
    progress_box = gr.Textbox(label="Progress", lines=6, interactive=False, elem_id="g4c-run-progress",
                              value=pl.format_progress(controller.snapshot()))
    runs_table = gr.Dataframe(headers=pl.RUNS_HEADERS, interactive=False, label="Runs in this store",
                              elem_id="g4c-runs")
    timer = gr.Timer(1.0, active=False)

    def snapshot():
        return pl.format_progress(controller.snapshot()), pl.runs_table(conns.db_path)

    def on_start(backend, model, base_url, method, concurrency, limit, split, error_rate, new_run, typed,
                 request: gr.Request):
        form = pl.RunForm(backend=backend, model=model, base_url=base_url, method=method, concurrency=concurrency,
                          limit=limit, split=split, error_rate=error_rate, new_run=new_run)
        try:
            controller.start(form, reviewer_of(request, typed))
        except (pl.PipelineControlError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        return (*snapshot(), gr.Timer(active=True))

    def on_stop():
        message = controller.stop()
        text, rows = snapshot()
        return f"{message}\n{text}", rows

    def on_tick():
        text, rows = snapshot()
        return text, rows, gr.Timer(active=controller.running)

    start_btn.click(on_start, [backend, model, base_url, method, concurrency, limit, split, error_rate, new_run,
                               reviewer_box], [progress_box, runs_table, timer], api_name="pipeline_start")
    stop_btn.click(on_stop, None, [progress_box, runs_table], api_name="pipeline_stop")
    refresh_btn.click(snapshot, None, [progress_box, runs_table], api_name="pipeline_status")
    timer.tick(on_tick, None, [progress_box, runs_table, timer], api_name=False, show_progress="hidden")
    # Opening the tab starts the live updates whenever a run is going, so they show in
    # every reviewer's browser (and after a reload), not only in the one that clicked Start.
    return on_tick, [progress_box, runs_table, timer]


# ---------------------------------------------------------------------- stats tab

def _stats_tab(conns, gt_cache):
    from . import stats_logic as sl

    gr.Markdown(
        "Hallucination rates from the reviewers' flags count decided (approved or rejected) pairs only: "
        "the share of their descriptors and captions flagged. Ground-truth rates are computed against the "
        "demo world's scene graphs and edit lists.")
    refresh_btn = gr.Button("⟳ Refresh the statistics", elem_id="g4c-stats-refresh")
    summary = gr.Dataframe(headers=sl.SUMMARY_HEADERS, interactive=False, label="Per run", elem_id="g4c-stats-table")
    catches = gr.Dataframe(headers=sl.FLAG_CATCH_HEADERS, interactive=False, elem_id="g4c-stats-catch",
                           label="Reviewer flags against ground truth (demo world): hallucinations caught")
    human_plot = gr.Plot(label="Reviewer flags")
    truth_plot = gr.Plot(label="Ground truth")
    progress_plot = gr.Plot(label="Review progress")
    caption_plot = gr.Plot(label="Captions")

    def on_refresh(progress=gr.Progress()):
        # Scoring a large run against ground truth the first time takes seconds (later
        # opens score only new pairs): say how far it is.
        def scoring(done, total, what):
            progress((done, total), desc=what, unit="pairs")

        db = conns.get()
        progress(0, desc="reading flags and captions")
        rows = sl.human_flag_counts(db)
        captions = sl.caption_stats(db)
        truth = sl.ground_truth_rates(db, gt_cache, scoring)
        return (sl.summary_rows(rows, captions), sl.flag_catch_rows(db, gt_cache, scoring), sl.plot_human_rates(rows),
                sl.plot_ground_truth(truth),
                sl.plot_review_progress(sl.review_progress(db)), sl.plot_caption_stats(captions))

    outputs = [summary, catches, human_plot, truth_plot, progress_plot, caption_plot]
    refresh_btn.click(on_refresh, None, outputs, api_name="stats")
    return on_refresh, outputs


# ---------------------------------------------------------------------- export tab

def _export_tab(conns):
    from store.exporters import FORMATS

    from . import export_logic as el

    choices = rl.filter_choices(conns.get())
    gr.Markdown("Only approved pairs are exported unless you include unreviewed ones; rejected pairs never are. "
                "Edited captions replace the VLM's text; flagged captions (and compounds built on them) are left "
                "out unless you include them.\n\n" + "\n".join(
                    f"- **{name}**: {el.FORMAT_NOTES[name]}" for name in FORMATS))
    with gr.Row():
        fmt = gr.Radio(list(FORMATS), value="good4cir", label="Format", elem_id="g4c-export-format")
        run_dd = gr.Dropdown(choices["runs"], value=rl.ANY, label="Run (default: newest per pair)")
        split_dd = gr.Dropdown(choices["splits"], value=rl.ANY, label="Split")
    with gr.Row():
        unreviewed = gr.Checkbox(False, label="include unreviewed pairs", elem_id="g4c-export-unreviewed")
        flagged = gr.Checkbox(False, label="include flagged captions")
        export_btn = gr.Button("Export", variant="primary", elem_id="g4c-export-go")
    summary = gr.Textbox(label="Written", interactive=False, lines=3, elem_id="g4c-export-summary")
    download = gr.File(label="Download", interactive=False, elem_id="g4c-export-file")

    def on_export(fmt, run, split, include_unreviewed, include_flagged):
        flt = rl.make_filter("all", run, None, split)
        try:
            path, stats = el.export_to_download(conns.get(), fmt, run_id=flt.run_id, split=flt.split,
                                                include_unreviewed=include_unreviewed,
                                                include_flagged=include_flagged)
        except (ValueError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        return el.describe_export(stats), str(path)

    export_btn.click(on_export, [fmt, run_dd, split_dd, unreviewed, flagged], [summary, download], api_name="export")

    def refresh_choices():
        c = rl.filter_choices(conns.get())
        return gr.update(choices=c["runs"]), gr.update(choices=c["splits"])

    return refresh_choices, [run_dd, split_dd]


# ---------------------------------------------------------------------- retrieve tab

def _retrieve_tab(conns, service):
    from . import retrieve_logic as qr

    if not service.available:
        gr.Markdown("**No retrieval index loaded.** Train a model (`good4cir train`), build an index "
                    "(`good4cir index`), then start the app with `--index DIR`.")
    else:
        gr.Markdown(f"Composed retrieval with the index `{service.index_path}` (the trained fusion model; where "
                    "the checkpoint has a re-ranker, it re-orders the fusion model's top candidates). "
                    "Choose a dataset pair (its true target is marked) or upload a reference image.")
    with gr.Row():
        with gr.Column(scale=2):
            pair_dd = gr.Dropdown([], label="Dataset pair (reference image)", elem_id="g4c-q-pair")
            reference_html = gr.HTML("", js_on_load=None)
            upload = gr.Image(label="…or upload a reference image", type="pil", sources=["upload"], height=200)
        with gr.Column(scale=3):
            text = gr.Textbox(label="Modification", placeholder="e.g. make the wall blue and remove the lamp",
                              elem_id="g4c-q-text")
            k = gr.Slider(1, 50, value=10, step=1, label="Top k", elem_id="g4c-q-k")
            go = gr.Button("Search", variant="primary", elem_id="g4c-q-go")
    results = gr.HTML("", elem_id="g4c-q-results", js_on_load=None)
    queries: dict[str, qr.DatasetQuery] = {}

    def choices():
        items = qr.dataset_queries(conns.get())
        queries.clear()
        queries.update({q.pair_id: q for q in items})
        return [(q.label, q.pair_id) for q in items]

    def on_pair(pair_id):
        pair = queries.get(pair_id)
        return qr.render_reference_html(pair), (pair.text if pair else gr.skip())

    def on_search(pair_id, image, text, k):
        pair = queries.get(pair_id)
        try:
            return service.search_html(conns.get(), pair=pair, upload=image, text=text, k=k)
        except qr.RetrieveError as exc:
            raise gr.Error(str(exc)) from None

    pair_dd.input(on_pair, pair_dd, [reference_html, text], api_name=False)
    # preprocess=False: the upload reaches on_search as the uploaded file (Gradio still
    # checks it lies in its upload folder), and retrieve_logic decodes it, so a file that
    # is not an image gets a plain message instead of Gradio's preprocessing error.
    go.click(on_search, [pair_dd, upload, text, k], results, api_name="retrieve", preprocess=False)
    text.submit(on_search, [pair_dd, upload, text, k], results, api_name=False, preprocess=False)

    def refresh():
        return gr.update(choices=choices())

    return refresh, [pair_dd]
