"""The `openai-batch` backend against the local server's /v1/files and /v1/batches:
stages chained through batches, file splitting, expiry, deadline, and a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from openai_server import start_server
from pipeline.pricing import PriceTable
from pipeline.runner import (RunAuthError, RunBusyError, RunNotFoundError, RunOptions, RunQuotaError,
                             RunUnreachableError, plan_run, run_pipeline, start_run_in_thread)
from pipeline_world import build_world, table_rows

KEY = "sk-test-batch-0123456789"


@pytest.fixture
def server():
    handle = start_server(batch_delay=0.1)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _options(server, **kw) -> RunOptions:
    base = dict(backend="openai-batch", base_url=server.url, poll_interval=0.05,
                flush_interval=0.1, backoff_base=0.01, image_max_side=128)
    base.update(kw)
    return RunOptions(**base)


def test_batches_chain_stages_split_files_and_cost_half(server, tmp_path):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=3, pairs=7)
    progress = run_pipeline(db_path, _options(server, max_batch_requests=4, max_batch_bytes=12_000))
    assert progress.pairs_done == 7 and progress.status == "finished"
    # every line sent once and answered once: 3 stage 1 + 7 stage 2 + 7 stage 3
    assert server.stats["batch_lines_submitted"] == server.stats["batch_lines_answered"] == 17
    batches = table_rows(db_path, "SELECT id, stage, status, custom_ids, input_file_id, collected FROM batches")
    assert all(status == "completed" and collected == 1 for _, _, status, _, _, collected in batches)
    stages = [stage for _, stage, *_ in batches]
    # stage 1 goes first; stage 3 batches only after stage 2 ones exist
    assert stages[0] == "stage1" and stages.index("stage3") > stages.index("stage2")
    for _, _, _, custom_ids, file_id, _ in batches:
        assert len(__import__("json").loads(custom_ids)) <= 4
        assert server.state.files[file_id]["bytes"] <= 12_000
    # calls map back by custom_id and cost half of the list price
    prices = PriceTable()
    for batch_id, custom_id, tokens_in, tokens_out, cost in table_rows(
            db_path, "SELECT batch_id, custom_id, tokens_in, tokens_out, cost_usd FROM calls"):
        assert batch_id and custom_id.startswith("g4c-")
        assert cost == pytest.approx(prices.cost("gpt-4o-mini", tokens_in, tokens_out) / 2)


def test_expired_batch_keeps_finished_lines_and_resubmits_the_rest(server, tmp_path):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=4)
    server.config.batch_expire_after = 2  # every batch finishes only its first 2 lines
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 4
    # no line answered twice: finished lines were kept, only the rest went out again
    assert server.stats["batch_lines_answered"] == 2 + 2 * 4
    statuses = [s for (s,) in table_rows(db_path, "SELECT status FROM batches")]
    assert "expired" in statuses
    expired_calls = table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'error'"
                                        " AND error LIKE '%batch_expired%'")[0][0]
    assert expired_calls == server.stats["batch_lines_submitted"] - server.stats["batch_lines_answered"]


def test_a_batch_past_its_deadline_is_cancelled_and_its_items_fail_with_a_reason(server, tmp_path):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=1, pairs=2)
    server.config.batch_delay = 60.0
    started = time.time()
    progress = run_pipeline(db_path, _options(server, batch_timeout=0.3, max_attempts=2))
    assert time.time() - started < 30
    assert progress.pairs_failed == 2 and progress.failures == {"retries exhausted": 2}
    assert set(s for (s,) in table_rows(db_path, "SELECT status FROM batches")) == {"cancelled"}


def test_restart_waits_for_stored_batches_instead_of_paying_again(server, tmp_path):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=3, pairs=5)
    server.config.batch_delay = 30.0
    handle = start_run_in_thread(db_path, _options(server))
    deadline = time.time() + 60
    while not table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE status = 'validating'")[0][0]:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    handle.stop()
    assert handle.join(timeout=30).status == "stopped"
    (first_batch,), = table_rows(db_path, "SELECT id FROM batches")
    assert server.stats["batch_lines_submitted"] == 3

    server.config.batch_delay = 0.1  # the open batch now finishes on the provider's side
    progress = run_pipeline(db_path, _options(server))
    assert progress.run_id == 1 and progress.pairs_done == 5
    # the stage 1 lines came from the batch the first session submitted
    assert server.stats["batch_lines_submitted"] == 3 + 2 * 5
    assert table_rows(db_path, "SELECT DISTINCT batch_id FROM calls WHERE stage = 'stage1'") == [(first_batch,)]


def _kill_batch_session_once(db_path, server, flush_interval: str, reached, poll: float) -> None:
    """Run `good4cir annotate --backend openai-batch` in its own process and SIGKILL it
    as soon as `reached()` is true (it must still be running then)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "good4cir", "annotate", "--db", str(db_path), "--backend", "openai-batch",
         "--base-url", server.url, "--poll-interval", "0.05", "--flush-interval", flush_interval,
         "--image-size", "128", "--no-progress"],
        env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not reached():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(poll)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_sigkill_between_creating_a_batch_and_storing_its_id_adopts_it_on_restart(server, tmp_path):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=3, pairs=5)
    # The provider creates the batch at once but answers late: the kill lands in between.
    server.config.batch_create_response_delay = 30.0
    _kill_batch_session_once(db_path, server, "0.1", lambda: server.stats["batches_created"], poll=0.02)
    (row_id, status, input_file), = table_rows(db_path, "SELECT id, status, input_file_id FROM batches")
    assert row_id == f"pending:{input_file}" and status == "submitting"

    server.config.batch_create_response_delay = 0.0
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 5
    assert server.stats["batch_lines_submitted"] == 3 + 2 * 5  # the stage 1 batch was not sent again
    (adopted,), = table_rows(db_path, "SELECT id FROM batches WHERE input_file_id = ?", [input_file])
    assert not adopted.startswith("pending:")
    assert table_rows(db_path, "SELECT DISTINCT batch_id FROM calls WHERE stage = 'stage1'") == [(adopted,)]


