"""OpenAI-compatible servers other than OpenAI (vLLM, Ollama, llama.cpp, LM Studio, TGI,
proxies) answer in their own ways; each test is one such habit, reproduced by the local
test server, and a regression test for a defect found running `annotate` against it."""

from __future__ import annotations

import pytest

from openai_server import fresh_server_fixture, server_fixture
from pipeline.runner import (RunImagesUnsupportedError, RunNotFoundError, RunOptions, RunQuotaError,
                             RunUnreachableError, run_pipeline)
from pipeline_world import build_world, table_rows

KEY = "sk-test-servers-0123456789abcdef"

server = server_fixture()
fresh_server = fresh_server_fixture(KEY)


def _world(tmp_path, references: int = 1, pairs: int = 2):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=references, pairs=pairs)
    return db_path


def _stopped_with_every_pair_pending(tmp_path, server, error, references: int, pairs: int, **kw) -> str:
    """A run over a new world that stops on `error` with none of its pairs touched; what
    the error says."""
    db_path = _world(tmp_path, references=references, pairs=pairs)
    with pytest.raises(error) as caught:
        run_pipeline(db_path, _options(server, **kw))
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY 1") == [("pending", pairs)]
    return str(caught.value)


def _options(server, backend: str = "openai", **kw) -> RunOptions:
    base = dict(backend=backend, base_url=server.url, model="local-vlm", concurrency=2,
                backoff_base=0.01, timeout=10, image_max_side=128)
    if backend == "openai-batch":
        base.update(concurrency=None, poll_interval=0.05, flush_interval=0.1)
    base.update(kw)
    return RunOptions(**base)


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_content_sent_as_a_list_of_text_parts_is_read_and_stored(server, tmp_path, backend):
    # Some servers (Mistral's API, proxies in front of Anthropic-style models) send
    # message.content as [{"type": "text", "text": ...}]. Every pair failed as 'internal
    # error: ValidationError', and the paid answers were never stored.
    db_path = _world(tmp_path)
    server.config.batch_delay = 0.05
    server.config.answer_style = "parts"
    progress = run_pipeline(db_path, _options(server, backend))
    assert progress.pairs_done == 2 and progress.pairs_failed == 0, progress.failures
    stored = table_rows(db_path, "SELECT response FROM calls WHERE status = 'ok'")
    assert len(stored) == 5 and all(text.startswith('{"') for (text,) in stored)


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_an_answer_sent_only_as_reasoning_content_is_used(server, tmp_path, backend):
    # A reasoning model behind vLLM's reasoning parser (or Ollama, LM Studio) whose end of
    # thinking the parser did not find: content is null and the whole text, the answer
    # included, is in reasoning_content. Every pair failed as 'the answer is empty' after
    # a paid repair request that could only come back empty too.
    db_path = _world(tmp_path)
    server.config.batch_delay = 0.05
    server.config.answer_style = "reasoning"
    progress = run_pipeline(db_path, _options(server, backend))
    assert progress.pairs_done == 2 and progress.pairs_failed == 0, progress.failures
    assert not table_rows(db_path, "SELECT 1 FROM calls WHERE stage = 'repair'")


@pytest.mark.parametrize("status", [400, 500, 404])
def test_a_text_only_model_stops_the_run_once_with_its_pairs_pending(server, tmp_path, status):
    # A text-only model refuses every image: vLLM with 400 ('... is not a multimodal
    # model'), llama.cpp without --mmproj with 500 ('image input is not supported'),
    # OpenRouter with 404 ('No endpoints found that support image input'). Every pair
    # failed on its own: with 400 after trying each response format, with 500 after every
    # retry (6 attempts with backoff per reference image), and the run 'finished'; the 404
    # stopped the run, but told the user to check the model name and the base URL.
    server.config.reject_images_status = status
    said = _stopped_with_every_pair_pending(tmp_path, server, RunImagesUnsupportedError, 3, 6, max_attempts=4)
    assert "local-vlm" in said and "image input" in said and "vision" in said
    assert server.stats["rejected_images"] <= 2  # concurrency 2: at most one each in flight


def test_a_model_the_server_lacks_stops_the_run_naming_the_models_it_has(server, tmp_path):
    # vLLM answers 404 'The model `x` does not exist.' (Ollama: 'model "x" not found, try
    # pulling it first'). The run stopped, but said only to check the model: the server
    # lists what it serves at /v1/models, and a local server's model name is rarely the
    # one the user guessed ('Qwen/Qwen2.5-VL-7B-Instruct', 'llava:13b').
    db_path = _world(tmp_path, references=2, pairs=4)
    server.config.served_models = ["Qwen/Qwen2.5-VL-7B-Instruct", "llava:13b"]
    with pytest.raises(RunNotFoundError) as caught:
        run_pipeline(db_path, _options(server, model="qwen-vl"))
    said = str(caught.value)
    assert "qwen-vl" in said and "Qwen/Qwen2.5-VL-7B-Instruct, llava:13b" in said
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY 1") == [("pending", 4)]


