"""Opening a store: one SQLite file, WAL mode, a busy timeout, migrated on open."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from .errors import StoreError
from .migrations import migrate

# Long enough that a reviewer's write waits out a pipeline batch commit instead of failing.
BUSY_TIMEOUT_MS = 30_000


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def open_db(db_path: str | Path) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the store at db_path.

    The connection may be shared across threads (the review app and the background
    pipeline do); sqlite serialises access, WAL lets readers go on during writes.
    """
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(
            str(db_path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
            isolation_level=None,
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
    except sqlite3.DatabaseError as exc:
        # A --db naming some other file (or a folder) is the user's mistake: say so
        # instead of a traceback. A busy store is not that, and keeps its own error.
        if "locked" in str(exc) or "busy" in str(exc):
            raise
        raise StoreError(f"{db_path}: not a good4cir store (an SQLite file): {exc}") from None
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    db = sqlite_utils.Database(conn)
    db.lock = threading.RLock()  # one writer at a time per connection object
    migrate(db)
    return db


def created_folders(db_path: str | Path) -> list[Path]:
    """The folders open_db(db_path) would create, deepest first (for remove_store)."""
    missing = []
    folder = Path(db_path).absolute().parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_store(db: sqlite_utils.Database, db_path: str | Path, folders: list[Path] = ()) -> None:
    """Close db and delete the store at db_path with its WAL files, then those of `folders`
    (from created_folders) left empty. For a store its creator found nothing to put in."""
    db.conn.close()
    db_path = Path(db_path)
    for suffix in ("", "-wal", "-shm", "-journal"):
        db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there meanwhile): keep it
            break


class transaction:
    """`with transaction(db):` — BEGIN IMMEDIATE ... COMMIT, rolled back on error.

    IMMEDIATE takes the write lock up front so two writers queue on the busy timeout
    instead of failing with "database is locked" on lock upgrade. Nested use (a store
    function called inside the caller's transaction) becomes a SAVEPOINT, so the inner
    block can fail alone and the outer one still commits or rolls back as a whole.
    """

    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        self.savepoint: str | None = None

    def __enter__(self):
        lock = getattr(self.db, "lock", None)
        if lock is not None:
            lock.acquire()
        try:
            if self.db.conn.in_transaction:
                self.savepoint = f"g4c_{id(self):x}"
                self.db.conn.execute(f"SAVEPOINT {self.savepoint}")
            else:
                self.db.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb):
        conn = self.db.conn
        try:
            if self.savepoint is not None:
                if exc_type is not None:
                    conn.execute(f"ROLLBACK TO {self.savepoint}")
                conn.execute(f"RELEASE {self.savepoint}")
            # sqlite-utils' own helpers commit on their own; only finish what is open.
            elif conn.in_transaction:
                conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            lock = getattr(self.db, "lock", None)
            if lock is not None:
                lock.release()
        return False
