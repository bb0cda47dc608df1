"""`good4cir train` and `good4cir eval`: the composed-retrieval model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a batch of 0 divided by zero)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", action="append", default=[], metavar="DB",
                        help="a store to read pairs from (repeat to mix several datasets)")
    parser.add_argument("--data", action="append", default=[], metavar="FILE",
                        help="an exported file (good4cir dataset.json or JSONL) to read "
                        "pairs from (repeatable, mixes with --db)")
    parser.add_argument("--source", default="auto", choices=["auto", "original", "generated", "both"],
                        help="captions to use: the dataset's own (original), the pipeline's "
                        "approved ones (generated), both; default auto = generated where a "
                        "pair has any, else original")
    parser.add_argument("--captions", default="both", choices=["individual", "compound", "both"],
                        help="which generated captions: stage 3 individual ones, stage 4 "
                        "compound ones, or both (default)")
    parser.add_argument("--include-unreviewed", action="store_true",
                        help="also use generated captions of pairs nobody approved yet")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where decoded images and frozen features are cached "
                        "(default $GOOD4CIR_CACHE, else good4cir/ in $XDG_CACHE_HOME or ~/.cache)")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch")
    add_device_option(parser)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="where the model runs: auto (the first CUDA GPU torch sees, else the "
                        "CPU; default), cpu, cuda or cuda:N")


# retrieval.fusion.FUSIONS, repeated here so that `good4cir --help` does not import torch
# (tests/test_retrieval_model.py checks the two agree).
FUSIONS = ("paper", "residual", "sum")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train the composed-retrieval model (open_clip encoders + fusion)",
        description=(
            "Train a composed-retrieval model on (reference, caption, target) triplets: "
            "symmetric InfoNCE at temperature 0.07, AdamW, warm-up then cosine. Writes "
            "config.json, best.pt, last.pt, history.json and curves.png to --out. Then, in "
            "the same budget, a re-ranker (a pair scorer over reference, candidate and their "
            "difference) for the fusion model's top candidates, into rerank.pt (none with "
            "--no-rerank or under 16 training pairs). "
            "Default: the tiny open_clip model from scratch, residual cross-attention "
            "fusion, 8 minutes."
        ),
    )
    _add_data_args(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (default: our small config, for demos), an open_clip model "
                        "name such as ViT-B-32, or hf-hub:ORG/REPO (an open_clip model on the "
                        "Hugging Face Hub, with its weights, e.g. "
                        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K)")
    init = parser.add_mutually_exclusive_group()
    init.add_argument("--pretrained", metavar="TAG",
                      help="open_clip pretrained tag, e.g. openai (downloaded by open_clip)")
    init.add_argument("--checkpoint", metavar="FILE", help="a local file of open_clip weights")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-time budget (default 8)")
    budget.add_argument("--epochs", type=positive_int, help="number of epochs instead of a time budget")
    parser.add_argument("--freeze-encoders", action="store_true",
                        help="keep the encoders fixed and cache their features: only the "
                        "fusion head trains (fast; use with pretrained encoders)")
    parser.add_argument("--fusion", default=None, choices=FUSIONS,
                        help="residual (default): pre-norm cross-attention layers; paper: "
                        "cross-attention stacked without residuals, as the authors' code; "
                        "sum: image + text embedding baseline")
    parser.add_argument("--image-size", type=positive_int, metavar="PX", help="override the model's input size")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="triplets per step (default 32)")
    parser.add_argument("--lr", type=float, help="peak learning rate of the fusion head (default "
                        "2e-3 from scratch, encoders at a quarter of it; 5e-4 frozen; 1e-4 "
                        "fine-tuning pretrained weights, encoders at a tenth); with --resume it "
                        "replaces the saved run's rate (default: the saved one carries on)")
    parser.add_argument("--set-negatives", type=non_negative_int, default=2, metavar="N",
                        help="per query, N members of its image set (CIRR's img_set, the "
                        "demo world's near-duplicates) join the negatives (default 2; 0: none)")
    parser.add_argument("--no-rerank", dest="rerank", action="store_false",
                        help="skip the second stage: the pair scorer that re-ranks the "
                        "fusion model's top candidates by looking at the reference and each "
                        "candidate together (by default it trains after the fusion model and "
                        "is kept only if it beats it on validation)")
    parser.add_argument("--rerank-share", type=float, default=0.75, metavar="F",
                        help="share of --minutes the pair scorer trains for (default 0.75)")
    parser.add_argument("--rerank-top-k", type=positive_int, default=100, metavar="K",
                        help="how many first-stage candidates the pair scorer re-ranks (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --out's last.pt (same model and fusion); the pair "
                        "scorer then trains afresh")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model already in --out (without it, or --resume, train refuses "
                        "to write over one)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run_train, on_interrupt="rerun the same command with --resume to continue "
                        "from the last finished epoch")

    parser = subparsers.add_parser(
        "eval", help="evaluate a trained model on a split (CIRR recall, recall_subset, mAP)",
        description=(
            "Evaluate on a split against a gallery of all its images (including every "
            "image-set member): Recall@1/5/10/50 with the reference removed, "
            "Recall_subset@1/2/3, median rank, mAP where pairs have several ground "
            "truths; with image-only, text-only and image+text-sum baselines from the "
            "same encoders. Held-out subsets (demo world) are reported separately."
        ),
    )
    _add_data_args(parser)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a folder written by train")
    parser.add_argument("--split", default="test", help="which split (default test)")
    parser.add_argument("--which", default="best", choices=["best", "last"],
                        help="which weights of the folder (default best)")
    parser.add_argument("--submission", metavar="OUT_DIR",
                        help="also write the test-server files for the split to OUT_DIR: "
                        "CIRR recall_submission_<split>.json and "
                        "recall_subset_submission_<split>.json, or CIRCO "
                        "circo_submission_<split>.json. Every query is ranked, including "
                        "those whose target the split withholds (test1, CIRCO test); metrics "
                        "cover the others. One query per pair, from the dataset's own caption "
                        "unless --source says otherwise")
    parser.add_argument("--gallery-images", action="append", default=[], metavar="DIR",
                        help="add every image of DIR to the gallery, named by file name (CIRCO: "
                        "COCO 2017 unlabeled2017/, which its protocol and server rank against; a "
                        "store holds only the images its pairs name). Repeatable")
    parser.add_argument("--no-rerank", dest="rerank", action="store_false",
                        help="score with the fusion model alone, even where the checkpoint "
                        "has a trained re-ranker")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw Recall@K for K=1..50 of the model, the fusion model alone and "
                        "the baselines, the model's by subset, and Recall_subset@K, to this PNG")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=run_eval)


def _need_data(args) -> None:
    from .cli import require_store

    if not args.db and not args.data:
        raise ValueError("give a store with --db (or an exported file with --data)")
    for db_path in args.db:
        require_store(db_path)
    for file_path in args.data:  # read by eval as well as train: not a "training file"
        if not Path(file_path).is_file():
            raise FileNotFoundError(f"{file_path}: no such file; --data takes a file that "
                                    "`good4cir export` writes (or the authors' dataset.json)")


def _note_captions_ignored(args) -> None:
    # The dataset's own captions have no individual/compound kind: --captions picks among
    # generated ones only, so with --source original it changes nothing.
    if args.source == "original" and args.captions != "both":
        print(f"note: --captions {args.captions} has no effect with --source original (the dataset's own "
              "captions are not individual or compound); every original caption is used", file=sys.stderr)


def _refuse_to_replace(out: Path, args: argparse.Namespace) -> None:
    # A command rerun from the shell's history must not throw away hours of training.
    from retrieval.model import BEST_FILE, LAST_FILE

    if args.resume or args.overwrite:
        return
    held = [name for name in (BEST_FILE, LAST_FILE) if (out / name).is_file()]
    if held:
        raise ValueError(f"{out} already holds a trained model ({', '.join(held)}): pass --resume to "
                         "continue training it, --overwrite to replace it, or another --out")


def run_train(args: argparse.Namespace) -> int:
    _need_data(args)  # before torch loads: a typo is told at once
    _note_captions_ignored(args)
    from retrieval.train import DEFAULT_FUSION, TrainConfig, train

    _refuse_to_replace(Path(args.out), args)
    cfg = TrainConfig(
        out=args.out, dbs=args.db, files=args.data, model=args.model,
        pretrained=args.pretrained, checkpoint=args.checkpoint, image_size=args.image_size,
        minutes=args.minutes, epochs=args.epochs, freeze_encoders=args.freeze_encoders,
        fusion=args.fusion or DEFAULT_FUSION, captions=args.captions, source=args.source,
        include_unreviewed=args.include_unreviewed, batch_size=args.batch_size, lr=args.lr,
        set_negatives=args.set_negatives, rerank=args.rerank, rerank_share=args.rerank_share,
        rerank_top_k=args.rerank_top_k, seed=args.seed, cache_dir=args.cache_dir, resume=args.resume, threads=args.threads,
        device=args.device, progress=sys.stderr.isatty(),
    )
    result = train(cfg)
    summary = result.history["summary"]
    if args.json:
        print(json.dumps({"out": str(result.out), **summary}, indent=2))
        return 0
    val = summary["best"].get("val") or {}
    print(f"trained {summary['epochs']} epoch{'' if summary['epochs'] == 1 else 's'} ({summary['steps']} steps, "
          f"{summary['seconds']:.0f} s, {summary['triplets_per_second']:.0f} triplets/s) "
          f"on {summary['train_triplets']} triplets; checkpoints in {result.out}")
    first = summary["best"].get("first_stage")
    if first and first.get("val"):
        print(f"fusion model alone, epoch {first.get('epoch')} (picked for validation recall at the"
              f" re-ranker's depth): {_brief(first['val'])}")
    if val:
        averaged = summary["best"].get("rerank_averaged_epochs") or []
        if first and averaged:
            label = f"with the re-ranker (the average of its epochs {averaged[0]}-{averaged[-1]})"
        elif first:
            label = f"with the re-ranker (its epoch {summary['best'].get('rerank_epoch')})"
        else:
            label = f"best validation (epoch {summary['best'].get('epoch')})"
        print(f"{label}: {_brief(val)}")
    rerank = result.history.get("rerank")
    if rerank and not rerank.get("epochs"):
        print("the re-ranker had no time left in --minutes: not trained")
    elif rerank and not rerank.get("enabled"):
        print("the re-ranker did not beat the fusion model on validation: not used")
    return 0


def _brief(val: dict) -> str:
    return (f"R@1 {val['recall']['1']:.1f}  R@5 {val['recall']['5']:.1f}  R@10 {val['recall']['10']:.1f}"
            + (f"  Rsubset@1 {val['recall_subset']['1']:.1f}" if val.get("recall_subset") else ""))


def run_eval(args: argparse.Namespace) -> int:
    _need_data(args)  # before torch loads: a typo is told at once
    _note_captions_ignored(args)
    from retrieval.evaluate import evaluate_checkpoint

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.submission:
        if args.plot:
            raise ValueError("--plot draws an evaluation's curves; --submission ranks for the test "
                             "server instead: run eval once without --submission for the plot")
        return _run_submission(args)
    result = evaluate_checkpoint(
        args.checkpoint, dbs=args.db, files=args.data, split=args.split, source=args.source,
        captions=args.captions, include_unreviewed=args.include_unreviewed,
        cache_dir=args.cache_dir, which=args.which, progress=sys.stderr.isatty(),
        rerank=args.rerank, gallery_dirs=args.gallery_images, plot=args.plot, device=args.device,
    )
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"split {result['split']}: {result['queries']} queries over {result['pairs']} pairs, "
          f"gallery of {result['gallery']} images")
    _print_metrics(result)
    if result.get("plot"):
        print(f"recall curves: {result['plot']}")
    return 0


def _print_metrics(result: dict) -> None:
    rows = [("model", result)]
    if result.get("first_stage"):
        rows.append(("  fusion model alone", result["first_stage"]))
    rows += [(f"baseline {name}", values)
                                   for name, values in result["baselines"].items()]
    for name, group in (result.get("subsets") or {}).items():
        rows.append((f"[{name}] model", group))
    print(f"{'':24} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'R@50':>6} {'Rs@1':>6} {'Rs@2':>6} {'Rs@3':>6} {'medR':>6}")
    for name, values in rows:
        recall, subset = values["recall"], values.get("recall_subset") or {}  # null: no image sets
        cells = [recall.get(k) for k in ("1", "5", "10", "50")] + [subset.get(k) for k in ("1", "2", "3")]
        print(f"{name:24} " + " ".join(f"{c:6.1f}" if c is not None else f"{'-':>6}" for c in cells)
              + f" {values['median_rank']:6.1f}")
    with_map = [(name, values["map"]) for name, values in rows if values.get("map")]
    if with_map:  # CIRCO's measure: queries with several ground truths
        ks = list(with_map[0][1])
        print(f"{'':24} " + " ".join(f"{'mAP@' + k:>7}" for k in ks))
        for name, values in with_map:
            print(f"{name:24} " + " ".join(f"{values[k]:7.1f}" for k in ks))
    interval = result.get("interval")
    if interval:
        spans = [f"{name} {low:.1f}-{high:.1f}" for name, (low, high) in
                 [("R@1", interval["recall"]["1"])]
                 + ([("Rs@1", interval["recall_subset"]["1"])] if interval.get("recall_subset") else [])]
        print(f"model, {100 * interval['level']:.0f}% bootstrap intervals over pairs: " + ", ".join(spans))
    if result.get("first_stage"):
        print(f"model: the fusion model's top {result['rerank']['top_k']} per query re-ranked by the "
              "pair scorer (--no-rerank: the fusion model alone)")


def _run_submission(args: argparse.Namespace) -> int:
    from retrieval.submit import write_checkpoint_submission

    # A server's queries are the dataset's own captions; auto would prefer generated ones.
    source = "original" if args.source == "auto" else args.source
    result = write_checkpoint_submission(
        args.checkpoint, args.submission, dbs=args.db, files=args.data, split=args.split,
        source=source, captions=args.captions, include_unreviewed=args.include_unreviewed,
        cache_dir=args.cache_dir, which=args.which, progress=sys.stderr.isatty(),
        gallery_dirs=args.gallery_images, rerank=args.rerank, device=args.device,
    )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if (result.metrics or {}).get("warning"):
        print(f"warning: {result.metrics['warning']}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            **(result.metrics or {}),
            "submission": {"kind": result.kind, "split": result.split,
                           "files": [str(f) for f in result.files], "queries": result.queries,
                           "without_target": result.without_target, "gallery": result.gallery,
                           "warnings": result.warnings},
            **({"notes": result.notes} if result.notes else {}),  # as eval --json has them
        }, indent=2))
        return 0
    print(f"split {result.split}: {result.queries} queries ranked against a gallery of "
          f"{result.gallery} images ({result.kind.upper()} submission)")
    if result.without_target:
        print(f"metrics skipped for {result.without_target} of {result.queries} queries: "
              f"split {result.split} withholds their target (the server scores them)")
    if result.metrics and result.metrics["queries"]:  # none: its keys are null
        print(f"metrics over the {result.metrics['queries']} queries with a target:")
        _print_metrics(result.metrics)
    for path in result.files:
        print(f"wrote {path}")
    return 0
