"""CIRR: PATH is a root holding captions/cap.rc2.{train,val,test1}.json and
image_splits/split.rc2.{split}.json (image name -> path like "./train/34/x.png"). Those
paths are relative to images_dir (`--images DIR`) when given, else to img_raw/ when the
root has one (the layout CIRR's README gives), else to the root itself.

Each caption entry becomes one pair (CIRR has one caption per pairid), with external id
"<split>:<pairid>", the caption as its original caption, img_set as image ids, and
pairid, img_set id, CIRR's image names and target_soft kept in `extra` so an export gives them back.
test1 withholds the target: those pairs have no target_id. Splits keep CIRR's names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import sqlite_utils

from ..errors import FormatError, ImageError
from ..models import ImportReport
from ._session import ImportSession, read_json

SPLITS = ("train", "val", "test1")


def import_cirr(db: sqlite_utils.Database, path: str | Path, *, split: Optional[str] = None,
                source: Optional[str] = None, images_dir: Optional[str | Path] = None,
                progress: bool = False) -> ImportReport:
    root = Path(path)
    if not (root / "captions").is_dir():
        raise FormatError(f"{root}: not a CIRR root (no captions/ folder; expected "
                          "captions/cap.rc2.<split>.json and image_splits/split.rc2.<split>.json)")
    splits = [split] if split else [s for s in SPLITS if (root / "captions" / f"cap.rc2.{s}.json").is_file()]
    if not splits:
        raise FormatError(f"{root}/captions: no cap.rc2.{{train,val,test1}}.json file")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise FormatError(f"--images {images_dir}: no such folder")
    session = ImportSession(db, source or "cirr", root, progress=progress, images_dir=images_dir)
    images = Path(images_dir) if images_dir else root / "img_raw" if (root / "img_raw").is_dir() else root
    # Every split's files are read before anything is written: a broken file found
    # halfway used to stop the import after earlier splits were partly stored.
    loaded = []
    for split_name in splits:
        try:
            loaded.append((split_name, *_load_split(root, split_name)))
        except FormatError as exc:
            if split:  # the one split asked for
                raise
            session.problem(f"CIRR split {split_name}", f"not imported: {exc}")
    for split_name, file_name, entries, name_to_path in loaded:
        session.prefetch(_referenced_paths(entries, name_to_path), images)
        for index, entry in session.iterate(enumerate(entries), total=len(entries), desc=f"cirr {split_name}"):
            _import_entry(session, images, split_name, file_name, index, entry, name_to_path)
    return session.finish()


def _load_split(root: Path, split_name: str) -> tuple[str, list, dict]:
    """(captions file name, its entries, image name -> path) for one split, or FormatError."""
    captions_file = root / "captions" / f"cap.rc2.{split_name}.json"
    names_file = root / "image_splits" / f"split.rc2.{split_name}.json"
    for needed in (captions_file, names_file):
        if not needed.is_file():
            present = [s for s in SPLITS if (root / "captions" / f"cap.rc2.{s}.json").is_file()]
            raise FormatError(f"{needed}: missing (needed for CIRR split {split_name!r}; CIRR's splits are "
                              f"{', '.join(SPLITS)}, and this root has captions for "
                              f"{', '.join(present) or 'none'})")
    return captions_file.name, read_json(captions_file, list), read_json(names_file, dict)


def _import_entry(session: ImportSession, root: Path, split: str, file_name: str, index: int,
                  entry, name_to_path: dict) -> None:
    item = f"{file_name}[{index}]"
    if not isinstance(entry, dict) or "pairid" not in entry or not entry.get("reference"):
        session.problem(item, "needs pairid and reference")
        return
    if isinstance(entry["pairid"], bool) or not isinstance(entry["pairid"], (int, str)):
        session.problem(item, f"pairid must be a whole number, not {entry['pairid']!r}")
        return
    item = f"{split} pairid {entry['pairid']}"
    wrong = _wrongly_typed(entry)
    if wrong:
        session.problem(item, wrong)
        return
    external_id = f"{split}:{entry['pairid']}"
    if session.pair_exists(external_id, item):
        return

    def image_id(name: str) -> str:
        if not isinstance(name, str):
            raise ImageError(f"{name!r}: not an image name")
        relative = name_to_path.get(name)
        if relative is None:
            raise ImageError(f"{name}: not listed in image_splits/split.rc2.{split}.json")
        if not isinstance(relative, str):  # else looked up as a file named "5"
            raise ImageError(f"{name}: image_splits/split.rc2.{split}.json gives it {relative!r}, "
                             "not a path to its image")
        return session.image(relative, base=root, name=name, split=split)

    try:
        reference_id = image_id(entry["reference"])
        target = entry.get("target_hard")
        target_id = image_id(target) if target else None
    except ImageError as exc:
        session.problem(item, str(exc))
        return
    if session.same_image(item, reference_id, target_id):
        return
    img_set = entry.get("img_set") or {}
    members = img_set.get("members", []) if isinstance(img_set, dict) else []
    member_ids = []
    for member in members:
        try:
            member_ids.append(image_id(member))
        except ImageError as exc:
            session.problem(f"{item} img_set member {member}", f"left out of the image set: {exc}",
                            drop_item=False)
    # CIRR's names, kept per pair: two names can hold byte-identical images, which the
    # store keeps once, under the first name it saw.
    extra = {"pairid": entry["pairid"],
             "names": {"reference": entry["reference"], "target_hard": target, "members": members}}
    if isinstance(img_set, dict) and "id" in img_set:
        extra["img_set_id"] = img_set["id"]
    if isinstance(img_set, dict):  # e.g. reference_rank, target_rank: given back on export
        others = {k: v for k, v in img_set.items() if k not in ("id", "members")}
        if others:
            extra["img_set_extra"] = others
    if "target_soft" in entry:
        extra["target_soft"] = entry["target_soft"]
    extra.update({k: v for k, v in entry.items()
                  if k not in ("pairid", "reference", "target_hard", "target_soft", "caption", "img_set")})
    caption = entry.get("caption")
    session.add_pair(external_id, reference_id, target_id, split=split,
                     captions=[caption] if caption else [],
                     img_set=member_ids if members else None, extra=extra)


def _wrongly_typed(entry: dict) -> Optional[str]:
    """Why an entry's fields cannot be imported as they are, or None."""
    for key in ("reference", "target_hard", "caption"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f"{key} must be a string, not {type(entry[key]).__name__}"
    img_set = entry.get("img_set")
    if img_set is not None and not (isinstance(img_set, dict)
                                    and isinstance(img_set.get("members", []), list)):
        return 'img_set must be {"id": ..., "members": [image names]}'
    return None


def _referenced_paths(entries: list, name_to_path: dict):
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        img_set = entry.get("img_set")
        names = [entry.get("reference"), entry.get("target_hard")]
        names += img_set.get("members", []) if isinstance(img_set, dict) else []
        yield from (name_to_path[n] for n in names if isinstance(n, str) and n in name_to_path)