def test_a_kill_while_a_batch_is_open_stops_the_run_and_the_rerun_collects_the_batch(server, tmp_path):
    # SIGTERM (`kill PID`, a container stop) ended the process at once, the run left
    # 'running' and nothing said how to go on
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=3, pairs=5)
    server.config.batch_delay = 3.0
    process = subprocess.Popen(
        [sys.executable, "-m", "good4cir", "annotate", "--db", str(db_path), "--backend", "openai-batch",
         "--base-url", server.url, "--poll-interval", "0.05", "--flush-interval", "0.1",
         "--image-size", "128", "--no-progress"],
        env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not server.stats["batches_created"]:
        assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert b"stopping (SIGTERM): what is in a batch stays on the server" in stderr
    assert b"rerun the same command to resume" in stderr
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]

    server.config.batch_delay = 0.1
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 5
    assert server.stats["batch_lines_submitted"] == 3 + 2 * 5  # the open stage 1 batch was not sent again


def test_lines_refused_for_newer_model_parameters_go_out_again_adapted(server, tmp_path):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=1, pairs=2)
    server.config.reject_max_tokens = True
    progress = run_pipeline(db_path, _options(server, model="gpt-5-mini"))
    assert progress.pairs_done == 2
    assert server.stats["rejected_max_tokens"] == 1  # one refused line, then adapted


@pytest.mark.parametrize("refuse, refused", [
    ({"reject_json_schema": True}, {"rejected_json_schema": 1}),
    ({"reject_json_schema": True, "reject_json_object": True},
     {"rejected_json_schema": 1, "rejected_json_object": 1}),
])
def test_lines_refused_for_their_response_format_step_down_once_and_go_out_again(
        server, tmp_path, refuse, refused):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=1, pairs=2)
    for name, value in refuse.items():
        setattr(server.config, name, value)
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 2 and progress.status == "finished"
    # Only the first line (stage 1) is refused per mode; every later line uses the lower one.
    for name, count in refused.items():
        assert server.stats[name] == count, (name, dict(server.stats))
    # 1 stage 1 + 2 stage 2 + 2 stage 3 answered, plus the refused lines
    assert server.stats["batch_lines_answered"] == 5 + sum(refused.values())


