"""Human review: caption edits with full history and undo, flags, approve/reject, notes.

Every write is immediate and records who and when. Edits are optimistic: the caller
says which version it saw, and a stale write raises ConflictError instead of silently
replacing someone else's text.
"""

from __future__ import annotations

from typing import Optional

import sqlite_utils

from .db import transaction, utc_now
from .errors import ConflictError, NotFoundError, StoreError
from .models import FLAG_REASONS, CaptionEdit, CaptionRecord, FlagRecord, ReviewEvent

_CURRENT_SQL = """
SELECT c.*, e.text AS edit_text, e.version AS edit_version, e.restores AS edit_restores
FROM captions c
LEFT JOIN caption_edits e ON e.caption_id = c.id
  AND e.version = (SELECT MAX(version) FROM caption_edits WHERE caption_id = c.id)
"""


def _caption_from_row(row: dict) -> CaptionRecord:
    row = dict(row)
    edit_text = row.pop("edit_text")
    edit_version = row.pop("edit_version")
    row.pop("edit_restores")
    record = CaptionRecord.from_row(row)
    record.current_text = record.text if edit_text is None else edit_text
    record.version = edit_version or 0
    return record


def get_caption(db: sqlite_utils.Database, caption_id: str) -> CaptionRecord:
    cursor = db.execute(_CURRENT_SQL + " WHERE c.id = ?", [caption_id])
    row = cursor.fetchone()
    if row is None:
        raise NotFoundError(f"caption {caption_id!r} does not exist")
    return _caption_from_row(dict(zip([d[0] for d in cursor.description], row)))


def list_captions(db: sqlite_utils.Database, annotation_id: str) -> list[CaptionRecord]:
    """The annotation's captions in order (individual first), with current text."""
    cursor = db.execute(
        _CURRENT_SQL + " WHERE c.annotation_id = ? ORDER BY c.kind DESC, c.position",
        [annotation_id],
    )
    names = [d[0] for d in cursor.description]
    return [_caption_from_row(dict(zip(names, row))) for row in cursor.fetchall()]


def list_captions_of(
    db: sqlite_utils.Database, annotation_ids: list[str]
) -> dict[str, list[CaptionRecord]]:
    """list_captions for many annotations in one query (exports read 100,000s)."""
    if not annotation_ids:
        return {}
    marks = ", ".join("?" for _ in annotation_ids)
    cursor = db.execute(
        _CURRENT_SQL + f" WHERE c.annotation_id IN ({marks})"
        " ORDER BY c.annotation_id, c.kind DESC, c.position",
        list(annotation_ids),
    )
    names = [d[0] for d in cursor.description]
    result: dict[str, list[CaptionRecord]] = {a: [] for a in annotation_ids}
    for row in cursor.fetchall():
        record = _caption_from_row(dict(zip(names, row)))
        result[record.annotation_id].append(record)
    return result


def caption_history(db: sqlite_utils.Database, caption_id: str) -> list[CaptionEdit]:
    rows = db.execute(
        "SELECT * FROM caption_edits WHERE caption_id = ? ORDER BY version", [caption_id]
    )
    names = [d[0] for d in rows.description]
    return [CaptionEdit.from_row(dict(zip(names, r))) for r in rows.fetchall()]


def _latest_edit(db, caption_id: str) -> Optional[tuple[int, int]]:
    """(version, restores) of the newest edit row, or None."""
    return db.execute(
        "SELECT version, restores FROM caption_edits WHERE caption_id = ? ORDER BY version DESC LIMIT 1",
        [caption_id],
    ).fetchone()


