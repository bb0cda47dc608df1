"""The Export tab: the store's export formats with their options, written to a fresh
temporary folder and handed to the browser as a download."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import sqlite_utils

from store.exporters import FORMATS, export_dataset

FILE_NAMES = {"good4cir": "dataset.json", "cirr": "cap.good4cir.json", "jsonl": "good4cir.jsonl"}
# Gradio copies a download into its own cache when the callback returns, so only the
# newest exports need to stay; without pruning, every click left a full export in /tmp
# for as long as the machine ran.
KEEP_EXPORTS = 5
_export_root: Optional[Path] = None


def _fresh_export_folder() -> Path:
    global _export_root
    if _export_root is None or not _export_root.is_dir():
        _export_root = Path(tempfile.mkdtemp(prefix="good4cir-exports-"))
        atexit.register(shutil.rmtree, _export_root, True)
    folder = Path(tempfile.mkdtemp(prefix="export-", dir=_export_root))
    older = sorted((p for p in _export_root.iterdir() if p.is_dir() and p != folder),
                   key=lambda p: p.stat().st_mtime)
    for stale in older[:max(0, len(older) - (KEEP_EXPORTS - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


FORMAT_NOTES = {
    "good4cir": "the authors' dataset.json: reference_image, target_image, difference_captions",
    "cirr": "CIRR-style caption JSON (one entry per caption, CIRR field names)",
    "jsonl": "one JSON object per pair with provenance: run, model, prompts, edits, reviewer",
}


def export_to_download(
    db: sqlite_utils.Database,
    format: str,
    *,
    run_id: Optional[int] = None,
    include_unreviewed: bool = False,
    include_flagged: bool = False,
    split: Optional[str] = None,
    out_dir: Optional[str | Path] = None,
) -> tuple[Path, dict]:
    """Write the export into `out_dir`, or a new temporary folder (the newest KEEP_EXPORTS
    of those are kept); returns (file path, counts)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    folder = Path(out_dir) if out_dir else _fresh_export_folder()
    path = folder / FILE_NAMES[format]
    stats = export_dataset(db, format, path, run_id=run_id, include_unreviewed=include_unreviewed,
                           include_flagged=include_flagged, split=split or None)
    if run_id is None:
        stats["approved_superseded"] = superseded_approvals(db, split=split or None)
        stats["include_unreviewed"] = include_unreviewed
    return path, stats


def superseded_approvals(db: sqlite_utils.Database, *, split: Optional[str] = None
                         ) -> list[tuple[str, int, int, str]]:
    """Pairs approved in one run whose newest finished annotation (the one an export
    takes) is another run's and not approved: (pair id, approved run id, newest run id,
    its review status). Without this the export's count fell short of the approvals, unexplained."""
    sql = ("SELECT a.pair_id, MAX(a.run_id), n.run_id, n.review_status FROM annotations a"
           " JOIN annotations n ON n.pair_id = a.pair_id AND n.status = 'done'"
           " AND n.run_id = (SELECT MAX(b.run_id) FROM annotations b WHERE b.pair_id = a.pair_id"
           " AND b.status = 'done')"
           " JOIN pairs p ON p.id = a.pair_id"
           " WHERE a.status = 'done' AND a.review_status = 'approved' AND n.run_id != a.run_id"
           " AND n.review_status != 'approved'" + (" AND p.split = ?" if split else "")
           + " GROUP BY a.pair_id ORDER BY a.pair_id")
    return [tuple(row) for row in db.execute(sql, [split] if split else []).fetchall()]


def describe_export(stats: dict) -> str:
    """Plain text summary of what an export wrote."""
    pairs = stats.get("pairs", 0)
    lines = [f"{pairs:,} pair{'' if pairs == 1 else 's'}, {stats.get('captions', 0):,} captions written as "
             f"{stats.get('format')}"]
    if stats.get("flagged_captions_left_out"):
        lines.append(f"{stats['flagged_captions_left_out']:,} flagged captions left out")
    stale = stats.get("stale_compounds_left_out") or 0
    if stale:
        quote = "it quotes" if stale == 1 else "they quote"
        lines.append(f"{stale:,} compound caption{'' if stale == 1 else 's'} left out: {quote} a caption a reviewer "
                     "edited (edit the compound in the Review tab to keep it)")
    if stats.get("pairs_without_captions"):
        lines.append(f"{stats['pairs_without_captions']:,} pairs had no caption left and were skipped")
    if stats.get("pairs_without_target"):
        lines.append(f"{stats['pairs_without_target']:,} pairs have no target image")
    splits = stats.get("splits") or []
    if stats.get("format") == "cirr" and len(splits) > 1:
        lines.append(f"this CIRR file mixes splits {', '.join(splits)}: CIRR keeps one split per file "
                     "(cap.rc2.<split>.json), so pick a Split and export each")
    not_in_run = stats.get("pairs_not_in_run") or 0
    if not_in_run:
        lines.append(f"{not_in_run:,} pair{'' if not_in_run == 1 else 's'} the chosen run did not annotate left out "
                     "(Run (any) exports each pair's newest annotation)")
    superseded = _superseded_lines(stats.get("approved_superseded") or [], bool(stats.get("include_unreviewed")))
    lines += superseded
    if not stats.get("pairs") and not superseded:
        lines.append("nothing to export: only approved pairs are exported unless you tick 'include unreviewed'")
    return "\n".join(lines)


def _superseded_lines(rows: list[tuple[str, int, int, str]], include_unreviewed: bool) -> list[str]:
    left_out: dict[tuple[int, int], int] = {}
    replaced: dict[tuple[int, int], int] = {}
    for _, approved_run, run_id, status in rows:
        into = replaced if include_unreviewed and status == "unreviewed" else left_out
        into[approved_run, run_id] = into.get((approved_run, run_id), 0) + 1
    lines = []
    for (approved_run, run_id), n in sorted(left_out.items()):
        them = "it" if n == 1 else "them"
        lines.append(f"{n:,} approved pair{'' if n == 1 else 's'} left out: run {run_id} annotated {them} again "
                     f"and an export takes each pair's newest annotation, which is not approved; approve {them} "
                     f"in run {run_id} (Review tab, Run filter), or choose run {approved_run} in Run above")
    for (approved_run, run_id), n in sorted(replaced.items()):
        lines.append(f"{n:,} approved pair{'' if n == 1 else 's'} exported with run {run_id}'s unreviewed "
                     f"captions (the newest annotation); choose run {approved_run} in Run above to export "
                     f"the approved ones")
    return lines
