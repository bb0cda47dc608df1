"""The review queue: which annotated pair comes next, and how many are where.

Indexed on (status, review_status, seq) so that "next unreviewed" stays a single index
seek at 100,000 pairs.
"""

from __future__ import annotations

from typing import Literal, Optional

import sqlite_utils

from .models import AnnotationRecord

Queue = Literal["unreviewed", "flagged", "approved", "rejected", "all"]
QUEUES: tuple[str, ...] = ("unreviewed", "flagged", "approved", "rejected", "all")


def _where(queue: str, run_id: Optional[int], split: Optional[str], model: Optional[str]):
    if queue not in QUEUES:
        raise ValueError(f"queue must be one of {', '.join(QUEUES)}, not {queue!r}")
    clauses = ["a.status = 'done'"]
    params: list = []
    if queue in ("unreviewed", "approved", "rejected"):
        clauses.append("a.review_status = ?")
        params.append(queue)
    elif queue == "flagged":
        clauses.append("a.flag_count > 0")
    if run_id is not None:
        clauses.append("a.run_id = ?")
        params.append(run_id)
    if split:
        # Correlated EXISTS keeps the scan on the queue index in seq order; an IN list
        # made the planner read the whole split and sort it (20+ ms at 100k pairs).
        clauses.append("EXISTS (SELECT 1 FROM pairs p WHERE p.id = a.pair_id AND p.split = ?)")
        params.append(split)
    if model:
        clauses.append("a.run_id IN (SELECT id FROM runs WHERE model = ?)")
        params.append(model)
    return " AND ".join(clauses), params


def step(
    db: sqlite_utils.Database,
    *,
    queue: str = "unreviewed",
    after_seq: Optional[int] = None,
    direction: Literal["next", "previous"] = "next",
    run_id: Optional[int] = None,
    split: Optional[str] = None,
    model: Optional[str] = None,
) -> Optional[AnnotationRecord]:
    """The next (or previous) annotation in the queue after `after_seq`; None at the end."""
    where, params = _where(queue, run_id, split, model)
    if after_seq is not None:
        where += " AND a.seq > ?" if direction == "next" else " AND a.seq < ?"
        params.append(after_seq)
    order = "ASC" if direction == "next" else "DESC"
    cursor = db.execute(f"SELECT a.* FROM annotations a WHERE {where} ORDER BY a.seq {order} LIMIT 1", params)
    row = cursor.fetchone()
    if row is None:
        return None
    return AnnotationRecord.from_row(dict(zip([d[0] for d in cursor.description], row)))


def position(
    db: sqlite_utils.Database, seq: int, *, queue: str = "all",
    run_id: Optional[int] = None, split: Optional[str] = None, model: Optional[str] = None,
) -> int:
    """1-based position of `seq` within the queue (how many queue entries have seq <= it)."""
    where, params = _where(queue, run_id, split, model)
    return db.execute(
        f"SELECT COUNT(*) FROM annotations a WHERE {where} AND a.seq <= ?", [*params, seq]
    ).fetchone()[0]


def counts(
    db: sqlite_utils.Database, *, run_id: Optional[int] = None,
    split: Optional[str] = None, model: Optional[str] = None,
) -> dict[str, int]:
    """Annotated pairs per queue plus 'pending' and 'failed' (not yet reviewable)."""
    where, params = _where("all", run_id, split, model)
    where = where.replace("a.status = 'done'", "1")
    row = db.execute(
        "SELECT"
        " SUM(a.status = 'done'),"
        " SUM(a.status = 'done' AND a.review_status = 'unreviewed'),"
        " SUM(a.status = 'done' AND a.flag_count > 0),"
        " SUM(a.status = 'done' AND a.review_status = 'approved'),"
        " SUM(a.status = 'done' AND a.review_status = 'rejected'),"
        " SUM(a.status = 'pending'), SUM(a.status = 'failed')"
        f" FROM annotations a WHERE {where}",
        params,
    ).fetchone()
    keys = ("all", "unreviewed", "flagged", "approved", "rejected", "pending", "failed")
    return {k: int(v or 0) for k, v in zip(keys, row)}
