"""Store latency at 100,000 pairs: fetching the next pair to review and saving a review.

Each operation is timed against a plain `SELECT * FROM annotations LIMIT 1` on the same
database in the same run, so the ratios hold on any machine. Targets (issue 2): p95
under 20 ms and within 3x of the plain query.

The 100,000-pair store is built once (bulk inserts in one transaction, a few shared
image rows) and cached under /tmp, keyed by BENCH_VERSION and the schema version; each
run works on a fresh copy, so reruns start from the same state and take seconds.

usage: python bench/store_bench.py [--pairs N] [--repeat R] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store import migrations, open_db, transaction  # noqa: E402
from store import queue, review  # noqa: E402

BENCH_VERSION = 1
IMAGES = 16
CAPTIONS_PER_PAIR = 4      # 3 individual + 1 compound, like a real annotation
REVIEWED_FRACTION = 0.3    # the first 30% of the queue is already approved


def cached_store(pairs: int, rebuild: bool) -> Path:
    path = Path(tempfile.gettempdir()) / (
        f"good4cir_store_bench_v{BENCH_VERSION}_s{len(migrations.MIGRATIONS)}_{pairs}.db")
    if path.exists() and not rebuild:
        return path
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    started = time.perf_counter()
    # Built under a name of its own, then renamed: a concurrent run never sees half a store.
    building = path.with_name(f"{path.stem}.{os.getpid()}.building")
    db = open_db(building)
    now = "2026-01-01T00:00:00.000+00:00"
    reviewed = int(pairs * REVIEWED_FRACTION)
    with transaction(db):
        conn = db.conn
        conn.executemany(
            "INSERT INTO images (id, name, path, width, height, size_bytes, format, created_at)"
            " VALUES (?, ?, ?, 256, 256, 1000, 'PNG', ?)",
            [(f"img{i:04d}", f"images/{i}.png", f"/data/images/{i}.png", now) for i in range(IMAGES)],
        )
        splits = ("train", "val", "test")
        conn.executemany(
            "INSERT INTO pairs (id, source, external_id, reference_id, target_id, split,"
            " original_captions, created_at) VALUES (?, 'bench', ?, ?, ?, ?, '[]', ?)",
            ((f"pair{i:06d}", str(i), f"img{i % IMAGES:04d}", f"img{(i + 1) % IMAGES:04d}",
              splits[i % 10 // 8 + (i % 10 == 9)], now) for i in range(pairs)),
        )
        conn.execute(
            "INSERT INTO runs (id, backend, model, prompt_versions, status, pairs_total, created_at)"
            " VALUES (1, 'simulator', 'sim-1', '{}', 'finished', ?, ?)", [pairs, now])
        conn.executemany(
            "INSERT INTO annotations (id, run_id, pair_id, status, review_status, reviewer,"
            " reviewed_at, seq, updated_at) VALUES (?, 1, ?, 'done', ?, ?, ?, ?, ?)",
            ((f"1:pair{i:06d}", f"pair{i:06d}", "approved" if i < reviewed else "unreviewed",
              "bench" if i < reviewed else None, now if i < reviewed else None, i + 1, now)
             for i in range(pairs)),
        )
        conn.executemany(
            "INSERT INTO captions (id, annotation_id, kind, position, text, sources, token_count,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((f"1:pair{i:06d}:{'k0' if k == 3 else f'c{k}'}", f"1:pair{i:06d}",
              "compound" if k == 3 else "individual", 0 if k == 3 else k,
              f"pair {i} caption {k}: change the lamp to a red one",
              json.dumps([f"1:pair{i:06d}:c0", f"1:pair{i:06d}:c1"]) if k == 3 else None,
              20 if k == 3 else None, now)
             for i in range(pairs) for k in range(CAPTIONS_PER_PAIR)),
        )
        # Some history: every 10th reviewed pair has an edit and a flag.
        conn.executemany(
            "INSERT INTO caption_edits (caption_id, version, text, action, restores, editor, created_at)"
            " VALUES (?, 1, 'an edited caption', 'edit', 1, 'bench', ?)",
            ((f"1:pair{i:06d}:c0", now) for i in range(0, reviewed, 10)),
        )
        conn.executemany(
            "INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
            " VALUES (?, 'caption', ?, 'other', 'bench', ?)",
            ((f"1:pair{i:06d}", f"1:pair{i:06d}:c1", now) for i in range(0, reviewed, 10)),
        )
        conn.execute("UPDATE annotations SET flag_count = 1 WHERE id IN (SELECT annotation_id FROM flags)")
    db.execute("ANALYZE")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.conn.close()
    building.rename(path)
    for leftover in building.parent.glob(building.name + "*"):
        leftover.unlink()
    print(f"built {pairs:,} pairs in {time.perf_counter() - started:.1f} s -> {path}")
    return path


def timed(fn, baseline, repeat: int) -> tuple[list[float], list[float]]:
    """(baseline samples, fn samples) in ms, taken alternately so that both see the same
    load on a shared machine. fn may return its own duration (ms) to exclude set-up."""
    for _ in range(min(20, repeat)):  # warm the page cache and statement cache
        baseline()
        fn()
    base, samples = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        baseline()
        base.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        own = fn()
        samples.append(own if own is not None else (time.perf_counter() - started) * 1000)
    return base, samples


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs in the store")
    parser.add_argument("--repeat", type=int, default=500, help="timed repetitions per operation")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached store")
    args = parser.parse_args()

    source = cached_store(args.pairs, args.rebuild)
    work_dir = Path(tempfile.mkdtemp(prefix="good4cir_bench_"))
    try:
        work = work_dir / "store.db"
        shutil.copyfile(source, work)
        db = open_db(work)
        assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == args.pairs
        results = measure(db, args.repeat)
        db.conn.close()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report(results, args.pairs, args.repeat)


def measure(db, repeat: int) -> dict[str, tuple[list[float], list[float]]]:
    """operation -> (its plain-query samples, its samples)."""
    results = {}

    def plain():
        db.execute("SELECT * FROM annotations LIMIT 1").fetchone()

    walk = {"seq": None}

    def step_sql():
        db.execute("SELECT a.* FROM annotations a WHERE a.status = 'done' AND a.review_status = ?"
                    " AND a.seq > ? ORDER BY a.seq LIMIT 1", ["unreviewed", walk["seq"] or 0]).fetchone()

    results["queue.step's SQL alone (index seek)"] = timed(step_sql, plain, repeat)

    def next_unreviewed():
        record = queue.step(db, after_seq=walk["seq"])
        walk["seq"] = record.seq

    results["next unreviewed pair: queue.step"] = timed(next_unreviewed, plain, repeat)
    walk["seq"] = None

    def review_page():
        record = queue.step(db, after_seq=walk["seq"])
        review.list_captions(db, record.id)
        walk["seq"] = record.seq

    results["next pair + its captions: step + list_captions"] = timed(review_page, plain, repeat)
    walk["seq"] = None

    def review_page_split():
        record = queue.step(db, after_seq=walk["seq"], split="val")
        review.list_captions(db, record.id)
        walk["seq"] = record.seq

    results["same, filtered to split=val"] = timed(review_page_split, plain, repeat)

    def saving():
        # The reviewer's save: an edit of the first caption, then approve (two writes).
        record = queue.step(db)
        caption = review.list_captions(db, record.id)[0]
        started = time.perf_counter()
        review.edit_caption(db, caption.id, caption.current_text + " (edited)", "bench",
                            expected_version=caption.version)
        review.set_review_status(db, record.id, "approved", "bench")
        return (time.perf_counter() - started) * 1000

    results["save a review: edit_caption + set_review_status"] = timed(saving, plain, repeat)

    def totals():
        queue.counts(db)

    results["(context) queue.counts: the review page's totals"] = timed(totals, plain, max(50, repeat // 10))

    def plain_write():
        with transaction(db):
            db.execute("UPDATE runs SET name = 'bench' WHERE id = 1")

    results["(context) plain write: one UPDATE, BEGIN..COMMIT"] = timed(plain_write, plain, repeat)
    return results


def report(results: dict[str, tuple[list[float], list[float]]], pairs: int, repeat: int) -> None:
    print(f"\nstore bench: {pairs:,} pairs, {repeat} timed runs each, in ms. Ratios are against a"
          f"\nplain `SELECT * FROM annotations LIMIT 1` timed alternately with each operation.\n")
    header = (f"{'operation':52} {'p50 ms':>8} {'p95 ms':>8} {'plain p50':>9} {'x p50':>6} {'x p95':>6}"
              f"  p95<20ms  x p95<=3")
    print(header)
    print("-" * len(header))
    for name, (base, samples) in results.items():
        p50, p95 = percentile(samples, 50), percentile(samples, 95)
        r50, r95 = p50 / percentile(base, 50), p95 / percentile(base, 95)
        print(f"{name:52} {p50:8.3f} {p95:8.3f} {percentile(base, 50):9.4f} {r50:6.1f} {r95:6.1f}  "
              f"{'yes' if p95 < 20 else 'NO':>8}  {'yes' if r95 <= 3 else 'no':>8}")
    save = results["save a review: edit_caption + set_review_status"][1]
    write = results["(context) plain write: one UPDATE, BEGIN..COMMIT"][1]
    print(f"\nsave a review vs the plain write transaction: x{percentile(save, 50) / percentile(write, 50):.1f}"
          f" p50, x{percentile(save, 95) / percentile(write, 95):.1f} p95 (a save is two transactions)")


if __name__ == "__main__":
    main()