def test_a_batch_cancelled_outside_good4cir_keeps_its_answers_and_sends_nothing_again(server, tmp_path):
    # Cancelling a batch from the provider's dashboard is the user deciding not to pay for
    # its unfinished lines. They used to go out again at once in a new batch, as if the
    # batch had expired. Now the finished lines are kept, the rest fail their pairs with a
    # reason that says how to send them, and nothing is sent until the user asks.
    import openai

    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=4)
    server.config.batch_delay = 120.0
    server.config.batch_cancel_keeps = 1  # the provider had finished one stage 1 line
    options = _options(server)
    handle = start_run_in_thread(db_path, options)
    deadline = time.time() + 60
    while not table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE status = 'validating'")[0][0]:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    (batch_id,), = table_rows(db_path, "SELECT id FROM batches")
    openai.OpenAI(base_url=server.url, api_key=KEY).batches.cancel(batch_id)  # "the dashboard"
    server.config.batch_delay = 0.1  # later batches (the kept line's stages 2 and 3) finish
    progress = handle.join(timeout=60)
    assert progress is not None and handle.error is None, handle.error
    # the kept stage 1 answer served its two pairs; the unanswered one was not sent again
    assert progress.pairs_done == 2 and progress.failures == {"batch cancelled": 2}
    assert server.stats["batch_lines_submitted"] == 2 + 2 + 2
    reasons = [r for (r,) in table_rows(db_path, "SELECT error FROM annotations WHERE status = 'failed'")]
    assert all(batch_id in r and "outside good4cir" in r and "--retry-failed" in r for r in reasons), reasons
    assert table_rows(db_path, "SELECT status, cancelled_by FROM batches WHERE id = ?", [batch_id]) == [
        ("cancelled", "outside")]

    # A restart does not send them either; --retry-failed does, once.
    run_pipeline(db_path, options)
    assert server.stats["batch_lines_submitted"] == 6
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "retry_failed": True}))
    assert progress.pairs_done == 4 and progress.failures == {}
    assert server.stats["batch_lines_submitted"] == 6 + 1 + 2 + 2


def test_a_batch_good4cir_cancelled_is_told_apart_from_one_cancelled_outside_after_a_restart(server, tmp_path):
    # The batch deadline's own cancel sends the unfinished lines again (as attempts). A
    # session that sent the cancel and stopped before the batch ended must not leave the
    # next session thinking the user cancelled it.
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=1, pairs=1)
    server.config.batch_delay = 120.0
    options = _options(server, batch_timeout=0.5)
    server.config.batch_cancel_refused = True  # the cancel is recorded, the batch stays open
    handle = start_run_in_thread(db_path, options)
    deadline = time.time() + 60
    while not server.stats["batch_cancels_refused"]:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    handle.stop()
    assert handle.join(timeout=30).status == "stopped"
    (batch_id,), = table_rows(db_path, "SELECT id FROM batches")
    server.config.batch_cancel_refused = False
    openai_batch = server.state.batches[batch_id]
    assert openai_batch["status"] in ("validating", "in_progress")
    openai_batch["status"] = "cancelling"  # the cancel good4cir asked for takes effect late
    server.config.batch_delay = 0.1
    progress = run_pipeline(db_path, options)
    assert progress.pairs_done == 1 and progress.failures == {}
    assert table_rows(db_path, "SELECT status, cancelled_by FROM batches WHERE id = ?", [batch_id]) == [
        ("cancelled", "good4cir")]


def test_a_slow_upload_gets_time_by_its_size_instead_of_failing_at_the_request_timeout(server, tmp_path):
    # A batch file of hundreds of MB is answered long after the per-request --timeout. The
    # upload timed out, the client sent the whole file again twice, and then the pairs
    # failed as 'retries exhausted' after as many more uploads. Now an upload gets
    # --timeout plus its size at the slowest speed allowed for (upload_bytes_per_s).
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=2)
    server.config.upload_bytes_per_s = 8_000  # the ~9 kB image files answer after ~1.1 s
    progress = run_pipeline(db_path, _options(server, timeout=0.4, upload_bytes_per_s=2_000, max_attempts=2))
    assert progress.pairs_done == 2, progress.failures
    # one file per batch, each line sent and answered once
    assert server.stats["files_uploaded"] == server.stats["batches_created"] == 3
    assert server.stats["batch_lines_submitted"] == server.stats["batch_lines_answered"] == 2 + 2 + 2


