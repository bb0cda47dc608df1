"""`good4cir annotate` and `good4cir status`: run the annotation pipeline, report runs."""

from __future__ import annotations

import argparse
import json
import sys

# As `import` with problems: some items failed, the rest are stored.
EXIT_PAIRS_FAILED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "annotate", help="annotate pairs with a VLM (stages 1-4), resumably",
        description=(
            "Run the annotation pipeline on the store's pairs. Rerunning the same command "
            "resumes the matching run and makes no call whose answer is already stored. "
            "The API key comes from the environment (OPENAI_API_KEY by default), never from "
            "an argument. The simulator backend is an offline stand-in for the demo world. "
            f"Exit status: 0 when every pair it worked on is done; {EXIT_PAIRS_FAILED} when some "
            "pairs failed (named at the end; --retry-failed sends them again); 130 when the run "
            "stopped with pairs pending (rerun to resume); 1 on an error, a run stopped for what "
            "every pair would meet included (a refused key, no credits, a model the server "
            "lacks, takes no images, or whose answers never validate as JSON), its pairs left "
            "pending."
        ),
    )
    parser.add_argument("--db", required=True, help="the store's SQLite file")
    parser.add_argument("--backend", required=True, choices=["openai", "openai-batch", "simulator"],
                        help="openai: chat completions (any OpenAI-compatible base URL); "
                        "openai-batch: the Batch API, half price; simulator: offline demo stand-in")
    parser.add_argument("--model", help="model name (default: gpt-4o-mini; simulator-v1 for the simulator)")
    parser.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    parser.add_argument("--concurrency", type=int, metavar="N",
                        help="requests in flight (default 16; openai-batch: pairs in flight, default 5000)")
    parser.add_argument("--limit", type=int, metavar="N", help="annotate at most this many pairs (in import order)")
    parser.add_argument("--split", help="only pairs of this split")
    parser.add_argument("--method", choices=["staged", "single"], default="staged",
                        help="staged (default): the paper's stages 1-4; single: one call per pair (ablation baseline)")
    parser.add_argument("--run", type=int, metavar="RUN_ID", help="resume this run")
    parser.add_argument("--new-run", action="store_true", help="start a new run even if one matches")
    parser.add_argument("--retry-failed", action="store_true", help="retry the resumed run's failed pairs")
    parser.add_argument("--name", help="a name for a new run")
    parser.add_argument("--detail", choices=["low", "high", "auto"], default="low",
                        help="image detail sent to the model (default low)")
    parser.add_argument("--image-size", type=int, default=512, metavar="PX",
                        help="downscale images to fit PX x PX before sending (default 512)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="seconds per request (default 120; openai-batch: a batch file's upload "
                        "gets this plus 1 s per 256 KB of the file)")
    parser.add_argument("--max-tokens", type=int, default=1500, metavar="N",
                        help="tokens an answer may take (default 1500); a reasoning model spends them on "
                        "thinking too, and a server's context must hold them with the prompt")
    parser.add_argument("--max-attempts", type=int, default=6, metavar="N", help="attempts per request on transient errors (default 6)")
    parser.add_argument("--retry-budget", type=int, metavar="N", help="retries allowed for the whole run, all sessions (default 100 + 2 per pair)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                        help="environment variable holding the API key (default OPENAI_API_KEY)")
    parser.add_argument("--prices", metavar="FILE",
                        help='JSON price overrides: {"model": {"input": usd_per_1m, "output": usd_per_1m}}')
    parser.add_argument("--error-rate", type=float, default=0.15, metavar="RATE", help="simulator: share of wrong answers (default 0.15)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the simulator and retry jitter (default 0)")
    parser.add_argument("--poll-interval", type=float, default=30.0, metavar="SECONDS", help="openai-batch: seconds between polls (default 30)")
    parser.add_argument("--flush-interval", type=float, default=5.0, metavar="SECONDS",
                        help="openai-batch: send the pooled requests after this many quiet seconds (default 5)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the number of calls and the estimated cost, then stop")
    parser.add_argument("--json", action="store_true", help="print the final progress as JSON (with --dry-run: the plan)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_annotate, on_interrupt="rerun the same command to resume")

    parser = subparsers.add_parser("status", help="report each pipeline run's progress, calls and cost",
                                   description="Report every run: pairs done, failed and pending, "
                                   "calls, cost and failure reasons.")
    parser.add_argument("--db", required=True, help="the store's SQLite file")
    parser.add_argument("--json", action="store_true", help='print {"runs": [...]} as JSON')
    parser.set_defaults(handler=run_status_command)


def _options(args: argparse.Namespace):
    from pipeline.runner import RunOptions

    return RunOptions(
        backend=args.backend, model=args.model, base_url=args.base_url, method=args.method,
        concurrency=args.concurrency, limit=args.limit, split=args.split, run_id=args.run,
        new_run=args.new_run, retry_failed=args.retry_failed, name=args.name,
        api_key_env=args.api_key_env, timeout=args.timeout, image_max_side=args.image_size,
        detail=args.detail, max_tokens=args.max_tokens, max_attempts=args.max_attempts, retry_budget=args.retry_budget,
        prices_path=args.prices, seed=args.seed, error_rate=args.error_rate,
        poll_interval=args.poll_interval, flush_interval=args.flush_interval,
    )


def run_annotate(args: argparse.Namespace) -> int:
    from pipeline.runner import plan_run, run_pipeline, withheld_note

    from .cli import require_store

    require_store(args.db)
    options = _options(args)
    if args.dry_run:
        plan = plan_run(args.db, options)
        stages = ", ".join(f"{k} {v}" for k, v in plan.calls_by_stage.items()) or "none"
        run = f"resume run {plan.run_id}" if plan.run_id else "new run"
        price_note = " (no price known for this model: pass --prices)" if plan.unknown_price else ""
        if args.json:
            print(json.dumps({"run_id": plan.run_id, "pairs": plan.pairs, "calls": plan.calls,
                              "calls_by_stage": plan.calls_by_stage,
                              "estimated_cost_usd": round(plan.estimated_cost_usd, 4),
                              "pairs_without_target": plan.pairs_without_target,
                              "awaited_in_batches": plan.awaited_in_batches}))
        else:
            print(f"{run}: {plan.pairs} pairs to annotate, {plan.calls} calls ({stages}), "
                  f"estimated cost ${plan.estimated_cost_usd:.4f}{price_note}")
            if plan.awaited_in_batches:
                awaited = sum(plan.awaited_in_batches.values())
                batches = list(plan.awaited_in_batches)
                print(f"  {awaited} more {'is' if awaited == 1 else 'are'} in open "
                      f"batch{'es' if len(batches) > 1 else ''} {', '.join(batches[:3])}"
                      f"{f' and {len(batches) - 3} more' if len(batches) > 3 else ''}, already "
                      "submitted: the run collects their answers from there, not counted above")
            if plan.pairs_without_target:
                print(f"  {withheld_note(plan.pairs_without_target)}")
        return 0

    bar = None

    def on_progress(progress) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:  # made on the first report, once the run exists
            from tqdm import tqdm

            bar = tqdm(unit="pair", desc="annotate", file=sys.stderr, dynamic_ncols=True,
                       total=progress.pairs_total, initial=progress.pairs_done + progress.pairs_failed)
        if bar.total != progress.pairs_total:
            bar.total = progress.pairs_total
        bar.set_postfix(done=progress.pairs_done, failed=progress.pairs_failed,
                        spend=f"${progress.cost_usd:.4f}", refresh=False)
        # update() redraws at most every mininterval: cheap at thousands of pairs a second
        bar.update(progress.pairs_done + progress.pairs_failed - bar.n)

    try:
        progress = run_pipeline(args.db, options, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(progress.as_dict()))
    else:
        failures = ", ".join(f"{k}: {v}" for k, v in progress.failures.items()) or "none"
        print(f"run {progress.run_id} {progress.status}: {progress.pairs_done} done, "
              f"{progress.pairs_failed} failed, {progress.pairs_pending} pending; "
              f"{progress.calls} calls, {progress.calls_reused} answers reused, "
              f"${progress.cost_usd:.4f}; failures: {failures}")
    _say_how_to_send_cancelled(progress.failures)
    if progress.pairs_failed and not args.json:
        _say_which_pairs_failed(args.db, progress)
    if progress.status == "stopped":
        print("rerun the same command to resume", file=sys.stderr)
        return 130
    return EXIT_PAIRS_FAILED if progress.pairs_failed else 0


def _say_which_pairs_failed(db_path: str, progress) -> None:
    from store import annotations as store_ann
    from store import open_db

    shown = 10
    db = open_db(db_path)
    try:
        failed = store_ann.failed_pairs(db, progress.run_id, limit=shown)
    finally:
        db.conn.close()
    for external_id, reason in failed:
        print(f"  failed: pair {external_id!r}: {reason}", file=sys.stderr)
    if progress.pairs_failed > len(failed):
        print(f"  ... and {progress.pairs_failed - len(failed)} more (good4cir status --db {db_path})",
              file=sys.stderr)
    print("fix what they name (an image file, the model, the server), then rerun the same command "
          "with --retry-failed to annotate them again", file=sys.stderr)


def _say_how_to_send_cancelled(failures: dict) -> None:
    cancelled = failures.get("batch cancelled")
    if cancelled:
        print(f"{cancelled} pairs failed: their requests were in a batch cancelled outside good4cir, and "
              "nothing was sent again; rerun the annotate command with --retry-failed to send them", file=sys.stderr)


def run_status_command(args: argparse.Namespace) -> int:
    from pipeline.runner import run_status

    from .cli import require_store

    require_store(args.db)
    report = run_status(args.db)
    if args.json:
        keys = ("id", "name", "backend", "model", "status", "pairs_done", "pairs_failed", "pairs_pending", "calls",
                "cost_usd", "failures", "open_batches")
        print(json.dumps({"runs": [{k: r[k] for k in keys} for r in report["runs"]]}))
        return 0
    if not report["runs"]:
        print("no runs yet: start one with `good4cir annotate`")
        return 0
    # the --name a run was given: the one thing that tells two runs of one model apart here
    width = min(20, max([4] + [len(r.get("name") or "-") for r in report["runs"]]))
    header = f"{'run':>4}  {'name':<{width}} {'backend':<13} {'model':<16} {'status':<11} {'done':>7} " \
             f"{'failed':>7} {'pending':>7} {'calls':>7} {'cost $':>9}  failures"
    print(header)
    for r in report["runs"]:
        failures = ", ".join(f"{k}: {v}" for k, v in r["failures"].items()) or "-"
        print(f"{r['id']:>4}  {(r.get('name') or '-')[:width]:<{width}} {r['backend']:<13} {r['model'][:16]:<16} "
              f"{r['status']:<11} "
              f"{r['pairs_done']:>7} {r['pairs_failed']:>7} {r['pairs_pending']:>7} "
              f"{r['calls']:>7} {r['cost_usd']:>9.4f}  {failures}")
    for r in report["runs"]:
        if r.get("calls_without_usage"):
            n = r["calls_without_usage"]
            print(f"run {r['id']}: the server reported no token usage for {n} of its answer"
                  f"{'' if n == 1 else 's'}, counted at $0: its cost is more than shown")
    for r in report["runs"]:
        if r.get("session"):
            print(f"run {r['id']} is being worked on by {r['session']}")
    for r in report["runs"]:
        if r["failures"].get("batch cancelled"):
            print(f"run {r['id']}: ", end="", file=sys.stderr)
            _say_how_to_send_cancelled(r["failures"])
    for r in report["runs"]:
        # A stopped run (Ctrl-C, a kill, the app's Stop) or one a run-stopping error ended
        # (a refused key, no credits, the server gone) resumes as an interrupted one does
        if r["status"] in ("stopped", "failed") and r["pairs_pending"]:
            why = "stopped" if r["status"] == "stopped" else "ended on an error (fix what it said first)"
            print(f"run {r['id']} {why} with {r['pairs_pending']} pairs pending: rerun the same "
                  f"`good4cir annotate` command (or pass --run {r['id']}) to resume")
    for r in report["runs"]:
        # A live session collects its own; one that is gone leaves them to the rerun
        if r["open_batches"] and r["status"] != "running":
            n = r["open_batches"]
            print(f"run {r['id']} has {n} batch{'' if n == 1 else 'es'} open on the server (submitted, answers "
                  f"not collected yet): rerun the same `good4cir annotate` command (or pass --run {r['id']}); "
                  "it collects their answers instead of sending them again")
    if any(r["status"] == "interrupted" for r in report["runs"]):
        print("interrupted: the session running it is gone; rerun the same `good4cir annotate` "
              "command (or pass --run RUN_ID) to resume")
    return 0
