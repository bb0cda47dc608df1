"""The Export tab: the store's export formats with their options, written to a fresh
temporary folder and handed to the browser as a download."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import sqlite_utils

from store.exporters import FORMATS, export_dataset

FILE_NAMES = {"good4cir": "dataset.json", "cirr": "cap.good4cir.json", "jsonl": "good4cir.jsonl"}
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
    """Write the export into a new temporary folder; returns (file path, counts)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="good4cir-export-"))
    path = folder / FILE_NAMES[format]
    stats = export_dataset(db, format, path, run_id=run_id, include_unreviewed=include_unreviewed,
                           include_flagged=include_flagged, split=split or None)
    return path, stats


def describe_export(stats: dict) -> str:
    """Plain text summary of what an export wrote."""
    pairs = stats.get("pairs", 0)
    lines = [f"{pairs:,} pair{'' if pairs == 1 else 's'}, {stats.get('captions', 0):,} captions written as "
             f"{stats.get('format')}"]
    if stats.get("flagged_captions_left_out"):
        lines.append(f"{stats['flagged_captions_left_out']:,} flagged captions left out")
    if stats.get("pairs_without_captions"):
        lines.append(f"{stats['pairs_without_captions']:,} pairs had no caption left and were skipped")
    if stats.get("pairs_without_target"):
        lines.append(f"{stats['pairs_without_target']:,} pairs have no target image")
    if not stats.get("pairs"):
        lines.append("nothing to export: only approved pairs are exported unless you tick 'include unreviewed'")
    return "\n".join(lines)
