"""The good4cir review app: `build_app(db_path) -> gr.Blocks`. Nothing runs at import.

Callbacks are thin: they read widget values, call the plain functions of
review_logic / stats_logic / export_logic / pipeline_logic / retrieve_logic, and put the
results back. Launching (host, auth, image route) is server.py's job.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from store.models import FLAG_REASONS  # noqa: E402
from store.queue import QUEUES  # noqa: E402

from . import review_logic as rl  # noqa: E402
from .assets import BOARD_JS, IMAGES_JS, SHORTCUTS_MD, URL_JS  # noqa: E402
from .connections import Connections  # noqa: E402

INDIVIDUAL_SLOTS = 8   # stage 3 answers 3-8 captions
COMPOUND_SLOTS = 8     # pipeline.compound keeps at most 8 per pair
# Reviewers each run several events at once (a blur, a click, a timer); Gradio's
# default of one event at a time per handler would make them wait on each other.
CONCURRENCY_LIMIT = 16


class SeenVersions:
    """Which version of each caption a browser session was shown, for optimistic edits.

    Held on the server and written by the handlers that show captions and save them,
    so a save that finishes after the reviewer moved on cannot leave a stale version
    (or another pair's caption) behind in the page.
    """

    def __init__(self, capacity: int = 200_000):
        self._data: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def set(self, session: str, caption_id: str, version: int) -> None:
        with self._lock:
            self._data[(session, caption_id)] = version
            self._data.move_to_end((session, caption_id))
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def get(self, session: str, caption_id: str, default: Optional[int]) -> Optional[int]:
        with self._lock:
            return self._data.get((session, caption_id), default)


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
    conns = Connections(db_path)
    seen = SeenVersions()

    def reviewer_of(request: Optional[gr.Request], typed: Optional[str]) -> str:
        user = getattr(request, "username", None) if request is not None else None
        return user or (typed or "").strip()

    def session_of(request: Optional[gr.Request]) -> str:
        return getattr(request, "session_hash", None) or "-"

    with gr.Blocks(title="good4cir review", analytics_enabled=False, fill_width=True) as demo:
        name_store = gr.BrowserState("", storage_key="g4c-reviewer")
        with gr.Row(equal_height=True):
            gr.Markdown("### good4cir · review, edit and export CIR captions")
            reviewer_box = gr.Textbox(
                label="Reviewer", placeholder="your name (recorded with every action)",
                scale=0, min_width=240, elem_id="g4c-reviewer", interactive=not auth_enabled,
            )

        with gr.Tabs():
            with gr.Tab("Review", id="review"):
                review = _review_tab(conns, seen, reviewer_of, session_of, reviewer_box)
            with gr.Tab("Pipeline", id="pipeline"):
                _pipeline_tab(conns, reviewer_box)
            with gr.Tab("Stats", id="stats"):
                _stats_tab(conns)
            with gr.Tab("Export", id="export"):
                _export_tab(conns)
            with gr.Tab("Retrieve", id="retrieve"):
                _retrieve_tab(conns, index_path)

        def on_name_typed(name):
            return (name or "").strip()

        reviewer_box.change(on_name_typed, reviewer_box, name_store, api_name=False, queue=False)

        def on_load(stored_name, request: gr.Request):
            user = getattr(request, "username", None)
            name = user or stored_name or ""
            wanted = request.query_params.get("pair") if request else None
            return [name, *review["load"](wanted, request)]

        demo.load(on_load, [name_store], [reviewer_box, *review["load_outputs"]], api_name="load")
        demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


# ---------------------------------------------------------------------- review tab

def _review_tab(conns, seen, reviewer_of, session_of, reviewer_box):
    cursor = gr.State(None)  # the shown annotation id
    with gr.Row(equal_height=True):
        queue_radio = gr.Radio(list(QUEUES), value="unreviewed", label="Queue", scale=3, elem_id="g4c-queue")
        run_dd = gr.Dropdown([rl.ANY], value=rl.ANY, label="Run", scale=2, allow_custom_value=False)
        model_dd = gr.Dropdown([rl.ANY], value=rl.ANY, label="Model", scale=2)
        split_dd = gr.Dropdown([rl.ANY], value=rl.ANY, label="Split", scale=1)
        goto_box = gr.Textbox(label="Go to pair", placeholder="pair id or annotation id, Enter", scale=2)
    info_html = gr.HTML("", elem_id="g4c-info", js_on_load=None)
    images_html = gr.HTML("", elem_id="g4c-images", js_on_load=IMAGES_JS)
    with gr.Row(equal_height=True):
        prev_btn = gr.Button("◀ Previous (k)", elem_id="g4c-prev", size="sm")
        next_btn = gr.Button("Next (j) ▶", elem_id="g4c-next", size="sm")
        approve_btn = gr.Button("✔ Approve (a)", elem_id="g4c-approve", variant="primary", size="sm")
        reject_btn = gr.Button("✘ Reject (r)", elem_id="g4c-reject", variant="stop", size="sm")
        reload_btn = gr.Button("⟳ Reload (u)", elem_id="g4c-reload", size="sm")
        advance_box = gr.Checkbox(True, label="go on after approve / reject", scale=0, min_width=220)
        reason_dd = gr.Dropdown(["(none)", *FLAG_REASONS], value="(none)", label="Flag reason",
                                scale=1, min_width=180, elem_id="g4c-reason")
    message_box = gr.Textbox(label="Last action", interactive=False, elem_id="g4c-message", max_lines=3)
    with gr.Row():
        with gr.Column(scale=5):
            board_html = gr.HTML("", elem_id="g4c-board", js_on_load=BOARD_JS)
        with gr.Column(scale=4):
            slots = []
            gr.Markdown("**Stage 3 · modification captions** (tick = hallucination flag; edit in place)")
            for i in range(INDIVIDUAL_SLOTS):
                slots.append(_caption_slot("i", i))
            gr.Markdown("**Stage 4 · compound captions**")
            for i in range(COMPOUND_SLOTS):
                slots.append(_caption_slot("k", i))
            note_box = gr.Textbox(label="Note (saved when you leave the field)", lines=2, elem_id="g4c-note")
            with gr.Row(equal_height=True):
                gt_toggle = gr.Checkbox(False, label="Show ground truth (demo world) (g)", elem_id="g4c-gt-toggle")
                score_btn = gr.Button("Score the flags against ground truth", size="sm")
            gt_html = gr.HTML("", visible=False, elem_id="g4c-gt", js_on_load=None)
    gr.Markdown(SHORTCUTS_MD, elem_classes=["g4c-keys"])
    current_box = gr.Textbox(visible="hidden", elem_id="g4c-current")

    filters = [queue_radio, run_dd, model_dd, split_dd]
    slot_components = []
    for s in slots:
        slot_components += [s["row"], s["flag"], s["text"], s["state"]]
    pair_outputs = [cursor, info_html, images_html, board_html, *slot_components, note_box,
                    gt_html, current_box, message_box]

    def show(annotation_id, flt, session, gt_on, message=""):
        db = conns.get()
        view = rl.load_pair(db, annotation_id) if annotation_id else None
        status = rl.queue_status(db, flt, annotation_id)
        values = [annotation_id, rl.render_info_html(view, status), rl.render_images_html(view),
                  rl.render_board_html(view)]
        captions = (view.individual if view else []), (view.compound if view else [])
        for kind_index, (kind_caps, count) in enumerate(zip(captions, (INDIVIDUAL_SLOTS, COMPOUND_SLOTS))):
            for i in range(count):
                cap = kind_caps[i] if i < len(kind_caps) else None
                if cap is None:
                    values += [gr.update(visible=False), False, gr.update(value="", label=""), None]
                    continue
                seen.set(session, cap.id, cap.version)
                label = f"{cap.position + 1} · v{cap.version}"
                if cap.version:
                    label += f" · edited by {cap.edited_by}"
                if cap.kind == "compound" and cap.token_count:
                    label += f" · {cap.token_count} CLIP tokens"
                if cap.flagged and cap.reason:
                    label += f" · flagged: {cap.reason}"
                values += [gr.update(visible=True), cap.flagged, gr.update(value=cap.text, label=label),
                           {"id": cap.id, "version": cap.version}]
        values += [view.note if view else "", gr.update(value=rl.render_ground_truth_html(view), visible=bool(gt_on)),
                   annotation_id or "", message]
        return values

    def load(wanted, request):
        db = conns.get()
        flt = rl.QueueFilter()
        annotation_id = rl.resolve_goto(db, wanted) if wanted else None
        if annotation_id is None:
            annotation_id = rl.first_in_queue(db, flt)
        choices = rl.filter_choices(db)
        return [gr.update(choices=choices["runs"], value=rl.ANY), gr.update(choices=choices["models"], value=rl.ANY),
                gr.update(choices=choices["splits"], value=rl.ANY),
                *show(annotation_id, flt, session_of(request), False,
                      "" if not wanted or annotation_id else f"pair {wanted!r} not found")]

    def on_filter(queue, run, model, split, gt_on, request: gr.Request):
        flt = rl.make_filter(queue, run, model, split)
        first = rl.first_in_queue(conns.get(), flt)
        return show(first, flt, session_of(request), gt_on, "" if first else f"the '{flt.queue}' queue is empty")

    def on_step(direction):
        def handler(annotation_id, queue, run, model, split, gt_on, request: gr.Request):
            flt = rl.make_filter(queue, run, model, split)
            target = rl.step_from(conns.get(), flt, annotation_id, direction)
            if target is None:
                end = "end" if direction == "next" else "start"
                return show(annotation_id, flt, session_of(request), gt_on, f"{end} of the '{flt.queue}' queue")
            return show(target, flt, session_of(request), gt_on)
        return handler

    def on_reload(annotation_id, queue, run, model, split, gt_on, request: gr.Request):
        flt = rl.make_filter(queue, run, model, split)
        return show(annotation_id, flt, session_of(request), gt_on, "reloaded")

    def on_goto(text, queue, run, model, split, gt_on, request: gr.Request):
        flt = rl.make_filter(queue, run, model, split)
        target = rl.resolve_goto(conns.get(), text)
        if target is None:
            raise gr.Error(f"no annotated pair {text!r}")
        return show(target, flt, session_of(request), gt_on, f"opened {target}")

    def on_status(status):
        def handler(annotation_id, queue, run, model, split, gt_on, advance, typed, request: gr.Request):
            if not annotation_id:
                raise gr.Error("no pair is shown")
            db = conns.get()
            flt = rl.make_filter(queue, run, model, split)
            try:
                rl.set_status(db, annotation_id, status, reviewer_of(request, typed))
            except rl.ReviewActionError as exc:
                raise gr.Error(str(exc)) from None
            message = f"{annotation_id}: {status}"
            target = annotation_id
            if advance:
                nxt = rl.step_from(db, flt, annotation_id, "next")
                if nxt is None:
                    message += f" · end of the '{flt.queue}' queue"
                else:
                    target = nxt
            return show(target, flt, session_of(request), gt_on, message)
        return handler

    nav_inputs = [cursor, *filters, gt_toggle]
    for comp in filters:
        comp.input(on_filter, [*filters, gt_toggle], pair_outputs, api_name=False)
    next_btn.click(on_step("next"), nav_inputs, pair_outputs, api_name="review_next")
    prev_btn.click(on_step("previous"), nav_inputs, pair_outputs, api_name="review_previous")
    reload_btn.click(on_reload, nav_inputs, pair_outputs, api_name="review_reload")
    goto_box.submit(on_goto, [goto_box, *filters, gt_toggle], pair_outputs, api_name="review_goto")
    status_inputs = [*nav_inputs, advance_box, reviewer_box]
    approve_btn.click(on_status("approved"), status_inputs, pair_outputs, api_name="review_approve")
    reject_btn.click(on_status("rejected"), status_inputs, pair_outputs, api_name="review_reject")
    current_box.change(None, current_box, current_box, js=URL_JS, api_name=False)

    # -- flags
    def on_board_click(annotation_id, queue, run, model, split, reason, typed, evt: gr.EventData, request: gr.Request):
        data = getattr(evt, "_data", None) or {}
        item = data.get("item")
        if not item or not annotation_id:
            return gr.skip(), gr.skip(), gr.skip()
        if data.get("annotation") and data["annotation"] != annotation_id:
            return gr.skip(), gr.skip(), "that descriptor belongs to a pair no longer shown; nothing flagged"
        db = conns.get()
        try:
            now = rl.toggle_flag(db, annotation_id, "descriptor", item, reviewer_of(request, typed), reason)
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        view = rl.load_pair(db, annotation_id)
        flt = rl.make_filter(queue, run, model, split)
        return (rl.render_board_html(view), rl.render_info_html(view, rl.queue_status(db, flt, annotation_id)),
                f"descriptor {'flagged' if now else 'unflagged'}")

    board_html.click(on_board_click, [cursor, *filters, reason_dd, reviewer_box],
                     [board_html, info_html, message_box], api_name="flag_descriptor")

    def on_caption_flag(annotation_id, slot, checked, queue, run, model, split, reason, typed, request: gr.Request):
        if not annotation_id or not slot:
            return gr.skip(), gr.skip()
        db = conns.get()
        try:
            now = rl.set_flag(db, annotation_id, "caption", slot["id"], bool(checked), reviewer_of(request, typed), reason)
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        view = rl.load_pair(db, annotation_id)
        flt = rl.make_filter(queue, run, model, split)
        return (rl.render_info_html(view, rl.queue_status(db, flt, annotation_id)),
                f"caption {slot['id'].rsplit(':', 1)[-1]} {'flagged' if now else 'unflagged'}")

    def on_caption_edit(slot, text, typed, request: gr.Request):
        if not slot:
            return gr.skip()
        session = session_of(request)
        expected = seen.get(session, slot["id"], slot.get("version"))
        try:
            result = rl.save_caption(conns.get(), slot["id"], text, reviewer_of(request, typed), expected)
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        if result.saved:
            seen.set(session, slot["id"], result.version)
        if result.conflict:
            gr.Warning(result.message, duration=12)
        return result.message or gr.skip()

    for s in slots:
        name = f"{s['kind']}{s['index']}"
        s["flag"].input(on_caption_flag, [cursor, s["state"], s["flag"], *filters, reason_dd, reviewer_box],
                        [info_html, message_box], api_name=f"flag_caption_{name}")
        s["text"].submit(on_caption_edit, [s["state"], s["text"], reviewer_box], message_box,
                         api_name=f"edit_caption_{name}")
        s["text"].blur(on_caption_edit, [s["state"], s["text"], reviewer_box], message_box, api_name=False)

    def on_note(annotation_id, note, typed, request: gr.Request):
        if not annotation_id:
            return gr.skip()
        try:
            changed = rl.save_note(conns.get(), annotation_id, note, reviewer_of(request, typed))
        except rl.ReviewActionError as exc:
            raise gr.Error(str(exc)) from None
        return "note saved" if changed else gr.skip()

    note_box.blur(on_note, [cursor, note_box, reviewer_box], message_box, api_name="save_note")

    def on_gt(annotation_id, gt_on):
        view = rl.load_pair(conns.get(), annotation_id) if annotation_id else None
        return gr.update(value=rl.render_ground_truth_html(view), visible=bool(gt_on))

    gt_toggle.change(on_gt, [cursor, gt_toggle], gt_html, api_name=False)

    def on_score(annotation_id):
        db = conns.get()
        view = rl.load_pair(db, annotation_id) if annotation_id else None
        if view is None or not view.has_ground_truth:
            raise gr.Error("this pair has no ground truth to score against")
        score = rl.score_pair_flags(db, annotation_id)
        return gr.update(value=rl.render_ground_truth_html(view, score), visible=True), True

    score_btn.click(on_score, cursor, [gt_html, gt_toggle], api_name="score_flags")

    return {"load": load, "load_outputs": [run_dd, model_dd, split_dd, *pair_outputs]}


def _caption_slot(kind: str, index: int) -> dict:
    with gr.Row(visible=False, equal_height=True, elem_classes=["g4c-caprow"], elem_id=f"g4c-cap-{kind}{index}") as row:
        flag = gr.Checkbox(False, label="⚑ flag", scale=0, min_width=92, elem_classes=["g4c-flagbox"],
                           elem_id=f"g4c-flag-{kind}{index}")
        text = gr.Textbox("", label="", lines=1, max_lines=4, scale=6, elem_id=f"g4c-text-{kind}{index}")
        state = gr.State(None)
    return {"kind": kind, "index": index, "row": row, "flag": flag, "text": text, "state": state}


# ---------------------------------------------------------------------- other tabs

def _pipeline_tab(conns, reviewer_box):
    gr.Markdown("The pipeline tab is being built.")


def _stats_tab(conns):
    gr.Markdown("The stats tab is being built.")


def _export_tab(conns):
    gr.Markdown("The export tab is being built.")


def _retrieve_tab(conns, index_path):
    gr.Markdown("The retrieve tab is being built.")
