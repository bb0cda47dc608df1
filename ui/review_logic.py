"""The review page as plain functions: which pair is shown, what it holds, and the
reviewer's actions. No Gradio here; app.py only wires these to components.

A descriptor is addressed as '<description id>/<object index>/<descriptor index>'
(flags.target_id for target_kind 'descriptor'); a caption by its caption id.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Optional

import sqlite_utils

from store import queue as store_queue
from store import review as store_review
from store.annotations import get_annotation, get_description
from store.errors import ConflictError, NotFoundError, StoreError
from store.models import (FLAG_REASONS, PIPELINE_FLAG_REASONS, PIPELINE_REVIEWER, RUN_SETTINGS_SHOWN, CaptionEdit,
                          DescribedObject, FlagRecord, ReviewEvent)

from .security import escape_text, image_url

ANY = "(any)"


@dataclass(frozen=True)
class QueueFilter:
    queue: str = "unreviewed"
    run_id: Optional[int] = None
    model: Optional[str] = None
    split: Optional[str] = None

    def kwargs(self) -> dict:
        return {"run_id": self.run_id, "model": self.model, "split": self.split}


def make_filter(queue: str, run: Optional[str], model: Optional[str], split: Optional[str]) -> QueueFilter:
    """From the filter widgets' values ('(any)' or empty means no filter; run as its id,
    the Run filter's value)."""
    def clean(value):
        return None if value in (None, "", ANY) else value

    run = clean(run)
    run_id = None
    if run is not None:
        head = str(run).split(":", 1)[0].strip()  # 'id: label' from pages opened before ids were values
        if not head.isdigit():
            raise ReviewActionError(f"run filter {run!r} is not a run number: choose a run from the list")
        run_id = int(head)
    return QueueFilter(queue=queue or "unreviewed", run_id=run_id, model=clean(model), split=clean(split))


# Run settings that tell runs with one name, backend and model apart when they differ.
_RUN_SETTINGS_SHOWN = RUN_SETTINGS_SHOWN


def run_labels(db: sqlite_utils.Database, *, progress: bool = True) -> dict[int, str]:
    """run id -> the label a reviewer tells runs apart by: name, backend / model, the
    settings in which runs of one name, backend and model differ, and start time; with
    `progress`, how many of its pairs are annotated (the Run filter). The Stats and
    Pipeline tabs use it without: their tables and plots show the counts themselves."""
    counts = {run_id: (done, total) for run_id, done, total in db.execute(
        "SELECT run_id, SUM(status = 'done'), COUNT(*) FROM annotations GROUP BY run_id").fetchall()
    } if progress else {}
    rows = db.execute(
        "SELECT id, name, backend, model, method, settings, started_at, created_at FROM runs ORDER BY id").fetchall()
    runs = []
    for run_id, name, backend, model, method, settings, started_at, created_at in rows:
        try:
            values = json.loads(settings or "{}")
        except ValueError:
            values = {}
        values = values if isinstance(values, dict) else {}
        values["method"] = method
        runs.append((run_id, name, backend, model, values,
                     f"started {_when(started_at)}" if started_at else f"created {_when(created_at)}"))
    groups: dict[tuple, list[dict]] = {}
    for _, name, backend, model, values, _ in runs:
        groups.setdefault((name, backend, model), []).append(values)
    out = {}
    for run_id, name, backend, model, values, started in runs:
        siblings = groups[(name, backend, model)]
        differing = [key for key in _RUN_SETTINGS_SHOWN
                     if len({json.dumps(v.get(key), sort_keys=True) for v in siblings}) > 1]
        parts = [f"run {run_id}"] + ([name] if name else []) + [f"{backend} / {model}"]
        parts += [f"{key} {'none' if values.get(key) is None else values[key]}" for key in differing]
        parts.append(started)
        if progress:
            done, total = counts.get(run_id, (0, 0))
            parts.append(f"{done:,} of {total:,} pair{'' if total == 1 else 's'} annotated")
        out[run_id] = " · ".join(parts)
    return out


