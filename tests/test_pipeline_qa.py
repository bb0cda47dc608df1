"""Less-travelled paths of the pipeline, each test a regression test for a defect found
by exercising it as a user would (the real `openai` client against the local server)."""

from __future__ import annotations

import time

import pytest

from openai_server import fresh_server_fixture, server_fixture
from pipeline.pricing import EST_TEXT_TOKENS_IN, EST_TOKENS_OUT, PriceTable
from pipeline.runner import RunNotFoundError, RunOptions, RunQuotaError, plan_run, run_pipeline, start_run_in_thread
from pipeline_world import build_world, table_rows

KEY = "sk-test-qa-0123456789abcdef"

server = server_fixture()
fresh_server = fresh_server_fixture(KEY)


def _world(tmp_path, references: int, pairs: int):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=references, pairs=pairs)
    return db_path


def _options(server, backend: str = "openai", **kw) -> RunOptions:
    base = dict(backend=backend, base_url=server.url, concurrency=2, backoff_base=0.01, timeout=10,
                image_max_side=128)
    if backend == "openai-batch":
        base.update(concurrency=None, poll_interval=0.05, flush_interval=0.1)
    base.update(kw)
    return RunOptions(**base)


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_a_server_refusing_response_format_with_422_steps_down_like_a_400(server, tmp_path, backend):
    # FastAPI-style OpenAI-compatible servers (TGI, many wrappers) answer an unknown or
    # unsupported field with 422 Unprocessable Entity, not 400: every pair used to fail
    # as 'request rejected (422)' instead of the run stepping down to plain text.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.batch_delay = 0.05
    server.config.reject_json_schema = server.config.reject_json_object = True
    server.config.reject_format_status = 422
    progress = run_pipeline(db_path, _options(server, backend, model="local-vlm"))
    assert progress.pairs_done == 2 and progress.pairs_failed == 0, progress.failures
    assert server.stats["rejected_json_schema"] == 1 and server.stats["rejected_json_object"] == 1


def test_a_batch_create_that_times_out_after_the_provider_made_it_is_adopted_not_paid_again(
        server, tmp_path):
    # The provider makes the batch at once but answers the create after the client's
    # timeout. The client's own retries used to make two more batches, and the lines then
    # went out again as new batches: one stage 1 line paid 18 times, and the pairs failed.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.batch_delay = 0.05
    server.config.batch_create_response_delay = 1.0
    earlier = set(server.state.batches)  # the server is shared by this module's tests
    progress = run_pipeline(db_path, _options(server, "openai-batch", timeout=0.4))
    assert progress.pairs_done == 2, progress.failures
    # one batch per stage, each line answered once: 1 stage 1 + 2 stage 2 + 2 stage 3
    assert server.stats["batches_created"] == 3
    assert server.stats["batch_lines_submitted"] == server.stats["batch_lines_answered"] == 5
    stored = table_rows(db_path, "SELECT id, status FROM batches ORDER BY created_at")
    assert [status for _, status in stored] == ["completed"] * 3
    assert {batch_id for batch_id, _ in stored} == set(server.state.batches) - earlier


def test_a_batch_refused_for_a_full_queue_waits_for_room_instead_of_failing_its_pairs(server, tmp_path):
    # Past the enqueued token limit the Batch API fails a new batch at once
    # (token_limit_exceeded). Its lines used to go out again at once, fail the same way,
    # and their pairs failed as 'retries exhausted' within seconds while the batches
    # already queued were still running.
    db_path = _world(tmp_path, references=4, pairs=4)
    server.config.batch_delay = 0.4
    server.config.batch_queue_limit = 2  # lines enqueued at once
    progress = run_pipeline(db_path, _options(server, "openai-batch", max_batch_requests=1,
                                              max_attempts=2))
    assert progress.pairs_done == 4 and progress.failures == {}
    assert server.stats["batches_failed"] >= 2  # the queue did overflow
    # nothing ran in a refused batch, nothing was paid twice, and no attempt was spent
    assert server.stats["batch_lines_submitted"] == server.stats["batch_lines_answered"] == 4 + 4 + 4
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'error'") == [(0,)]


