"""The authors' dataset.json: a JSON list of {"reference_image", "target_image",
"difference_captions"} where images are paths (relative to the file's folder) or URLs.

A URL image gets id = sha256 of the URL. By default it is only recorded (the import
makes no network request): no local file, so the review app cannot show it and training
leaves its pair out, and the report says so. With download=True each URL is fetched
into downloaded_images/ beside the file and validated like a local image; a URL that
fails (HTTP error, not an image, too many pixels) is a problem naming the item.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import sqlite_utils

from ..errors import FormatError, ImageError
from ..models import ImportReport
from ._session import ImportSession, read_text

_KNOWN_KEYS = {"reference_image", "target_image", "difference_captions", "id", "split"}


def import_good4cir(db: sqlite_utils.Database, path: str | Path, *, split: Optional[str] = None,
                    source: Optional[str] = None, images_dir: Optional[str | Path] = None,
                    progress: bool = False, download: bool = False) -> ImportReport:
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.json"))
        if len(candidates) != 1:
            raise FormatError(f"{path}: pass the dataset JSON file itself (found {len(candidates)} .json files)")
        path = candidates[0]
    try:
        entries = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(entries, dict):  # tolerate {"pairs": [...]} / {"data": [...]} wrappers
        lists = [v for v in entries.values() if isinstance(v, list)]
        entries = lists[0] if len(lists) == 1 else None
    if not isinstance(entries, list):
        raise FormatError(f"{path}: expected a JSON list of pairs with reference_image and target_image")
    folder = path.parent
    seen: dict[str, tuple[str, dict]] = {}  # external id -> (first item, its entry)
    session = ImportSession(db, source or path.stem, folder, progress=progress, images_dir=images_dir)
    wanted = [e for e in entries if isinstance(e, dict) and (split is None or e.get("split") in (None, split))]
    locations = [e[k] for e in wanted for k in ("reference_image", "target_image") if isinstance(e.get(k), str)]
    if download:
        session.download(locations)
    session.prefetch(locations, folder)
    for index, entry in session.iterate(enumerate(entries), total=len(entries), desc=session.source):
        item = f"{path.name}[{index}]"
        if not isinstance(entry, dict) or not entry.get("reference_image") or not entry.get("target_image"):
            session.problem(item, "needs an object with reference_image and target_image")
            continue
        wrong = next((f"{key} must be an image path or URL (a string), not {type(entry[key]).__name__}"
                      for key in ("reference_image", "target_image") if not isinstance(entry[key], str)), None)
        if wrong is None and entry.get("split") is not None and not isinstance(entry["split"], str):
            wrong = f"split must be a string, not {type(entry['split']).__name__}"
        if wrong:
            session.problem(item, wrong)
            continue
        entry_split = entry.get("split")
        if split is not None and entry_split is not None and entry_split != split:
            continue
        reference, target = str(entry["reference_image"]), str(entry["target_image"])
        external_id = str(entry["id"]) if entry.get("id") is not None else f"{reference}|{target}"
        first, first_entry = seen.setdefault(external_id, (item, entry))
        if first != item and first_entry == entry:
            # A word-for-word copy (concatenated files): nothing of it is lost.
            session.warn(item, f"repeats {first} word for word: left out, nothing is lost")
            continue
        if session.pair_exists(external_id, item, reference, folder):
            continue
        captions = entry.get("difference_captions") or []
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            session.problem(item, "difference_captions must be a list of strings")
            continue
        try:
            reference_id = session.image(reference, base=folder, split=entry_split or split)
            target_id = session.image(target, base=folder, split=entry_split or split)
        except ImageError as exc:
            session.problem(item, str(exc))
            continue
        if session.same_image(item, reference_id, target_id) or (
                entry.get("id") is None and session.respelled(item, reference_id, target_id)):
            continue
        session.add_pair(external_id, reference_id, target_id, split=entry_split or split,
                         captions=[str(c) for c in captions],
                         extra={k: v for k, v in entry.items() if k not in _KNOWN_KEYS})
    return session.finish()