def run_choices(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """(label, value) for each run: the value is the run id, the label run_labels'."""
    return [(label, str(run_id)) for run_id, label in run_labels(db).items()]


def split_choices(db: sqlite_utils.Database) -> list:
    """Every split of the store, as its name; a split with no annotated pair to review is
    offered as (label saying why, name): CIRR's test1 withholds its targets, so its pairs
    are never annotated, and a split no run has reached yet holds nothing either. Still
    listed: the Export tab writes such a split's imported captions."""
    splits = [r[0] for r in db.execute(
        "SELECT DISTINCT split FROM pairs WHERE split IS NOT NULL ORDER BY split").fetchall()]
    annotated = {r[0] for r in db.execute(
        "SELECT DISTINCT p.split FROM annotations a JOIN pairs p ON p.id = a.pair_id"
        " WHERE a.status = 'done'").fetchall()}
    out = []
    for split in splits:
        if split in annotated:
            out.append(split)
        elif db.execute("SELECT 1 FROM pairs WHERE split = ? AND target_id IS NOT NULL LIMIT 1",
                        [split]).fetchone() is None:
            out.append((f"{split} · nothing to review: no pair has a target image (withheld)", split))
        else:
            out.append((f"{split} · nothing to review yet: no pair annotated", split))
    return out


def filter_choices(db: sqlite_utils.Database) -> dict[str, list]:
    """Choices for the run, model and split filters; runs as (label, run id) pairs,
    splits as split_choices gives them."""
    models = [r[0] for r in db.execute("SELECT DISTINCT model FROM runs ORDER BY model").fetchall()]
    return {"runs": [(ANY, ANY), *run_choices(db)], "models": [ANY, *models], "splits": [ANY, *split_choices(db)]}


# ---------------------------------------------------------------- navigation

def first_in_queue(db: sqlite_utils.Database, flt: QueueFilter) -> Optional[str]:
    record = store_queue.step(db, queue=flt.queue, **flt.kwargs())
    return record.id if record else None


def step_from(
    db: sqlite_utils.Database, flt: QueueFilter, annotation_id: Optional[str], direction: str
) -> Optional[str]:
    """The annotation after (or before) `annotation_id` in the queue; None at its end."""
    seq = None
    if annotation_id:
        try:
            seq = get_annotation(db, annotation_id).seq
        except NotFoundError:
            seq = None
    record = store_queue.step(db, queue=flt.queue, after_seq=seq, direction=direction, **flt.kwargs())
    return record.id if record else None


def next_free(
    db: sqlite_utils.Database, flt: QueueFilter, annotation_id: Optional[str], busy: set[str]
) -> Optional[str]:
    """The next annotation in the queue after `annotation_id` (the first with None) that
    no other page has open (`busy`), so reviewers working down one queue at once are not
    all handed the same pair; the plain next one when every pair left is open elsewhere."""
    first = step_from(db, flt, annotation_id, "next") if annotation_id else first_in_queue(db, flt)
    candidate = first
    while candidate is not None and candidate in busy:
        candidate = step_from(db, flt, candidate, "next")
    return candidate if candidate is not None else first


def resolve_goto(db: sqlite_utils.Database, text: str) -> Optional[str]:
    """An annotation id from what a reviewer typed: an annotation id, a pair id or a
    pair's external id (the newest run's annotation of it)."""
    text = (text or "").strip()
    if not text:
        return None
    row = db.execute("SELECT id FROM annotations WHERE id = ?", [text]).fetchone()
    if row:
        return row[0]
    row = db.execute(
        "SELECT a.id FROM annotations a JOIN pairs p ON p.id = a.pair_id"
        " WHERE (p.id = ? OR p.external_id = ?) AND a.status = 'done' ORDER BY a.run_id DESC LIMIT 1",
        [text, text],
    ).fetchone()
    return row[0] if row else None


def pair_name(db: sqlite_utils.Database, annotation_id: str) -> str:
    """'pair p3 (run 2)': an annotated pair as the page names it (its external id, else
    its pair id), for messages; the annotation id itself is a hash nobody can read."""
    row = db.execute("SELECT p.external_id, p.id, a.run_id FROM annotations a JOIN pairs p ON p.id = a.pair_id"
                     " WHERE a.id = ?", [annotation_id]).fetchone()
    if row is None:
        return f"pair {annotation_id}"
    return f"pair {row[0] or row[1]} (run {row[2]})"


@dataclass
class QueueStatus:
    queue: str
    position: int          # 1-based position of the shown pair in the queue, 0 if not in it
    queue_total: int
    counts: dict[str, int]

    @property
    def reviewed(self) -> int:
        return self.counts.get("approved", 0) + self.counts.get("rejected", 0)

    def text(self) -> str:
        c = self.counts
        where = (
            f"{self.position:,} / {self.queue_total:,} in '{self.queue}'"
            if self.position else f"not in '{self.queue}' ({self.queue_total:,} left there)"
        )
        return (
            f"{where}  ·  {self.reviewed:,} / {c.get('all', 0):,} reviewed  ·  "
            f"{c.get('approved', 0):,} approved  ·  {c.get('rejected', 0):,} rejected  ·  "
            f"{c.get('flagged', 0):,} flagged  ·  {c.get('pending', 0):,} still annotating  ·  "
            f"{c.get('failed', 0):,} failed"
        )


def queue_status(db: sqlite_utils.Database, flt: QueueFilter, annotation_id: Optional[str]) -> QueueStatus:
    counts = store_queue.counts(db, **flt.kwargs())
    total = counts.get(flt.queue, 0)
    pos = 0
    if annotation_id:
        row = db.execute(
            "SELECT seq, status, review_status, flag_count FROM annotations WHERE id = ?", [annotation_id]
        ).fetchone()
        if row and _in_queue(flt.queue, row[1], row[2], row[3]):
            pos = store_queue.position(db, row[0], queue=flt.queue, **flt.kwargs())
    return QueueStatus(queue=flt.queue, position=pos, queue_total=total, counts=counts)


def _in_queue(queue: str, status: str, review_status: str, flag_count: int) -> bool:
    if status != "done":
        return False
    if queue == "all":
        return True
    if queue == "flagged":
        return flag_count > 0
    return review_status == queue


# ---------------------------------------------------------------- the pair view

@dataclass
class DescriptorCell:
    target_id: str
    text: str
    state: str        # 'same', 'new' (stage 2 only) or 'gone' (stage 1: not kept in stage 2)
    flagged: bool = False
    reason: Optional[str] = None
    flagged_by: Optional[str] = None


@dataclass
class ObjectCell:
    name: str
    state: str        # stage 2: unchanged/changed/new; stage 1: kept/changed/removed
    descriptors: list[DescriptorCell] = field(default_factory=list)


@dataclass
class CaptionCell:
    id: str
    kind: str
    position: int
    text: str             # current text
    original: str
    version: int
    flagged: bool = False
    reason: Optional[str] = None
    flagged_by: Optional[str] = None
    edited_by: Optional[str] = None
    token_count: Optional[int] = None
    history: list[CaptionEdit] = field(default_factory=list)  # edit rows, oldest first
    sources: list[str] = field(default_factory=list)          # a compound's stage 3 caption ids
    # A compound's sources whose text a reviewer changed while the compound still has the
    # pipeline's text: exports leave it out (store.exporters), since it quotes the old text.
    stale_sources: list[str] = field(default_factory=list)
    flagged_sources: list[str] = field(default_factory=list)  # flagged: exports leave the compound out too

    @property
    def can_undo(self) -> bool:
        # The store's undo steps back through effective versions; it stops at the original.
        return bool(self.history) and self.history[-1].restores != 0


@dataclass
class ImageCell:
    id: str
    name: str
    url: Optional[str]
    scene: Optional[dict] = None
    # Recorded by its URL only (imported without --download): the page has no file to
    # show and says how to fetch one. The URL itself stays out of the page.
    url_only: bool = False


@dataclass
class PairView:
    annotation_id: str
    pair_id: str
    external_id: Optional[str]
    source: str
    split: Optional[str]
    run_id: int
    run_label: str
    model: str
    backend: str
    review_status: str
    reviewer: Optional[str]
    reviewed_at: Optional[str]
    note: str
    reference: ImageCell
    target: ImageCell
    stage1: list[ObjectCell]
    stage2: list[ObjectCell]
    individual: list[CaptionCell]
    compound: list[CaptionCell]
    flags: list[FlagRecord]
    ground_truth: Optional[list] = None
    original_captions: list[str] = field(default_factory=list)
    updated_at: Optional[str] = None
    events: list["PairEvent"] = field(default_factory=list)  # the pair's review history, oldest first
    newer_run: Optional[int] = None  # a later run that finished this pair: exports take its annotation

    @property
    def has_ground_truth(self) -> bool:
        return self.ground_truth is not None


def _norm(name: str) -> str:
    return " ".join(name.lower().split())


def diff_objects(
    stage1_id: str, stage1: list[DescribedObject], stage2_id: str, stage2: list[DescribedObject]
) -> tuple[list[ObjectCell], list[ObjectCell]]:
    """Tell unchanged, changed and new objects apart.

    Stage 2 reuses stage 1's exact descriptors for unchanged objects, so objects are
    matched by name (in order, for repeated names) and descriptors by exact text.
    """
    unmatched: dict[str, list[int]] = {}
    for i, obj in enumerate(stage1):
        unmatched.setdefault(_norm(obj.name), []).append(i)
    match_of_stage1: dict[int, int] = {}
    right: list[ObjectCell] = []
    for j, obj in enumerate(stage2):
        candidates = unmatched.get(_norm(obj.name))
        i = candidates.pop(0) if candidates else None
        if i is None:
            state = "new"
            before: set[str] = set()
        else:
            match_of_stage1[i] = j
            before = {d.strip() for d in stage1[i].descriptors}
            now = {d.strip() for d in obj.descriptors}
            state = "unchanged" if before == now else "changed"
        cells = [
            DescriptorCell(
                target_id=f"{stage2_id}/{j}/{k}", text=d,
                state="same" if d.strip() in before else "new",
            )
            for k, d in enumerate(obj.descriptors)
        ]
        right.append(ObjectCell(name=obj.name, state=state, descriptors=cells))
    left: list[ObjectCell] = []
    for i, obj in enumerate(stage1):
        j = match_of_stage1.get(i)
        if j is None:
            state, after = "removed", set()
        else:
            after = {d.strip() for d in stage2[j].descriptors}
            state = "kept" if right[j].state == "unchanged" else "changed"
        cells = [
            DescriptorCell(
                target_id=f"{stage1_id}/{i}/{k}", text=d,
                state="same" if d.strip() in after else "gone",
            )
            for k, d in enumerate(obj.descriptors)
        ]
        left.append(ObjectCell(name=obj.name, state=state, descriptors=cells))
    return left, right


def _image_cell(db, image_id: Optional[str]) -> ImageCell:
    if not image_id:  # CIRR test pairs have no target
        return ImageCell(id="", name="(no target image in this dataset)", url=None)
    row = db.execute("SELECT name, path, url, scene_json FROM images WHERE id = ?", [image_id]).fetchone()
    if row is None:
        return ImageCell(id=image_id, name=f"(missing image {image_id})", url=None)
    name, path, remote_url, scene = row
    return ImageCell(
        id=image_id, name=name, url=image_url(image_id) if path else None,
        scene=json.loads(scene) if scene else None, url_only=not path and bool(remote_url),
    )


def load_pair(db: sqlite_utils.Database, annotation_id: str) -> PairView:
    """Everything the review page shows for one annotated pair, read fresh from SQLite."""
    ann = get_annotation(db, annotation_id)
    cursor = db.execute("SELECT * FROM pairs WHERE id = ?", [ann.pair_id])
    pair = dict(zip([d[0] for d in cursor.description], cursor.fetchone()))
    run = db.execute("SELECT name, backend, model FROM runs WHERE id = ?", [ann.run_id]).fetchone()
    all_flags = store_review.list_flags(db, annotation_id, include_removed=True)
    flags = [f for f in all_flags if f.removed_at is None]
    flag_by_target = {(f.target_kind, f.target_id): f for f in flags}

    stage1 = get_description(db, ann.stage1_id) if ann.stage1_id else None
    stage2 = get_description(db, ann.stage2_id) if ann.stage2_id else None
    left, right = diff_objects(
        stage1.id if stage1 else "", stage1.objects if stage1 else [],
        stage2.id if stage2 else "", stage2.objects if stage2 else [],
    )
    for obj in (*left, *right):
        for cell in obj.descriptors:
            flag = flag_by_target.get(("descriptor", cell.target_id))
            if flag:
                cell.flagged, cell.reason, cell.flagged_by = True, flag.reason, flag.reviewer

    history = _edits_of_annotation(db, annotation_id)
    individual, compound = [], []
    for cap in store_review.list_captions(db, annotation_id):
        cell = _caption_cell(cap, history.get(cap.id, []), flag_by_target.get(("caption", cap.id)))
        (individual if cap.kind == "individual" else compound).append(cell)
    edited = {c.id for c in (*individual, *compound) if c.text != c.original}
    flagged_captions = {c.id for c in individual if c.flagged}
    for cell in compound:
        cell.flagged_sources = [s for s in cell.sources if s in flagged_captions]
        if cell.id not in edited:
            cell.stale_sources = [s for s in cell.sources if s in edited]

    ground_truth = json.loads(pair["ground_truth"]) if pair.get("ground_truth") else None
    # As store.exporters picks a pair's annotation: the newest run that finished it.
    newer_run = db.execute("SELECT MAX(run_id) FROM annotations WHERE pair_id = ? AND status = 'done' AND run_id > ?",
                           [ann.pair_id, ann.run_id]).fetchone()[0]
    return PairView(
        annotation_id=ann.id, pair_id=ann.pair_id, external_id=pair.get("external_id"),
        source=pair["source"], split=pair.get("split"), run_id=ann.run_id,
        run_label=f"run {ann.run_id}" + (f" · {run[0]}" if run and run[0] else ""),
        model=run[2] if run else "?", backend=run[1] if run else "?",
        review_status=ann.review_status, reviewer=ann.reviewer, reviewed_at=ann.reviewed_at,
        note=ann.note or "", reference=_image_cell(db, pair["reference_id"]),
        target=_image_cell(db, pair["target_id"]), stage1=left, stage2=right,
        individual=individual, compound=compound, flags=flags, ground_truth=ground_truth,
        original_captions=json.loads(pair.get("original_captions") or "[]"),
        updated_at=ann.updated_at,
        events=pair_events(store_review.review_history(db, annotation_id), all_flags, history,
                           _descriptor_names(left, right)),
        newer_run=newer_run,
    )


def _edits_of_annotation(db, annotation_id: str) -> dict[str, list[CaptionEdit]]:
    """Every caption edit of one annotation in one query, by caption, oldest first."""
    cursor = db.execute(
        "SELECT e.* FROM caption_edits e JOIN captions c ON c.id = e.caption_id"
        " WHERE c.annotation_id = ? ORDER BY e.caption_id, e.version", [annotation_id])
    names = [d[0] for d in cursor.description]
    out: dict[str, list[CaptionEdit]] = {}
    for row in cursor.fetchall():
        edit = CaptionEdit.from_row(dict(zip(names, row)))
        out.setdefault(edit.caption_id, []).append(edit)
    return out


def _caption_cell(cap, history: list[CaptionEdit], flag: Optional[FlagRecord]) -> CaptionCell:
    return CaptionCell(
        id=cap.id, kind=cap.kind, position=cap.position, text=cap.current_text or cap.text,
        original=cap.text, version=cap.version, flagged=flag is not None,
        reason=flag.reason if flag else None, flagged_by=flag.reviewer if flag else None,
        edited_by=history[-1].editor if history else None,
        token_count=cap.token_count, history=history, sources=list(cap.sources or ()),
    )


def load_caption(db: sqlite_utils.Database, caption_id: str) -> CaptionCell:
    """One caption as the captions panel shows it (after a save or an undo)."""
    cap = store_review.get_caption(db, caption_id)
    flag_row = db.execute(
        "SELECT * FROM flags WHERE annotation_id = ? AND target_kind = 'caption' AND target_id = ?"
        " AND removed_at IS NULL", [cap.annotation_id, caption_id])
    row = flag_row.fetchone()
    flag = FlagRecord.from_row(dict(zip([d[0] for d in flag_row.description], row))) if row else None
    return _caption_cell(cap, store_review.caption_history(db, caption_id), flag)


def pair_stamp(db: sqlite_utils.Database, annotation_id: str) -> str:
    """A cheap fingerprint of everything reviewers change on a pair: it differs whenever a
    caption edit, flag, status or note was written since it was taken. Index lookups
    only, so every open page can ask for it every few seconds."""
    row = db.execute(
        "SELECT a.updated_at, a.flag_count, a.review_status,"
        " (SELECT MAX(e.id) FROM caption_edits e JOIN captions c ON c.id = e.caption_id"
        "  WHERE c.annotation_id = a.id),"
        " (SELECT MAX(id) FROM flags WHERE annotation_id = a.id),"
        " (SELECT MAX(id) FROM review_events WHERE annotation_id = a.id)"
        " FROM annotations a WHERE a.id = ?", [annotation_id]).fetchone()
    return "" if row is None else "|".join("" if v is None else str(v) for v in row)


@dataclass(frozen=True)
class Watermark:
    """What a page had seen of the store when it read a pair: the newest caption edit,
    flag and review event row ids, and the pair's flags then in force. Rows are told
    'after' by their ids, which never tie as stored times (milliseconds) did with the
    moment the page read the pair; a flag removed later is one in `active_flags` (or
    newer) that is removed now."""
    edit_id: int
    flag_id: int
    event_id: int
    active_flags: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"wm:{self.edit_id}:{self.flag_id}:{self.event_id}:{','.join(map(str, self.active_flags))}"

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional["Watermark"]:
        """None for anything else (an empty state, a page opened before watermarks)."""
        parts = (text or "").split(":")
        if len(parts) != 5 or parts[0] != "wm":
            return None
        try:
            flags = tuple(int(f) for f in parts[4].split(",") if f)
            return cls(int(parts[1]), int(parts[2]), int(parts[3]), flags)
        except ValueError:
            return None


def pair_watermark(db: sqlite_utils.Database, annotation_id: str) -> str:
    """The watermark of a pair as read now (take it before reading the pair: a write in
    between is then told as new, never missed). A plain string, for gr.State."""
    edit_id, flag_id, event_id = db.execute(
        "SELECT (SELECT COALESCE(MAX(id), 0) FROM caption_edits), (SELECT COALESCE(MAX(id), 0) FROM flags),"
        " (SELECT COALESCE(MAX(id), 0) FROM review_events)").fetchone()
    active = tuple(r[0] for r in db.execute(
        "SELECT id FROM flags WHERE annotation_id = ? AND removed_at IS NULL ORDER BY id", [annotation_id]))
    return str(Watermark(edit_id, flag_id, event_id, active))


# ---------------------------------------------------------------- history

@dataclass
class PairEvent:
    at: str
    who: str
    what: str


def caption_label(caption_id: str) -> str:
    """'caption c0' for '<annotation id>:c0', as the page's messages name captions."""
    return f"caption {caption_id.rsplit(':', 1)[-1]}"


def _descriptor_names(*sides: list[ObjectCell]) -> dict[str, str]:
    return {cell.target_id: f"“{cell.text}” ({obj.name})"
            for objects in sides for obj in objects for cell in obj.descriptors}


def pair_events(
    events: list[ReviewEvent], flags: list[FlagRecord], edits: dict[str, list[CaptionEdit]],
    descriptor_names: dict[str, str],
) -> list[PairEvent]:
    """The pair's review history in time order: approve / reject / reset, notes, flags
    set and removed, caption edits and undos."""
    out = []
    for ev in events:
        if ev.action == "note":
            what = f"note: “{ev.value}”" if ev.value else "cleared the note"
        else:
            what = {"approved": "approved the pair", "rejected": "rejected the pair",
                    "unreviewed": "reset the pair to unreviewed"}.get(ev.value or "", f"{ev.action}: {ev.value}")
        out.append(PairEvent(ev.created_at, ev.reviewer, what))
    for flag in flags:
        target = (caption_label(flag.target_id) if flag.target_kind == "caption"
                  else "descriptor " + descriptor_names.get(flag.target_id, flag.target_id))
        out.append(PairEvent(flag.created_at, flag.reviewer,
                             f"flagged {target}" + (f" ({flag.reason})" if flag.reason else "")))
        if flag.removed_at:
            out.append(PairEvent(flag.removed_at, flag.removed_by or "?", f"unflagged {target}"))
    for caption_id, rows in edits.items():
        for edit in rows:
            what = (f"edited {caption_label(caption_id)} (v{edit.version})" if edit.action == "edit"
                    else f"undid {caption_label(caption_id)} back to v{edit.restores} (v{edit.version})")
            out.append(PairEvent(edit.created_at, edit.editor, what))
    out.sort(key=lambda e: e.at)
    return out


# ---------------------------------------------------------------- actions

class ReviewActionError(Exception):
    """An action the reviewer asked for that could not be done; the message says why."""


def require_reviewer(reviewer: Optional[str]) -> str:
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ReviewActionError("type your name in the Reviewer box first: every action is recorded with it")
    if reviewer.casefold() == PIPELINE_REVIEWER:
        # Its flags are told apart by this name (Stats leaves them out of reviewers' rates).
        raise ReviewActionError(f"{reviewer!r} is the pipeline's own name for the flags it sets: type your own "
                                "name in the Reviewer box")
    return reviewer


def _reason(reason: Optional[str]) -> Optional[str]:
    if reason in (None, "", ANY, "(none)"):
        return None
    if reason not in FLAG_REASONS:
        raise ReviewActionError(f"flag reason {reason!r} is not one of: {', '.join(FLAG_REASONS)}")
    return reason


def _active_flag(db, annotation_id: str, kind: str, target_id: str) -> Optional[int]:
    row = db.execute(
        "SELECT id FROM flags WHERE annotation_id = ? AND target_kind = ? AND target_id = ?"
        " AND removed_at IS NULL", [annotation_id, kind, target_id]).fetchone()
    return row[0] if row else None


def _check_descriptor_target(db, annotation_id: str, target_id: str) -> None:
    """A descriptor flag must name a descriptor of this annotation's stage 1 or 2 list."""
    parts = target_id.rsplit("/", 2)
    ann = get_annotation(db, annotation_id)
    if len(parts) != 3 or parts[0] not in (ann.stage1_id, ann.stage2_id):
        raise ReviewActionError(f"{target_id!r} is not a descriptor of pair {annotation_id}")
    desc = get_description(db, parts[0])
    try:
        desc.objects[int(parts[1])].descriptors[int(parts[2])]
    except (ValueError, IndexError, AttributeError):
        raise ReviewActionError(f"{target_id!r} is not a descriptor of pair {annotation_id}") from None


def set_flag(
    db: sqlite_utils.Database, annotation_id: str, kind: str, target_id: str,
    flagged: bool, reviewer: str, reason: Optional[str] = None,
) -> bool:
    """Flag (or unflag) one descriptor or caption; returns whether it is flagged now."""
    reviewer = require_reviewer(reviewer)
    if kind == "descriptor":
        _check_descriptor_target(db, annotation_id, target_id)
    elif kind == "caption":
        row = db.execute("SELECT annotation_id FROM captions WHERE id = ?", [target_id]).fetchone()
        if row is None or row[0] != annotation_id:
            raise ReviewActionError(f"caption {target_id!r} is not part of pair {annotation_id}")
    else:
        raise ReviewActionError(f"cannot flag a {kind!r}; only a descriptor or a caption")
    current = _active_flag(db, annotation_id, kind, target_id)
    if flagged:
        store_review.add_flag(db, annotation_id, kind, target_id, reviewer, _reason(reason))
        return True
    if current is not None:
        store_review.remove_flag(db, current, reviewer)
    return False


def toggle_flag(
    db: sqlite_utils.Database, annotation_id: str, kind: str, target_id: str,
    reviewer: str, reason: Optional[str] = None,
) -> bool:
    flagged = _active_flag(db, annotation_id, kind, target_id) is not None
    return set_flag(db, annotation_id, kind, target_id, not flagged, reviewer, reason)


@dataclass
class EditResult:
    saved: bool
    version: int
    text: str
    message: str
    conflict: bool = False


# Line breaks of every kind str.splitlines knows, with the blanks around them.
_LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")


def one_line(text: Optional[str]) -> tuple[str, bool]:
    """The caption text as stored: line breaks (with the blanks around them) become one
    space, ends trimmed. Returns it and whether there were line breaks."""
    text = (text or "").strip()
    joined = _LINE_BREAKS.sub(" ", text)
    return joined, joined != text


def save_caption(
    db: sqlite_utils.Database, caption_id: str, text: str, editor: str, expected_version: Optional[int]
) -> EditResult:
    """Save an in-place edit made from version `expected_version`.

    Saving the text the caption already has writes nothing (blur after Enter sends it
    twice). If someone saved a newer version meanwhile nothing is written and the
    result says so, with their text, instead of overwriting it.
    """
    editor = require_reviewer(editor)
    text, joined = one_line(text)
    joined_note = "its line breaks were replaced by spaces (a caption is one line: exports and CLIP read it so)"
    current = store_review.get_caption(db, caption_id)
    if text == (current.current_text or current.text):
        return EditResult(False, current.version, text,
                          f"{caption_label(caption_id)}: not changed; {joined_note}" if joined else "")
    if not text:
        return EditResult(False, current.version, current.current_text or current.text,
                          f"{caption_label(caption_id)}: an empty caption is not saved; flag it instead")
    try:
        saved = store_review.edit_caption(db, caption_id, text, editor, expected_version=expected_version)
    except ConflictError:
        by = _last_editor(db, caption_id) or "someone else"
        return EditResult(
            False, current.version, current.current_text or current.text,
            f"NOT SAVED: {by} changed this caption ({caption_label(caption_id)}) while you were editing it "
            f"(now version {current.version}, you started from version {expected_version}). Their text is "
            f"kept: “{current.current_text}”. Reload the pair (u) to see it, then edit again.",
            conflict=True,
        )
    message = f"caption saved as version {saved.version}" + (f"; {joined_note}" if joined else "")
    note = _recheck_caption_length(db, current.annotation_id, caption_id, saved.current_text, editor)
    return EditResult(True, saved.version, saved.current_text, f"{message}; {note}" if note else message)


def _recheck_caption_length(db: sqlite_utils.Database, annotation_id: str, caption_id: str, text: str,
                            editor: str) -> str:
    """After an edit: clear the pipeline's "over 77 CLIP tokens" flag once the caption fits
    (the reviewer shortened it, which is the fix the flag asks for; left in place, it kept
    the fixed caption out of exports), and warn when an edit makes a caption too long for
    training, which cuts it at 77 tokens."""
    from pipeline.compound import CLIP_CONTEXT_LENGTH, count_clip_tokens

    tokens = count_clip_tokens(text)
    overlong = PIPELINE_FLAG_REASONS[0]
    row = db.execute(
        "SELECT id FROM flags WHERE annotation_id = ? AND target_kind = 'caption' AND target_id = ?"
        " AND reviewer = ? AND reason = ? AND removed_at IS NULL",
        [annotation_id, caption_id, PIPELINE_REVIEWER, overlong]).fetchone()
    if tokens > CLIP_CONTEXT_LENGTH:
        return (f"it is {tokens} CLIP tokens, over the {CLIP_CONTEXT_LENGTH} the retrieval model reads: "
                "training cuts the rest off")
    if row is not None:
        store_review.remove_flag(db, row[0], editor)
        return f"it now fits in {tokens} CLIP tokens, so the pipeline's '{overlong}' flag is cleared"
    return ""


def undo_caption(db: sqlite_utils.Database, caption_id: str, editor: str, expected_version: Optional[int]) -> EditResult:
    """Revert the caption's last edit, made against version `expected_version`.

    If someone saved a newer version since the reviewer's page showed
    `expected_version`, nothing is written and the result says who and what is kept.
    """
    editor = require_reviewer(editor)
    label = caption_label(caption_id)
    try:
        current = store_review.get_caption(db, caption_id)
    except NotFoundError:
        raise ReviewActionError(f"{label} ({caption_id!r}) does not exist") from None
    try:
        saved = store_review.undo_caption_edit(db, caption_id, editor, expected_version=expected_version)
    except ConflictError:
        current = store_review.get_caption(db, caption_id)
        by = _last_editor(db, caption_id) or "someone else"
        return EditResult(
            False, current.version, current.current_text,
            f"NOT UNDONE: {by} changed {label} after your page showed it (now version {current.version}, "
            f"you saw version {expected_version}). Nothing was undone; their text is kept: "
            f"“{current.current_text}”.",
            conflict=True,
        )
    except StoreError:
        current = store_review.get_caption(db, caption_id)
        return EditResult(False, current.version, current.current_text,
                          f"{label}: nothing to undo, it shows the pipeline's original text")
    return EditResult(True, saved.version, saved.current_text,
                      f"{label}: undone, back to “{saved.current_text}” (version {saved.version})")


def _last_editor(db, caption_id: str) -> Optional[str]:
    row = db.execute("SELECT editor FROM caption_edits WHERE caption_id = ? ORDER BY version DESC LIMIT 1",
                     [caption_id]).fetchone()
    return row[0] if row else None


def set_status(db: sqlite_utils.Database, annotation_id: str, status: str, reviewer: str,
               seen_since: Optional[str] = None) -> str:
    """Approve, reject or reset the pair. Returns what the reviewer should know, or "":
    with `seen_since` (the pair_watermark of when their page read the pair), that this
    decision replaces another reviewer's different one made after that, which their page
    may not have shown yet (a decision is not refused as a stale caption edit is: a
    second opinion may overrule the first, but not unknowingly)."""
    reviewer = require_reviewer(reviewer)
    before = db.execute("SELECT review_status, reviewer, reviewed_at FROM annotations WHERE id = ?",
                        [annotation_id]).fetchone()
    last = db.execute("SELECT MAX(id) FROM review_events WHERE annotation_id = ? AND action = 'status'",
                      [annotation_id]).fetchone()[0]
    store_review.set_review_status(db, annotation_id, status, reviewer)
    mark = Watermark.parse(seen_since)
    if mark is None or before is None:
        return ""
    previous, by, at = before
    if previous in (status, "unreviewed") or last is None or last <= mark.event_id or by == reviewer:
        return ""
    return (f"{by} {previous} this pair at {_when(at)}, after you opened it; your decision replaces theirs "
            "(the pair's history keeps both)")


def save_note(db: sqlite_utils.Database, annotation_id: str, note: str, reviewer: str,
              expected: Optional[str] = None) -> bool:
    """Save the note if it changed; returns whether anything was written.

    `expected` is the stored note the reviewer's page showed when they started typing.
    If someone saved another note since, nothing is written (ReviewActionError says
    who and what is kept) instead of silently replacing theirs."""
    note = (note or "").strip()
    row = db.execute("SELECT note FROM annotations WHERE id = ?", [annotation_id]).fetchone()
    if row is None:
        raise ReviewActionError(f"pair {annotation_id} does not exist")
    stored = (row[0] or "").strip()
    if stored == note:
        return False
    if expected is not None and stored != (expected or "").strip():
        last = db.execute(
            "SELECT reviewer FROM review_events WHERE annotation_id = ? AND action = 'note' ORDER BY id DESC LIMIT 1",
            [annotation_id]).fetchone()
        # Leaving the box for Next or Approve also shows another pair: the text goes in the message.
        raise ReviewActionError(
            f"NOT SAVED: {last[0] if last else 'someone else'} changed the note of {pair_name(db, annotation_id)} "
            f"while you were typing yours. Their note is kept: “{stored}”. Your note was: “{note}”; open the "
            "pair again (u reloads it) and edit the note.")
    store_review.set_note(db, annotation_id, note, require_reviewer(reviewer))
    return True


def live_note(stored: Optional[str], shown: Optional[str], in_box: Optional[str]) -> Optional[str]:
    """The note a live refresh puts in the note box, or None to leave the box alone.

    Only a stored note that moved since the page showed it is sent, and only while the
    box still holds what was shown. A refresh for another change (a flag, an approval)
    sends nothing: the box's value travelled with the request, so typing that starts
    while the request is in flight would otherwise be overwritten by the stored note."""
    stored, shown, in_box = (stored or "").strip(), (shown or "").strip(), (in_box or "").strip()
    if in_box != shown or stored == shown:
        return None
    return stored


def activity_since(db: sqlite_utils.Database, annotation_id: str, since: str, me: str) -> list[str]:
    """What other reviewers (and the pipeline) did to this pair after the page's
    `since` watermark (pair_watermark), oldest first; [] for no watermark."""
    mark = Watermark.parse(since)
    if mark is None:
        return []
    lines = []
    for editor, caption_id, version, at in db.execute(
        "SELECT e.editor, e.caption_id, e.version, e.created_at FROM caption_edits e"
        " JOIN captions c ON c.id = e.caption_id WHERE c.annotation_id = ? AND e.id > ?"
        " AND e.editor != ?", [annotation_id, mark.edit_id, me]).fetchall():
        lines.append((at, f"{editor} edited caption {caption_id.rsplit(':', 1)[-1]} (v{version})"))
    # A flag set by one reviewer may be removed by another: each side is its own line.
    seen_active = set(mark.active_flags)
    for flag_id, reviewer, kind, target, at, removed_at, removed_by in db.execute(
        "SELECT id, reviewer, target_kind, target_id, created_at, removed_at, removed_by FROM flags"
        " WHERE annotation_id = ? AND (id > ? OR removed_at IS NOT NULL)", [annotation_id, mark.flag_id]).fetchall():
        what = caption_label(target) if kind == "caption" else "a descriptor"
        new = flag_id > mark.flag_id
        if new and reviewer != me:
            lines.append((at, f"{reviewer} flagged {what}"))
        if removed_at and (new or flag_id in seen_active) and removed_by != me:
            lines.append((removed_at, f"{removed_by or 'someone'} unflagged {what}"))
    for reviewer, action, value, at in db.execute(
        "SELECT reviewer, action, value, created_at FROM review_events WHERE annotation_id = ?"
        " AND id > ? AND reviewer != ?", [annotation_id, mark.event_id, me]).fetchall():
        lines.append((at, f"{reviewer} set {action} to {value!r}" if action == "note" else f"{reviewer} marked it {value}"))
    return [text for _, text in sorted(lines)]


# ---------------------------------------------------------------- HTML (all text escaped)

def flag_label(by: Optional[str], reason: Optional[str]) -> str:
    """'flagged by bob: wrong count'; the pipeline's own flags (an answer still wrong after
    its repair request) are named as the pipeline's, so nobody takes them for a reviewer's."""
    who = "the pipeline" if by == PIPELINE_REVIEWER else by
    return "flagged" + (f" by {who}" if who else "") + (f": {reason}" if reason else "")


# What a pipeline flag asks of the reviewer, shown on the object it is about.
_PIPELINE_HINTS = {
    PIPELINE_FLAG_REASONS[0]: "shorten it to clear the flag",
    PIPELINE_FLAG_REASONS[1]: "stage 2 may call a reference object by another name (captions may then say it "
                              "was removed and added); unflag it if it is really new",
}


_STATE_LABEL = {
    "unchanged": "unchanged", "changed": "changed", "new": "new",
    "kept": "kept", "removed": "not in target",
}


def render_images_html(view: Optional[PairView]) -> str:
    if view is None:
        return "<div class='g4c-empty'>Nothing to show in this queue.</div>"

    def figure(label: str, cell: ImageCell) -> str:
        if cell.url:
            body = (f"<img src='{escape_text(cell.url)}' alt='{escape_text(label)}' "
                    f"data-g4c-zoom='1' title='click to zoom'>")
        elif cell.url_only:  # store/importers/_download.py fetches it on request
            body = ("<div class='g4c-noimg'>not downloaded: this image is recorded by its URL only; "
                    "import its dataset again with <code>good4cir import --download</code> to fetch it"
                    "</div>")
        else:
            body = "<div class='g4c-noimg'>no local file for this image</div>"
        return (f"<figure class='g4c-fig'>{body}<figcaption><b>{escape_text(label)}</b> · "
                f"{escape_text(cell.name)}</figcaption></figure>")

    return (f"<div class='g4c-images' data-annotation='{escape_text(view.annotation_id)}'>"
            f"{figure('Reference', view.reference)}{figure('Target', view.target)}</div>")


def render_board_html(view: Optional[PairView]) -> str:
    """Stage 1 and stage 2 descriptors side by side; clicking a descriptor flags it."""
    if view is None:
        return ""

    def column(title: str, objects: list[ObjectCell]) -> str:
        if not objects:
            return f"<div class='g4c-col'><h4>{escape_text(title)}</h4><p class='g4c-muted'>no descriptors</p></div>"
        cards = []
        for obj in objects:
            chips = []
            for cell in obj.descriptors:
                classes = f"g4c-chip g4c-d-{cell.state}" + (" g4c-flagged" if cell.flagged else "")
                tip = flag_label(cell.flagged_by, cell.reason) if cell.flagged else "click to flag"
                chips.append(
                    f"<button type='button' class='{classes}' data-item='{escape_text(cell.target_id)}' "
                    f"title='{escape_text(tip)}'>{'⚑ ' if cell.flagged else ''}{escape_text(cell.text)}</button>")
            pipeline_reasons = sorted({c.reason or "" for c in obj.descriptors
                                       if c.flagged and c.flagged_by == PIPELINE_REVIEWER})
            notes = "".join(
                f"<div class='g4c-pipeflag'>⚑ {escape_text(flag_label(PIPELINE_REVIEWER, reason))}"
                + (f" · {escape_text(_PIPELINE_HINTS[reason])}" if reason in _PIPELINE_HINTS else "") + "</div>"
                for reason in pipeline_reasons)
            cards.append(
                f"<div class='g4c-obj g4c-o-{obj.state}'><div class='g4c-objhead'>{escape_text(obj.name)}"
                f"<span class='g4c-badge g4c-b-{obj.state}'>{escape_text(_STATE_LABEL.get(obj.state, obj.state))}</span>"
                f"</div>{notes}<div class='g4c-chips'>{''.join(chips)}</div></div>")
        return f"<div class='g4c-col'><h4>{escape_text(title)}</h4>{''.join(cards)}</div>"

    legend = (
        "<div class='g4c-legend'><span class='g4c-badge g4c-b-unchanged'>unchanged</span>"
        "<span class='g4c-badge g4c-b-changed'>changed</span><span class='g4c-badge g4c-b-new'>new</span>"
        "<span class='g4c-badge g4c-b-removed'>not in target</span>"
        "<span class='g4c-chip g4c-d-new'>new descriptor</span><span class='g4c-chip g4c-d-gone'>dropped</span>"
        "<span class='g4c-chip g4c-flagged'>⚑ flagged</span> · click a descriptor to flag or unflag it</div>")
    return (f"<div class='g4c-board' data-annotation='{escape_text(view.annotation_id)}'>{legend}"
            f"<div class='g4c-cols'>{column('Reference · stage 1 descriptors', view.stage1)}"
            f"{column('Target · stage 2 descriptors', view.stage2)}</div></div>")


def render_info_html(view: Optional[PairView], status: QueueStatus, open_by: Optional[list[str]] = None) -> str:
    """The queue line and the pair's line; `open_by`: who else has the pair open now."""
    head = f"<div class='g4c-progress'>{escape_text(status.text())}</div>"
    if view is None:
        return head
    state = view.review_status
    who = f" by {view.reviewer}" if view.reviewer and state != "unreviewed" else ""
    flags = len(view.flags)
    also = (f" · <span class='g4c-openby'>also open for {escape_text(', '.join(open_by))}</span>"
            if open_by else "")
    newer = ""
    if view.newer_run is not None:
        name = view.external_id or view.pair_id
        newer = ("<div class='g4c-newer'>" + escape_text(
            f"run {view.newer_run} annotated this pair again: exports take run {view.newer_run}'s annotation, not "
            f"this one (to export this review choose run {view.run_id} in the Export tab); Go to {name} opens "
            f"run {view.newer_run}'s") + "</div>")
    return (
        head + f"<div class='g4c-meta'><span class='g4c-status g4c-s-{escape_text(state)}'>"
        f"{escape_text(state + who)}</span> · pair <code>{escape_text(view.external_id or view.pair_id)}</code>"
        f" · {escape_text(view.source)} · split {escape_text(view.split or '-')} · "
        f"{escape_text(view.run_label)} · {escape_text(view.backend)} / {escape_text(view.model)}"
        f" · {flags} flag{'s' if flags != 1 else ''}{also}</div>{newer}")


def _compact(value) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_compact(v)}" for k, v in value.items()) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return str(value)