def test_an_upload_that_times_out_after_the_file_arrived_is_found_not_sent_again(server, tmp_path):
    # Past even that allowance, the provider may still have received the file. Sending it
    # again made a second copy each time (and the client did so on its own, twice); now
    # the upload is looked up by its own file name first and used if it is there.
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=2)
    server.config.upload_bytes_per_s = 8_000
    progress = run_pipeline(db_path, _options(server, timeout=0.4, upload_bytes_per_s=1e12, max_attempts=2))
    assert progress.pairs_done == 2, progress.failures
    assert server.stats["files_uploaded"] == server.stats["batches_created"] == 3
    assert server.stats["batch_lines_submitted"] == server.stats["batch_lines_answered"] == 2 + 2 + 2
    names = [f["filename"] for f in server.state.files.values() if f["purpose"] == "batch"]
    assert len(set(names)) == 3


def _run_with_a_batch_open(server, tmp_path, **run_a):
    """Run A over 3 pairs (references 0, 1, 0), with `run_a`'s options, whose first batch
    stays open at the provider: (store path, its options, its live session's handle, the
    batch id)."""
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=3)
    options = _options(server, **run_a)
    server.config.batch_delay = 120.0
    handle = start_run_in_thread(db_path, options)
    deadline = time.time() + 60
    while not table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE status = 'validating'")[0][0]:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    (batch_a,), = table_rows(db_path, "SELECT id FROM batches")
    return db_path, options, handle, batch_a


def _stopped_run_with_a_batch_open(server, tmp_path, **run_a):
    """As `_run_with_a_batch_open`, with run A's session stopped: its batch stays open."""
    db_path, options, handle, batch_a = _run_with_a_batch_open(server, tmp_path, **run_a)
    handle.stop()
    assert handle.join(timeout=30).status == "stopped"
    return db_path, options, batch_a


def test_a_new_run_waits_for_another_runs_open_batch_instead_of_paying_again(server, tmp_path):
    # Run B (a new run over the same pairs, same model and settings: the same requests)
    # only looked at its own batches, so it sent the requests that run A's open batch was
    # already answering, and paid twice. Now it waits for that batch and takes its answers.
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    assert server.stats["batch_lines_submitted"] == 2

    server.config.batch_delay = 0.1  # run A's batch finishes on the provider's side
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "new_run": True}))
    assert progress.run_id == 2 and progress.pairs_done == 3, progress.failures
    assert server.stats["batch_lines_submitted"] == 2 + 3 + 3  # stage 1 was not sent again
    assert table_rows(db_path, "SELECT DISTINCT run_id, batch_id FROM calls WHERE stage = 'stage1'") == [
        (2, batch_a)]
    # run A, resumed, reuses those answers: nothing sent, nothing counted twice
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "run_id": 1}))
    assert progress.pairs_done == 3 and server.stats["batch_lines_submitted"] == 8
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok'") == [(8,)]


def test_a_new_run_beside_a_live_batch_run_over_the_same_pairs_is_refused_naming_it(server, tmp_path):
    db_path, options, handle, batch_a = _run_with_a_batch_open(server, tmp_path)
    try:
        with pytest.raises(RunBusyError) as caught:
            run_pipeline(db_path, RunOptions(**{**options.__dict__, "new_run": True}))
        assert "run 1" in str(caught.value) and batch_a in str(caught.value)
        assert table_rows(db_path, "SELECT id FROM runs") == [(1,)]  # no run made
        assert server.stats["batch_lines_submitted"] == 2  # run 2 sent nothing
    finally:
        handle.stop()
        handle.join(timeout=30)


def test_a_chat_run_over_pairs_in_another_runs_open_batch_is_refused_naming_it(server, tmp_path):
    # The `openai` backend cannot wait for a batch: it would pay again for every answer
    # run A's open batch holds. It says which run and batch, and what to do.
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    with pytest.raises(RunBusyError) as caught:
        run_pipeline(db_path, RunOptions(**{**options.__dict__, "backend": "openai"}))
    message = str(caught.value)
    assert "run 1" in message and batch_a in message and "--run 1" in message
    assert server.stats["chat_requests"] == 0