def test_the_batch_deadline_counts_from_submission_across_a_restart(server, tmp_path):
    # A restarted session used to start a stored batch's clock again, so a run resumed
    # now and then never gave up on a batch the provider left hanging.
    db_path = _world(tmp_path, references=1, pairs=1)
    server.config.batch_delay = 120.0  # the provider never finishes it
    timeout = 3.0
    options = _options(server, "openai-batch", batch_timeout=timeout)
    handle = start_run_in_thread(db_path, options)
    deadline = time.time() + 30
    while not table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE status = 'validating'")[0][0]:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    submitted = time.time()
    handle.stop()
    assert handle.join(timeout=30).status == "stopped"
    (batch_id,), = table_rows(db_path, "SELECT id FROM batches")
    time.sleep(max(0.0, submitted + timeout + 0.2 - time.time()))  # its window is over

    handle = start_run_in_thread(db_path, options)
    assert handle.wait_started(timeout=30)
    resumed = time.time()
    # cancelled at the first poll, not a whole window after the restart
    while server.state.batches[batch_id]["status"] not in ("cancelling", "cancelled"):
        assert time.time() - resumed < timeout * 0.75, "the restarted session gave the batch a new window"
        time.sleep(0.02)
    handle.stop()
    handle.join(timeout=30)


@pytest.mark.parametrize("method", ["staged", "single"])
def test_dry_run_counts_only_the_calls_a_new_run_will_pay_for(server, tmp_path, method):
    # A second run over pairs already answered (--new-run, or another split) reads every
    # stored answer back and pays nothing, but the dry run used to count a stage 3 (or
    # single) call for every pair.
    db_path = _world(tmp_path, references=2, pairs=4)
    run_pipeline(db_path, _options(server, method=method, limit=3))
    paid = server.stats["chat_requests"]
    plan = plan_run(db_path, _options(server, method=method, new_run=True))
    progress = run_pipeline(db_path, _options(server, method=method, new_run=True))
    assert progress.pairs_done == 4
    made = server.stats["chat_requests"] - paid
    assert plan.calls == made == (2 if method == "staged" else 1)  # the one pair never annotated
    assert plan.calls_by_stage.get("stage3", 0) == (1 if method == "staged" else 0)


def test_an_account_out_of_credits_stops_the_run_with_its_pairs_pending(server, tmp_path):
    # OpenAI answers 429 insufficient_quota once the credits are spent. It was retried as a
    # rate limit, every pair failed as 'retries exhausted' and the run said 'finished'.
    db_path = _world(tmp_path, references=3, pairs=12)
    server.config.reject_quota = True
    with pytest.raises(RunQuotaError) as caught:
        run_pipeline(db_path, _options(server))
    assert str(caught.value).startswith("run 1 stopped: quota exceeded (429)")
    assert "Add credits to the account" in str(caught.value)
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 12)]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    assert server.stats["rejected_quota"] <= 2  # concurrency 2: not retried, not one per pair
    server.config.reject_quota = False  # credits added: the same options resume and finish
    progress = run_pipeline(db_path, _options(server))
    assert progress.run_id == 1 and progress.pairs_done == 12


