"""`good4cir score`: hallucination scores of runs against the demo world's ground truth."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", help="score runs' descriptors and captions against demo-world ground truth",
        description=(
            "Compare runs' stage 1/2 descriptors with the scene graphs (invented objects, "
            "wrong attributes) and their captions with the edit lists (missed and invented "
            "changes). Works for any backend on pairs imported from the demo world. Give "
            "--run several times to compare runs (e.g. staged against single)."
        ),
    )
    parser.add_argument("--db", required=True, help="the store's SQLite file")
    parser.add_argument("--run", type=int, action="append", metavar="RUN_ID",
                        help="a run to score; repeat to compare runs (default: every run)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument("--plot", metavar="FILE", help="also write a PNG bar chart comparing the runs")
    parser.add_argument("--text", choices=["original", "current"], default="original",
                        help="score the VLM's original captions (default) or the reviewed, edited ones")
    parser.add_argument("--detail", action="store_true",
                        help="with --json: include every pair's findings")
    parser.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from pipeline.scoring import format_table, score_runs
    from store.annotations import list_runs
    from store.db import open_db

    from .cli import CommandError, require_store

    require_store(args.db)
    db = open_db(args.db)
    run_ids = args.run or [run.id for run in list_runs(db)]
    if not run_ids:
        raise CommandError(f"{args.db} has no runs yet; run `good4cir annotate` first")
    scores = score_runs(db, run_ids, text=args.text, detail=args.detail, progress=sys.stderr.isatty())
    if all(s["pairs_scored"] == 0 for s in scores):
        raise CommandError(
            "no scored pairs: scoring needs finished pairs with demo-world ground truth "
            "(import a folder made by `good4cir demo-world`)")
    if args.plot:
        from pipeline.plots import plot_scores

        plot_scores(scores, args.plot)
    if args.json:
        print(json.dumps({"runs": scores}, indent=1))
    else:
        print(format_table(scores))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