def test_answers_of_another_runs_batch_outside_the_collecting_runs_scope_are_reused_by_later_runs(
        server, tmp_path):
    # Run B (--limit 1) took over run A's open batch but stored only the answer it asked
    # for, and the batch was marked collected: the answer for A's other reference image
    # was lost, and run C, asking it later, paid for it again.
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    server.config.batch_delay = 0.1
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "new_run": True, "limit": 1}))
    assert progress.run_id == 2 and progress.pairs_done == 1, progress.failures
    assert server.stats["batch_lines_submitted"] == 2 + 2  # stage 2 and 3 of its one pair
    # both answers of A's batch are stored: B's own, and the other one as run A's
    assert sorted(table_rows(db_path, "SELECT run_id, batch_id FROM calls WHERE stage = 'stage1'")) == [
        (1, batch_a), (2, batch_a)]

    # run C, over every pair, on the chat backend: it pays for no stage 1 at all
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "backend": "openai",
                                                   "new_run": True}))
    assert progress.pairs_done == 3, progress.failures
    assert server.stats["chat_requests"] == 2 + 2  # stage 2 and 3 of its two new pairs
    assert progress.calls_reused == 2  # ref 1's stage 1 from A's batch, B's stage 3
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE stage = 'stage1'") == [(2,)]


def test_dry_run_does_not_count_requests_another_runs_open_batch_answers(server, tmp_path):
    # A new run waits for run A's open batch and takes its answers, but --dry-run counted
    # them as calls to pay for: its count and cost were above what the run then sent.
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    new_run = RunOptions(**{**options.__dict__, "new_run": True})
    plan = plan_run(db_path, new_run)
    assert plan.calls_by_stage == {"stage1": 0, "stage2": 3, "stage3": 3}
    assert plan.estimated_cost_usd == pytest.approx(PriceTable().estimate(
        "gpt-4o-mini", {"stage2": 3, "stage3": 3}, batch=True, image_max_side=128))
    # run A itself, resumed, waits for its own open batch too
    assert plan_run(db_path, options).calls_by_stage == {"stage1": 0, "stage2": 3, "stage3": 3}
    # A chat run would be refused (it cannot wait for a batch): so is its dry run, saying why.
    with pytest.raises(RunBusyError) as caught:
        plan_run(db_path, RunOptions(**{**options.__dict__, "backend": "openai"}))
    assert "run 1" in str(caught.value) and batch_a in str(caught.value)

    server.config.batch_delay = 0.1
    sent = server.stats["batch_lines_submitted"]
    progress = run_pipeline(db_path, new_run)
    assert progress.pairs_done == 3 and server.stats["batch_lines_submitted"] - sent == plan.calls


def _count_call_writes(db_path) -> None:
    """Triggers that log every row written to `calls` (insert or update) in the store."""
    import sqlite3

    conn = sqlite3.connect(str(db_path))
    conn.executescript(
        "CREATE TABLE _call_writes (kind TEXT, call_id INTEGER);"
        "CREATE TRIGGER _calls_inserted AFTER INSERT ON calls"
        " BEGIN INSERT INTO _call_writes VALUES ('insert', NEW.id); END;"
        "CREATE TRIGGER _calls_updated AFTER UPDATE ON calls"
        " BEGIN INSERT INTO _call_writes VALUES ('update', NEW.id); END;")
    conn.close()


def test_each_batch_answer_is_written_once_as_the_call_of_the_run_that_asked(server, tmp_path):
    # Collecting a batch stored each answer as a call of the batch's run, then handing it
    # to the session that asked rewrote that row (run, stage, cost, latency): every answer
    # was written twice. Now collecting stores it where it stays, as the asker's call.
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    _count_call_writes(db_path)
    server.config.batch_delay = 0.1
    # run B (--limit 1) takes over run A's open batch: its own answer and A's other one
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "new_run": True, "limit": 1}))
    assert progress.pairs_done == 1, progress.failures
    assert sorted(table_rows(db_path, "SELECT run_id, batch_id FROM calls WHERE stage = 'stage1'")) == [
        (1, batch_a), (2, batch_a)]
    # run A, resumed, sends and collects its own batches
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "run_id": 1}))
    assert progress.pairs_done == 3, progress.failures
    answered = server.stats["batch_lines_answered"]
    assert table_rows(db_path, "SELECT kind, COUNT(*) FROM _call_writes GROUP BY kind") == [("insert", answered)]
    assert table_rows(db_path, "SELECT COUNT(*), COUNT(DISTINCT custom_id) FROM calls") == [(answered, answered)]
    # each row holds what the asker would have stored: its latency, the batch price (the
    # answer no session was waiting for, A's other stage 1 collected by B, has no latency)
    prices = PriceTable()
    unasked = 0
    for run_id, stage, latency_ms, tokens_in, tokens_out, cost in table_rows(
            db_path, "SELECT run_id, stage, latency_ms, tokens_in, tokens_out, cost_usd FROM calls"):
        if latency_ms is None:
            unasked += 1
            assert (run_id, stage) == (1, "stage1")
        else:
            assert latency_ms > 0
        assert cost == pytest.approx(prices.cost("gpt-4o-mini", tokens_in, tokens_out) / 2)
    assert unasked == 1