def render_activity_html(lines: list[str]) -> str:
    if not lines:
        return ""
    return ("<div class='g4c-activity'>Since you opened this pair: " + escape_text("; ".join(lines[-6:]))
            + " — shown below (text you have not saved yet is kept).</div>")


def _when(iso: Optional[str]) -> str:
    """'2026-11-26 21:30:01 UTC' from a stored ISO time (UTC, milliseconds)."""
    if not iso:
        return ""
    return iso[:19].replace("T", " ") + (" UTC" if iso.endswith("+00:00") else "")


def render_pair_history_html(view: Optional[PairView]) -> str:
    """The pair's review history, newest first."""
    if view is None:
        return ""
    if not view.events:
        return "<div class='g4c-history g4c-muted'>No review actions on this pair yet.</div>"
    rows = "".join(
        f"<tr><td class='g4c-when'>{escape_text(_when(ev.at))}</td><td><b>{escape_text(ev.who)}</b></td>"
        f"<td>{escape_text(ev.what)}</td></tr>" for ev in reversed(view.events))
    return (f"<div class='g4c-history' data-annotation='{escape_text(view.annotation_id)}'>"
            f"<table class='g4c-table g4c-histtable'><thead><tr><th>when</th><th>who</th><th>what</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")


def _clip_tokens(cap: CaptionCell) -> Optional[int]:
    """CLIP tokens of the caption's current text: the pipeline stored the count of a
    compound's original text; an edited caption is counted again (cheap: no torch)."""
    if cap.text == cap.original:
        return cap.token_count
    from pipeline.compound import count_clip_tokens

    return count_clip_tokens(cap.text)


