"""Writing what the pipeline produces: runs, VLM calls, descriptor lists, captions.

The pipeline calls these; it never writes SQL of its own.
"""

from __future__ import annotations

import json
from typing import Iterable, Optional

import sqlite_utils

from .db import transaction, utc_now
from .errors import NotFoundError
from .models import AnnotationRecord, CallRecord, DescribedObject, DescriptionRecord, RunRecord


def annotation_id_for(run_id: int, pair_id: str) -> str:
    return f"{run_id}:{pair_id}"


def create_run(
    db: sqlite_utils.Database,
    backend: str,
    model: str,
    *,
    base_url: Optional[str] = None,
    method: str = "staged",
    settings: Optional[dict] = None,
    prompt_versions: Optional[dict] = None,
    name: Optional[str] = None,
) -> RunRecord:
    now = utc_now()
    with transaction(db):
        run_id = db.execute(
            "INSERT INTO runs (name, backend, model, base_url, method, settings, prompt_versions,"
            " status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'created', ?)",
            [name, backend, model, base_url, method, json.dumps(settings or {}, sort_keys=True),
             json.dumps(prompt_versions or {}, sort_keys=True), now],
        ).lastrowid
    return get_run(db, run_id)


def get_run(db: sqlite_utils.Database, run_id: int) -> RunRecord:
    cursor = db.execute("SELECT * FROM runs WHERE id = ?", [run_id])
    row = cursor.fetchone()
    if row is None:
        raise NotFoundError(f"run {run_id} does not exist")
    return RunRecord.from_row(dict(zip([d[0] for d in cursor.description], row)))


def list_runs(db: sqlite_utils.Database) -> list[RunRecord]:
    cursor = db.execute("SELECT * FROM runs ORDER BY id")
    names = [d[0] for d in cursor.description]
    return [RunRecord.from_row(dict(zip(names, r))) for r in cursor.fetchall()]


def update_run(db: sqlite_utils.Database, run_id: int, **fields) -> None:
    allowed = {"status", "pairs_total", "started_at", "finished_at", "settings", "name"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"cannot update run fields {sorted(unknown)}")
    if "settings" in fields and not isinstance(fields["settings"], str):
        fields["settings"] = json.dumps(fields["settings"], sort_keys=True)
    assignments = ", ".join(f"{k} = ?" for k in fields)
    with transaction(db):
        db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*fields.values(), run_id])


def ensure_annotations(db: sqlite_utils.Database, run_id: int, pair_ids: Iterable[str]) -> int:
    """Create pending annotation rows for the run's pairs (existing rows are kept).

    Returns how many were new. `seq` gives the review queue its order.
    """
    now = utc_now()
    pair_ids = list(pair_ids)
    with transaction(db):
        start = db.execute("SELECT COALESCE(MAX(seq), 0) FROM annotations").fetchone()[0]
        before = db.execute("SELECT COUNT(*) FROM annotations WHERE run_id = ?", [run_id]).fetchone()[0]
        db.conn.executemany(
            "INSERT OR IGNORE INTO annotations (id, run_id, pair_id, status, seq, updated_at)"
            " VALUES (?, ?, ?, 'pending', ?, ?)",
            [(annotation_id_for(run_id, p), run_id, p, start + i + 1, now) for i, p in enumerate(pair_ids)],
        )
        after = db.execute("SELECT COUNT(*) FROM annotations WHERE run_id = ?", [run_id]).fetchone()[0]
    return after - before


def get_annotation(db: sqlite_utils.Database, annotation_id: str) -> AnnotationRecord:
    cursor = db.execute("SELECT * FROM annotations WHERE id = ?", [annotation_id])
    row = cursor.fetchone()
    if row is None:
        raise NotFoundError(f"annotation {annotation_id!r} does not exist")
    return AnnotationRecord.from_row(dict(zip([d[0] for d in cursor.description], row)))


def record_call(db: sqlite_utils.Database, call: CallRecord) -> int:
    """Store one VLM request/response. Call this before acting on the answer, so a
    crash afterwards never pays for it again."""
    data = call.model_dump(exclude={"id"})
    data["created_at"] = data["created_at"] or utc_now()
    columns = ", ".join(data)
    marks = ", ".join("?" for _ in data)
    with transaction(db):
        return db.execute(f"INSERT INTO calls ({columns}) VALUES ({marks})", list(data.values())).lastrowid


