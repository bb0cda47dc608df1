"""Demo-world generation speed: pairs/s and the time for 1,000 pairs (target: under 30 s).

Runs `generate_world` with the requested workers, then (the baseline, in the same run)
with one worker, and checks that both wrote byte-identical worlds. Wall time on a shared
machine depends on the load, so CPU time (this process and its workers) and the load
average are printed too.

    .venv/bin/python bench/demo_world_bench.py [--pairs 1000] [--workers 2] [--no-baseline]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store.demo_world import generate_world, plan_world  # noqa: E402

TARGET_S = 30.0


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _run(out: Path, pairs: int, seed: int, workers: int) -> dict:
    cpu0, t0 = _cpu_s(), time.perf_counter()
    meta = generate_world(out, pairs, seed, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    return {"wall": wall, "cpu": _cpu_s() - cpu0, "images": meta["images"], "digest": _digest(out)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-worker baseline run")
    args = parser.parse_args()

    t0 = time.perf_counter()
    plan = plan_world(args.pairs, args.seed)
    plan_s = time.perf_counter() - t0
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"planning {args.pairs} pairs / {len(plan.images)} images: {plan_s:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        main_run = _run(Path(tmp) / "main", args.pairs, args.seed, args.workers)
        scale = 1000 / args.pairs
        print(f"workers={args.workers}: {main_run['wall']:.1f} s wall, {main_run['cpu']:.1f} s CPU, "
              f"{args.pairs / main_run['wall']:.0f} pairs/s, {main_run['images'] / main_run['wall']:.0f} images/s")
        per_1000 = main_run["wall"] * scale
        verdict = "PASS" if per_1000 < TARGET_S else "FAIL"
        print(f"time for 1,000 pairs: {per_1000:.1f} s (target < {TARGET_S:.0f} s: {verdict}); "
              f"CPU per 1,000 pairs {main_run['cpu'] * scale:.1f} s")
        if not args.no_baseline:
            base = _run(Path(tmp) / "base", args.pairs, args.seed, 1)
            print(f"baseline workers=1: {base['wall']:.1f} s wall, {base['cpu']:.1f} s CPU")
            print(f"speed-up workers={args.workers} vs 1: {base['wall'] / main_run['wall']:.2f}x; "
                  f"byte-identical output: {base['digest'] == main_run['digest']}")
            if base["digest"] != main_run["digest"]:
                return 1
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
