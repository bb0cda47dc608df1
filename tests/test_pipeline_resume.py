"""Killing a run (SIGKILL, mid-flight) loses nothing and pays for nothing twice: the
rerun of the same command ends with the store an uninterrupted run makes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openai_server import start_server
from pipeline.runner import RunOptions, run_pipeline
from pipeline_world import build_world, store_snapshot, table_rows

KEY = "sk-test-resume-0123456789"
REFS, PAIRS, CONCURRENCY = 4, 12, 4


@pytest.fixture
def server():
    handle = start_server(latency=0.03)
    yield handle
    handle.stop()


def _annotate(db_path: Path, server) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.Popen(
        [sys.executable, "-m", "good4cir", "annotate", "--db", str(db_path), "--backend", "openai",
         "--base-url", server.url, "--concurrency", str(CONCURRENCY), "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_at_several_points_then_rerun_equals_an_uninterrupted_run(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    images = tmp_path / "images"
    killed_db = tmp_path / "killed.db"
    build_world(killed_db, images, references=REFS, pairs=PAIRS)
    expected_calls = REFS + 2 * PAIRS

    kills = 0
    for kill_at in (2, 12, 22):  # paid calls seen by the server: stage 1, 2 and 3 territory
        process = _annotate(killed_db, server)
        deadline = time.time() + 60
        while server.stats["completions_ok"] < kill_at and process.poll() is None:
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=30)
    assert kills >= 3
    process = _annotate(killed_db, server)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-2000:]
    paid_with_kills = server.stats["completions_ok"]

    server.state.reset()
    clean_db = tmp_path / "clean.db"
    build_world(clean_db, images, references=REFS, pairs=PAIRS)
    progress = run_pipeline(clean_db, RunOptions(base_url=server.url, concurrency=CONCURRENCY))
    assert progress.pairs_done == PAIRS
    assert server.stats["completions_ok"] == expected_calls

    killed, clean = store_snapshot(killed_db), store_snapshot(clean_db)
    assert len(clean["ok_calls"]) == expected_calls
    for table in ("annotations", "descriptions", "captions", "ok_calls"):
        assert killed[table] == clean[table], table
    # one stored answer per request; the only extra paid calls are those a kill caught
    # between the server's answer and the store (in flight, or answered and not yet written)
    assert table_rows(killed_db, "SELECT request_hash FROM calls WHERE status = 'ok'"
                                 " GROUP BY request_hash HAVING COUNT(*) > 1") == []
    assert expected_calls <= paid_with_kills <= expected_calls + kills * 2 * CONCURRENCY
    assert table_rows(killed_db, "SELECT COUNT(*), MIN(status) FROM runs") == [(1, "finished")]


def test_ctrl_c_stops_gracefully_and_the_rerun_finishes_without_paying_twice(server, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=REFS, pairs=PAIRS)
    process = _annotate(db_path, server)
    deadline = time.time() + 60
    while server.stats["completions_ok"] < 8:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert b"rerun the same command to resume" in stderr
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    # status says how to go on, as it does for an interrupted run (it showed the table only)
    from good4cir.cli import main as cli_main

    assert cli_main(["status", "--db", str(db_path)]) == 0
    pending = table_rows(db_path, "SELECT COUNT(*) FROM annotations WHERE status = 'pending'")[0][0]
    assert (f"run 1 stopped with {pending} pairs pending: rerun the same `good4cir annotate` command"
            in capsys.readouterr().out)
    # the calls that were in flight at Ctrl-C finished and were stored
    paid = server.stats["completions_ok"]
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok'")[0][0] == paid
    progress = run_pipeline(db_path, RunOptions(base_url=server.url, concurrency=CONCURRENCY))
    assert progress.pairs_done == PAIRS and progress.status == "finished"
    assert server.stats["completions_ok"] == REFS + 2 * PAIRS  # nothing paid twice


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_kill_or_a_closed_terminal_stops_as_ctrl_c_does_and_stores_every_answer(server, tmp_path, monkeypatch,
                                                                                  signum):
    # `kill PID`, `timeout`, a container stop (SIGTERM) and a closed terminal (SIGHUP) ended
    # the process at once: the answers in flight and those not yet written were paid for and lost
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=REFS, pairs=PAIRS)
    server.config.latency = 0.3  # calls in flight when the signal comes
    process = _annotate(db_path, server)
    deadline = time.time() + 60
    while server.stats["completions_ok"] < 8:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert f"stopping ({signum.name})".encode() in stderr
    assert b"rerun the same command to resume" in stderr
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    paid = server.stats["completions_ok"]
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok'")[0][0] == paid
    server.config.latency = 0.0
    progress = run_pipeline(db_path, RunOptions(base_url=server.url, concurrency=CONCURRENCY))
    assert progress.pairs_done == PAIRS and progress.status == "finished"
    assert server.stats["completions_ok"] == REFS + 2 * PAIRS  # nothing paid twice


APP_WITH_A_RUN = """
import sys
import gradio, httpx, openai  # loaded before the run's thread needs them, as in the app
from good4cir.cli import main
from pipeline.runner import RunOptions, start_run_in_thread
db, url, port = sys.argv[1:4]
handle = start_run_in_thread(db, RunOptions(base_url=url, concurrency=4))  # as the Pipeline tab does
handle.wait_started(30)
sys.exit(main(["app", "--db", db, "--port", port]))
"""


def test_stopping_the_app_stops_its_pipeline_run_and_stores_the_answers_in_flight(server, tmp_path):
    # The Pipeline tab's run lives on a daemon thread: Ctrl-C on the app ended it with the
    # process, its answers in flight paid for and lost, the run left 'running'
    from ui.server import free_port

    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=REFS, pairs=PAIRS)
    server.config.latency, server.config.hold = 0.5, True  # the run waits until the app is up
    process = subprocess.Popen([sys.executable, "-c", APP_WITH_A_RUN, str(db_path), server.url, str(free_port())],
                               env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert b"review app on" in process.stdout.readline(), process.stderr.read().decode()[-2000:]
    server.config.hold = False
    deadline = time.time() + 60
    while server.stats["completions_ok"] < 6:
        assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert b"stopping run 1 of the Pipeline tab" in stdout, (stdout + stderr).decode()[-2000:]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok'")[0][0] == server.stats["completions_ok"]