def caption_meta(cap: CaptionCell) -> str:
    """The small line above a caption's text: position, version, who changed it last."""
    meta = f"{cap.position + 1} · v{cap.version}"
    if cap.version and cap.history:
        last = cap.history[-1]
        meta += (f" · edited by {last.editor}" if last.action == "edit"
                 else f" · undone by {last.editor} (back to v{last.restores})")
    from pipeline.compound import CLIP_CONTEXT_LENGTH

    tokens = _clip_tokens(cap)
    if tokens is not None and (cap.kind == "compound" or tokens > CLIP_CONTEXT_LENGTH):
        meta += f" · {tokens} CLIP tokens"
        # The pipeline's own 'over 77 CLIP tokens' flag says so already.
        if tokens > CLIP_CONTEXT_LENGTH and not (cap.flagged and cap.flagged_by == PIPELINE_REVIEWER):
            meta += f": over the {CLIP_CONTEXT_LENGTH} the retrieval model reads, training cuts the rest off"
    if cap.flagged_sources and not cap.flagged:
        names = ", ".join(caption_label(s).split(" ", 1)[1] for s in cap.flagged_sources)
        meta += f" · built on flagged caption{'s' if len(cap.flagged_sources) > 1 else ''} {names}: exports leave it out"
    elif cap.stale_sources and not cap.flagged:   # one reason to be left out is enough
        names = ", ".join(caption_label(s).split(" ", 1)[1] for s in cap.stale_sources)
        meta += (f" · quotes edited caption{'s' if len(cap.stale_sources) > 1 else ''} {names}: exports leave it "
                 "out until it is edited too")
    if cap.flagged:
        meta += f" · {flag_label(cap.flagged_by, cap.reason)}"
        if cap.flagged_by == PIPELINE_REVIEWER and cap.reason in _PIPELINE_HINTS:
            meta += f" ({_PIPELINE_HINTS[cap.reason]})"
    return meta