def test_a_restart_finds_lines_an_earlier_session_sent_in_a_lower_response_format(server, tmp_path):
    # A batch's lines are known by a hash that includes the response format. A session
    # that had stepped down (the server refuses json_schema) left a batch in json_object;
    # the restarted session, back at json_schema, did not recognise it and paid again.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.batch_delay = 0.05
    server.config.reject_json_schema = True
    options = _options(server, "openai-batch")
    handle = start_run_in_thread(db_path, options)
    deadline = time.time() + 30
    while table_rows(db_path, "SELECT status FROM batches") != [("completed",)]:  # the refused one
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.01)
    server.config.batch_delay = 120.0  # the stage 1 line, sent again as json_object, stays open
    while len(table_rows(db_path, "SELECT id FROM batches WHERE status = 'validating'")) < 1:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.01)
    handle.stop()
    assert handle.join(timeout=30).status == "stopped"
    assert server.stats["batch_lines_submitted"] == 2

    server.config.batch_delay = 0.05  # the open batch finishes on the provider's side
    progress = run_pipeline(db_path, options)
    assert progress.pairs_done == 2
    # 2 stage 1 lines (refused, then json_object) + 2 stage 2 + 2 stage 3: none paid twice,
    # and the restarted session kept the format the first one had learned
    assert server.stats["batch_lines_submitted"] == 6 and server.stats["rejected_json_schema"] == 1


def test_stopping_a_batch_run_is_a_stop_not_an_error(server, tmp_path):
    # A stop cancels the batch run's waiting pairs at once (no grace: answers may be hours
    # away). That cancellation used to escape as the run's error: the app's Pipeline tab
    # showed 'CancelledError', and Ctrl-C in the CLI said 'interrupted' instead of
    # 'rerun the same command to resume'.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.batch_delay = 120.0
    handle = start_run_in_thread(db_path, _options(server, "openai-batch"))
    deadline = time.time() + 30
    while not table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE status = 'validating'")[0][0]:
        assert handle.running and time.time() < deadline, handle.error
        time.sleep(0.02)
    handle.stop()
    progress = handle.join(timeout=30)
    assert progress.status == "stopped" and progress.pairs_pending == 2
    assert handle.error is None, repr(handle.error)
    assert handle.result is not None and handle.result.status == "stopped"


def test_dry_run_estimates_images_as_openai_bills_them_for_the_default_model():
    # gpt-4o-mini (the default model) bills an image as 2833 tokens at 'low' detail (the
    # same dollars as gpt-4o's 85), so stage 1 and 2 cost several times what the dry run
    # said when it counted 85 for every model.
    prices = PriceTable()
    stage1 = EST_TEXT_TOKENS_IN["stage1"], EST_TOKENS_OUT["stage1"]
    for model, detail, image in [("gpt-4o-mini", "low", 2833), ("gpt-4o-mini-2024-07-18", "high", 2833 + 5667),
                                 ("gpt-4o", "low", 85), ("gpt-4o", "high", 85 + 170),
                                 ("gpt-4.1-mini", "low", round(256 * 1.62))]:
        expected = prices.cost(model, stage1[0] + image, stage1[1])
        assert prices.estimate(model, {"stage1": 1}, detail=detail) == pytest.approx(expected), model
    # a batch estimate is half; a larger image costs more where the model bills by size
    assert prices.estimate("gpt-4o-mini", {"single": 2}, batch=True) == pytest.approx(
        prices.estimate("gpt-4o-mini", {"single": 1}))
    assert prices.estimate("gpt-4.1-mini", {"stage1": 1}, image_max_side=1024) > \
        prices.estimate("gpt-4.1-mini", {"stage1": 1}, image_max_side=512)


