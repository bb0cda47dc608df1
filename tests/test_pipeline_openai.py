"""The `openai` backend end to end: the real AsyncOpenAI client against a real local
HTTP server (tests/openai_server.py), a real SQLite store in a tmp dir."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from good4cir.cli import main as cli_main
import openai_server
from openai_server import fresh_server_fixture, server_fixture
from pipeline.runner import RunAuthError, RunOptions, run_pipeline, start_run_in_thread
from pipeline_world import build_world, corrupt_image, table_rows
from store.db import open_db

KEY = "sk-test-secret-0123456789abcdef"


server = server_fixture()
fresh_server = fresh_server_fixture(KEY)


def _world(tmp_path: Path, references: int, pairs: int):
    db_path = tmp_path / "store.db"
    world = build_world(db_path, tmp_path / "images", references=references, pairs=pairs)
    return db_path, world


def _options(server, **kw) -> RunOptions:
    base = dict(backend="openai", model="gpt-4o-mini", base_url=server.url, concurrency=4,
                backoff_base=0.01, timeout=10)
    base.update(kw)
    return RunOptions(**base)


def test_request_shapes_images_as_data_urls_and_schema_in_response_format(server, tmp_path):
    db_path, _ = _world(tmp_path, references=1, pairs=1)
    progress = run_pipeline(db_path, _options(server, image_max_side=64, detail="high"))
    assert progress.pairs_done == 1
    requests = server.requests
    assert len(requests) == 3
    by_kind = {}
    for body in requests:
        user = next(m for m in body["messages"] if m["role"] == "user")
        images = [p for p in user["content"] if p["type"] == "image_url"]
        schema = body["response_format"]["json_schema"]
        by_kind.setdefault(schema["name"], []).append((body, images))
        assert body["messages"][0]["role"] == "system"
        assert body["model"] == "gpt-4o-mini"
        assert body["response_format"]["type"] == "json_schema"
        assert schema["strict"] is True
        assert schema["schema"]["additionalProperties"] is False
    # stage 1 and stage 2: one image each, a downscaled JPEG data URL with the detail asked for
    assert len(by_kind["descriptor_list"]) == 2
    for body, images in by_kind["descriptor_list"]:
        assert len(images) == 1
        url = images[0]["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        assert images[0]["image_url"]["detail"] == "high"
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert max(image.size) == 64  # the 256 px original, fitted into 64 px
        assert body["response_format"]["json_schema"]["schema"]["required"] == ["objects"]
    # stage 2 carries stage 1's JSON; stage 3 is text only with both lists
    stage2 = [b for b, _ in by_kind["descriptor_list"] if "reference image" in json.dumps(b)]
    assert len(stage2) == 1
    (body3, images3), = by_kind["modification_captions"]
    assert images3 == []
    assert body3["response_format"]["json_schema"]["schema"]["required"] == ["captions"]
    assert json.dumps(body3).count('\\"objects\\"') >= 2


def test_stage1_runs_once_per_reference_image_across_pairs_and_runs(server, tmp_path):
    db_path, world = _world(tmp_path, references=2, pairs=6)
    progress = run_pipeline(db_path, _options(server, concurrency=6))
    assert progress.pairs_done == 6
    stages = dict(table_rows(db_path, "SELECT stage, COUNT(*) FROM calls GROUP BY stage"))
    assert stages == {"stage1": 2, "stage2": 6, "stage3": 6}
    assert server.stats["completions_ok"] == 2 + 2 * 6
    # every pair with one reference points at one shared stage 1 description
    shared = table_rows(db_path, "SELECT COUNT(DISTINCT stage1_id) FROM annotations")
    assert shared == [(2,)]
    # a new run with the same model and prompts pays for nothing again
    progress = run_pipeline(db_path, _options(server, new_run=True))
    assert progress.run_id == 2 and progress.pairs_done == 6
    assert server.stats["completions_ok"] == 14
    assert progress.calls_reused == 6  # stage 3 answers; stage 1 and 2 descriptions reused whole
    # a different model is a different cache key
    run_pipeline(db_path, _options(server, model="gpt-4o", new_run=True, limit=1))
    assert server.stats["completions_ok"] == 17


def test_stage1_answers_describe_the_image_not_the_prompts_format_example(server, tmp_path):
    # The stage 1 prompt shows its answer format as {"objects": [{"name": "...", ...}]}: the
    # server took that example for a reference list and answered as stage 2 would (an
    # object named "..." and one real object).
    db_path, _ = _world(tmp_path, references=2, pairs=2)
    assert run_pipeline(db_path, _options(server)).pairs_done == 2
    stage1 = [json.loads(o) for (o,) in table_rows(db_path, "SELECT objects FROM descriptions WHERE stage = 1")]
    assert len(stage1) == 2
    for objects in stage1:
        assert len(objects) >= 3  # the server lists 3 to 5 objects per image
        assert all(o["name"] in openai_server.OBJECTS for o in objects)
        assert all(set(o["descriptors"]) <= set(openai_server.OBJECTS[o["name"]]) for o in objects)


def test_cli_dry_run_annotate_rerun_and_status_json(server, tmp_path, capsys):
    db_path, _ = _world(tmp_path, references=3, pairs=5)
    args = ["annotate", "--db", str(db_path), "--backend", "openai", "--base-url", server.url,
            "--concurrency", "3", "--no-progress"]
    assert cli_main(args + ["--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["calls"] == 3 + 2 * 5 and plan["run_id"] is None
    assert plan["estimated_cost_usd"] > 0
    assert server.stats["chat_requests"] == 0  # a dry run spends nothing
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(0,)]

    assert cli_main(args + ["--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["pairs_done"] == 5 and done["status"] == "finished"
    assert server.stats["completions_ok"] == 13

    assert cli_main(args + ["--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calls"] == 0
    # Two pairs left pending with their descriptions and stage 3 answers stored, as a
    # session killed just before completing them leaves them: nothing is counted.
    db = open_db(db_path)
    db.execute("UPDATE annotations SET status = 'pending' WHERE rowid IN (SELECT rowid FROM annotations LIMIT 2)")
    db.conn.commit()
    db.conn.close()
    assert cli_main(args + ["--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calls_by_stage"] == {"stage1": 0, "stage2": 0, "stage3": 0}
    assert cli_main(args) == 0  # resumes: stage 3's answers are stored too, so no call
    capsys.readouterr()
    assert cli_main(args) == 0  # rerun: resumes the finished run, makes no call
    assert server.stats["completions_ok"] == 13
    assert "run 1 finished" in capsys.readouterr().out

    assert cli_main(["status", "--db", str(db_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["runs"]
    (run,) = report["runs"]
    # "status" as in the table's column (it was missing from --json).
    assert list(run) == ["id", "name", "backend", "model", "status", "pairs_done", "pairs_failed",
                         "pairs_pending", "calls", "cost_usd", "failures", "open_batches"]
    assert run["id"] == 1 and run["backend"] == "openai" and run["model"] == "gpt-4o-mini"
    assert run["status"] == "finished"
    assert (run["pairs_done"], run["pairs_failed"], run["pairs_pending"], run["calls"]) == (5, 0, 0, 13)
    assert run["cost_usd"] > 0 and run["failures"] == {}
    assert cli_main(["status", "--db", str(db_path)]) == 0
    assert "gpt-4o-mini" in capsys.readouterr().out


@pytest.mark.parametrize("reject, expected_mode", [
    ({"reject_json_schema": True}, "json_object"),
    ({"reject_json_schema": True, "reject_json_object": True}, None),
])
def test_response_format_falls_back_json_schema_then_json_object_then_text(
        server, tmp_path, reject, expected_mode):
    db_path, _ = _world(tmp_path, references=2, pairs=3)
    for key, value in reject.items():
        setattr(server.config, key, value)
    progress = run_pipeline(db_path, _options(server, concurrency=1))
    assert progress.pairs_done == 3 and progress.pairs_failed == 0
    # the fallback is found once and kept: one rejection per refused mode
    assert server.stats["rejected_json_schema"] == 1
    assert server.stats["rejected_json_object"] == (1 if expected_mode is None else 0)
    modes = [(b.get("response_format") or {}).get("type") for b in server.requests]
    assert modes[-1] == expected_mode
    # in text mode the server wraps the JSON in prose; the captions are still clean
    texts = [t for (t,) in table_rows(db_path, "SELECT text FROM captions WHERE kind = 'individual'")]
    assert texts and not any("```" in t or "Sure" in t for t in texts)


def test_newer_models_parameters_are_adapted_once_not_mistaken_for_format_refusals(server, tmp_path):
    db_path, _ = _world(tmp_path, references=1, pairs=2)
    server.config.reject_max_tokens = True
    server.config.reject_temperature = True
    progress = run_pipeline(db_path, _options(server, concurrency=1, model="gpt-5-mini"))
    assert progress.pairs_done == 2
    assert server.stats["rejected_max_tokens"] == 1 and server.stats["rejected_temperature"] == 1
    last = server.requests[-1]
    assert "max_completion_tokens" in last and "temperature" not in last
    assert last["response_format"]["type"] == "json_schema"  # the format was never stepped down


def test_invalid_answer_gets_one_repair_quoting_the_error_then_fails_with_reason(server, tmp_path):
    db_path, _ = _world(tmp_path, references=1, pairs=2)
    server.config.rate_invalid_answer = 1.0
    progress = run_pipeline(db_path, _options(server, concurrency=1))
    assert progress.pairs_failed == 2 and progress.pairs_done == 0
    errors = table_rows(db_path, "SELECT error FROM annotations")
    assert all(e.startswith("invalid answer: stage1:") for (e,) in errors)
    # exactly one repair for the shared stage 1 request, and it quotes the validation error
    calls = table_rows(db_path, "SELECT stage, status FROM calls ORDER BY id")
    assert calls == [("stage1", "ok"), ("repair", "ok")]
    repair_body = server.requests[-1]
    assert [m["role"] for m in repair_body["messages"]] == ["system", "user", "assistant", "user"]
    assert "objects" in repair_body["messages"][-1]["content"]
    assert "at least 1 item" in repair_body["messages"][-1]["content"]  # pydantic's own words

    # retrying the failed pairs asks the model again instead of reusing the stored answers
    server.config.rate_invalid_answer = 0.0
    before = server.stats["completions_ok"]
    progress = run_pipeline(db_path, _options(server, concurrency=1, retry_failed=True))
    assert progress.pairs_done == 2 and progress.pairs_failed == 0
    assert server.stats["completions_ok"] - before == 1 + 2 * 2

    # a repaired answer is used: invalid first answers, valid second ones
    server.state.reset()
    server.config.seed = 3
    server.config.rate_invalid_answer = 0.5
    db2, _ = _world(tmp_path / "b", references=2, pairs=6)
    progress = run_pipeline(db2, _options(server, concurrency=1))
    repaired_ok = table_rows(db2, "SELECT COUNT(*) FROM calls WHERE stage = 'repair'")[0][0]
    assert repaired_ok >= 1
    assert progress.pairs_done >= 1 and progress.pairs_done + progress.pairs_failed == 6


def test_bad_images_fail_only_their_items(server, tmp_path):
    db_path, world = _world(tmp_path, references=3, pairs=6)  # pairs j use reference j % 3
    corrupt_image(world["images"]["ref0001"][1])          # reference of pairs 1 and 4
    Path(world["images"]["tgt0002"][1]).unlink()          # target of pair 2
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 3 and progress.pairs_failed == 3
    rows = dict(table_rows(db_path, "SELECT p.external_id, a.error FROM annotations a"
                                    " JOIN pairs p ON p.id = a.pair_id"))
    assert {k for k, v in rows.items() if v} == {"1", "2", "4"}
    assert rows["1"].startswith("bad image: image ref0001.png: cannot decode")
    assert rows["4"] == rows["1"]
    assert rows["2"].startswith("bad image: image ") and "tgt0002.png" in rows["2"]
    assert progress.failures == {"bad image": 3}
    # nothing was sent for the unreadable images: stage 1 of refs 0 and 2, stages 2-3 of
    # pairs 0, 3, 5 (pair 2 shares ref 2's stage 1 and stops before its stage 2)
    assert server.stats["completions_ok"] == 2 + 2 * 3


def test_api_key_is_never_stored(server, tmp_path):
    db_path, _ = _world(tmp_path, references=1, pairs=2)
    run_pipeline(db_path, _options(server))
    server.config.reject_auth = True  # the server echoes the key in its 401 message
    with pytest.raises(RunAuthError) as caught:
        run_pipeline(db_path, _options(server, new_run=True, model="gpt-4.1-mini"))
    assert KEY not in str(caught.value)
    error = table_rows(db_path, "SELECT error FROM calls WHERE status = 'error' LIMIT 1")[0][0]
    assert "Incorrect API key provided" in error and KEY not in error
    for path in tmp_path.glob("store.db*"):
        assert KEY.encode() not in path.read_bytes(), path
    settings = table_rows(db_path, "SELECT settings FROM runs")
    assert all(KEY not in s for (s,) in settings)


def test_a_refused_api_key_stops_the_run_once_with_pairs_left_pending(server, tmp_path, monkeypatch, capsys):
    db_path, _ = _world(tmp_path, references=3, pairs=12)
    server.config.reject_auth = True
    with pytest.raises(RunAuthError) as caught:
        run_pipeline(db_path, _options(server, concurrency=2))
    message = str(caught.value)
    assert message.startswith("run 1 stopped: authentication failed (401)")
    assert "Set OPENAI_API_KEY to a valid key" in message and KEY not in message
    # no pair failed; the few calls in flight when the first 401 came are all that was sent
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("pending", 12)]
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    assert server.stats["rejected_auth"] <= 2  # concurrency 2: not one per pair
    # the CLI says it in one line, with exit status 1 and no traceback
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # else the CLI re-raises, for pytest
    args = ["annotate", "--db", str(db_path), "--backend", "openai", "--base-url", server.url,
            "--concurrency", "2", "--no-progress"]
    capsys.readouterr()
    assert cli_main(args) == 1
    assert capsys.readouterr().err.startswith("error: run 1 stopped: authentication failed (401)")
    # with the key accepted again, the same command resumes and finishes every pair
    server.config.reject_auth = False
    assert cli_main(args) == 0
    assert table_rows(db_path, "SELECT status, COUNT(*) FROM annotations GROUP BY status") == [("done", 12)]


def test_background_thread_reports_progress_stops_and_resumes(server, tmp_path):
    db_path, _ = _world(tmp_path, references=4, pairs=16)
    server.config.latency = 0.05
    seen = []
    handle = start_run_in_thread(db_path, _options(server, concurrency=2, stop_grace=5),
                                 on_progress=lambda p: seen.append((p.pairs_done, p.calls)))
    assert handle.wait_started(timeout=30) and handle.run_id == 1
    deadline = time.time() + 60
    while handle.progress.pairs_done < 3 and time.time() < deadline:
        time.sleep(0.02)
    handle.stop()
    final = handle.join(timeout=30)
    assert final is not None and handle.error is None and not handle.running
    assert final.status == "stopped"
    assert 3 <= final.pairs_done < 16 and final.pairs_pending == 16 - final.pairs_done
    assert seen and seen[-1][0] == final.pairs_done
    assert table_rows(db_path, "SELECT status FROM runs") == [("stopped",)]
    calls_before = server.stats["completions_ok"]
    resumed = run_pipeline(db_path, _options(server, concurrency=4))
    assert resumed.run_id == 1 and resumed.pairs_done == 16 and resumed.status == "finished"
    assert server.stats["completions_ok"] - calls_before <= 4 + 2 * (16 - final.pairs_done)
    dup = table_rows(db_path, "SELECT request_hash FROM calls WHERE status = 'ok'"
                              " GROUP BY request_hash HAVING COUNT(*) > 1")
    assert dup == []


def test_an_image_known_only_by_url_is_sent_as_that_url(server, tmp_path):
    import sqlite3

    db_path, world = _world(tmp_path, references=1, pairs=1)
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE images SET path = NULL, url = 'https://example.com/ref.png' WHERE name = 'ref0000'")
    conn.commit()
    conn.close()
    progress = run_pipeline(db_path, _options(server))
    assert progress.pairs_done == 1
    urls = [p["image_url"]["url"] for body in server.requests for m in body["messages"]
            if m["role"] == "user" and isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"]
    assert urls[0] == "https://example.com/ref.png" and urls[1].startswith("data:image/jpeg;base64,")


def test_resuming_a_run_by_id_with_other_settings_is_refused(server, tmp_path):
    db_path, _ = _world(tmp_path, references=1, pairs=1)
    run_pipeline(db_path, _options(server))
    assert run_pipeline(db_path, _options(server, run_id=1)).run_id == 1
    with pytest.raises(ValueError, match="run 1 was made with other settings"):
        run_pipeline(db_path, _options(server, run_id=1, model="gpt-4o"))


def test_cli_annotate_names_the_failed_pairs_and_how_to_retry_them(server, tmp_path, capsys, monkeypatch):
    # The summary said only 'failures: bad image: 3': which pairs, and what to do after
    # fixing their images, was left to the user to dig out of the store.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    db_path, world = _world(tmp_path, references=3, pairs=6)
    corrupt_image(world["images"]["ref0001"][1])
    Path(world["images"]["tgt0002"][1]).unlink()
    # Status 3, as an import with problems: a script sees that some pairs failed.
    assert cli_main(["annotate", "--db", str(db_path), "--backend", "openai", "--base-url", server.url,
                     "--no-progress"]) == 3
    out = capsys.readouterr()
    said = out.out + out.err
    assert "3 failed" in said
    for external_id, image in (("1", "ref0001.png"), ("2", "tgt0002.png"), ("4", "ref0001.png")):
        line = next(x for x in said.splitlines() if x.strip().startswith(f"failed: pair {external_id!r}"))
        assert "bad image" in line and image in line, line
    assert "--retry-failed" in said


def _add_targetless_pair(db_path: Path, image_dir: Path, split: str = "test1") -> None:
    """A pair whose target is withheld, as the CIRR importer stores test1 (target_id NULL)."""
    import hashlib

    from pipeline_world import draw_image

    path = image_dir / "withheld_ref.png"
    draw_image(path, 999)
    image_id = hashlib.sha256(path.read_bytes()).hexdigest()
    db = open_db(db_path)
    db.execute("INSERT INTO images (id, name, path, root, width, height, size_bytes, format, split, created_at)"
               " VALUES (?, 'withheld_ref', ?, ?, 256, 256, 1, 'PNG', ?, '2026')",
               [image_id, str(path), str(image_dir), split])
    db.execute("INSERT INTO pairs (id, source, external_id, reference_id, target_id, split, created_at)"
               " VALUES ('withheld0', 'cirr', 'test1:18', ?, NULL, ?, '2026')", [image_id, split])
    db.conn.commit()
    db.conn.close()


def test_pairs_without_a_target_are_not_annotated(server, tmp_path, capsys, caplog):
    # A CIRR store holds test1, whose targets are withheld. annotate counted its pairs in
    # the dry run, paid stage 1 for their references, failed each as 'no target' and
    # told the user to fix them and rerun with --retry-failed, which could never help.
    db_path, _ = _world(tmp_path, references=2, pairs=3)
    _add_targetless_pair(db_path, tmp_path / "images")
    args = ["annotate", "--db", str(db_path), "--backend", "openai", "--base-url", server.url,
            "--no-progress"]
    assert cli_main(args + ["--dry-run"]) == 0
    out = capsys.readouterr()
    assert "3 pairs to annotate" in out.out and "stage1 2," in out.out
    assert "1 pair without a target image" in out.out + out.err
    assert cli_main(args) == 0
    out = capsys.readouterr()
    assert "3 done, 0 failed" in out.out and "--retry-failed" not in out.out + out.err
    assert "1 pair without a target image left out" in caplog.text
    assert server.stats["completions_ok"] == 2 + 2 * 3
    assert table_rows(db_path, "SELECT COUNT(*) FROM annotations WHERE pair_id = 'withheld0'") == [(0,)]
    with pytest.raises(ValueError, match="split 'test1'.*no target image"):
        cli_main(args + ["--split", "test1"])


def test_a_key_with_a_trailing_newline_is_used_without_it(server, tmp_path, monkeypatch):
    # `export OPENAI_API_KEY=$(cat key.txt)` keeps no newline, but a key read from a file
    # another way does: httpx refuses the header, and every call failed as a "connection
    # error", retried to exhaustion, with no word about the key.
    db_path, _ = _world(tmp_path, references=1, pairs=1)
    monkeypatch.setenv("OPENAI_API_KEY", f"  {KEY}\n")
    progress = run_pipeline(db_path, _options(server, max_attempts=2))
    assert (progress.pairs_done, progress.pairs_failed) == (1, 0)


@pytest.mark.parametrize("base_url, said", [
    ("http://127.0.0.1:99999/v1", "port"),
    ("ftp://u:pw-0123456789@127.0.0.1/v1", "http:// or https://"),
    ("http:///v1", "host"),
])
def test_a_base_url_that_cannot_work_is_refused_before_any_pair_fails(server, tmp_path, base_url, said):
    # Port 99999 failed every pair as "internal error: ExceptionGroup: unhandled errors in
    # a TaskGroup"; an ftp:// URL retried each pair as a "Connection error".
    db_path, _ = _world(tmp_path, references=1, pairs=2)
    with pytest.raises(ValueError, match=said) as caught:
        run_pipeline(db_path, _options(server, base_url=base_url, max_attempts=1))
    assert "pw-0123456789" not in str(caught.value)
    assert table_rows(db_path, "SELECT COUNT(*) FROM annotations WHERE status = 'failed'") == [(0,)]



@pytest.mark.parametrize("extra, said", [
    (["--base-url", "localhost:8000/v1"], "http:// or https://"),
    (["--base-url", "https://r.openai.azure.com/openai/deployments/gpt4o?api-version=2024-02-01"],
     "Azure OpenAI deployment URL"),
    (["--api-key-env", "sk-test-dryleak-0123456789"], "name of an environment variable"),
])
def test_a_dry_run_refuses_what_the_run_would_refuse(server, tmp_path, capsys, extra, said):
    # `annotate --dry-run` printed its plan and exit 0 for a --base-url or --api-key-env the
    # run refuses at once: a user checking the command before paying learnt nothing.
    db_path, _ = _world(tmp_path, references=1, pairs=1)
    with pytest.raises(ValueError, match=said):
        cli_main(["annotate", "--db", str(db_path), "--backend", "openai", "--model", "gpt-4o",
                  "--dry-run", *extra])
    assert "dryleak" not in capsys.readouterr().out

def test_a_key_passed_as_the_variable_name_is_refused_and_never_stored(server, tmp_path):
    # `--api-key-env $OPENAI_API_KEY` (the key, not the variable's name): with --base-url
    # the run went on without a key and stored the key itself in runs.settings.
    db_path, _ = _world(tmp_path, references=1, pairs=1)
    leaked = "sk-test-envleak-0123456789"
    with pytest.raises(ValueError, match="name of an environment variable") as caught:
        run_pipeline(db_path, _options(server, api_key_env=leaked))
    assert leaked not in str(caught.value)
    for path in tmp_path.glob("store.db*"):
        assert leaked.encode() not in path.read_bytes(), path
