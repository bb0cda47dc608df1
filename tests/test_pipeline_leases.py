"""One session per run: a run's lease (store.leases) keeps a second session from paying
for every answer again, and a killed session's run is taken over and shown as
interrupted. Real parts: the real AsyncOpenAI client against tests/openai_server.py, a
real SQLite store in a tmp dir, real processes for the dead and killed sessions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openai_server import server_fixture
from pipeline.runner import RunBusyError, RunOptions, run_pipeline, run_status, start_run_in_thread
from pipeline_world import build_world, table_rows
from store import leases
from store.db import open_db
from store.models import LeaseRecord

KEY = "sk-test-lease-0123456789abcdef"
REFS, PAIRS = 2, 6
CALLS = REFS + 2 * PAIRS


server = server_fixture()


@pytest.fixture(autouse=True)
def fresh_server(server, monkeypatch):
    server.state.config.__init__()
    server.state.reset()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _world(tmp_path: Path) -> Path:
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=REFS, pairs=PAIRS)
    return db_path


def _options(server, **kw) -> RunOptions:
    base = dict(backend="openai", model="gpt-4o-mini", base_url=server.url, concurrency=2,
                backoff_base=0.01, timeout=10, stop_grace=5)
    base.update(kw)
    return RunOptions(**base)


def _no_duplicate_requests(server) -> None:
    bodies = [json.dumps(body, sort_keys=True) for body in server.requests]
    assert len(bodies) == len(set(bodies)), "the server was asked the same thing twice"


def _plant_lease(db_path: Path, run_id: int, *, pid: int, age_s: float = 0.0, host=None) -> None:
    """Leave a lease as another session would, and the row saying 'running'."""
    db = open_db(db_path)
    try:
        leases.acquire_lease(db, run_id, "another-session", pid=pid, host=host)
        db.execute("UPDATE run_leases SET heartbeat_at = heartbeat_at - ? WHERE run_id = ?", [age_s, run_id])
        db.execute("UPDATE runs SET status = 'running' WHERE id = ?", [run_id])
    finally:
        db.conn.close()


def _stopped_run(db_path: Path, server) -> int:
    """A run row that matches _options(server), stopped before it made any call."""
    handle = start_run_in_thread(db_path, _options(server))
    handle.stop()
    assert handle.wait_started(timeout=30) and handle.error is None
    final = handle.join(timeout=30)
    assert final is not None and final.pairs_pending > 0
    return handle.run_id


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_session_on_a_running_run_fails_fast_and_pays_for_nothing(server, tmp_path):
    db_path = _world(tmp_path)
    # The first session's answers are held until the others have been refused, so it is
    # still going however slowly they start (a CLI process takes seconds to import).
    server.config.hold = True
    first = start_run_in_thread(db_path, _options(server, timeout=300))
    assert first.wait_started(timeout=30) and first.error is None and first.running

    # In-process (the app's Pipeline tab runs a Runner this way) ...
    with pytest.raises(RunBusyError) as caught:
        run_pipeline(db_path, _options(server))
    message = str(caught.value)
    assert message.startswith(f"run {first.run_id} is being worked on by another session")
    assert f"pid {os.getpid()} on {leases.this_host()}" in message and "heartbeat" in message
    assert "wait for it to finish" in message
    second = start_run_in_thread(db_path, _options(server))
    assert second.wait_started(timeout=30) and isinstance(second.error, RunBusyError)
    # ... and the CLI in another terminal: a clean one-line error, exit status 1.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    cli = subprocess.run(
        [sys.executable, "-m", "good4cir", "annotate", "--db", str(db_path), "--backend", "openai",
         "--base-url", server.url, "--concurrency", "2", "--no-progress"],
        env={**env, "OPENAI_API_KEY": KEY}, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1, cli.stderr[-2000:]
    assert cli.stderr.startswith(f"error: run {first.run_id} is being worked on by another session")
    assert "Traceback" not in cli.stderr

    server.config.hold = False
    final = first.join(timeout=60)
    assert final is not None and first.error is None and final.status == "finished"
    assert final.pairs_done == PAIRS
    assert server.stats["completions_ok"] == CALLS  # the refused sessions asked nothing
    _no_duplicate_requests(server)
    assert table_rows(db_path, "SELECT COUNT(*), MIN(status) FROM runs") == [(1, "finished")]
    assert table_rows(db_path, "SELECT COUNT(*) FROM run_leases") == [(0,)]  # given back


def test_two_sessions_started_together_on_a_new_run_make_one_run(server, tmp_path):
    db_path = _world(tmp_path)
    server.config.hold = True  # neither can finish before both have started
    handles = [start_run_in_thread(db_path, _options(server, timeout=300)) for _ in range(2)]
    for handle in handles:
        assert handle.wait_started(timeout=30)
    server.config.hold = False
    for handle in handles:
        handle.join(timeout=60)
    errors = [h.error for h in handles]
    assert sum(e is None for e in errors) == 1, errors
    assert sum(isinstance(e, RunBusyError) for e in errors) == 1, errors
    assert table_rows(db_path, "SELECT COUNT(*), MIN(status) FROM runs") == [(1, "finished")]
    assert server.stats["completions_ok"] == CALLS
    _no_duplicate_requests(server)


def test_a_lease_left_by_a_dead_process_is_taken_over_at_once(server, tmp_path):
    db_path = _world(tmp_path)
    run_id = _stopped_run(db_path, server)
    _plant_lease(db_path, run_id, pid=_dead_pid())  # heartbeat fresh: only the pid is gone
    assert run_status(db_path)["runs"][0]["status"] == "interrupted"
    started = time.monotonic()
    progress = run_pipeline(db_path, _options(server))
    assert progress.run_id == run_id and progress.status == "finished" and progress.pairs_done == PAIRS
    assert time.monotonic() - started < leases.STALE_AFTER_S  # not waited out
    assert table_rows(db_path, "SELECT COUNT(*) FROM run_leases") == [(0,)]
    assert run_status(db_path)["runs"][0]["status"] == "finished"


def test_a_live_process_holds_the_run_until_its_heartbeat_is_stale(server, tmp_path):
    db_path = _world(tmp_path)
    run_id = _stopped_run(db_path, server)
    _plant_lease(db_path, run_id, pid=os.getpid(), age_s=leases.STALE_AFTER_S - 10)
    asked = server.stats["chat_requests"]
    with pytest.raises(RunBusyError, match=f"run {run_id} is being worked on .* last heartbeat 2\\d s ago"):
        run_pipeline(db_path, _options(server))
    assert server.stats["chat_requests"] == asked
    assert run_status(db_path)["runs"][0]["status"] == "running"  # held: not interrupted
    # The same process, hung: its heartbeat is older than the limit.
    _plant_lease(db_path, run_id, pid=os.getpid(), age_s=leases.STALE_AFTER_S + 1)
    assert run_status(db_path)["runs"][0]["status"] == "interrupted"
    progress = run_pipeline(db_path, _options(server))
    assert progress.run_id == run_id and progress.status == "finished" and progress.pairs_done == PAIRS
    assert server.stats["completions_ok"] == CALLS
    assert table_rows(db_path, "SELECT COUNT(*) FROM run_leases") == [(0,)]


def test_liveness_of_a_lease_on_another_host_rests_on_its_heartbeat_alone():
    now = time.time()
    dead = _dead_pid()
    here = LeaseRecord(run_id=1, owner="a", pid=dead, host=leases.this_host(), acquired_at=now, heartbeat_at=now)
    elsewhere = here.model_copy(update={"host": leases.this_host() + "-other"})
    assert not leases.lease_is_live(here)          # our host: the pid is known to be gone
    assert leases.lease_is_live(elsewhere)         # another host: the pid means nothing here
    assert not leases.lease_is_live(elsewhere, now=now + leases.STALE_AFTER_S)
    mine = here.model_copy(update={"pid": os.getpid()})
    assert leases.lease_is_live(mine) and not leases.lease_is_live(mine, now=now + leases.STALE_AFTER_S)


def test_heartbeats_renew_the_lease_and_a_session_whose_run_was_taken_over_stops(
        server, tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "HEARTBEAT_EVERY_S", 0.05)
    db_path = _world(tmp_path)
    server.config.latency = 0.2
    handle = start_run_in_thread(db_path, _options(server, concurrency=1))
    assert handle.wait_started(timeout=30) and handle.error is None
    (first,) = table_rows(db_path, "SELECT heartbeat_at FROM run_leases")
    deadline = time.time() + 10
    while table_rows(db_path, "SELECT heartbeat_at FROM run_leases") == [first]:
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.02)
    # Another session takes the run over (as it would after this one hung past the limit).
    db = open_db(db_path)
    db.execute("UPDATE run_leases SET owner = 'new-holder' WHERE run_id = ?", [handle.run_id])
    db.conn.close()
    final = handle.join(timeout=30)
    assert final is not None and handle.error is None
    assert final.status == "stopped" and final.pairs_pending > 0
    assert "taken over by another session" in final.last_error
    # The run row and the lease are the new holder's: the old session touched neither.
    assert table_rows(db_path, "SELECT status FROM runs") == [("running",)]
    assert table_rows(db_path, "SELECT owner FROM run_leases") == [("new-holder",)]


def test_status_shows_a_killed_run_as_interrupted_and_the_rerun_resumes_it(server, tmp_path, capsys):
    from good4cir.cli import main as cli_main

    db_path = _world(tmp_path)
    server.config.latency = 0.2
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    process = subprocess.Popen(
        [sys.executable, "-m", "good4cir", "annotate", "--db", str(db_path), "--backend", "openai",
         "--base-url", server.url, "--concurrency", "2", "--no-progress"],
        env={**env, "OPENAI_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while server.stats["completions_ok"] < 3:
        assert process.poll() is None and time.time() < deadline, "the run made no progress"
        time.sleep(0.005)
    server.config.hold = True  # it cannot finish before it is killed
    assert process.poll() is None
    assert run_status(db_path)["runs"][0]["status"] == "running"  # alive: its lease is live
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert table_rows(db_path, "SELECT status FROM runs") == [("running",)]  # what the row says
    (run,) = run_status(db_path)["runs"]
    assert run["status"] == "interrupted" and run["session"] is None
    assert cli_main(["status", "--db", str(db_path)]) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[1]
    assert row.split()[:5] == ["1", "-", "openai", "gpt-4o-mini", "interrupted"], out
    assert "rerun the same `good4cir annotate` command" in out
    server.config.hold = False
    progress = run_pipeline(db_path, _options(server))
    assert progress.status == "finished" and progress.pairs_done == PAIRS
    assert run_status(db_path)["runs"][0]["status"] == "finished"
    assert table_rows(db_path, "SELECT COUNT(*) FROM run_leases") == [(0,)]


def test_a_new_chat_run_beside_a_live_chat_run_over_the_same_pairs_is_refused_naming_it(server, tmp_path):
    # Two live `openai` runs over the same pairs with the same settings ask the same
    # requests: each has its own lease, so both paid for every answer in flight. The
    # second start is refused, naming the run and saying what to do, and asks nothing.
    db_path = _world(tmp_path)
    server.config.hold = True  # the first session stays in flight until the second is refused
    first = start_run_in_thread(db_path, _options(server, timeout=300))
    assert first.wait_started(timeout=30) and first.error is None
    # Both of its request slots (concurrency 2) held at the server: it can ask no more.
    deadline = time.time() + 30
    while server.stats["chat_requests"] < 2:
        assert first.running and time.time() < deadline, first.error
        time.sleep(0.01)
    asked = server.stats["chat_requests"]
    try:
        with pytest.raises(RunBusyError) as caught:
            run_pipeline(db_path, _options(server, new_run=True))
        message = str(caught.value)
        assert f"run {first.run_id} is annotating {PAIRS} of the {PAIRS} pairs this run would annotate" in message
        assert f"pid {os.getpid()}" in message and "pay twice" in message
        assert f"Wait for run {first.run_id} to finish" in message
        assert server.stats["chat_requests"] == asked  # the refused run asked nothing
        assert table_rows(db_path, "SELECT id FROM runs") == [(first.run_id,)]  # and made no run
    finally:
        server.config.hold = False
    final = first.join(timeout=60)
    assert final is not None and final.status == "finished" and final.pairs_done == PAIRS
    # Once it is done, the new run reuses every answer: nothing paid twice.
    progress = run_pipeline(db_path, _options(server, new_run=True))
    assert progress.pairs_done == PAIRS and server.stats["completions_ok"] == CALLS
    _no_duplicate_requests(server)
