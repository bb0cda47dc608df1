"""`good4cir import` and `good4cir export`: datasets in and out of the store."""

from __future__ import annotations

import argparse
import json
import sys

# `good4cir import`'s exit status when some items had problems: the rest is stored,
# and scripts can tell this apart from an error (1) and a usage error (2).
EXIT_PROBLEMS = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    from store.importers import FORMATS as IMPORT_FORMATS

    parser = subparsers.add_parser(
        "import", help="import a dataset (pairs folder, good4cir JSON, CIRR, CIRCO) into a store",
        description=(
            "Import image pairs into the store. Idempotent: importing twice adds nothing. "
            "Bad items (missing, empty, truncated, non-image or oversized files) are "
            "listed with the reason while the rest imports. "
            "pairs: PATH is a folder with pairs.jsonl (or the .jsonl file itself). "
            "good4cir: PATH is the authors' dataset.json (paths relative to it, or URLs, "
            "which are recorded without downloading unless --download is given). "
            "cirr: PATH is a CIRR root with captions/ and image_splits/. "
            "circo: PATH is an annotations JSON file (with --images DIR), or a CIRCO root "
            "holding annotations/*.json and COCO2017_unlabeled/unlabeled2017/ (or images/). "
            f"Exit status: 0 when every item imported; {EXIT_PROBLEMS} when some items had problems "
            "(each is listed; the rest is stored); 1 on an error. An import that stores nothing "
            "into a store it created removes that store again and exits 1 saying why."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="what to import (see above)")
    parser.add_argument("--db", required=True, help="the store's SQLite file (created if missing)")
    parser.add_argument("--format", required=True, choices=IMPORT_FORMATS, help="the input format")
    parser.add_argument("--split", help="import only this split (formats that name splits), "
                        "or record pairs under it (formats that do not)")
    parser.add_argument("--images", metavar="DIR",
                        help="circo: the folder of CIRCO's images; cirr: the folder image_splits' paths "
                             "are relative to (default img_raw/ or the root); any format: a folder outside "
                             "PATH holding images (e.g. an export's absolute paths) the review app may show")
    parser.add_argument("--source", help="dataset name recorded on the pairs (default: from the format)")
    parser.add_argument("--download", action="store_true",
                        help="good4cir, pairs: fetch images named by http(s) URL into downloaded_images/ "
                        "beside the dataset file and check them (the review app shows only local files, and "
                        "training needs them); without it URLs are recorded only. A rerun fetches "
                        "only what is not there yet")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run_import, on_interrupt="rerun the same command to go on (what is "
                        "imported or downloaded already is not done again)")

    from store.exporters import FORMATS as EXPORT_FORMATS

    parser = subparsers.add_parser(
        "export", help="export reviewed captions (good4cir JSON, CIRR JSON, JSONL with provenance)",
        description=(
            "Export the store's captions. By default only approved annotations, the edited "
            "text of each caption, and no flagged captions. For each pair the newest "
            "finished annotation is used, unless --run picks a run."
        ),
    )
    parser.add_argument("--db", required=True, help="the store's SQLite file")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the output format")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write")
    parser.add_argument("--run", type=int, metavar="RUN_ID",
                        help="export this run's annotations (only the pairs it annotated)")
    parser.add_argument("--include-unreviewed", action="store_true",
                        help="also unreviewed annotations, and the imported captions of pairs "
                        "with no annotation")
    parser.add_argument("--include-flagged", action="store_true",
                        help="keep captions a reviewer flagged as hallucinated")
    parser.add_argument("--split", help="export only pairs of this split")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run_export, on_interrupt="the --out file is left as it was; rerun the "
                        "same command to export")


def run_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from store import open_db
    from store.db import created_folders, remove_store
    from store.importers import import_dataset

    from .cli import CommandError

    db_path = Path(args.db)
    # A store this command creates and then fills with nothing is removed again: an
    # empty store left behind looks like a real one to every later command.
    new_store = not db_path.exists()
    new_folders = created_folders(db_path) if new_store else []
    db = open_db(db_path)
    try:
        report = import_dataset(
            db, args.format, args.path, split=args.split, source=args.source,
            images_dir=args.images, progress=sys.stderr.isatty(), download=args.download,
        )
    except BaseException:
        # Interrupted after some batches were written: those stay ("everything finished
        # so far is saved"); only a store still empty goes.
        if new_store and not db.execute("SELECT 1 FROM pairs LIMIT 1").fetchone():
            remove_store(db, db_path, new_folders)
            args.interrupted_note = (f"interrupted before any pair was stored, so the new store "
                                     f"{args.db} was removed again; rerun the same command")
        raise
    stored_nothing = new_store and report.pairs_added == 0 and report.images_added == 0
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        _print_import_report(args, report, hint=not stored_nothing)
    if stored_nothing:
        remove_store(db, db_path, new_folders)
        raise CommandError(f"nothing imported: {_why_nothing(args, report)}; "
                           f"removed the new store {args.db} (it would have been empty)")
    return EXIT_PROBLEMS if report.problems else 0


