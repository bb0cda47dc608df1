"""Three processes write one store at once for several seconds (a pipeline finishing
annotations, two reviewers editing, flagging and approving): no write is lost and no
"database is locked" error is raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from store import open_db, transaction
from store import annotations as ann
from store.importers import import_dataset

FIXTURES = Path(__file__).parent / "fixtures"
SECONDS = 4.0


def test_pipeline_and_two_reviewers_write_at_once(tmp_path):
    db_path = tmp_path / "s.db"
    db = open_db(db_path)
    import_dataset(db, "pairs", FIXTURES / "pairs")
    reference_id, target_id = db.execute("SELECT reference_id, target_id FROM pairs").fetchone()
    # Enough pairs that the pipeline never runs out of work within SECONDS.
    with transaction(db):
        db.conn.executemany(
            "INSERT INTO pairs (id, source, external_id, reference_id, target_id, created_at)"
            " VALUES (?, 'bulk', ?, ?, ?, 'now')",
            [(f"bulk{i}", str(i), reference_id, target_id) for i in range(5000)])
    pair_ids = [r[0] for r in db.execute("SELECT id FROM pairs ORDER BY rowid")]
    run = ann.create_run(db, "simulator", "sim-1")
    ann.ensure_annotations(db, run.id, pair_ids)
    pending_before = db.execute("SELECT COUNT(*) FROM annotations WHERE status = 'pending'").fetchone()[0]

    start_at = time.time() + 2.0  # after every process has imported and opened the store
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    worker = FIXTURES / "store_writer.py"
    processes = {
        role: subprocess.Popen(
            [sys.executable, str(worker), str(db_path), role, str(start_at), str(SECONDS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for role in ("pipeline", "reviewer-ana", "reviewer-ben")
    }
    results = {}
    for role, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{role} failed:\n{err}"
        assert "locked" not in err
        results[role] = json.loads(out)
    print(results)

    pipeline = results["pipeline"]
    reviewers = [results["reviewer-ana"], results["reviewer-ben"]]
    assert pipeline["done"] > 20 and sum(r["approvals"] for r in reviewers) > 5
    count = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
    assert count("SELECT COUNT(*) FROM calls") == pipeline["calls"]
    assert count("SELECT COUNT(*) FROM annotations WHERE status = 'done'") == pipeline["done"]
    assert count("SELECT COUNT(*) FROM annotations WHERE status = 'pending'") == pending_before - pipeline["done"]
    assert count("SELECT COUNT(*) FROM captions") == 3 * pipeline["done"]
    assert count("SELECT COUNT(*) FROM caption_edits") == sum(r["edits"] for r in reviewers)
    assert count("SELECT COUNT(*) FROM review_events") == sum(r["approvals"] for r in reviewers)
    # Both reviewers may flag the same caption: flagging twice is one flag.
    assert 0 < count("SELECT COUNT(*) FROM flags") <= sum(r["flags"] for r in reviewers)
    assert count("SELECT COUNT(*) FROM annotations WHERE review_status = 'approved'") == count(
        "SELECT COUNT(DISTINCT annotation_id) FROM review_events")
    assert count("SELECT COUNT(*) FROM annotations WHERE flag_count > 0") == count(
        "SELECT COUNT(DISTINCT annotation_id) FROM flags WHERE removed_at IS NULL")
    # Each edit's version numbers are gapless per caption: no edit overwrote another.
    gaps = db.execute("SELECT caption_id, COUNT(*), MAX(version) FROM caption_edits GROUP BY caption_id").fetchall()
    assert all(n == top for _, n, top in gaps)
