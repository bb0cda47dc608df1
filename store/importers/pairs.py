"""The project's own format: a folder with pairs.jsonl (and images), as the demo world
writes it. PATH may also be a .jsonl file; image paths are relative to its folder.

pairs.jsonl, one object per line: "reference" and "target" (required; relative paths,
absolute paths or http(s) URLs; "target": null for a query whose target is withheld), "id", "split", "captions", "edits" (ground truth),
"img_set" (image paths), "gt_images" (image paths: every ground truth of a query with
several, as CIRCO's, kept as extra "gt_image_ids"). scenes.jsonl beside it gives
{"image", "scene"} per image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import sqlite_utils

from ..errors import FormatError, ImageError
from ..models import ImportReport
from ._session import ImportSession, read_lines

PAIRS_FILE = "pairs.jsonl"
SCENES_FILE = "scenes.jsonl"
# Keys with a column of their own, plus those our jsonl export adds (re-importing an
# export keeps the pairs and captions; provenance stays in the file it came from).
_KNOWN_KEYS = {"id", "reference", "target", "split", "captions", "edits", "img_set", "gt_images", "extra",
               "pair_id", "source", "original_captions", "provenance"}


def import_pairs(db: sqlite_utils.Database, path: str | Path, *, split: Optional[str] = None,
                 source: Optional[str] = None, images_dir: Optional[str | Path] = None,
                 progress: bool = False, download: bool = False) -> ImportReport:
    path = Path(path)
    if path.is_dir():
        folder, pairs_file = path, path / PAIRS_FILE
    else:
        folder, pairs_file = path.parent, path
    if not pairs_file.is_file():
        others = sorted(p.name for p in folder.glob("*.json*") if p.suffix.lower() in (".jsonl", ".json"))
        raise FormatError(f"{pairs_file}: not found; a pairs import needs a folder holding {PAIRS_FILE}"
                          + (f" (this one holds {', '.join(others[:5])}: pass the JSON-lines file "
                             "itself, or --format good4cir for the authors' dataset.json)" if others else ""))
    named_source = source
    if source is None:
        source = "demo" if (folder / "world.json").is_file() else folder.resolve().name
    session = ImportSession(db, source, folder, progress=progress, images_dir=images_dir)
    scenes = _read_scenes(folder / SCENES_FILE, folder, session)
    lines = read_lines(pairs_file)
    _refuse_json_array(pairs_file, lines)
    if not any(text is None or text.strip() for text, _ in lines):
        session.warn(pairs_file.name, "the file is empty: no pairs to import")
    locations = list(_image_locations([text for text, _ in lines if text is not None], split))
    if download:
        session.download(locations)
    session.prefetch(locations, folder)
    for number, (line, undecodable) in session.iterate(enumerate(lines, start=1), total=len(lines),
                                                        desc=source):
        item = f"{pairs_file.name} line {number}"
        if undecodable:
            session.problem(item, undecodable)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            session.problem(item, f"not valid JSON ({exc.msg})")
            continue
        # "target": null (not a missing key) is a query whose target is withheld, as our
        # jsonl export writes CIRR test1 pairs.
        if (not isinstance(obj, dict) or not obj.get("reference")
                or not (obj.get("target") or ("target" in obj and obj["target"] is None))):
            session.problem(item, 'needs an object with "reference" and "target" image paths')
            continue
        wrong = _wrongly_typed(obj)
        if wrong:
            session.problem(item, wrong)
            continue
        line_split = obj.get("split")
        if split is not None and line_split is not None and line_split != split:
            continue
        pair_split = line_split or split
        external_id = str(obj["id"]) if obj.get("id") is not None else f"{obj['reference']}|{obj['target'] or ''}"
        item = f"pair {external_id!r} ({item})"
        # A line of our jsonl export names the dataset its pair came from: a store of
        # several holds the same id under each (CIRR's and CIRCO's "val:0"), and under
        # one source every second one was a duplicate, left out. --source still wins.
        line_source = (obj["source"] if named_source is None and "provenance" in obj
                       and isinstance(obj.get("source"), str) and obj["source"].strip() else None)
        if session.pair_exists(external_id, item, obj["reference"], folder, source=line_source):
            continue
        captions = obj.get("captions") or []
        if isinstance(captions, str):
            captions = [captions]
        # Checked before any image is staged: a wrongly typed field drops only this line.
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            session.problem(item, '"captions" must be a list of strings (or one string)')
            continue
        wrong_list = next((key for key in ("img_set", "gt_images")
                           if obj.get(key) is not None and not isinstance(obj[key], list)), None)
        if wrong_list:
            session.problem(item, f'"{wrong_list}" must be a list of image paths')
            continue
        try:
            reference_id = session.image(obj["reference"], base=folder, split=pair_split,
                                         scene=scenes.get(_norm(obj["reference"], folder)))
            target_id = None if obj["target"] is None else session.image(
                obj["target"], base=folder, split=pair_split,
                scene=scenes.get(_norm(obj["target"], folder)))
        except ImageError as exc:
            session.problem(item, str(exc))
            continue
        if session.same_image(item, reference_id, target_id) or (
                obj.get("id") is None and session.respelled(item, reference_id, target_id, source=line_source)):
            continue
        img_set = None
        if obj.get("img_set") is not None:
            img_set = _images(session, obj["img_set"], folder, pair_split, scenes,
                              f"{item} img_set member", "the image set")
        extra = dict(obj["extra"]) if isinstance(obj.get("extra"), dict) else {}
        extra.update({k: v for k, v in obj.items() if k not in _KNOWN_KEYS})
        if "pairid" in extra and isinstance(obj.get("original_captions"), list) \
                and obj["original_captions"] != captions:
            # Our jsonl export of an annotated CIRR pair: its captions are a run's, and
            # CIRR's pairid numbers the dataset's own caption, which is not among them; a
            # CIRR export would give it to the first generated one.
            extra["original_pairid"] = extra.pop("pairid")
        if obj.get("gt_images") is not None:
            truths = _images(session, obj["gt_images"], folder, pair_split, scenes,
                             f"{item} ground truth", "its ground truths")
            # Our export keeps the store's own list in extra too, with any id it held no
            # image for: those stay as they were.
            given = extra.get("gt_image_ids")
            extra["gt_image_ids"] = list(dict.fromkeys(
                [*(given if isinstance(given, list) else ()), *truths]))
        session.add_pair(external_id, reference_id, target_id, split=pair_split,
                         captions=captions, img_set=img_set, ground_truth=obj.get("edits"),
                         extra=extra, source=line_source)
    return session.finish()


def _images(session: ImportSession, locations: list, folder: Path, split: Optional[str],
            scenes: dict[str, dict], item: str, left_out_of: str) -> list[str]:
    """Store ids of a pair's further images; one that cannot be imported is a problem that
    leaves the pair in."""
    ids = []
    for location in locations:
        if not isinstance(location, str):  # else looked up as a file named "5" or "None"
            session.problem(f"{item} {location!r}", f"left out of {left_out_of}: not an image path "
                            f"(a string), but {type(location).__name__}", drop_item=False)
            continue
        try:
            ids.append(session.image(location, base=folder, split=split,
                                     scene=scenes.get(_norm(location, folder))))
        except ImageError as exc:
            session.problem(f"{item} {location!r}", f"left out of {left_out_of}: {exc}", drop_item=False)
    return ids


def _wrongly_typed(obj: dict) -> Optional[str]:
    """Why a line's fields cannot be imported as they are, or None. (A number where a path
    belongs would otherwise be looked up as a file named "7".)"""
    for key in ("reference", "target"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            return f'"{key}" must be an image path or URL (a string), not {type(obj[key]).__name__}'
    if obj.get("split") is not None and not isinstance(obj["split"], str):
        return f'"split" must be a string, not {type(obj["split"]).__name__}'
    if obj.get("id") is not None and not isinstance(obj["id"], (str, int)):
        return f'"id" must be a string or a number, not {type(obj["id"]).__name__}'
    return None


def _refuse_json_array(pairs_file: Path, lines: list) -> None:
    """A whole JSON array saved as pairs.jsonl (a json.dump, pretty-printed or not) gave a
    problem per line but imported the odd line with no trailing comma: refused whole."""
    texts = [text for text, _ in lines if text is not None]
    if not next((t for t in texts if t.strip()), "").lstrip().startswith("["):
        return
    try:
        data = json.loads("\n".join(texts))
    except json.JSONDecodeError:
        return
    if isinstance(data, list):
        raise FormatError(f"{pairs_file}: holds one JSON array of {len(data)} items, not JSON Lines; "
                          f"{PAIRS_FILE} needs one object per line (e.g. jq -c '.[]' old.json > {PAIRS_FILE})")


def _image_locations(lines: list[str], split: Optional[str]):
    """Every image path the lines of `split` name (bad lines are reported later, in order)."""
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and (split is None or obj.get("split") in (None, split)):
            for key in ("reference", "target"):
                if isinstance(obj.get(key), str):
                    yield obj[key]
            for key in ("img_set", "gt_images"):
                if isinstance(obj.get(key), list):
                    yield from (m for m in obj[key] if isinstance(m, str))


def _norm(location: str, folder: Path) -> str:
    """Key that matches scenes.jsonl's image paths with pairs.jsonl's."""
    path = Path(str(location))
    # realpath, not Path.resolve: a symlink loop raises RuntimeError in the latter, and
    # the line that names it is reported as a problem by the image check instead.
    try:
        return os.path.realpath(path if path.is_absolute() else folder / path)
    except ValueError:  # a NUL byte in the path: no scene, and the image check says why
        return str(location)


def _read_scenes(scenes_file: Path, folder: Path, session: ImportSession) -> dict[str, dict]:
    if not scenes_file.is_file():
        return {}
    scenes: dict[str, dict] = {}
    for number, (line, undecodable) in enumerate(read_lines(scenes_file), start=1):
        if undecodable:
            session.warn(f"{scenes_file.name} line {number}", f"ignored: {undecodable}")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            scenes[_norm(obj["image"], folder)] = obj["scene"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            session.warn(f"{scenes_file.name} line {number}",
                         f'ignored: needs {{"image": path, "scene": {{...}}}} ({exc})')
    return scenes
