"""A fault storm against the real client: 429 with Retry-After, 500s, timeouts, bodies
that are not JSON, answers that are not JSON or fail validation, truncated answers.
The run ends with every pair done or failed with its reason."""

from __future__ import annotations

from datetime import datetime

import pytest

from openai_server import start_server
from pipeline.runner import RunOptions, run_pipeline
from pipeline_world import build_world, table_rows

REASONS = {"invalid answer", "retries exhausted", "retry budget spent"}


@pytest.fixture
def server():
    handle = start_server(seed=7, rate_429=0.12, rate_500=0.1, rate_timeout=0.04, timeout_sleep=1.0,
                          rate_malformed_body=0.05, rate_malformed_answer=0.06, rate_length=0.05,
                          rate_invalid_answer=0.04, retry_after=0.2)
    yield handle
    handle.stop()


def test_fault_storm_ends_with_every_pair_done_or_failed_with_its_reason(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-storm-0123456789")
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=8, pairs=24)
    options = RunOptions(base_url=server.url, concurrency=8, timeout=0.4, backoff_base=0.02,
                         backoff_max=0.5, max_attempts=4)
    progress = run_pipeline(db_path, options)
    assert progress.status == "finished"
    rows = table_rows(db_path, "SELECT status, error FROM annotations")
    assert len(rows) == 24 and {s for s, _ in rows} <= {"done", "failed"}
    assert progress.pairs_done + progress.pairs_failed == 24
    assert progress.pairs_done >= 12  # most pairs get through the storm
    for status, error in rows:
        if status == "failed":
            assert error and error.split(": ", 1)[0] in REASONS, error
    # every attempt is stored, with what went wrong
    errors = [e for (e,) in table_rows(db_path, "SELECT error FROM calls WHERE status = 'error'")]
    kinds = {e.split(":", 1)[0].split(" (", 1)[0] for e in errors}
    assert {"rate limited", "server error", "timeout", "malformed response"} <= kinds, kinds
    # truncated and unparseable answers were sent for repair
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE stage = 'repair'")[0][0] >= 1
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE error = 'finish_reason: length'")[0][0] >= 1
    # Retry-After honoured: the next attempt of a rate-limited request waited >= 0.2 s
    attempts = table_rows(db_path, "SELECT request_hash, status, error, created_at, latency_ms"
                                   " FROM calls ORDER BY id")
    gaps = []
    for i, (key, status, error, at, _) in enumerate(attempts):
        if status == "error" and error.startswith("rate limited"):
            later = next((a for a in attempts[i + 1:] if a[0] == key), None)
            if later:
                waited = (datetime.fromisoformat(later[3]) - datetime.fromisoformat(at)).total_seconds()
                gaps.append(waited - later[4] / 1000)  # minus the next attempt's own latency
    assert gaps and min(gaps) >= 0.19, gaps
    # status agrees with the annotations
    assert sum(progress.failures.values()) == progress.pairs_failed


def test_retry_budget_bounds_the_retries_of_a_run(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-storm-0123456789")
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=6)
    for name in ("rate_timeout", "rate_malformed_body", "rate_malformed_answer", "rate_length",
                 "rate_invalid_answer", "rate_429"):
        setattr(server.config, name, 0.0)
    server.config.rate_500 = 1.0
    progress = run_pipeline(db_path, RunOptions(base_url=server.url, concurrency=2, retry_budget=3,
                                                backoff_base=0.01, max_attempts=10))
    assert progress.pairs_failed == 6
    assert set(progress.failures) <= {"retry budget spent"}
    # 3 retries in all, plus one first attempt per distinct request that was tried
    assert server.stats["chat_requests"] == 3 + 2


def test_the_retry_budget_is_the_runs_across_sessions(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-storm-0123456789")
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=1, pairs=2)
    for name in ("rate_429", "rate_timeout", "rate_malformed_body", "rate_malformed_answer",
                 "rate_length", "rate_invalid_answer"):
        setattr(server.config, name, 0.0)
    server.config.rate_500 = 1.0
    options = dict(base_url=server.url, concurrency=1, retry_budget=2, backoff_base=0.01, max_attempts=10)
    run_pipeline(db_path, RunOptions(**options))
    assert server.stats["chat_requests"] == 1 + 2
    run_pipeline(db_path, RunOptions(**options, retry_failed=True))
    assert server.stats["chat_requests"] == 3 + 1  # one first attempt, no retries left
    run_pipeline(db_path, RunOptions(**{**options, "retry_budget": 4}, retry_failed=True))
    assert server.stats["chat_requests"] == 4 + 1 + 2  # a budget of 4 leaves 2 retries after 2 used