def render_caption_history_html(cap: CaptionCell) -> str:
    """The inside of a caption's history box: every version, newest first, with text,
    editor and time. Version 0 is the pipeline's text."""
    def item(head: str, text: str, current: bool) -> str:
        return (f"<li class='{'g4c-current' if current else ''}'><span class='g4c-histmeta'>"
                f"{escape_text(head + (' · current' if current else ''))}</span><div>{escape_text(text)}</div></li>")

    items = []
    for i, edit in enumerate(reversed(cap.history)):
        how = "edit" if edit.action == "edit" else f"undo → text of v{edit.restores}"
        items.append(item(f"v{edit.version} · {how} · {edit.editor} · {_when(edit.created_at)}", edit.text, i == 0))
    items.append(item("v0 · original (pipeline)", cap.original, not cap.history))
    n = len(cap.history) + 1
    return (f"<summary>History · {n} version{'s' if n != 1 else ''}</summary>"
            f"<ol class='g4c-histlist'>{''.join(items)}</ol>")


def caption_state(cap: CaptionCell) -> dict:
    """What the captions panel's script needs to redraw one row after a save or an undo."""
    return {"caption_id": cap.id, "version": cap.version, "text": cap.text, "can_undo": cap.can_undo,
            "flagged": cap.flagged, "meta": caption_meta(cap), "history_html": render_caption_history_html(cap)}