def test_retry_failed_with_the_batch_backend_asks_again_instead_of_rereading_the_old_batch(
        server, tmp_path):
    # --retry-failed discards the stored answers that did not validate. The batch backend
    # then found the same lines in the run's stored batch and read the same bad answers
    # back: nothing was retried, the pairs failed again, and their cost was counted twice.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.batch_delay = 0.05
    server.config.batch_invalid_answer_rate = 1.0  # stage 1 and its repair both fail validation
    options = _options(server, "openai-batch")
    progress = run_pipeline(db_path, options)
    assert progress.failures == {"invalid answer": 2}
    assert server.stats["batch_lines_submitted"] == 2  # stage 1, then its repair

    server.config.batch_invalid_answer_rate = 0.0
    progress = run_pipeline(db_path, RunOptions(**{**options.__dict__, "retry_failed": True}))
    assert progress.pairs_done == 2 and progress.failures == {}
    assert server.stats["batch_lines_submitted"] == 2 + 1 + 2 + 2  # stage 1 asked again
    # every stored call was paid once: one stored answer per line sent
    calls, = table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok'")
    assert calls == (server.stats["batch_lines_submitted"],)


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_a_base_url_without_v1_stops_the_run_instead_of_failing_every_pair(server, tmp_path, backend):
    # A --base-url without /v1 (or, on OpenAI, a mistyped --model: 404 model_not_found) is
    # no pair's fault: every pair used to fail as 'request rejected (404)', the run 'finished'.
    db_path = _world(tmp_path, references=3, pairs=12)
    options = _options(server, backend, base_url=server.url.removesuffix("/v1"))
    with pytest.raises(RunNotFoundError) as caught:
        run_pipeline(db_path, options)
    assert str(caught.value).startswith("run 1 stopped: not found (404)")
    assert "ends in /v1" in str(caught.value)
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 12)]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]


def test_limit_caps_a_resumed_session_at_its_first_pairs(server, tmp_path):
    # --limit is how a user caps spend. A session interrupted under a larger limit left its
    # pairs pending, and a rerun with a smaller --limit annotated (and paid for) all of them.
    db_path = _world(tmp_path, references=6, pairs=6)
    server.config.hold = True  # the first session makes no progress before it is stopped
    handle = start_run_in_thread(db_path, _options(server, limit=6, stop_grace=0.1))
    assert handle.wait_started(timeout=30)
    handle.stop()
    assert handle.join(timeout=30).status == "stopped"
    server.config.hold = False
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 6)]

    options = _options(server, limit=2)
    plan = plan_run(db_path, options)
    progress = run_pipeline(db_path, options)
    assert progress.run_id == 1 and progress.status == "finished"
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [
        ("done", 2), ("pending", 4)]
    ok_calls, = table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok'")
    assert ok_calls == (plan.calls,) == (2 + 2 + 2,)  # stages 1, 2, 3 of two pairs


def test_a_refused_cancel_of_a_late_batch_keeps_waiting_for_it_instead_of_paying_again(server, tmp_path):
    # Past batch_timeout the backend cancels a batch. A refused cancel (the provider will
    # not cancel a batch that is finalizing) marked the batch unreadable, and its lines
    # went out again in a new batch while the first one still finished: paid twice.
    db_path = _world(tmp_path, references=1, pairs=1)
    server.config.batch_delay = 0.8
    server.config.batch_cancel_refused = True
    progress = run_pipeline(db_path, _options(server, "openai-batch", batch_timeout=0.2))
    assert progress.pairs_done == 1
    assert server.stats["batch_cancels_refused"] >= 1
    assert server.stats["batch_lines_submitted"] == 3  # stages 1, 2 and 3, each sent once


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_a_server_without_usage_is_said_once_not_reported_as_free(server, tmp_path, caplog, backend):
    # An OpenAI-compatible server (or proxy) that sends no `usage` made a priced model's
    # run report $0, as if it had cost nothing, without a word.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.batch_delay = 0.05
    server.config.omit_usage = True
    with caplog.at_level("WARNING", logger="good4cir.pipeline"):
        progress = run_pipeline(db_path, _options(server, backend, model="gpt-4o-mini"))
    assert progress.pairs_done == 2 and progress.cost_usd == 0
    said = [r.getMessage() for r in caplog.records if "reported no token usage" in r.getMessage()]
    assert len(said) == 1 and "gpt-4o-mini" in said[0]