def _print_import_report(args: argparse.Namespace, report, *, hint: bool) -> None:
    print(
        f"imported {report.pairs_added} pairs and {report.images_added} images into {args.db}; "
        f"{report.pairs_skipped} pairs were already there; {len(report.problems)} problems"
    )
    if report.images_moved:
        print(f"  {report.images_moved} known images were found at a new path; the store now points there")
    if report.images_downloaded:
        print(f"  {report.images_downloaded} images stored before by URL only now have their downloaded "
              "file: the review app shows them")
    if report.images_rerooted:
        print(f"  {report.images_rerooted} known images lie in a folder this import names (--images): "
              "the review app now shows them")
    for problem in report.problems:
        print(f"  problem: {problem.item}: {problem.reason}")
    for warning in report.warnings:
        print(f"  note: {warning.item}: {warning.reason}")
    if report.problems and hint:
        print(f"  the items above were left out (exit status {EXIT_PROBLEMS}); fix what they name "
              "and import again: what is stored already is skipped")


def _why_nothing(args: argparse.Namespace, report) -> str:
    """Why an import stored nothing, for the error message."""
    if report.problems:
        return (f"all {len(report.problems)} items of {args.path} had problems (listed above)"
                if len(report.problems) != 1 else f"{report.problems[0].item}: {report.problems[0].reason}")
    if report.warnings:
        return "; ".join(f"{w.item}: {w.reason}" for w in report.warnings[:3])
    if args.split:
        return f"{args.path} holds no pairs of split {args.split!r}"
    return f"{args.path} holds no pairs"


def run_export(args: argparse.Namespace) -> int:
    from store import open_db
    from store.exporters import export_dataset

    from .cli import CommandError, require_store

    require_store(args.db)

    db = open_db(args.db)
    try:
        report = export_dataset(
            db, args.format, args.out, run_id=args.run, include_unreviewed=args.include_unreviewed,
            include_flagged=args.include_flagged, split=args.split, progress=sys.stderr.isatty(),
        )
    except OSError as exc:  # the store is SQLite (not OSError): this is the output path
        raise CommandError(f"cannot write the export to {args.out}: {exc}") from None
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"wrote {report['pairs']} pairs, {report['captions']} captions to {args.out} "
        f"({args.format}); left out: {report['flagged_captions_left_out']} flagged captions, "
        f"{report['stale_compounds_left_out']} compounds quoting an edited caption, "
        f"{report['pairs_without_captions']} pairs with no caption to export"
    )
    if args.format == "cirr" and len(report["splits"]) > 1:
        print(f"  note: this CIRR file mixes splits {', '.join(report['splits'])}; CIRR keeps one split per "
              "file (cap.rc2.<split>.json), so importing it back puts all its pairs under one split: "
              "export each with --split")
    targetless = report["pairs_without_target"]
    if targetless:
        print(f"  {targetless} pair{'' if targetless == 1 else 's'} without a target image left out: the "
              "authors' format has no query without one (CIRR's test1, CIRCO's test); --format jsonl or "
              "--format cirr keeps them")
    named = [split for split in report["splits"] if split != "None"]
    if args.format == "good4cir" and named and not args.split:
        print(f"  note: the authors' format has no split field, so the split of these pairs "
              f"({', '.join(named)}) is not in the file and importing it back records none (or the "
              "one --split names); export each split with --split, or use --format jsonl to keep "
              "splits, ids and provenance")
    replaced = report["pairs_imported_captions_replaced"]
    if replaced and args.format != "jsonl":
        print(f"  note: {replaced} pair{' had captions of its' if replaced == 1 else 's had captions of their'} "
              "own (imported with the dataset); the file holds the generated captions in their place: "
              "--format jsonl keeps both (original_captions)")
    awaiting, never = report["pairs_awaiting_review"], report["pairs_not_annotated"]
    if awaiting:
        print(f"  {awaiting} annotated pair{'' if awaiting == 1 else 's'} awaiting review left out: only "
              f"approved pairs are exported; approve them in the app (good4cir app --db {args.db}), "
              "or pass --include-unreviewed")
        for run, count in (report.get("awaiting_approved_in_runs") or {}).items():
            print(f"    {count} of them {'has' if count == 1 else 'have'} an approved annotation of the older "
                  f"run {run} (the export takes each pair's newest): export those with --run {run}")
    rejected = report["pairs_rejected"]
    if rejected:
        print(f"  {rejected} pair{'' if rejected == 1 else 's'} rejected in review left out (a rejected "
              "pair is never exported; set it back to unreviewed or approve it in the app to export it)")
    if never:
        print(f"  {never} pair{'' if never == 1 else 's'} never annotated left out: annotate them "
              "(good4cir annotate), or pass --include-unreviewed to export their imported captions")
    not_in_run = report["pairs_not_in_run"]
    if not_in_run:
        print(f"  {not_in_run} pair{'' if not_in_run == 1 else 's'} run {args.run} did not annotate left out "
              "(without --run, each pair's newest annotation is exported)")
    withheld = report["pairs_withheld_target"]
    if withheld:
        print(f"  {withheld} pair{'' if withheld == 1 else 's'} without a target image (its split withholds "
              "it, as CIRR's test1 does) left out: annotate leaves such pairs out; pass "
              "--include-unreviewed to export their imported captions")
    return 0
