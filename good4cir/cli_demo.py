"""`good4cir demo-world`: write the procedural demo world in the pairs import format."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-world",
        help="generate the demo world (hotel-room renders, pairs, ground truth)",
        description="Write DIR/images/*.png, DIR/pairs.jsonl, DIR/scenes.jsonl and DIR/world.json: "
        "a deterministic world of rendered hotel rooms with ground-truth edits and captions, "
        "split into train/val/test; every pair (train ones too, as training negatives) has an image "
        "set of hard negatives, and test holds out some phrasings and kind x attribute combinations.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--pairs", type=int, default=1000, metavar="N", help="number of pairs (default 1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="rendering processes (default: up to 2); output is the same for any value")
    parser.set_defaults(handler=_demo_world)


def _demo_world(args: argparse.Namespace) -> int:
    from store.demo_world import generate_world

    if args.pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {args.pairs}")
    # A bar only where someone watches, as import and export: a log gets no carriage returns.
    meta = generate_world(args.out, args.pairs, args.seed, workers=args.workers, progress=sys.stderr.isatty())
    splits = ", ".join(f"{name} {c['pairs']} pairs/{c['images']} images" for name, c in meta["splits"].items())
    print(f"wrote {meta['pairs']} pairs and {meta['images']} images to {args.out} ({splits})")
    return 0
