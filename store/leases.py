"""Run leases: at most one live session works on a run at a time.

Two sessions on one run (two terminals, or the CLI beside the app's Pipeline tab) would
each pay for every answer. A session takes its run's lease before handing out work and
renews it with a heartbeat while it runs. A lease is live while its heartbeat is younger
than STALE_AFTER_S and, when it was taken on this host, its process is still alive: a
session killed with kill -9 can be resumed at once, a hung one (or one whose pid was
reused) after STALE_AFTER_S. Rows hold a random owner id, a pid and a host name only.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

import sqlite_utils

from .db import transaction
from .errors import LeaseHeldError
from .models import LeaseRecord

STALE_AFTER_S = 30.0      # a heartbeat older than this no longer holds the run
HEARTBEAT_EVERY_S = 5.0   # how often a session renews: several beats fit in STALE_AFTER_S


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks, sends nothing)."""
    if pid <= 0:  # 0 and negatives address process groups, not one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def lease_is_live(lease: LeaseRecord, *, now: Optional[float] = None,
                  stale_after: float = STALE_AFTER_S) -> bool:
    now = time.time() if now is None else now
    if now - lease.heartbeat_at >= stale_after:
        return False
    # A pid means something only on its own host; elsewhere the heartbeat alone decides.
    return lease.host != this_host() or pid_alive(lease.pid)


def describe_lease(lease: LeaseRecord, *, now: Optional[float] = None) -> str:
    """'pid 123 on host-a, last heartbeat 4 s ago': for messages."""
    now = time.time() if now is None else now
    return f"pid {lease.pid} on {lease.host}, last heartbeat {max(0.0, now - lease.heartbeat_at):.0f} s ago"


def get_lease(db: sqlite_utils.Database, run_id: int) -> Optional[LeaseRecord]:
    cursor = db.execute("SELECT * FROM run_leases WHERE run_id = ?", [run_id])
    row = cursor.fetchone()
    if row is None:
        return None
    return LeaseRecord.from_row(dict(zip([d[0] for d in cursor.description], row)))


def acquire_lease(db: sqlite_utils.Database, run_id: int, owner: str, *,
                  pid: Optional[int] = None, host: Optional[str] = None,
                  stale_after: float = STALE_AFTER_S) -> Optional[LeaseRecord]:
    """Take run_id's lease for `owner` (this process and host unless given).

    Atomic (BEGIN IMMEDIATE): of two sessions racing for one run, one wins. Raises
    LeaseHeldError when another owner's lease is live. Returns the dead lease it
    replaced, if any (for a log line), else None.
    """
    now = time.time()
    with transaction(db):
        held = get_lease(db, run_id)
        if held is not None and held.owner != owner and lease_is_live(held, now=now, stale_after=stale_after):
            raise LeaseHeldError(
                f"run {run_id} is being worked on by another session ({describe_lease(held, now=now)})", held)
        db.execute(
            "INSERT OR REPLACE INTO run_leases (run_id, owner, pid, host, acquired_at, heartbeat_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [run_id, owner, os.getpid() if pid is None else pid, this_host() if host is None else host,
             now, now])
    return held if held is not None and held.owner != owner else None


def heartbeat_lease(db: sqlite_utils.Database, run_id: int, owner: str) -> bool:
    """Renew owner's lease; False when owner no longer holds it (another session took it over)."""
    with transaction(db):
        return db.execute("UPDATE run_leases SET heartbeat_at = ? WHERE run_id = ? AND owner = ?",
                          [time.time(), run_id, owner]).rowcount == 1


def release_lease(db: sqlite_utils.Database, run_id: int, owner: str) -> bool:
    """Give the lease back; only its owner's row is removed. True if there was one."""
    with transaction(db):
        return db.execute("DELETE FROM run_leases WHERE run_id = ? AND owner = ?",
                          [run_id, owner]).rowcount == 1


def live_leases(db: sqlite_utils.Database, *, stale_after: float = STALE_AFTER_S) -> dict[int, LeaseRecord]:
    """Every live lease, by run id."""
    cursor = db.execute("SELECT * FROM run_leases")
    names = [d[0] for d in cursor.description]
    now = time.time()
    leases = (LeaseRecord.from_row(dict(zip(names, row))) for row in cursor.fetchall())
    return {lease.run_id: lease for lease in leases if lease_is_live(lease, now=now, stale_after=stale_after)}
