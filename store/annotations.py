"""Writing what the pipeline produces: runs, VLM calls, descriptor lists, captions.

The pipeline calls these; it never writes SQL of its own.
"""

from __future__ import annotations

import json
from typing import Iterable, Optional

import sqlite_utils

from .db import transaction, utc_now
from .errors import NotFoundError
from .models import (PIPELINE_FLAG_REASONS, PIPELINE_REVIEWER, AnnotationRecord, CallRecord, DescribedObject,
                     DescriptionRecord, RunRecord)


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
    crash afterwards never pays for it again.

    A batch line's answer is stored once: one already stored as another run's call
    (collect_batch stores an answer no session was waiting for as a call of the batch's
    run) becomes the call of the run that asked for it, not a second paid call. (A
    line a session was waiting for is stored as its call when the batch is collected,
    and the runner does not record it again.)"""
    data = call.model_dump(exclude={"id"})
    data["created_at"] = data["created_at"] or utc_now()
    columns = ", ".join(data)
    marks = ", ".join("?" for _ in data)
    with transaction(db):
        if call.status == "ok" and call.batch_id and call.custom_id:
            row = db.execute("SELECT id FROM calls WHERE batch_id = ? AND custom_id = ? AND status = 'ok'",
                             [call.batch_id, call.custom_id]).fetchone()
            if row is not None:
                db.execute("UPDATE calls SET run_id = ?, stage = ?, cost_usd = ?, latency_ms = ? WHERE id = ?",
                           [call.run_id, call.stage, call.cost_usd, call.latency_ms, row[0]])
                return row[0]
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
    caption_flags: Optional[dict[int, str]] = None,
    descriptor_flags: Optional[dict[str, str]] = None,
) -> None:
    """Store an annotation's captions and mark it done, in one transaction.

    compounds: (text, indexes of the individual captions it joins, CLIP token count).
    caption_flags ({caption index: reason}) and descriptor_flags ({'<description id>/
    <object>/<descriptor>': reason}): what the pipeline found wrong and could not get
    repaired, flagged by PIPELINE_REVIEWER with one of PIPELINE_FLAG_REASONS.
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
        flags = [("caption", individual_ids[i], reason) for i, reason in (caption_flags or {}).items()]
        flags += [("descriptor", target, reason) for target, reason in (descriptor_flags or {}).items()]
        for _, _, reason in flags:
            if reason not in PIPELINE_FLAG_REASONS:
                raise ValueError(f"pipeline flag reason {reason!r} is not one of {', '.join(PIPELINE_FLAG_REASONS)}")
        db.conn.executemany(
            "INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(annotation_id, kind, target, reason, PIPELINE_REVIEWER, now) for kind, target, reason in flags],
        )
        db.execute(
            "UPDATE annotations SET status = 'done', error = NULL, stage1_id = ?, stage2_id = ?,"
            " flag_count = (SELECT COUNT(*) FROM flags WHERE annotation_id = ? AND removed_at IS NULL),"
            " updated_at = ? WHERE id = ?",
            [stage1_id, stage2_id, annotation_id, now, annotation_id],
        )


def fail_annotation(db: sqlite_utils.Database, annotation_id: str, reason: str) -> None:
    with transaction(db):
        db.execute(
            "UPDATE annotations SET status = 'failed', error = ?, updated_at = ? WHERE id = ?"
            " AND status != 'done'",
            [reason, utc_now(), annotation_id],
        )


def failed_pairs(db: sqlite_utils.Database, run_id: int, limit: int = 10) -> list[tuple[str, str]]:
    """(pair's external id, reason) of a run's failed pairs, in import order, at most `limit`."""
    return [tuple(row) for row in db.execute(
        "SELECT p.external_id, a.error FROM annotations a JOIN pairs p ON p.id = a.pair_id"
        " WHERE a.run_id = ? AND a.status = 'failed' ORDER BY p.rowid LIMIT ?", [run_id, limit])]


def require_split(db: sqlite_utils.Database, split: Optional[str]) -> None:
    """ValueError naming the splits the store has when no pair is of `split` (a typo's
    'tran' selects nothing, which would read as a store with nothing to do)."""
    if not split or db.execute("SELECT 1 FROM pairs WHERE split = ? LIMIT 1", [split]).fetchone():
        return
    found = [row[0] for row in db.execute(
        "SELECT DISTINCT split FROM pairs WHERE split IS NOT NULL ORDER BY split")]
    raise ValueError(f"no pairs of split {split!r} (splits present: {', '.join(found) or 'none'})")


# --- Reads and resets the pipeline's runner needs (appended by the pipeline work) ---


def select_pair_ids(db: sqlite_utils.Database, *, split: Optional[str] = None,
                    limit: Optional[int] = None, source: Optional[str] = None,
                    with_target: bool = False) -> list[str]:
    """Pair ids in import order (stable, so `--limit N` picks the same N again).
    with_target: only pairs that have a target image (CIRR's test1 withholds it)."""
    where, params = [], []
    if with_target:
        where.append("target_id IS NOT NULL")
    if split:
        where.append("split = ?")
        params.append(split)
    if source:
        where.append("source = ?")
        params.append(source)
    sql = "SELECT id FROM pairs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY created_at, rowid"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [row[0] for row in db.execute(sql, params).fetchall()]


def pending_work(db: sqlite_utils.Database, run_id: int) -> list[dict]:
    """The run's pending annotations with what annotating them needs: pair, image ids,
    image paths (the URL for an image recorded only by URL) and names, in queue order."""
    cursor = db.execute(
        "SELECT a.id AS annotation_id, a.pair_id, p.reference_id, p.target_id,"
        " COALESCE(ri.path, ri.url) AS reference_path, COALESCE(ti.path, ti.url) AS target_path,"
        " ri.name AS reference_name, ti.name AS target_name"
        " FROM annotations a JOIN pairs p ON p.id = a.pair_id"
        " JOIN images ri ON ri.id = p.reference_id LEFT JOIN images ti ON ti.id = p.target_id"
        " WHERE a.run_id = ? AND a.status = 'pending' ORDER BY a.seq",
        [run_id],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def reset_failed_annotations(db: sqlite_utils.Database, run_id: int) -> int:
    """Put a run's failed annotations back to pending (to retry them); returns how many."""
    with transaction(db):
        return db.execute(
            "UPDATE annotations SET status = 'pending', error = NULL, updated_at = ?"
            " WHERE run_id = ? AND status = 'failed'", [utc_now(), run_id],
        ).rowcount


def ok_call_hashes(db: sqlite_utils.Database) -> set[str]:
    """Request hashes with a stored successful answer (any run): calls not to pay again."""
    return {row[0] for row in db.execute("SELECT DISTINCT request_hash FROM calls WHERE status = 'ok'")}


def run_counts(db: sqlite_utils.Database, run_id: int) -> dict:
    """Progress of one run: pairs done/failed/pending, calls, tokens, cost, failure reasons.

    A failure reason is counted by its category, the text before the first ': '.
    """
    counts = dict(db.execute(
        "SELECT status, COUNT(*) FROM annotations WHERE run_id = ? GROUP BY status", [run_id]
    ).fetchall())
    calls, errors, tokens_in, tokens_out, cost = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(status = 'error'), 0), COALESCE(SUM(tokens_in), 0),"
        " COALESCE(SUM(tokens_out), 0), COALESCE(SUM(cost_usd), 0) FROM calls WHERE run_id = ?",
        [run_id],
    ).fetchone()
    # Answers the server sent without token usage (some compatible servers and proxies):
    # their cost is not in `cost`.
    (without_usage,) = db.execute(
        "SELECT COUNT(*) FROM calls WHERE run_id = ? AND status = 'ok'"
        " AND COALESCE(tokens_in, 0) = 0 AND COALESCE(tokens_out, 0) = 0", [run_id]).fetchone()
    failures: dict[str, int] = {}
    for (error,) in db.execute(
        "SELECT error FROM annotations WHERE run_id = ? AND status = 'failed'", [run_id]
    ).fetchall():
        reason = (error or "unknown").split(": ", 1)[0]
        failures[reason] = failures.get(reason, 0) + 1
    return {
        "pairs_done": counts.get("done", 0), "pairs_failed": counts.get("failed", 0),
        "pairs_pending": counts.get("pending", 0), "calls": calls, "call_errors": errors,
        "tokens_in": tokens_in, "tokens_out": tokens_out, "cost_usd": round(cost, 6),
        "calls_without_usage": without_usage, "failures": failures,
    }


BATCH_LINE_FIELDS = ("request_hash", "stage", "subject_id", "prompt_version", "request")


def save_batch(db: sqlite_utils.Database, batch_id: str, run_id: Optional[int], stage: str, *,
               input_file_id: str, status: str, custom_ids: list[str],
               lines: Optional[dict[str, dict]] = None) -> None:
    """Remember a submitted provider batch, so a restarted run picks it up.

    lines: {custom id: {request_hash, stage, subject_id, prompt_version, request}}, what
    each line asks (as its call would be stored), so that every answer the batch holds
    can be stored for every run that asks the same (collect_batch), and a dry run
    counts what they answer as not to pay (open_batch_lines)."""
    now = utc_now()
    with transaction(db):
        db.execute(
            "INSERT OR REPLACE INTO batches (id, run_id, stage, input_file_id, status, custom_ids,"
            " collected, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
            [batch_id, run_id, stage, input_file_id, status, json.dumps(custom_ids), now, now],
        )
        db.conn.executemany(
            f"INSERT OR REPLACE INTO batch_lines (batch_id, custom_id, {', '.join(BATCH_LINE_FIELDS)})"
            f" VALUES (?, ?, {', '.join('?' * len(BATCH_LINE_FIELDS))})",
            [(batch_id, custom_id, *(line.get(k) for k in BATCH_LINE_FIELDS))
             for custom_id, line in (lines or {}).items()])


def collect_batch(db: sqlite_utils.Database, batch_id: str, answers: dict[str, dict],
                  **fields) -> dict[str, int]:
    """Mark a finished batch collected (update_batch's fields) and, in the same
    transaction, store each answer in `answers` ({custom id: {response, error, model,
    tokens_in, tokens_out, cost_usd, latency_ms, run_id}}) that no call holds yet as an
    ok call, from its stored line (save_batch's lines). This is the answer's one write:
    run_id is the run of the session that asked for it; None (an answer no session is
    waiting for: a pair outside the collecting run's scope) stores it as a call of the
    batch's run, which would otherwise lose it, and the next run asking it would pay
    again. Returns {custom id: call id} of the calls stored."""
    now = utc_now()
    stored: dict[str, int] = {}
    with transaction(db):
        row = db.execute("SELECT run_id FROM batches WHERE id = ?", [batch_id]).fetchone()
        run_id = row[0] if row else None
        recorded = {r[0] for r in db.execute(
            "SELECT custom_id FROM calls WHERE batch_id = ? AND status = 'ok'", [batch_id])}
        lines = db.execute(f"SELECT custom_id, {', '.join(BATCH_LINE_FIELDS)} FROM batch_lines WHERE batch_id = ?",
                           [batch_id]).fetchall()
        # Every answered line becomes a call below; an unanswered one goes out again by its
        # asker, who stores its own line with the new batch. The rows go first: the calls'
        # copies of their requests then fill the pages they free, so the file holds each
        # request once (deleted after, they stayed as free pages: the file grew by every
        # collected request twice).
        db.execute("DELETE FROM batch_lines WHERE batch_id = ?", [batch_id])
        for custom_id, *line in lines:
            answer = answers.get(custom_id)
            if answer is None or custom_id in recorded:
                continue
            call = CallRecord(**{**dict(zip(BATCH_LINE_FIELDS, line)), **answer,
                                 "run_id": answer.get("run_id") or run_id}, status="ok",
                              batch_id=batch_id, custom_id=custom_id, created_at=now)
            data = call.model_dump(exclude={"id"})
            stored[custom_id] = db.execute(
                f"INSERT INTO calls ({', '.join(data)}) VALUES ({', '.join('?' * len(data))})",
                list(data.values())).lastrowid
        update_batch(db, batch_id, collected=1, **fields)
    return stored


def open_batch_lines(db: sqlite_utils.Database, run_ids: Iterable[int]) -> dict[str, str]:
    """{request hash: batch id} of the lines waiting in these runs' batches that are
    not collected yet (a batch stored before m006 has no line rows: unlisted_batch_lines)."""
    run_ids = list(run_ids)
    if not run_ids:
        return {}
    return dict(db.execute(
        "SELECT l.request_hash, l.batch_id FROM batch_lines l JOIN batches b ON b.id = l.batch_id"
        f" WHERE b.collected = 0 AND b.run_id IN ({', '.join('?' * len(run_ids))})", run_ids).fetchall())


def unlisted_batch_lines(db: sqlite_utils.Database, run_ids: Iterable[int]) -> dict[str, str]:
    """{custom id: batch id} of the lines of these runs' open batches that were stored
    with no line rows (before m006): only their custom ids say what they ask."""
    run_ids = list(run_ids)
    if not run_ids:
        return {}
    found: dict[str, str] = {}
    for batch_id, custom_ids in db.execute(
            "SELECT b.id, b.custom_ids FROM batches b WHERE b.collected = 0"
            f" AND b.run_id IN ({', '.join('?' * len(run_ids))})"
            " AND NOT EXISTS (SELECT 1 FROM batch_lines l WHERE l.batch_id = b.id)"
            " ORDER BY b.created_at", run_ids).fetchall():
        for custom_id in json.loads(custom_ids or "[]"):
            found.setdefault(custom_id, batch_id)
    return found


def update_batch(db: sqlite_utils.Database, batch_id: str, **fields) -> None:
    allowed = {"status", "output_file_id", "error_file_id", "collected", "cancelled_by"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"cannot update batch fields {sorted(unknown)}")
    assignments = ", ".join(f"{k} = ?" for k in fields)
    with transaction(db):
        db.execute(f"UPDATE batches SET {assignments}, updated_at = ? WHERE id = ?",
                   [*fields.values(), utc_now(), batch_id])


def open_batch_counts(db: sqlite_utils.Database) -> dict[int, int]:
    """{run id: how many of its batches are submitted and not collected yet}."""
    return dict(db.execute(
        "SELECT run_id, COUNT(*) FROM batches WHERE collected = 0 GROUP BY run_id").fetchall())


def list_batches(db: sqlite_utils.Database, run_id: Optional[int] = None) -> list[dict]:
    sql = "SELECT * FROM batches" + (" WHERE run_id = ?" if run_id is not None else "")
    cursor = db.execute(sql + " ORDER BY created_at", [run_id] if run_id is not None else [])
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    for row in rows:
        row["custom_ids"] = json.loads(row["custom_ids"] or "[]")
    return rows


def batch_cancelled_by(db: sqlite_utils.Database, batch_id: str) -> Optional[str]:
    """'good4cir' when good4cir asked the provider to cancel the batch, 'outside' when
    it was found cancelled by someone else, else None."""
    row = db.execute("SELECT cancelled_by FROM batches WHERE id = ?", [batch_id]).fetchone()
    return row[0] if row else None


def adopt_batch(db: sqlite_utils.Database, placeholder_id: str, batch_id: str, status: str) -> None:
    """Give a batch row saved before its batch existed (id 'pending:<input file id>')
    the provider's batch id."""
    with transaction(db):
        db.execute("UPDATE batches SET id = ?, status = ?, updated_at = ? WHERE id = ?",
                   [batch_id, status, utc_now(), placeholder_id])
        db.execute("UPDATE batch_lines SET batch_id = ? WHERE batch_id = ?", [batch_id, placeholder_id])


def delete_batch(db: sqlite_utils.Database, batch_id: str) -> None:
    with transaction(db):
        db.execute("DELETE FROM batch_lines WHERE batch_id = ?", [batch_id])
        db.execute("DELETE FROM batches WHERE id = ?", [batch_id])
