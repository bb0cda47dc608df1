"""Answers that validate but are wrong in a way the pipeline can see (a caption past CLIP's
77 tokens, stage 2 calling a stage 1 object by another name): one repair request, and
what is still wrong after it is stored flagged by the pipeline, never silently. An answer
that copies the prompt's format example ("...") is invalid: one repair request, then the
pair fails with the reason. The real `openai` client against the local server
(tests/openai_server.py), a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import openai_server
from openai_server import fresh_server_fixture, server_fixture
from pipeline.compound import CLIP_CONTEXT_LENGTH, count_clip_tokens
from pipeline.runner import RunOptions, run_pipeline
from pipeline_world import build_world, table_rows
from store.models import PIPELINE_REVIEWER

server = server_fixture()
fresh_server = fresh_server_fixture("sk-test-repair-0123456789")


def _run(server, tmp_path: Path, pairs: int = 1, failed: int = 0, **options):
    db_path = tmp_path / "store.db"
    build_world(db_path, tmp_path / "images", references=1, pairs=pairs)
    progress = run_pipeline(db_path, RunOptions(backend="openai", model="gpt-4o-mini", base_url=server.url,
                                                concurrency=2, backoff_base=0.01, timeout=10, **options))
    assert progress.pairs_done == pairs - failed and progress.pairs_failed == failed
    return db_path


def _flags(db_path) -> list[tuple]:
    return table_rows(db_path, "SELECT target_kind, target_id, reason, reviewer FROM flags"
                               " WHERE removed_at IS NULL ORDER BY target_id")


def _repair_texts(db_path) -> list[str]:
    rows = table_rows(db_path, "SELECT request FROM calls WHERE stage = 'repair' AND status = 'ok'")
    return [json.loads(r[0])["history"][-1]["content"] for r in rows]


def test_a_caption_over_77_clip_tokens_gets_a_repair_request_and_the_short_one_is_stored(server, tmp_path):
    server.config.overlong_captions = "first"
    db_path = _run(server, tmp_path)
    assert server.stats["spoiled_overlong_caption"] == 1
    (repair,) = _repair_texts(db_path)
    assert "caption 1 is too long" in repair and "CLIP tokens" in repair
    captions = [r[0] for r in table_rows(db_path, "SELECT text FROM captions WHERE kind = 'individual'")]
    assert captions and all(count_clip_tokens(c) <= CLIP_CONTEXT_LENGTH for c in captions)
    assert _flags(db_path) == []


def test_a_caption_still_over_77_clip_tokens_after_the_repair_is_stored_flagged(server, tmp_path):
    server.config.overlong_captions = "always"
    db_path = _run(server, tmp_path)
    assert len(_repair_texts(db_path)) == 1  # one repair, then the answer is kept
    rows = table_rows(db_path, "SELECT id, text FROM captions WHERE kind = 'individual' ORDER BY position")
    long_ids = [cid for cid, text in rows if count_clip_tokens(text) > CLIP_CONTEXT_LENGTH]
    assert len(long_ids) == 1
    assert _flags(db_path) == [("caption", long_ids[0], "over 77 CLIP tokens", PIPELINE_REVIEWER)]
    assert table_rows(db_path, "SELECT flag_count FROM annotations") == [(1,)]


def _stage2_lists(db_path) -> list[tuple[str, list[dict]]]:
    """(stage 2 description id, objects) of every pair."""
    return [(d, json.loads(o)) for d, o in table_rows(
        db_path, "SELECT a.stage2_id, d.objects FROM annotations a JOIN descriptions d ON d.id = a.stage2_id")]


def test_stage2_renaming_a_stage1_object_gets_a_repair_request_and_the_names_are_kept(server, tmp_path):
    server.config.rename_objects = "first"
    db_path = _run(server, tmp_path, pairs=4)
    spoiled = server.stats["spoiled_renamed_object"]
    assert spoiled >= 1
    repairs = _repair_texts(db_path)
    assert len(repairs) == spoiled and all("under another name" in r for r in repairs)
    renamed = set(openai_server.RENAMES.values())
    assert not any(renamed & {o["name"] for o in objects} for _, objects in _stage2_lists(db_path))
    assert _flags(db_path) == []


def test_stage2_still_renaming_after_the_repair_is_stored_with_the_object_flagged(server, tmp_path):
    server.config.rename_objects = "always"
    db_path = _run(server, tmp_path, pairs=4)
    spoiled = server.stats["spoiled_renamed_object"]
    assert spoiled >= 2 and len(_repair_texts(db_path)) == spoiled // 2  # first answer and its repair
    expected = [("descriptor", f"{stage2_id}/{i}/{k}", "renamed a reference object", PIPELINE_REVIEWER)
                for stage2_id, objects in _stage2_lists(db_path) for i, obj in enumerate(objects)
                if obj["name"] in openai_server.RENAMES.values() for k in range(len(obj["descriptors"]))]
    assert len(expected) >= 2 and _flags(db_path) == sorted(expected, key=lambda f: f[1])


def test_objects_really_added_and_removed_get_no_repair_request(server, tmp_path):
    # The server's stage 2 drops a reference object and adds a new one in some pairs.
    db_path = _run(server, tmp_path, pairs=6)
    assert _repair_texts(db_path) == [] and _flags(db_path) == []
    names = [({o["name"] for o in json.loads(a)}, {o["name"] for o in json.loads(b)}) for a, b in table_rows(
        db_path, "SELECT d1.objects, d2.objects FROM annotations a JOIN descriptions d1 ON d1.id = a.stage1_id"
                 " JOIN descriptions d2 ON d2.id = a.stage2_id")]
    assert any(before - after and after - before for before, after in names)


PLACEHOLDER = "copies the format example's placeholder"


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def test_an_answer_copying_the_format_examples_placeholders_gets_a_repair_request(server, tmp_path):
    server.config.echo_format_example = "first"
    db_path = _run(server, tmp_path)
    assert server.stats["echoed_format_example"] == 3  # stage 1, 2 and 3 answered "..." once each
    repairs = _repair_texts(db_path)
    assert len(repairs) == 3 and all(PLACEHOLDER in r for r in repairs)
    objects = [o for (d,) in table_rows(db_path, "SELECT objects FROM descriptions") for o in json.loads(d)]
    assert objects and all(o["name"] in openai_server.OBJECTS and all(map(_has_words, o["descriptors"]))
                           for o in objects)
    captions = [c for (c,) in table_rows(db_path, "SELECT text FROM captions")]
    assert len(captions) >= 3 and all(map(_has_words, captions))


@pytest.mark.parametrize("method, stage", [("staged", "stage1"), ("single", "single")])
def test_an_answer_still_copying_the_placeholders_after_the_repair_fails_the_pair_with_that_reason(
        server, tmp_path, method, stage):
    server.config.echo_format_example = "always"
    db_path = _run(server, tmp_path, failed=1, method=method)
    assert len(_repair_texts(db_path)) == 1
    ((status, error),) = table_rows(db_path, "SELECT status, error FROM annotations")
    assert status == "failed" and error.startswith(f"invalid answer: {stage}: ")
    assert PLACEHOLDER in error and "after one repair" in error
    assert table_rows(db_path, "SELECT COUNT(*) FROM descriptions UNION ALL SELECT COUNT(*) FROM captions") \
        == [(0,), (0,)]