def test_a_200_whose_body_is_an_error_is_retried_and_named_by_the_servers_message(server, tmp_path):
    # Proxies (OpenRouter, LiteLLM) answer some upstream failures with HTTP 200 and a body
    # {"error": {...}}: it was retried, but stored and reported as 'malformed response: no
    # choices', dropping what the server said.
    db_path = _world(tmp_path, references=1, pairs=1)
    server.config.rate_error_body = 1.0
    progress = run_pipeline(db_path, _options(server, max_attempts=2))
    assert progress.pairs_failed == 1 and progress.failures == {"retries exhausted": 1}
    errors = table_rows(db_path, "SELECT error FROM calls")
    assert len(errors) == 2 and all("upstream model crashed" in e for (e,) in errors), errors


def test_a_500_refusing_the_response_format_steps_down_instead_of_retrying(server, tmp_path):
    # llama.cpp's server before it took json_schema (and ik_llama.cpp) answers it with 500
    # 'response_format type must be one of "text" or "json_object", but got: json_schema'.
    # A 500 is retried: every request was sent max_attempts times with backoff and every
    # pair failed as 'retries exhausted'.
    db_path = _world(tmp_path)
    server.config.reject_json_schema = True
    server.config.reject_format_status = 500
    progress = run_pipeline(db_path, _options(server, max_attempts=3))
    assert progress.pairs_done == 2 and progress.pairs_failed == 0, progress.failures
    assert server.stats["rejected_json_schema"] == 1 and server.requests[-1]["response_format"] == {
        "type": "json_object"}


def test_a_server_slower_than_the_timeout_is_named_with_the_timeout_to_raise(server, tmp_path):
    # A local VLM on a slow machine takes longer than --timeout for every request: each
    # pair failed as 'retries exhausted: ... timeout: APITimeoutError: Request timed out.',
    # which did not say which limit, nor that --timeout raises it.
    db_path = _world(tmp_path, references=1, pairs=1)
    server.config.rate_timeout = 1.0
    server.config.timeout_sleep = 1.0
    progress = run_pipeline(db_path, _options(server, max_attempts=1, timeout=0.3))
    assert progress.failures == {"retries exhausted": 1}
    (error,) = table_rows(db_path, "SELECT error FROM calls")[0]
    assert "0.3 s" in error and "--timeout" in error, error


def test_a_think_block_before_the_answer_is_not_taken_for_it(server, tmp_path):
    # A reasoning model served without a reasoning parser (llama.cpp without
    # --reasoning-format, older Ollama) writes '<think>...</think>' in content before the
    # answer, often with a draft of it. The first JSON object in the text, the draft, was
    # taken for the answer: stage 1 stored an object called 'thing'.
    db_path = _world(tmp_path)
    server.config.answer_style = "think"
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 2, progress.failures
    stored = table_rows(db_path, "SELECT objects FROM descriptions")
    assert stored and not any('"thing"' in objects for (objects,) in stored), stored


def test_a_server_taking_fewer_images_than_the_single_method_sends_stops_the_run(server, tmp_path):
    # vLLM serves many VLMs with one image per request unless started with
    # --limit-mm-per-prompt, and answers 400 'At most 1 image(s) may be provided in one
    # request.' The single-stage method sends two: every pair failed on its own, each
    # after trying every response format, and the message did not say what to change.
    db_path = _world(tmp_path, references=2, pairs=4)
    server.config.max_images_per_request = 1
    with pytest.raises(RunImagesUnsupportedError) as caught:
        run_pipeline(db_path, _options(server, method="single"))
    said = str(caught.value)
    assert "At most 1 image(s)" in said and "--limit-mm-per-prompt" in said and "--method staged" in said
    assert server.stats["rejected_image_count"] <= 2
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY 1") == [("pending", 4)]


