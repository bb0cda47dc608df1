"""The run's one connection to the store, on its own thread (see StoreWorker)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Optional

from store.db import open_db

log = logging.getLogger("good4cir.pipeline")


class CallRef:
    """The id of a stored call, filled in on the store's thread when the row is written."""

    __slots__ = ("id",)

    def __init__(self, call_id: Optional[int] = None):
        self.id = call_id


class StoreWriteError(RuntimeError):
    """A write to the store failed; the run stops rather than lose track of what it paid for."""


class StoreWorker:
    """The run's one connection to the store, on its own thread.

    Operations run in submission order. Writes are queued without waiting
    (`later`): order alone guarantees that a call's row is committed before anything
    made from its answer, and the event loop does not wait for sqlite. Reads and writes
    whose result is needed are awaited (`call`). The loop is woken once per drained
    batch of operations, not once per operation. After a failed write nothing more is
    written and every later operation fails with StoreWriteError.
    """

    def __init__(self, db_path: str, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._idle = False
        self._closing = False
        self.error: Optional[BaseException] = None
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(db_path,), name="g4c-store", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self.error is not None:
            raise self.error

    def _main(self, db_path: str) -> None:
        try:
            self.db = open_db(db_path)
        except BaseException as exc:
            self.error = exc
            self._opened.set()
            return
        self._opened.set()
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._idle = True
                    self._cv.wait()
                self._idle = False
                if not self._queue and self._closing:
                    break
            done = []
            while self._queue:
                fn, args, future = self._queue.popleft()
                if self.error is not None:
                    outcome = (False, StoreWriteError(f"the store stopped after an error: {self.error}"))
                else:
                    try:
                        outcome = (True, fn(self.db, *args))
                    except BaseException as exc:
                        outcome = (False, exc)
                        if future is None:  # nobody waits for this write: stop writing
                            self.error = exc
                            log.error("store write %s failed: %s", getattr(fn, "__name__", fn), exc)
                if future is not None:
                    done.append((future, outcome))
            if done:
                try:
                    self._loop.call_soon_threadsafe(self._resolve, done)
                except RuntimeError:  # the loop is gone; the blocking callers use events
                    pass
        self.db.conn.close()

    @staticmethod
    def _resolve(done) -> None:
        for future, (ok, value) in done:
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _put(self, item) -> None:
        # Under the lock: the store thread checks the queue and goes idle under it, so an
        # item appended between its check and its wait cannot go unnoticed.
        with self._cv:
            self._queue.append(item)
            if self._idle:
                self._cv.notify()

    def later(self, fn, *args) -> None:
        if self.error is not None:
            raise StoreWriteError(f"the store stopped after an error: {self.error}")
        self._put((fn, args, None))

    async def call(self, fn, *args):
        future = self._loop.create_future()
        self._put((fn, args, future))
        return await future

    def call_blocking(self, fn, *args):
        """Run fn on the store thread and wait, from outside the event loop's flow."""
        box: dict = {}
        event = threading.Event()

        def run(db, *a):
            try:
                box["value"] = fn(db, *a)
            except BaseException as exc:
                box["error"] = exc
            finally:
                event.set()

        self._put((run, args, None))
        event.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=60)