def render_ground_truth_html(view: Optional[PairView], score: Optional[dict] = None) -> str:
    if view is None or not view.has_ground_truth:
        return "<div class='g4c-muted'>No ground truth for this pair (only demo-world pairs have it).</div>"
    edits = []
    for edit in view.ground_truth or []:
        if isinstance(edit, dict):
            edits.append(", ".join(
                f"{escape_text(k)}: {escape_text(_compact(v))}" for k, v in edit.items()))
        else:
            edits.append(escape_text(edit))
    caps = "".join(f"<li>{escape_text(c)}</li>" for c in view.original_captions)
    score_html = ""
    if score:
        score_html = "<div class='g4c-score'>" + " · ".join(
            f"{escape_text(k)}: {escape_text(v)}" for k, v in score.items()) + "</div>"
    return (
        "<div class='g4c-gt'><b>Ground-truth edits</b><ul>"
        + "".join(f"<li>{e}</li>" for e in edits)
        + "</ul><b>Ground-truth captions</b><ul>" + caps + "</ul>" + score_html + "</div>")


def score_pair_flags(db: sqlite_utils.Database, annotation_id: str) -> dict:
    """How many of this pair's true hallucinations the reviewer's flags caught (demo
    world ground truth), by pipeline.scoring.score_flags."""
    try:
        from pipeline.scoring import score_flags
    except ImportError as exc:  # the scoring module is not there yet
        raise ReviewActionError(f"flag scoring is not available: {exc}") from None
    return summarize_flag_score(score_flags(db, annotation_id))


