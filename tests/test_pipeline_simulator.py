"""The runner with the offline simulator on a real demo world (generated and imported
through the store's own APIs), and the single-stage baseline through the runner."""

from __future__ import annotations

import json

import pytest

from good4cir.cli import main as cli_main
from openai_server import start_server
from pipeline.runner import RunOptions, run_pipeline, start_run_in_thread
from pipeline_world import build_world, table_rows
from store.db import open_db
from store.demo_world import generate_world
from store.importers import import_dataset


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_world(root / "world", pairs=12, seed=3, progress=False)
    db_path = root / "store.db"
    db = open_db(db_path)
    import_dataset(db, "pairs", root / "world")
    db.conn.close()
    return db_path


def test_simulator_staged_and_single_runs_through_the_cli(demo_store, capsys):
    base = ["annotate", "--db", str(demo_store), "--backend", "simulator", "--no-progress", "--json"]
    assert cli_main(base) == 0
    staged = json.loads(capsys.readouterr().out)
    assert staged["pairs_done"] == 12 and staged["status"] == "finished" and staged["cost_usd"] == 0
    refs = table_rows(demo_store, "SELECT COUNT(DISTINCT reference_id) FROM pairs")[0][0]
    assert staged["calls"] >= refs + 2 * 12  # plus any repairs
    assert cli_main(base + ["--method", "single"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["run_id"] == 2 and single["pairs_done"] == 12
    rows = table_rows(demo_store, "SELECT r.method, r.model, a.stage1_id IS NULL, COUNT(*) FROM annotations a"
                                  " JOIN runs r ON r.id = a.run_id GROUP BY 1, 2, 3")
    assert rows == [("single", "simulator-v1", 1, 12), ("staged", "simulator-v1", 0, 12)]
    # stage 4 compounds recorded with their sources, within CLIP's 77 tokens
    for sources, tokens in table_rows(demo_store, "SELECT sources, token_count FROM captions WHERE kind = 'compound'"):
        assert len(json.loads(sources)) >= 2 and tokens <= 77
    # the same command again changes nothing and calls nothing
    calls = table_rows(demo_store, "SELECT COUNT(*) FROM calls")[0][0]
    assert cli_main(base) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == 1
    assert table_rows(demo_store, "SELECT COUNT(*) FROM calls")[0][0] == calls


def test_single_stage_request_has_both_images_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-single-0123456789")
    server = start_server()
    try:
        db_path = tmp_path / "store.db"
        build_world(db_path, tmp_path / "images", references=2, pairs=3)
        progress = run_pipeline(db_path, RunOptions(base_url=server.url, method="single", concurrency=2))
        assert progress.pairs_done == 3
        assert server.stats["completions_ok"] == 3
        for body in server.requests:
            user = body["messages"][1]["content"]
            assert [p["type"] for p in user] == ["text", "image_url", "image_url"]
            assert body["response_format"]["json_schema"]["name"] == "modification_captions"
        stages = table_rows(db_path, "SELECT DISTINCT stage FROM calls")
        assert stages == [("single",)]
    finally:
        server.stop()


def test_a_run_that_cannot_start_reports_why(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=1, pairs=1)
    handle = start_run_in_thread(db_path, RunOptions(backend="openai"))
    assert handle.wait_started(timeout=30)
    assert isinstance(handle.error, ValueError) and "OPENAI_API_KEY" in str(handle.error)
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(0,)]  # nothing half-made


def test_annotate_and_score_refuse_a_store_that_does_not_exist(tmp_path):
    missing = tmp_path / "typo" / "store.db"
    for args in (["annotate", "--db", str(missing), "--backend", "simulator"],
                 ["annotate", "--db", str(missing), "--backend", "simulator", "--dry-run"],
                 ["score", "--db", str(missing)]):
        with pytest.raises(FileNotFoundError, match="no such store"):
            cli_main(args)
        assert not missing.parent.exists(), args  # a mistyped path leaves no empty store behind


def test_the_simulator_refuses_a_store_without_demo_world_pairs(tmp_path):
    # A user's own images have no ground truth for the simulator to answer from: every
    # pair used to fail one by one ('request rejected: 11') with exit status 0.
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=2, pairs=3)
    for extra in ([], ["--dry-run"]):
        with pytest.raises(ValueError, match="demo-world ground truth.*--backend openai"):
            cli_main(["annotate", "--db", str(db_path), "--backend", "simulator", "--no-progress", *extra])
    assert table_rows(db_path, "SELECT COUNT(*) FROM runs") == [(0,)]
    assert table_rows(db_path, "SELECT COUNT(*) FROM calls") == [(0,)]


def test_scene_graphs_not_of_the_demo_world_fail_their_pairs_with_the_reason(tmp_path, capsys):
    # tests/fixtures/pairs carries ground-truth edits and a scenes.jsonl of another shape
    # (no floor): each pair failed as 'internal error: KeyError: 'floor'' with a traceback.
    from pathlib import Path

    db_path = tmp_path / "store.db"
    fixture = Path(__file__).parent / "fixtures" / "pairs"
    assert cli_main(["import", "--db", str(db_path), "--format", "pairs", str(fixture)]) == 0
    capsys.readouterr()
    assert cli_main(["annotate", "--db", str(db_path), "--backend", "simulator", "--no-progress"]) == 3
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip().startswith("failed: pair")]
    assert len(said) == 3, said
    for line in said:
        assert "internal error" not in line and "is not the demo world's (no 'floor'" in line, line
