"""One SQLite connection per server thread.

Gradio runs handlers on a thread pool. Sharing one connection would put one reviewer's
reads inside another's write transaction; a connection per thread keeps them apart,
and WAL lets the readers go on while the pipeline or another reviewer writes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlite_utils

from store.db import open_db


class Connections:
    def __init__(self, db_path: str | Path):
        self.db_path = str(db_path)
        self._local = threading.local()
        open_db(self.db_path)  # migrate once up front, in the caller's thread

    def get(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = open_db(self.db_path)
            self._local.db = db
        return db