@pytest.mark.parametrize("limit", [-1, 0])
def test_a_limit_below_one_is_refused_not_read_as_no_limit(server, tmp_path, limit):
    # SQLite reads LIMIT -1 as no limit: `--limit -1` annotated (and paid for) every pair.
    db_path = _world(tmp_path, references=1, pairs=3)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        plan_run(db_path, _options(server, limit=limit))
    with pytest.raises(ValueError, match="limit must be at least 1"):
        run_pipeline(db_path, _options(server, limit=limit))
    assert server.stats["chat_requests"] == 0
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(0,)]


@pytest.mark.parametrize("option, value, said", [
    ("timeout", 0.0, "timeout must be more than 0, not 0"),
    ("max_attempts", 0, "max attempts must be at least 1, not 0"),
    ("max_tokens", 0, "max tokens must be at least 1, not 0"),
    ("retry_budget", -1, "retry budget must be at least 0, not -1"),
    ("poll_interval", 0.0, "poll interval must be more than 0, not 0"),
    ("flush_interval", -1.0, "flush interval must be at least 0, not -1"),
])
def test_numbers_a_run_cannot_use_are_refused_before_any_call(server, tmp_path, option, value, said):
    # `--timeout 0` timed every request out (each pair failed after 6 attempts) and
    # `--max-attempts 0` or `--retry-budget -1` ran as if they meant something else.
    db_path = _world(tmp_path, references=1, pairs=2)
    for call in (plan_run, run_pipeline):
        with pytest.raises(ValueError) as raised:
            call(db_path, _options(server, **{option: value}))
        assert str(raised.value) == said
    assert server.stats["chat_requests"] == 0
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(0,)]


@pytest.mark.parametrize("method", ["staged", "single"])
def test_dry_run_of_more_pairs_than_sqlite_allows_variables(server, tmp_path, monkeypatch, method):
    # The dry run put every pending pair (and every description key) in one `IN (...)`:
    # past the SQLite build's variable limit (32766 in many builds; CIRR alone has 28k
    # training pairs) it failed with 'too many SQL variables'. Here the limit is made small.
    import sqlite3

    import pipeline.runner as runner

    db_path = _world(tmp_path, references=3, pairs=30)
    run_pipeline(db_path, _options(server, method=method, limit=4))
    real_open = runner.open_db

    def open_small(path):
        db = real_open(path)
        db.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 20)
        return db

    monkeypatch.setattr(runner, "open_db", open_small)
    monkeypatch.setattr(runner, "SQL_CHUNK", 10, raising=False)  # absent before the fix
    plan = plan_run(db_path, _options(server, method=method))
    assert plan.pairs == 26 and plan.calls == (26 + 26 if method == "staged" else 26)


def test_credentials_in_the_base_url_never_reach_the_store(server, tmp_path):
    # Some proxies take a key in the URL (https://user:key@host/v1). The runs row, its
    # settings and every stored request used to keep it verbatim.
    db_path = _world(tmp_path, references=1, pairs=2)
    secret = "pw-SENTINEL-7f3a"
    url = server.url.replace("://", f"://alice:{secret}@", 1)
    options = _options(server, base_url=url)
    progress = run_pipeline(db_path, options)
    assert progress.pairs_done == 2 and progress.calls > 0, progress.failures
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert secret.encode() not in stored and b"alice" not in stored
    assert table_rows(db_path, "SELECT base_url FROM runs") == [(server.url,)]
    # The same command resumes the same run instead of starting (and paying for) a new one.
    calls = server.stats["chat_requests"]
    run_pipeline(db_path, options)
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(1,)]
    assert server.stats["chat_requests"] == calls