def test_each_batch_request_takes_room_in_the_store_once(server, tmp_path):
    # A batch line's request is kept in batch_lines while the batch is open and moved
    # into its call when the batch is collected. The calls were written before the lines
    # were deleted, so the lines' pages were left free in the file: after a run whose
    # last batch held 7 requests the store kept 4 free pages (16 KB, the size of those
    # requests again; 17 pages for a last batch of 40).
    import sqlite3

    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=3, pairs=7)
    progress = run_pipeline(db_path, _options(server))     # one batch per stage
    assert progress.pairs_done == 7 and server.stats["batch_lines_answered"] == 17
    # every request is kept, as its call (the audit copy; resumes reuse it by its hash)
    assert table_rows(db_path, "SELECT COUNT(*), COUNT(request) FROM calls") == [(17, 17)]
    assert table_rows(db_path, "SELECT COUNT(*) FROM batch_lines") == [(0,)]
    conn = sqlite3.connect(str(db_path))
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()
    assert free_pages <= 1


def test_a_refusal_beside_another_runs_open_batch_counts_only_the_pairs_this_session_would_send(
        server, tmp_path):
    # Run A's open batch holds stage 1 of references 0 and 1 for its pairs 0, 1, 2 (refs
    # 0, 1, 0). A chat run with --limit 1 sends requests for pair 0 alone, but the refusal
    # counted every pending pair of A that shares a reference with it ("2 of these pairs").
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    chat = RunOptions(**{**options.__dict__, "backend": "openai", "limit": 1})
    with pytest.raises(RunBusyError) as caught:
        run_pipeline(db_path, chat)
    assert "holding requests for 1 of the 1 pairs this run would annotate" in str(caught.value)
    assert batch_a in str(caught.value) and server.stats["chat_requests"] == 0


def test_a_refusal_names_pairs_that_share_only_a_reference_image_with_another_runs_batch(server, tmp_path):
    # Run A (--limit 1: pair 0, reference 0) has its batch open. A chat run over all three
    # pairs would ask stage 1 of reference 0 for pair 2 too: 2 of its 3 pairs, one of them
    # only through its reference image. The count was A's pending pairs (1).
    db_path, options, _ = _stopped_run_with_a_batch_open(server, tmp_path, limit=1)
    with pytest.raises(RunBusyError) as caught:
        run_pipeline(db_path, RunOptions(**{**options.__dict__, "backend": "openai", "limit": None}))
    message = str(caught.value)
    assert "holding requests for 2 of the 3 pairs this run would annotate" in message
    assert "1 of them only through its reference image" in message