def edit_caption(
    db: sqlite_utils.Database,
    caption_id: str,
    text: str,
    editor: str,
    expected_version: Optional[int] = None,
) -> CaptionRecord:
    """Make `text` the caption's current text as a new version.

    expected_version is the version the editor was looking at; if someone saved a
    newer one since, ConflictError is raised and nothing is written.
    """
    text = text.strip()
    if not text:
        raise StoreError(f"caption {caption_id!r}: an edit cannot be empty")
    if not editor:
        raise StoreError("an edit needs the editor's name")
    with transaction(db):
        if db.execute("SELECT 1 FROM captions WHERE id = ?", [caption_id]).fetchone() is None:
            raise NotFoundError(f"caption {caption_id!r} does not exist")
        latest = _latest_edit(db, caption_id)
        current_version = latest[0] if latest else 0
        if expected_version is not None and expected_version != current_version:
            raise ConflictError(
                f"caption {caption_id!r} was changed by someone else (now version "
                f"{current_version}, you edited version {expected_version}); reload it"
            )
        version = current_version + 1
        db.execute(
            "INSERT INTO caption_edits (caption_id, version, text, action, restores, editor, created_at)"
            " VALUES (?, ?, ?, 'edit', ?, ?, ?)",
            [caption_id, version, text, version, editor, utc_now()],
        )
        _touch_annotation_of_caption(db, caption_id)
    return get_caption(db, caption_id)


def undo_caption_edit(
    db: sqlite_utils.Database, caption_id: str, editor: str,
    expected_version: Optional[int] = None,
) -> CaptionRecord:
    """Return the caption to the text it had before its current version, as a new version."""
    with transaction(db):
        latest = _latest_edit(db, caption_id)
        if latest is None:
            raise StoreError(f"caption {caption_id!r} has no edit to undo")
        current_version, restores = latest
        if expected_version is not None and expected_version != current_version:
            raise ConflictError(
                f"caption {caption_id!r} was changed by someone else (now version "
                f"{current_version}); reload it"
            )
        if restores == 0:
            raise StoreError(f"caption {caption_id!r} already shows the original text")
        # The effective version `restores` was written over some earlier effective version.
        previous = _effective_before(db, caption_id, restores)
        if previous == 0:
            text = db.execute("SELECT text FROM captions WHERE id = ?", [caption_id]).fetchone()[0]
        else:
            text = db.execute(
                "SELECT text FROM caption_edits WHERE caption_id = ? AND version = ?",
                [caption_id, previous],
            ).fetchone()[0]
        db.execute(
            "INSERT INTO caption_edits (caption_id, version, text, action, restores, editor, created_at)"
            " VALUES (?, ?, ?, 'undo', ?, ?, ?)",
            [caption_id, current_version + 1, text, previous, editor, utc_now()],
        )
        _touch_annotation_of_caption(db, caption_id)
    return get_caption(db, caption_id)


def _effective_before(db, caption_id: str, version: int) -> int:
    """The effective version that was current just before `version` was written."""
    row = db.execute(
        "SELECT restores FROM caption_edits WHERE caption_id = ? AND version = ?",
        [caption_id, version - 1],
    ).fetchone()
    return 0 if row is None else row[0]


def _touch_annotation_of_caption(db, caption_id: str) -> None:
    db.execute(
        "UPDATE annotations SET updated_at = ? WHERE id = (SELECT annotation_id FROM captions WHERE id = ?)",
        [utc_now(), caption_id],
    )


def add_flag(
    db: sqlite_utils.Database,
    annotation_id: str,
    target_kind: str,
    target_id: str,
    reviewer: str,
    reason: Optional[str] = None,
) -> FlagRecord:
    """Flag one descriptor or caption as a hallucination. Flagging twice is a no-op."""
    if target_kind not in ("descriptor", "caption"):
        raise StoreError(f"flag target kind must be 'descriptor' or 'caption', not {target_kind!r}")
    if reason is not None and reason not in FLAG_REASONS:
        raise StoreError(f"flag reason {reason!r} is not one of {', '.join(FLAG_REASONS)}")
    if not reviewer:
        raise StoreError("a flag needs the reviewer's name")
    with transaction(db):
        _require_annotation(db, annotation_id)
        existing = db.execute(
            "SELECT id FROM flags WHERE annotation_id = ? AND target_kind = ? AND target_id = ?"
            " AND removed_at IS NULL",
            [annotation_id, target_kind, target_id],
        ).fetchone()
        if existing:
            flag_id = existing[0]
            if reason is not None:
                db.execute("UPDATE flags SET reason = ? WHERE id = ?", [reason, flag_id])
        else:
            flag_id = db.execute(
                "INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [annotation_id, target_kind, target_id, reason, reviewer, utc_now()],
            ).lastrowid
        _refresh_flag_count(db, annotation_id)
    return _get_flag(db, flag_id)


