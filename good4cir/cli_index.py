"""`good4cir index` and `good4cir query`: a FAISS index over a gallery, and composed queries."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .cli_retrieval import add_device_option, non_negative_int, positive_int


def register(subparsers) -> None:
    index = subparsers.add_parser(
        "index",
        help="encode a store's images with a trained model into a FAISS index",
        description=(
            "Encode the gallery images of a store with a checkpoint from `good4cir train` "
            "and save a FAISS index with its id map. Resumable: rerun the same command "
            "after an interruption and finished chunks are reused; images that could not be read "
            "are tried again (put a missing file back and rerun)."
        ),
    )
    index.add_argument("--db", required=True, type=Path, help="the store's SQLite file")
    index.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                       help="a folder written by train")
    index.add_argument("--out", required=True, type=Path, metavar="DIR", help="index folder to write")
    index.add_argument(
        "--factory", default="Flat",
        help='FAISS index-factory string: "Flat" (exact, default), "HNSW32", "IVF1024,PQ32", ...',
    )
    index.add_argument("--split", help="only this split's images (and every image its pairs use)")
    index.add_argument(
        "--search-params", metavar="PARAMS",
        help='FAISS search parameters saved with the index, e.g. "efSearch=128" or "nprobe=16"',
    )
    index.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="images per forward pass (default 64)")
    index.add_argument("--workers", type=non_negative_int, metavar="N", help="image-loading processes (default: cores - 1, at most 4)")
    index.add_argument("--fresh", action="store_true", help="discard cached embeddings and encode everything again")
    index.add_argument("--cache-dir", metavar="DIR",
                       help="pixel cache of `train`/`eval`: images decoded there are not decoded again "
                       "(default $GOOD4CIR_CACHE, else good4cir/ in $XDG_CACHE_HOME or ~/.cache)")
    index.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                       help="no progress bar (there is none unless stderr is a terminal)")
    index.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch")
    add_device_option(index)
    index.set_defaults(handler=run_index, on_interrupt="rerun the same command to go on (the embeddings "
                       "of finished chunks are reused)")

    query = subparsers.add_parser(
        "query",
        help="retrieve the top-k gallery images for a reference image and a modification text",
        description="Compose a query (reference image + modification text) and search an index.",
    )
    query.add_argument("--index", required=True, type=Path, metavar="DIR", help="a folder written by index")
    query.add_argument("--image", required=True, type=Path, metavar="FILE", help="the reference image")
    query.add_argument("--text", required=True, help="the modification text")
    query.add_argument("-k", type=positive_int, default=10, help="how many results (default 10)")
    query.add_argument("--checkpoint", type=Path, metavar="DIR",
                       help="a folder written by train (default: the one the index names)")
    query.add_argument("--search-params", metavar="PARAMS", help='override the index\'s search parameters, e.g. "efSearch=256"')
    query.add_argument(
        "--keep-reference", action="store_true",
        help="keep the reference image in the results (by default it is removed, as in CIRR)",
    )
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch")
    add_device_option(query)
    query.set_defaults(handler=run_query)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def run_index(args: argparse.Namespace) -> int:
    from .cli import require_store

    require_store(args.db)  # before torch loads
    _set_threads(args)
    from retrieval.index import EMBEDDINGS_DIR, build_gallery_index

    try:
        report = build_gallery_index(
            args.db, args.checkpoint, args.out, factory=args.factory, split=args.split,
            search_params=args.search_params, batch_size=args.batch_size,
            num_workers=args.workers, fresh=args.fresh, progress=not args.quiet and sys.stderr.isatty(),
            cache_dir=args.cache_dir, device=args.device,
        )
    except KeyboardInterrupt:
        # Work is kept a chunk of images at a time: stopped inside the first, none was.
        if not any(not p.name.endswith(".tmp.npz") for p in (Path(args.out) / EMBEDDINGS_DIR).glob("chunk_*.npz")):
            args.interrupted_note = ("interrupted before a chunk of images was encoded and saved (no chunk "
                                     "was finished); rerun the same command to start the encoding again")
        raise
    print(
        f"indexed {report.count} images ({report.encoded} encoded now) into {report.out_dir} "
        f"[{report.factory}, {report.dim}-d, search params {report.search_params or 'none'}] "
        f"in {report.encode_seconds:.1f} s encoding + {report.build_seconds:.1f} s building"
    )
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable images:", file=sys.stderr)
        for item in report.skipped[:20]:
            print(f"  {item['name']} ({item['path']}): {item['error']}", file=sys.stderr)
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more (listed in meta.json)", file=sys.stderr)
    return 0


def run_query(args: argparse.Namespace) -> int:
    _set_threads(args)
    from retrieval.index import RERANK_STAGE, QueryEngine

    if args.k < 1:
        raise ValueError("-k must be at least 1")
    if not args.text.strip():  # a composed query without its modification: refused, as the app does
        raise ValueError("--text is empty: give the modification to apply to the reference image")
    # The engine's warnings (an index of another model version, a long text, a gallery
    # file gone) as lines of their own: Python's format shows a source line of ours.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = QueryEngine(args.index, checkpoint_dir=args.checkpoint, search_params=args.search_params,
                             device=args.device)
        hits = engine.query(args.image, args.text, k=args.k, exclude_reference=not args.keep_reference)
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    for message in messages[:10]:  # a gallery moved away: one line per candidate
        print(f"warning: {message}", file=sys.stderr)
    if len(messages) > 10:
        print(f"warning: ... and {len(messages) - 10} more", file=sys.stderr)
    reranked = sum(1 for h in hits if h.stage == RERANK_STAGE)
    if args.json:
        # "score" is on the scale of the hit's "stage"; "first_stage_score" is on one
        # scale for all hits. Re-ranked hits come first.
        print(json.dumps({
            "image": str(args.image), "text": args.text, "k": args.k, "reranked": reranked,
            "results": [
                {"rank": rank, "name": h.name, "image_id": h.image_id, "path": h.path, "score": round(h.score, 6),
                 "stage": h.stage, "first_stage_score": round(h.first_stage_score, 6)}
                for rank, h in enumerate(hits, 1)
            ],
        }, indent=2))
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>3}  {h.score:+.4f}  {h.name}  {h.path}")
    if 0 < reranked < len(hits):
        print(f"note: hits 1-{reranked} are in the re-ranker's order, with its scores; hits "
              f"{reranked + 1}-{len(hits)} follow in the fusion model's order, with cosine scores (another "
              "scale); first_stage_score (--json) is the cosine of every hit", file=sys.stderr)
    return 0