def test_dry_run_beside_a_batch_stored_before_its_lines_were_kept_counts_what_the_run_sends(
        server, tmp_path, capsys):
    # A batch submitted before migration m006 has no stored lines (batch_lines), only its
    # custom ids. The run waits for it and sends none of its requests, but --dry-run
    # matched open batches by stored lines alone and counted them as calls to pay for
    # (stage 1: 2, with their cost), saying nothing of the batch.
    from good4cir.cli import main as cli_main

    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    import sqlite3

    conn = sqlite3.connect(str(db_path))
    with conn:  # the store as a session before m006 left it
        conn.execute("DELETE FROM batch_lines")
    conn.close()
    new_run = RunOptions(**{**options.__dict__, "new_run": True})
    plan = plan_run(db_path, new_run)
    assert plan.calls_by_stage == {"stage1": 0, "stage2": 3, "stage3": 3}
    assert plan.awaited_in_batches == {batch_a: 2}
    assert plan_run(db_path, options).calls_by_stage == {"stage1": 0, "stage2": 3, "stage3": 3}
    assert cli_main(["annotate", "--db", str(db_path), "--backend", "openai-batch", "--base-url", server.url,
                     "--image-size", "128", "--new-run", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 calls" in out and f"2 more are in open batch {batch_a}" in out, out

    server.config.batch_delay = 0.1
    sent = server.stats["batch_lines_submitted"]
    progress = run_pipeline(db_path, new_run)
    assert progress.pairs_done == 3 and server.stats["batch_lines_submitted"] - sent == plan.calls


def test_sigkill_after_a_batch_is_collected_loses_no_answer_and_pays_none_twice(server, tmp_path):
    # Collecting a batch is where its answers are stored, once, as the asking run's calls:
    # a session killed as soon as that is committed (before or while the answers are
    # handed to its pairs) leaves them in the store, and the rerun reuses them.
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=3, pairs=5)
    server.config.batch_delay = 0.5
    _kill_batch_session_once(
        db_path, server, "5", lambda: table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE collected = 1")[0][0],
        poll=0.005)
    (first_batch,), = table_rows(db_path, "SELECT id FROM batches")
    assert table_rows(db_path, "SELECT run_id, COUNT(*) FROM calls WHERE batch_id = ? GROUP BY run_id",
                      [first_batch]) == [(1, 3)]

    server.config.batch_delay = 0.1
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 5, progress.failures
    assert server.stats["batch_lines_submitted"] == server.stats["batch_lines_answered"] == 3 + 2 * 5
    assert table_rows(db_path, "SELECT COUNT(*), COUNT(DISTINCT request_hash) FROM calls") == [(13, 13)]


# -- run-stopping errors and the user's stop with batches open or lines not yet sent

REFUSALS = {  # server switch -> what the run raises, and what its message tells the user
    "reject_auth": (RunAuthError, "OPENAI_API_KEY"),
    "reject_quota": (RunQuotaError, "credits"),
    "reject_not_found": (RunNotFoundError, "base URL"),
}


def _pairs_left_pending_and_batch_kept(db_path, batch_a) -> None:
    """Every pair pending, the run stopped, run A's open batch still stored to collect."""
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 3)]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    assert table_rows(db_path, "SELECT id, collected FROM batches") == [(batch_a, 0)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("place", ["upload", "create", "upload,create,poll"])
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_run_stopping_refusal_beside_an_open_batch_stops_at_once_and_a_rerun_collects_it(
        server, tmp_path, place, refusal):
    # Run 1 (--limit 1) left stage 1 of reference 0 open in a batch. Resumed over its 3
    # pairs, pairs 0 and 2 wait for that batch and pair 1 sends its own stage 1 line, which
    # the batch API refuses (a revoked key, no credits, a wrong URL). The runner stopped
    # sending, but the session waited on for the open batch (its 24 h window, here 120 s)
    # before it said why it stopped.
    error, said = REFUSALS[refusal]
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path, limit=1)
    resumed = RunOptions(**{**options.__dict__, "limit": None})
    server.config.refuse_at = place
    setattr(server.config, refusal, True)
    started = time.time()
    with pytest.raises(error) as caught:
        run_pipeline(db_path, resumed)
    assert time.time() - started < 20
    assert said in str(caught.value) and "stay pending" in str(caught.value)
    _pairs_left_pending_and_batch_kept(db_path, batch_a)
    assert server.stats["batch_lines_submitted"] == 1  # nothing more went out

    # Put right, the same command collects the open batch (nothing paid twice) and ends.
    setattr(server.config, refusal, False)
    server.config.batch_delay = 0.1
    progress = run_pipeline(db_path, resumed)
    assert progress.pairs_done == 3, progress.failures
    assert server.stats["batch_lines_submitted"] == 1 + 1 + 3 + 3
    assert (batch_a, 1) in table_rows(db_path, "SELECT batch_id, COUNT(*) FROM calls WHERE stage = 'stage1'"
                                               " AND status = 'ok' GROUP BY batch_id")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("refusal", ["reject_auth", "reject_quota"])
def test_a_refusal_while_polling_an_open_batch_stops_without_sending_its_lines_again(
        server, tmp_path, refusal):
    # Polling the open batch is refused (a key revoked mid-run: this server refuses only
    # the polls). The batch was taken for one this key cannot see and its lines went out
    # again in a new batch, paid twice.
    error, said = REFUSALS[refusal]
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path, limit=1)
    resumed = RunOptions(**{**options.__dict__, "limit": None})
    server.config.refuse_at = "poll"
    setattr(server.config, refusal, True)
    started = time.time()
    with pytest.raises(error) as caught:
        run_pipeline(db_path, resumed)
    assert time.time() - started < 20
    assert said in str(caught.value)
    assert server.stats["batch_lines_submitted"] <= 2, server.stats  # at most pair 1's own line
    (stored_a,), = table_rows(db_path, "SELECT collected FROM batches WHERE id = ?", [batch_a])
    assert stored_a == 0
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 3)]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]


