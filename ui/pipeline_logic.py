"""The Pipeline tab: one background run at a time, started and stopped from the app.

The run writes to the store through its own connections (pipeline.runner); finished
pairs join the review queue as they complete, because the queue reads the same file.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from .security import is_loopback

BACKENDS = ("simulator", "openai", "openai-batch")
METHODS = ("staged", "single")
# The runner's limit is the store's first N pairs in import order (so a resumed run picks
# the same ones), not N more pending pairs: the field says so.
LIMIT_LABEL = "Limit: the store's first N pairs (done ones are skipped)"


class PipelineControlError(Exception):
    """A start or stop the app refuses, with the reason."""


@dataclass
class RunForm:
    backend: str = "simulator"
    model: str = ""
    base_url: str = ""
    method: str = "staged"
    concurrency: Optional[str | float] = None
    limit: Optional[str | float] = None
    split: str = ""
    error_rate: Optional[float] = None
    new_run: bool = False


def check_base_url(base_url: str) -> Optional[str]:
    """The base URL a run from the app may use: none (the provider's default) or a
    server on this machine. The run sends OPENAI_API_KEY to it, so a reviewer must not
    be able to point it at a server of their choosing; other URLs go through the CLI."""
    base_url = (base_url or "").strip()
    if not base_url:
        return None
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PipelineControlError(f"base URL {base_url!r} must look like http://127.0.0.1:8000/v1")
    if not is_loopback(parsed.hostname):
        raise PipelineControlError(
            f"base URL host {parsed.hostname!r} is not this machine: from the app a run may only use "
            "OpenAI's default or a local server (the API key goes to it); use `good4cir annotate "
            "--base-url ...` for other servers")
    return base_url


def options_from_form(form: RunForm):
    """RunOptions from the tab's fields, checked."""
    from pipeline.runner import RunOptions

    if form.backend not in BACKENDS:
        raise PipelineControlError(f"backend must be one of {', '.join(BACKENDS)}, not {form.backend!r}")
    if form.method not in METHODS:
        raise PipelineControlError(f"method must be one of {', '.join(METHODS)}")

    def positive_int(value, name):
        if value is None or not str(value).strip():
            return None
        try:
            number = float(str(value).strip())
        except ValueError:
            raise PipelineControlError(f"{name} must be a whole number of at least 1, not {value!r}") from None
        if number < 1 or number != int(number):
            raise PipelineControlError(f"{name} must be a whole number of at least 1, not {value!r}")
        return int(number)

    kwargs = dict(
        backend=form.backend, model=(form.model or "").strip() or None,
        base_url=check_base_url(form.base_url), method=form.method,
        concurrency=positive_int(form.concurrency, "concurrency"), limit=positive_int(form.limit, "limit"),
        split=(form.split or "").strip() or None, new_run=bool(form.new_run),
    )
    if form.backend != "simulator" and not kwargs["base_url"] and not os.environ.get("OPENAI_API_KEY", "").strip():
        # The backend's own message points to --base-url, a flag the app has no box for,
        # and does not say the key is read where the app was started.
        raise PipelineControlError(
            f"the {form.backend} backend needs OPENAI_API_KEY in the environment of `good4cir app` "
            "(restart the app with it set), or a local server's address in Base URL")
    if form.backend == "simulator" and form.error_rate not in (None, ""):
        if not 0 <= float(form.error_rate) <= 1:  # NaN fails too
            raise PipelineControlError("the simulator's error rate must be between 0 and 1")
        kwargs["error_rate"] = float(form.error_rate)
    return RunOptions(**kwargs)


class PipelineController:
    """Holds the app's background run (at most one at a time)."""

    def __init__(self, db_path: str):
        self.db_path = db_path
        self._handle = None
        self._lock = threading.Lock()
        self.started_by: Optional[str] = None
        self._done_before: dict[int, int] = {}   # every run's done pairs when the last start began
        self._limit: Optional[int] = None
        self._stopping = False                   # Stop was pressed; the run finishes its in-flight calls
        self._reviewed_elsewhere = 0             # pairs of a new run that an earlier run's review decided
        self._same_settings: list[int] = []      # earlier runs a new run (asked for) shares settings with

    @property
    def running(self) -> bool:
        return self._handle is not None and self._handle.running

    def start(self, form: RunForm, who: str):
        from pipeline.runner import run_status, start_run_in_thread

        options = options_from_form(form)
        with self._lock:
            if self.running and self._stopping:
                raise PipelineControlError(
                    f"run {self._handle.run_id} is stopping: its in-flight calls finish and are stored; "
                    "start again once the progress says stopped")
            if self.running:
                raise PipelineControlError(
                    f"run {self._handle.run_id} (started by {self.started_by}) is still going; stop it first")
            # Read before the start, to tell a resumed run from a new one and say what this
            # start added (a start with nothing left to do otherwise looks like no start).
            done_before = {run["id"]: run["pairs_done"] for run in run_status(self.db_path)["runs"]}
            self._handle = start_run_in_thread(self.db_path, options)
            self.started_by = who or "someone"
            self._stopping = False
            self._done_before, self._limit = done_before, options.limit
        self._handle.wait_started(timeout=30)
        if self._handle.error is not None:
            raise PipelineControlError(f"the run did not start: {self._handle.error}")
        run_id = self._handle.run_id
        self._reviewed_elsewhere = 0 if run_id is None or run_id in done_before else _reviewed_elsewhere(
            self.db_path, run_id)
        self._same_settings = [] if run_id is None or run_id in done_before else _same_settings(self.db_path, run_id)
        return self._handle

    def stop(self) -> str:
        with self._lock:
            if not self.running:
                return "no run is going"
            self._handle.stop()
            self._stopping = True
            return f"stopping run {self._handle.run_id}: in-flight calls finish and are stored"

    def snapshot(self) -> Optional[dict]:
        """The current (or last) run's progress as a dict, or None if none was started."""
        handle = self._handle
        if handle is None:
            return None
        progress = handle.progress.as_dict()
        progress["thread_running"] = handle.running
        progress["started_by"] = self.started_by
        if handle.run_id is not None:
            progress["resumed"] = handle.run_id in self._done_before
            progress["done_by_this_start"] = progress.get("pairs_done", 0) - self._done_before.get(handle.run_id, 0)
            progress["limit"] = self._limit
            progress["reviewed_elsewhere"] = 0 if progress["resumed"] else self._reviewed_elsewhere
            progress["same_settings"] = [] if progress["resumed"] else list(self._same_settings)
        if handle.error is not None:
            progress["error"] = f"{type(handle.error).__name__}: {handle.error}"
        return progress


def _reviewed_elsewhere(db_path: str, run_id: int) -> int:
    """How many of the run's pairs another run's annotation has a review decision for:
    a new run's annotation of them replaces that one in exports."""
    from store.db import open_db

    db = open_db(db_path)
    try:
        return db.execute(
            "SELECT COUNT(DISTINCT a.pair_id) FROM annotations a JOIN annotations o ON o.pair_id = a.pair_id"
            " AND o.run_id != a.run_id AND o.review_status != 'unreviewed' WHERE a.run_id = ?",
            [run_id]).fetchone()[0]
    finally:
        db.conn.close()


def _same_settings(db_path: str, run_id: int) -> list[int]:
    """Earlier runs with the settings of run_id (a new run started though they match)."""
    from store.annotations import list_runs
    from store.db import open_db

    db = open_db(db_path)
    try:
        runs = list_runs(db)
    finally:
        db.conn.close()
    mine = next((r.settings.get("fingerprint") for r in runs if r.id == run_id), None)
    return [r.id for r in runs if mine and r.id != run_id and r.settings.get("fingerprint") == mine]


def format_progress(progress: Optional[dict]) -> str:
    """Plain text for the progress box (a Textbox: shown as text, never markup)."""
    if progress is None:
        return "No run started from this app yet."
    total = progress.get("pairs_total") or 0
    done = progress.get("pairs_done", 0)
    failed = progress.get("pairs_failed", 0)
    share = f" ({100 * (done + failed) / total:.0f}%)" if total else ""
    lines = [
        f"run {progress.get('run_id')} · {progress.get('status')}"
        # The session's thread outlives the status only while a stopped run winds down.
        + (" · still finishing" if progress.get("thread_running") and progress.get("status") != "running" else "")
        + f" · started by {progress.get('started_by')}",
        f"pairs: {done:,} done + {failed:,} failed of {total:,}{share}, {progress.get('pairs_pending', 0):,} pending",
        f"calls: {progress.get('calls', 0):,} stored ({progress.get('calls_reused', 0):,} reused from the store),"
        f" {progress.get('call_errors', 0):,} errors",
        f"spend: ${progress.get('cost_usd', 0.0):.4f}",
    ]
    if "resumed" in progress:
        added = progress.get("done_by_this_start", 0)
        same = progress.get("same_settings") or []
        if progress["resumed"]:
            why = "same settings"
        elif same:  # 'start a new run' was ticked
            why = (f"a new run, as asked; run{'s' if len(same) > 1 else ''} {', '.join(map(str, same))} "
                   f"{'have' if len(same) > 1 else 'has'} these settings")
        else:
            why = "no earlier run has these settings"
        line = (f"{'resumed' if progress['resumed'] else 'new'} run {progress.get('run_id')} ({why}): "
                f"{added:,} pair{'' if added == 1 else 's'} annotated by this start")
        if progress.get("status") == "finished" and not added and not failed and not progress.get("thread_running"):
            limit = progress.get("limit")
            line += ("; nothing was left to do" + (
                f": Limit {limit} takes the store's first {limit} pairs, and they are done; raise it for more"
                if limit else ""))
        lines.insert(1, line)
        reviewed = progress.get("reviewed_elsewhere") or 0
        if reviewed:
            one = reviewed == 1
            lines.insert(2, f"{reviewed:,} of its pairs {'was' if one else 'were'} reviewed in an earlier run: exports "
                            f"take each pair's newest annotation, so review {'it' if one else 'them'} again in run "
                            f"{progress.get('run_id')} (Review tab, Run filter) or export the earlier run by its "
                            "number")
    failures = progress.get("failures") or {}
    if failures:
        lines.append("failures: " + "; ".join(f"{reason}: {count}" for reason, count in sorted(failures.items())))
    if progress.get("last_error"):
        lines.append(f"last error: {progress['last_error']}")
    if progress.get("error"):
        lines.append(f"the run stopped with an error: {progress['error']}")
    return "\n".join(lines)


def runs_table(db_path: str) -> list[list]:
    """Every run of the store, one row each, for the runs table; each run labelled as
    the Review tab's Run filter labels it (runs of one name told apart)."""
    from pipeline.runner import run_status
    from store.db import open_db

    from .review_logic import run_labels

    db = open_db(db_path)
    try:
        labels = run_labels(db, progress=False)
    finally:
        db.conn.close()
    rows = []
    for run in run_status(db_path)["runs"]:
        rows.append([
            run["id"], labels.get(run["id"], run.get("name") or ""), run["backend"], run["model"],
            run.get("method", ""), run.get("status", ""), run["pairs_done"], run["pairs_failed"],
            run["pairs_pending"], run["calls"], round(run["cost_usd"] or 0.0, 4),
        ])
    return rows


RUNS_HEADERS = ["run", "label", "backend", "model", "method", "status", "done", "failed", "pending", "calls", "cost $"]