def test_a_request_past_the_models_context_is_not_sent_again_in_other_formats(server, tmp_path):
    # vLLM refuses a prompt plus max_tokens longer than its --max-model-len with 400 'This
    # model's maximum context length is ...'. The 400 was taken for a refused
    # response_format: the request went out three times (json_schema, json_object, text),
    # and each pair failed on the server's words alone, with nothing to say what to change
    # (max_tokens could not be changed at all).
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.context_length = 1200
    progress = run_pipeline(db_path, _options(server))
    assert progress.failures == {"request rejected": 2}
    assert server.stats["rejected_context_length"] == 1  # stage 1's one request, once
    assert [r.get("response_format", {}).get("type") for r in server.requests] == ["json_schema"]
    (error,) = table_rows(db_path, "SELECT error FROM calls")[0]
    assert "maximum context length is 1200" in error and "--max-tokens (now 1500)" in error
    assert "--max-model-len" in error and "--image-size" in error


def test_a_reasoning_model_out_of_max_tokens_keeps_structured_outputs_and_says_raise_it(server, tmp_path):
    # A reasoning model (gpt-5-mini, Qwen3-VL-Thinking) spends max_tokens on thinking too:
    # under json_schema OpenAI answers 400 'Could not finish the message because max_tokens
    # or model output limit was reached'. That was taken for a refused response_format: the
    # request went out again as json_object, came back cut off (paid), and the whole run
    # went on without Structured Outputs. Nothing could raise the limit.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.thinking_tokens = 3000
    progress = run_pipeline(db_path, _options(server))
    assert progress.failures == {"request rejected": 2} and server.stats["thinking_cut_off"] == 1
    (error,) = table_rows(db_path, "SELECT error FROM calls")[0]
    assert "Could not finish the message" in error and "raise --max-tokens" in error
    progress = run_pipeline(db_path, _options(server, max_tokens=4000, retry_failed=True))
    assert progress.pairs_done == 2 and progress.run_id == 1, progress.failures
    assert {r.get("response_format", {}).get("type") for r in server.requests} == {"json_schema"}
    assert {r["max_tokens"] for r in server.requests[1:]} == {4000}


def test_raising_max_tokens_resumes_the_run_and_reuses_its_answers(server, tmp_path):
    # The token-limit advice says to raise --max-tokens and rerun. max_tokens was part of
    # the run's fingerprint and of every answer's cache key, so the rerun started a new
    # run and paid again for every pair already done, and for every stage 1 description.
    db_path = _world(tmp_path, references=2, pairs=4)
    first = run_pipeline(db_path, _options(server))
    assert first.pairs_done == 4
    asked = len(server.requests)
    again = run_pipeline(db_path, _options(server, max_tokens=4000))
    assert again.run_id == first.run_id and again.pairs_done == 4
    assert len(server.requests) == asked  # nothing paid twice


def test_max_tokens_is_an_annotate_option(server, tmp_path):
    from good4cir.cli import main

    db_path = _world(tmp_path, references=1, pairs=1)
    assert main(["annotate", "--db", str(db_path), "--backend", "openai", "--base-url", server.url,
                 "--model", "local-vlm", "--max-tokens", "3000", "--no-progress"]) == 0
    assert server.requests and {r["max_tokens"] for r in server.requests} == {3000}


def test_a_query_in_the_base_url_goes_with_every_request(server, tmp_path):
    # Some proxies take their key in the URL ('.../v1?api-key=...'; the store keeps it
    # redacted). The client appends each endpoint's path to the base URL as text, so every
    # request went to '/v1/?api-key=...chat/completions': the run stopped as a 404 telling
    # the user to check a base URL that already ended in /v1.
    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.require_query = {"api-key": "k3y-in-the-url"}
    progress = run_pipeline(db_path, _options(server, base_url=server.url + "?api-key=k3y-in-the-url"))
    assert progress.pairs_done == 2, progress.last_error
    assert server.stats["rejected_query"] == 0 and server.stats["completions_ok"] == 5
    assert table_rows(db_path, "SELECT base_url FROM runs") == [(server.url + "?api-key=[redacted]",)]


def test_an_azure_deployment_url_is_refused_naming_the_v1_endpoint(server, tmp_path):
    # Azure OpenAI's deployment URL ('.../openai/deployments/NAME?api-version=...') wants
    # the key in an api-key header: the run stopped on a 404 (or a 401 blaming the key).
    # The resource's v1 endpoint speaks the OpenAI protocol, with the deployment as model.
    db_path = _world(tmp_path, references=1, pairs=1)
    url = "https://my-res.openai.azure.com/openai/deployments/gpt-4o-prod?api-version=2024-10-21"
    with pytest.raises(ValueError) as caught:
        run_pipeline(db_path, _options(server, base_url=url, model="gpt-4o-prod"))
    said = str(caught.value)
    assert "Azure" in said and "--base-url https://my-res.openai.azure.com/openai/v1" in said and "--model" in said
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(0,)]