def remove_flag(db: sqlite_utils.Database, flag_id: int, reviewer: str) -> FlagRecord:
    with transaction(db):
        row = db.execute("SELECT annotation_id FROM flags WHERE id = ?", [flag_id]).fetchone()
        if row is None:
            raise NotFoundError(f"flag {flag_id} does not exist")
        db.execute(
            "UPDATE flags SET removed_at = ?, removed_by = ? WHERE id = ? AND removed_at IS NULL",
            [utc_now(), reviewer, flag_id],
        )
        _refresh_flag_count(db, row[0])
    return _get_flag(db, flag_id)


def list_flags(db: sqlite_utils.Database, annotation_id: str, include_removed: bool = False) -> list[FlagRecord]:
    sql = "SELECT * FROM flags WHERE annotation_id = ?"
    if not include_removed:
        sql += " AND removed_at IS NULL"
    cursor = db.execute(sql + " ORDER BY id", [annotation_id])
    names = [d[0] for d in cursor.description]
    return [FlagRecord.from_row(dict(zip(names, r))) for r in cursor.fetchall()]


def _get_flag(db, flag_id: int) -> FlagRecord:
    cursor = db.execute("SELECT * FROM flags WHERE id = ?", [flag_id])
    names = [d[0] for d in cursor.description]
    return FlagRecord.from_row(dict(zip(names, cursor.fetchone())))


def _refresh_flag_count(db, annotation_id: str) -> None:
    db.execute(
        "UPDATE annotations SET flag_count = (SELECT COUNT(*) FROM flags WHERE annotation_id = ?"
        " AND removed_at IS NULL), updated_at = ? WHERE id = ?",
        [annotation_id, utc_now(), annotation_id],
    )


def _require_annotation(db, annotation_id: str) -> None:
    if db.execute("SELECT 1 FROM annotations WHERE id = ?", [annotation_id]).fetchone() is None:
        raise NotFoundError(f"annotation {annotation_id!r} does not exist")


def set_review_status(
    db: sqlite_utils.Database, annotation_id: str, status: str, reviewer: str
) -> None:
    """Approve, reject, or reset ('unreviewed') an annotated pair."""
    if status not in ("approved", "rejected", "unreviewed"):
        raise StoreError(f"review status must be approved, rejected or unreviewed, not {status!r}")
    if not reviewer:
        raise StoreError("a review needs the reviewer's name")
    now = utc_now()
    with transaction(db):
        _require_annotation(db, annotation_id)
        db.execute(
            "UPDATE annotations SET review_status = ?, reviewer = ?, reviewed_at = ?, updated_at = ?"
            " WHERE id = ?",
            [status, reviewer, now, now, annotation_id],
        )
        db.execute(
            "INSERT INTO review_events (annotation_id, action, value, reviewer, created_at)"
            " VALUES (?, 'status', ?, ?, ?)",
            [annotation_id, status, reviewer, now],
        )


def set_note(db: sqlite_utils.Database, annotation_id: str, note: str, reviewer: str) -> None:
    now = utc_now()
    with transaction(db):
        _require_annotation(db, annotation_id)
        db.execute("UPDATE annotations SET note = ?, updated_at = ? WHERE id = ?", [note, now, annotation_id])
        db.execute(
            "INSERT INTO review_events (annotation_id, action, value, reviewer, created_at)"
            " VALUES (?, 'note', ?, ?, ?)",
            [annotation_id, note, reviewer, now],
        )


def review_history(db: sqlite_utils.Database, annotation_id: str) -> list[ReviewEvent]:
    cursor = db.execute(
        "SELECT * FROM review_events WHERE annotation_id = ? ORDER BY id", [annotation_id]
    )
    names = [d[0] for d in cursor.description]
    return [ReviewEvent.from_row(dict(zip(names, r))) for r in cursor.fetchall()]