@pytest.mark.timeout(60)
def test_an_unreachable_server_beside_an_open_batch_stops_with_the_pairs_pending(server, tmp_path):
    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path, limit=1)
    server.stop()  # nothing listens on its port any more
    started = time.time()
    with pytest.raises(RunUnreachableError):
        run_pipeline(db_path, RunOptions(**{**options.__dict__, "limit": None, "max_attempts": 2}))
    assert time.time() - started < 30
    _pairs_left_pending_and_batch_kept(db_path, batch_a)


@pytest.mark.timeout(60)
def test_a_server_gone_while_a_batch_is_open_stops_the_run_with_the_pairs_pending(server, tmp_path):
    # Stage 1 was answered in this session, then the server went away with the stage 2
    # batch open. The batch run sends nothing else that would notice: it polled on and
    # failed, forever, with no error shown. Now a run of failed polls stops it.
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=3)
    handle = start_run_in_thread(db_path, _options(server))
    deadline = time.time() + 30
    while not table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE collected = 1")[0][0]:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    server.config.batch_delay = 120.0
    while table_rows(db_path, "SELECT COUNT(*) FROM batches")[0][0] < 2:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    server.stop()
    progress = handle.join(timeout=40)
    assert progress is not None and progress.status == "stopped", handle.progress
    assert isinstance(handle.error, RunUnreachableError) and "polls in a row" in str(handle.error)
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 3)]
    assert table_rows(db_path, "SELECT collected FROM batches ORDER BY created_at") == [(1,), (0,)]


@pytest.mark.timeout(60)
def test_the_cli_says_why_a_batch_run_stopped_with_exit_status_1(server, tmp_path, monkeypatch, capsys):
    from good4cir.cli import main as cli_main

    db_path, options, batch_a = _stopped_run_with_a_batch_open(server, tmp_path, limit=1)
    server.config.refuse_at = "create"
    server.config.reject_quota = True
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # else the CLI re-raises, for pytest
    assert cli_main(["annotate", "--db", str(db_path), "--backend", "openai-batch", "--base-url", server.url,
                     "--poll-interval", "0.05", "--flush-interval", "0.1", "--image-size", "128",
                     "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: run 1 stopped: quota exceeded (429)") and "credits" in err, err
    _pairs_left_pending_and_batch_kept(db_path, batch_a)


@pytest.mark.timeout(60)
def test_a_stop_with_lines_not_yet_sent_ends_at_once_and_sends_nothing(server, tmp_path):
    # The pool goes out only after 30 s without a new request: the stop comes before.
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=3)
    handle = start_run_in_thread(db_path, _options(server, flush_interval=30.0))
    deadline = time.time() + 30
    while not (handle.progress and handle.progress.run_id):
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    time.sleep(0.5)  # the stage 1 lines are pooled
    started = time.time()
    handle.stop()
    progress = handle.join(timeout=30)
    assert progress is not None and progress.status == "stopped" and time.time() - started < 5
    assert progress.pairs_pending == 3
    assert server.stats["files_uploaded"] == server.stats["batches_created"] == 0
    assert table_rows(db_path, "SELECT COUNT(*) FROM batches") == [(0,)]
    assert run_pipeline(db_path, _options(server)).pairs_done == 3


@pytest.mark.timeout(60)
def test_status_says_a_stopped_run_has_batches_open_on_the_server(server, tmp_path, capsys):
    # `annotate --dry-run` said that answers were waiting in an open batch; `status`, the
    # command a user runs to see where a run is, said only 'stopped with 3 pairs pending'.
    import json

    from good4cir.cli import main as cli_main

    db_path, _, batch_a = _stopped_run_with_a_batch_open(server, tmp_path)
    assert cli_main(["status", "--db", str(db_path)]) == 0
    out = capsys.readouterr().out
    assert "run 1 has 1 batch open on the server" in out and "collects" in out, out
    assert cli_main(["status", "--db", str(db_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["open_batches"] == 1