@pytest.mark.parametrize("credentials", ["userinfo", "query"])
def test_a_server_echoing_the_base_urls_credentials_does_not_get_them_stored_or_shown(server, tmp_path, credentials):
    # A refusal that echoes what it was sent (the 401's "Incorrect API key provided: ...")
    # had the API key scrubbed, but not a key in the --base-url: user info goes out as
    # "Basic base64(user:password)", a query key as it is, and both were stored in the
    # call's error and printed in the run's stop message.
    import base64

    from pipeline.runner import RunAuthError

    db_path = _world(tmp_path, references=1, pairs=1)
    secret = "pw-SENTINEL-7f3a"
    if credentials == "userinfo":
        url = server.url.replace("://", f"://alice:{secret}@", 1)
        echoed = base64.b64encode(f"alice:{secret}".encode()).decode()
    else:
        url, echoed = server.url + f"?api-key={secret}", secret
    server.config.reject_auth = True
    try:
        with pytest.raises(RunAuthError) as caught:
            run_pipeline(db_path, _options(server, base_url=url))
    finally:
        server.config.reject_auth = False
    assert "Incorrect API key provided" in str(caught.value)
    assert secret not in str(caught.value) and echoed not in str(caught.value), str(caught.value)
    errors = table_rows(db_path, "SELECT error FROM calls WHERE status = 'error'")
    assert errors and all(secret not in e and echoed not in e for (e,) in errors), errors
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert secret.encode() not in stored and echoed.encode() not in stored


def test_redact_url_keeps_the_address_and_drops_what_is_secret():
    from store.redaction import redact_url

    assert redact_url("https://u:p@vlm.example.org:8443/v1") == "https://vlm.example.org:8443/v1"
    assert redact_url("https://h/v1?api-key=abc&region=eu") == "https://h/v1?api-key=[redacted]&region=eu"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url(None) is None


def test_a_server_that_cannot_be_reached_stops_the_run_instead_of_failing_every_pair(tmp_path, monkeypatch):
    # A --base-url with the wrong port (or a local server not started yet): every pair was
    # retried, then failed as 'retries exhausted', and the run 'finished' with exit status 0.
    import socket

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-unreachable-0123456789")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db_path = _world(tmp_path, references=3, pairs=6)
    options = RunOptions(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", concurrency=2,
                         backoff_base=0.01, backoff_max=0.02, max_attempts=2, timeout=5)
    with pytest.raises(ValueError, match=rf"cannot reach the server at http://127.0.0.1:{port}/v1") as caught:
        run_pipeline(db_path, options)
    assert "--base-url" in str(caught.value) and "stay pending" in str(caught.value)
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 6)]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]


def test_a_split_the_store_does_not_have_names_the_splits_it_has(tmp_path):
    # A mistyped --split said 'the store has no pairs of split 'tran': import some first',
    # and the dry run counted 0 calls as if all were well.
    db_path = _world(tmp_path, references=2, pairs=2)
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE pairs SET split = 'train'")
    options = RunOptions(backend="openai", base_url="http://127.0.0.1:9/v1", split="tran")
    for call in (plan_run, run_pipeline):
        with pytest.raises(ValueError, match=r"no pairs of split 'tran' \(splits present: train\)"):
            call(db_path, options)
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(0,)]


def test_an_unreachable_server_stops_the_run_in_a_store_with_earlier_answers(server, tmp_path, monkeypatch):
    # 'No answer yet' was read from the whole store: after one run against a server that
    # answered, a second one at a wrong port (another model, another local server) retried
    # every pair, failed all of them as 'retries exhausted' and 'finished'.
    import socket

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-unreachable-0123456789")
    db_path = _world(tmp_path, references=3, pairs=6)
    assert run_pipeline(db_path, _options(server)).pairs_done == 6
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = RunOptions(backend="openai", model="another-model", base_url=f"http://127.0.0.1:{port}/v1",
                         concurrency=2, backoff_base=0.01, backoff_max=0.02, max_attempts=2, timeout=5)
    with pytest.raises(ValueError, match=rf"cannot reach the server at http://127.0.0.1:{port}/v1"):
        run_pipeline(db_path, options)
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations WHERE run_id = 2 GROUP BY status") \
        == [("pending", 6)]
