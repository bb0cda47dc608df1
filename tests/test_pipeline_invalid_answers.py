"""A model whose answers never validate (prose, or JSON of another shape) stops the run
after a few pairs, its other pairs left pending, instead of paying a request and a repair
for every pair; a model that slips now and then never stops. The real `openai` client
against the local server (tests/openai_server.py), a real store."""

from __future__ import annotations

import pytest

from good4cir.cli import main as cli_main
from openai_server import fresh_server_fixture, server_fixture
from pipeline.runner import INVALID_ANSWERS_TO_STOP, RunInvalidAnswersError, RunOptions, run_pipeline
from pipeline_world import build_world, table_rows

KEY = "sk-test-invalid-answers-0123456789"
N = INVALID_ANSWERS_TO_STOP
PAIRS = 40
CONCURRENCY = 2

server = server_fixture()
fresh_server = fresh_server_fixture(KEY)


def _world(tmp_path, references: int = PAIRS, pairs: int = PAIRS):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=references, pairs=pairs)
    return db_path


def _options(server, backend: str = "openai", **kw) -> RunOptions:
    base = dict(backend=backend, base_url=server.url, model="local-vlm", concurrency=CONCURRENCY,
                backoff_base=0.01, timeout=10, image_max_side=64)
    if backend == "openai-batch":
        base.update(poll_interval=0.05, flush_interval=0.3)
    base.update(kw)
    return RunOptions(**base)


def _statuses(db_path) -> dict[str, int]:
    return dict(table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status"))


@pytest.mark.parametrize("method", ["staged", "single"])
def test_a_model_answering_prose_stops_the_run_after_a_few_pairs_with_the_rest_pending(
        server, tmp_path, method):
    # Every pair paid its request and a repair request, failed as 'invalid answer', and the
    # run went on: 80 paid calls for 40 pairs, 20,000 for 10,000, and nothing to show.
    db_path = _world(tmp_path)
    server.config.answer_style = "prose"
    with pytest.raises(RunInvalidAnswersError) as caught:
        run_pipeline(db_path, _options(server, method=method))
    said = str(caught.value)
    assert said.startswith("run 1 stopped: ") and "local-vlm" in said
    assert "The room has a bed" in said and "not valid JSON" in said  # what it answered, and why not
    assert "structured output" in said and "--retry-failed" in said
    # A request and a repair per failed pair, and at most the calls in flight at the stop.
    assert server.stats["chat_requests"] <= 2 * N + CONCURRENCY, server.stats
    statuses = _statuses(db_path)
    assert N <= statuses["failed"] <= N + CONCURRENCY and statuses.get("done", 0) == 0
    assert statuses["pending"] == PAIRS - statuses["failed"]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    # every paid answer is stored
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls") == [(server.stats["chat_requests"],)]


def test_the_cli_says_so_with_exit_status_1_and_a_fixed_server_resumes_every_pair(
        server, tmp_path, monkeypatch, capsys):
    db_path = _world(tmp_path, references=10)
    server.config.answer_style = "prose"
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # else the CLI re-raises, for pytest
    args = ["annotate", "--db", str(db_path), "--backend", "openai", "--base-url", server.url,
            "--model", "local-vlm", "--concurrency", str(CONCURRENCY), "--image-size", "64",
            "--no-progress"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: run 1 stopped: ") and "--retry-failed" in err, err
    # The server now answers in JSON (say, restarted with structured outputs): the same
    # command with --retry-failed asks again for the failed pairs and does the rest.
    server.config.answer_style = ""
    assert cli_main(args + ["--retry-failed"]) == 0
    assert _statuses(db_path) == {"done": PAIRS}


def test_a_model_that_slips_now_and_then_never_stops_the_run(server, tmp_path):
    # Answers fail validation at random (each repair too), so more than N pairs fail in
    # all, some of them among the first: the run goes on to the end.
    db_path = _world(tmp_path)
    server.config.rate_invalid_answer = 0.6
    progress = run_pipeline(db_path, _options(server, method="single", concurrency=1))
    assert progress.status == "finished"
    assert progress.pairs_done + progress.pairs_failed == PAIRS
    assert progress.pairs_failed > N and progress.failures == {"invalid answer": progress.pairs_failed}


def test_once_an_answer_validated_the_run_never_stops_for_invalid_ones(server, tmp_path):
    # The first pair is answered in JSON, every later answer is prose: a model that can
    # answer in the format is not stopped, however its later answers go.
    db_path = _world(tmp_path)

    def turn_to_prose(progress) -> None:
        if progress.pairs_done:
            server.config.answer_style = "prose"

    progress = run_pipeline(db_path, _options(server, method="single", concurrency=1),
                            on_progress=turn_to_prose)
    assert progress.status == "finished"
    assert (progress.pairs_done, progress.pairs_failed) == (1, PAIRS - 1)


def test_a_resumed_run_with_earlier_successes_still_stops_when_this_sessions_answers_never_validate(
        server, tmp_path):
    # Pairs done by an earlier session say nothing of the model as served now (a server
    # restarted without its JSON support, another model under the same name).
    db_path = _world(tmp_path)
    assert run_pipeline(db_path, _options(server, method="single", limit=3)).pairs_done == 3
    server.config.answer_style = "prose"
    server.state.reset()
    with pytest.raises(RunInvalidAnswersError):
        run_pipeline(db_path, _options(server, method="single"))
    assert server.stats["chat_requests"] <= 2 * N + CONCURRENCY
    statuses = _statuses(db_path)
    assert statuses["done"] == 3 and statuses["pending"] >= PAIRS - 3 - N - CONCURRENCY


def test_the_batch_backend_stops_too_without_sending_another_batch(server, tmp_path):
    # With the Batch API a pair fails only once the batch holding its repair comes back,
    # so the pairs in flight (--concurrency: pairs, 5000 by default) are paid by then; the
    # stop saves the rest.
    db_path = _world(tmp_path)
    server.config.answer_style = "prose"
    server.config.batch_delay = 0.05
    with pytest.raises(RunInvalidAnswersError):
        run_pipeline(db_path, _options(server, "openai-batch", method="single", concurrency=4))
    statuses = _statuses(db_path)
    assert statuses.get("done", 0) == 0 and statuses["failed"] >= N
    # two batch lines (request, repair) per failed pair; nothing else was sent
    assert server.stats["batch_lines_submitted"] == 2 * statuses["failed"], server.stats
    assert statuses["failed"] <= N + 4 and statuses["pending"] == PAIRS - statuses["failed"]
    assert table_rows(db_path, "SELECT COUNT(*) FROM batches WHERE collected = 0") == [(0,)]