def find_ok_call(db: sqlite_utils.Database, request_hash: str) -> Optional[CallRecord]:
    """The stored successful answer to an identical request, if any (any run)."""
    cursor = db.execute(
        "SELECT * FROM calls WHERE request_hash = ? AND status = 'ok' ORDER BY id DESC LIMIT 1",
        [request_hash],
    )
    row = cursor.fetchone()
    if row is None:
        return None
    return CallRecord.from_row(dict(zip([d[0] for d in cursor.description], row)))


def save_description(
    db: sqlite_utils.Database,
    description_id: str,
    stage: int,
    image_id: str,
    objects: list[DescribedObject] | list[dict],
    *,
    pair_id: Optional[str] = None,
    prompt_version: Optional[str] = None,
    model: Optional[str] = None,
    call_id: Optional[int] = None,
) -> DescriptionRecord:
    objects = [o if isinstance(o, DescribedObject) else DescribedObject(**o) for o in objects]
    record = DescriptionRecord(
        id=description_id, stage=stage, image_id=image_id, pair_id=pair_id,
        prompt_version=prompt_version, model=model, objects=objects, call_id=call_id,
        created_at=utc_now(),
    )
    with transaction(db):
        db.execute(
            "INSERT OR REPLACE INTO descriptions (id, stage, image_id, pair_id, prompt_version, model,"
            " objects, call_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [record.id, stage, image_id, pair_id, prompt_version, model,
             json.dumps([o.model_dump() for o in objects]), call_id, record.created_at],
        )
    return record


def get_description(db: sqlite_utils.Database, description_id: str) -> Optional[DescriptionRecord]:
    cursor = db.execute("SELECT * FROM descriptions WHERE id = ?", [description_id])
    row = cursor.fetchone()
    if row is None:
        return None
    return DescriptionRecord.from_row(dict(zip([d[0] for d in cursor.description], row)))


def complete_annotation(
    db: sqlite_utils.Database,
    annotation_id: str,
    *,
    stage1_id: Optional[str],
    stage2_id: Optional[str],
    captions: list[str],
    compounds: list[tuple[str, list[int], int]] = (),
) -> None:
    """Store an annotation's captions and mark it done, in one transaction.

    compounds: (text, indexes of the individual captions it joins, CLIP token count).
    Rerunning for a done annotation changes nothing: its captions may have edits.
    """
    now = utc_now()
    with transaction(db):
        row = db.execute("SELECT status FROM annotations WHERE id = ?", [annotation_id]).fetchone()
        if row is None:
            raise NotFoundError(f"annotation {annotation_id!r} does not exist")
        if row[0] == "done":
            return
        individual_ids = [f"{annotation_id}:c{i}" for i in range(len(captions))]
        db.conn.executemany(
            "INSERT OR IGNORE INTO captions (id, annotation_id, kind, position, text, created_at)"
            " VALUES (?, ?, 'individual', ?, ?, ?)",
            [(cid, annotation_id, i, text, now) for i, (cid, text) in enumerate(zip(individual_ids, captions))],
        )
        db.conn.executemany(
            "INSERT OR IGNORE INTO captions (id, annotation_id, kind, position, text, sources,"
            " token_count, created_at) VALUES (?, ?, 'compound', ?, ?, ?, ?, ?)",
            [
                (f"{annotation_id}:k{i}", annotation_id, i, text,
                 json.dumps([individual_ids[j] for j in sources]), tokens, now)
                for i, (text, sources, tokens) in enumerate(compounds)
            ],
        )
        db.execute(
            "UPDATE annotations SET status = 'done', error = NULL, stage1_id = ?, stage2_id = ?,"
            " updated_at = ? WHERE id = ?",
            [stage1_id, stage2_id, now, annotation_id],
        )


def fail_annotation(db: sqlite_utils.Database, annotation_id: str, reason: str) -> None:
    with transaction(db):
        db.execute(
            "UPDATE annotations SET status = 'failed', error = ?, updated_at = ? WHERE id = ?"
            " AND status != 'done'",
            [reason, utc_now(), annotation_id],
        )