def test_a_server_still_loading_its_model_stops_the_run_with_its_pairs_pending(server, tmp_path):
    # llama.cpp's server answers 503 'Loading model' until its model is loaded (a large
    # model: minutes). Each request was retried for its attempts and then its pair failed
    # as 'retries exhausted': the whole store failed in seconds, to be sent again only with
    # --retry-failed. Not one answer in the session and still 503: stop, pairs pending.
    server.config.loading = True
    said = _stopped_with_every_pair_pending(tmp_path, server, RunUnreachableError, 2, 4, max_attempts=3)
    assert "Loading model" in said and "loading" in said and "rerun the same command" in said
    server.config.loading = False
    assert run_pipeline(tmp_path / "store.db", _options(server, max_attempts=3)).pairs_done == 4


def test_a_batch_line_out_of_max_tokens_says_raise_it(server, tmp_path):
    # The batch backend's line refused with 'Could not finish the message because
    # max_tokens ...' failed its pair on the server's words alone.
    db_path = _world(tmp_path, references=1, pairs=1)
    server.config.batch_delay = 0.05
    server.config.thinking_tokens = 3000
    progress = run_pipeline(db_path, _options(server, "openai-batch"))
    assert progress.failures == {"request rejected": 1}
    (error,) = table_rows(db_path, "SELECT error FROM calls WHERE status = 'error'")[0]
    assert "Could not finish the message" in error and "raise --max-tokens" in error, error


def test_status_says_a_priced_runs_cost_leaves_out_answers_without_usage(server, tmp_path, capsys):
    # A proxy that sends usage with every count 0 (or none): annotate warned once that the
    # cost is not known, but `status`, read later, showed the run at $0.0000 as if free.
    from good4cir.cli import main

    db_path = _world(tmp_path, references=1, pairs=2)
    server.config.usage_zeros = True
    assert run_pipeline(db_path, _options(server, model="gpt-4o-mini")).pairs_done == 2
    assert run_pipeline(db_path, _options(server, model="my-local-vlm")).pairs_done == 2  # unpriced
    capsys.readouterr()
    assert main(["status", "--db", str(db_path)]) == 0
    said = capsys.readouterr().out
    assert "run 1: the server reported no token usage for 5 of its answers, counted at $0" in said
    assert "run 2:" not in said


def test_a_daily_request_cap_stops_the_run_with_its_pairs_pending(server, tmp_path):
    # OpenRouter's free models allow so many requests a day, then answer each with 429
    # 'Rate limit exceeded: free-models-per-day ...' (no Retry-After) until the day ends.
    # It was retried as a rate limit: every remaining pair failed as 'retries exhausted'
    # within a minute, spending the run's retry budget.
    db_path = _world(tmp_path, references=4, pairs=4)
    server.config.daily_limit_after = 3
    with pytest.raises(RunQuotaError) as caught:
        run_pipeline(db_path, _options(server, concurrency=1, max_attempts=3))
    said = str(caught.value)
    assert "free-models-per-day" in said and "Wait until the daily limit resets" in said
    assert server.stats["rejected_daily_limit"] == 1
    statuses = dict(table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY 1"))
    assert "failed" not in statuses and statuses["pending"] >= 3, statuses
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok'") == [(3,)]  # all stored


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_an_answer_withheld_by_a_content_filter_is_named_so_and_not_repaired(server, tmp_path, backend):
    # Azure OpenAI's content filter answers 200 with content null and finish_reason
    # 'content_filter' (paid). It was read as 'the answer is empty': a paid repair request
    # was sent for each, the pair failed as an invalid answer that did not name the filter,
    # and six of them stopped the run blaming the model for not answering JSON.
    db_path = _world(tmp_path, references=7, pairs=7)
    server.config.answer_style = "filtered"
    server.config.batch_delay = 0.05
    progress = run_pipeline(db_path, _options(server, backend, model="gpt-4o-mini"))
    sent = server.stats["chat_requests"] + server.stats["batch_lines_submitted"]
    assert progress.pairs_failed == 7 and sent == 7  # no repair
    errors = table_rows(db_path, "SELECT error FROM annotations WHERE status = 'failed'")
    assert all("content filter" in e and "content_filter" in e for (e,) in errors), errors
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls WHERE status = 'ok' AND tokens_in > 0") == [(7,)]
    # --retry-failed asks again (the filter may let a new answer through), once each
    progress = run_pipeline(db_path, _options(server, backend, model="gpt-4o-mini", retry_failed=True))
    sent = server.stats["chat_requests"] + server.stats["batch_lines_submitted"]
    assert progress.pairs_failed == 7 and sent == 14