def summarize_flag_score(result: dict) -> dict[str, str]:
    """score_flags' answer as short lines: what was truly hallucinated, what the flags caught."""
    out = {}
    for part in ("descriptors", "captions"):
        r = result.get(part) or {}
        out[part] = (f"{r.get('caught', 0)} of {r.get('hallucinated', 0)} hallucinated caught, "
                     f"{len(r.get('false_flags') or [])} false flag(s)")
    total = result.get("all") or {}
    recall, precision = total.get("recall"), total.get("precision")
    out["overall"] = (f"recall {'-' if recall is None else f'{100 * recall:.0f}%'}, "
                      f"precision {'-' if precision is None else f'{100 * precision:.0f}%'}")
    return out


def render_captions_html(view: Optional[PairView], *, live: bool = False) -> str:
    """Stage 3 and stage 4 captions as editable text areas with a flag box, an Undo
    button and a history box each.

    Each row carries the caption id and the version it shows, so a save names exactly
    what the reviewer was looking at (the optimistic-concurrency check needs that).
    `live`: a refresh because someone else changed the pair; the page's script then keeps
    text the reviewer has typed and not saved (a move or reload shows the stored text).
    """
    if view is None:
        return ""
    # A fresh token per rendering lets the page's script tell Gradio's redraw of this
    # panel apart from its own changes to it.
    live_attr = f" data-render='{secrets.token_hex(6)}'" + (" data-live='1'" if live else "")

    def rows(title: str, caps: list[CaptionCell], prefix: str) -> str:
        out = [f"<h4>{escape_text(title)}</h4>"]
        if not caps:
            out.append("<p class='g4c-muted'>none</p>")
        for i, cap in enumerate(caps):
            lines = 3 if len(cap.text) > 110 else 2 if len(cap.text) > 55 else 1
            undo_tip = ("revert this caption's last edit (z)" if cap.can_undo
                        else "nothing to undo: the pipeline's original text")
            out.append(
                f"<div class='g4c-caprow{' g4c-capflagged' if cap.flagged else ''}' id='g4c-cap-{prefix}{i}' "
                f"data-caption='{escape_text(cap.id)}' data-version='{cap.version}'>"
                f"<label class='g4c-flaglabel' title='flag as hallucination'><input type='checkbox' data-flag='1'"
                f"{' checked' if cap.flagged else ''}> ⚑</label>"
                f"<div class='g4c-capbody'><div class='g4c-capmeta'>{escape_text(caption_meta(cap))}</div>"
                f"<textarea rows='{lines}' spellcheck='true'>{escape_text(cap.text)}</textarea>"
                f"<div class='g4c-captools'><button type='button' class='g4c-undo' data-undo='1' "
                f"title='{escape_text(undo_tip)}'{'' if cap.can_undo else ' disabled'}>↶ Undo</button>"
                f"<details class='g4c-caphist'>{render_caption_history_html(cap)}</details></div>"
                f"</div></div>")
        return "".join(out)

    return (f"<div class='g4c-captions' data-annotation='{escape_text(view.annotation_id)}'"
            f"{live_attr}>"
            f"<div class='g4c-capstatus' role='status'></div>"
            f"{rows('Stage 3 · modification captions', view.individual, 'i')}"
            f"{rows('Stage 4 · compound captions', view.compound, 'k')}</div>")
