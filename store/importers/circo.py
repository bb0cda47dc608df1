"""CIRCO: annotations JSON (a list of {"id", "reference_img_id", "target_img_id",
"gt_img_ids", "relative_caption", "shared_concept"}) plus a folder of COCO 2017
unlabeled images named by id ("000000123456.jpg"; any extension, padded or not).

PATH is either the annotations file, with the images folder given as images_dir
(`--images DIR`; found without it beside the file, or beside its annotations/ folder as
in CIRCO's layout), or a CIRCO root holding annotations/{val,test}.json (or *.json at the
top) and the images in COCO2017_unlabeled/unlabeled2017/, unlabeled2017/ or images/.
The split is the annotations file's name (val.json -> "val") unless --split names it;
with a root, --split picks which file. The test split has no target: those pairs have
no target_id. gt_img_ids are imported as images and kept in `extra` as store ids
("gt_image_ids") next to CIRCO's own ("gt_img_ids").
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import sqlite_utils

from ..errors import FormatError, ImageError
from ..models import ImportReport
from ._session import ImportSession, read_json

IMAGE_DIRS = ("COCO2017_unlabeled/unlabeled2017", "unlabeled2017", "images")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def import_circo(db: sqlite_utils.Database, path: str | Path, *, split: Optional[str] = None,
                 source: Optional[str] = None, images_dir: Optional[str | Path] = None,
                 progress: bool = False) -> ImportReport:
    path = Path(path)
    if path.is_dir():
        annotation_files = _annotation_files(path, split)
        if images_dir is None:
            images_dir = next((path / d for d in IMAGE_DIRS if (path / d).is_dir()), None)
        file_splits = [(f, f.stem) for f in annotation_files]
    else:
        file_splits = [(path, split or path.stem)]
        if images_dir is None:
            # CIRCO's layout keeps the file in annotations/, beside the images' folder.
            roots = [path.parent] + ([path.parent.parent] if path.parent.name == "annotations" else [])
            images_dir = next((root / d for root in roots for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if images_dir is None or not Path(images_dir).is_dir():
        raise FormatError(f"{path}: no CIRCO images folder found; pass --images DIR "
                          f"(looked for {', '.join(IMAGE_DIRS)})")
    images_dir = Path(images_dir)
    by_id = _index_images(images_dir)
    if not by_id:
        # --images naming a folder of CIRCO's layout above the images (COCO2017_unlabeled)
        nested = next((images_dir / d for d in IMAGE_DIRS if (images_dir / d).is_dir()), None)
        nested_ids = _index_images(nested) if nested else {}
        if nested_ids:
            images_dir, by_id = nested, nested_ids
    session = ImportSession(db, source or "circo", images_dir, progress=progress)
    # Every file is read before anything is written (a broken one found halfway used to
    # stop the import after earlier files were partly stored). With several files, a
    # broken one is a problem and the others import; a single file is an error.
    loaded = []
    for annotations_file, split_name in file_splits:
        try:
            loaded.append((annotations_file, split_name, read_json(annotations_file, list, "CIRCO queries")))
        except FormatError as exc:
            if len(file_splits) == 1:
                raise
            session.problem(annotations_file.name, f"not imported: {exc}")
    for annotations_file, split_name, entries in loaded:
        session.prefetch(_referenced_files(entries, by_id), images_dir)
        for index, entry in session.iterate(enumerate(entries), total=len(entries), desc=f"circo {split_name}"):
            _import_entry(session, images_dir, by_id, split_name, annotations_file.name, index, entry)
    return session.finish()


def _annotation_files(root: Path, split: Optional[str]) -> list[Path]:
    folder = root / "annotations" if (root / "annotations").is_dir() else root
    files = sorted(folder.glob("*.json"))
    if split:
        files = [f for f in files if f.stem == split]
    if not files:
        raise FormatError(f"{folder}: no CIRCO annotations file"
                          + (f" named {split}.json" if split else " (*.json)"))
    return files


def _index_images(images_dir: Path) -> dict[int, Path]:
    """COCO image id -> file, from names like 000000123456.jpg or 123456.png."""
    by_id: dict[int, Path] = {}
    for file in images_dir.iterdir():
        if file.suffix.lower() in _IMAGE_SUFFIXES and file.stem.isdigit():
            by_id.setdefault(int(file.stem), file)
    return by_id


def _referenced_files(entries: list, by_id: dict[int, Path]):
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        gt = entry.get("gt_img_ids")
        ids = [entry.get("reference_img_id"), entry.get("target_img_id"), *(gt if isinstance(gt, list) else ())]
        for coco_id in ids:
            if isinstance(coco_id, int) and coco_id in by_id:
                yield str(by_id[coco_id].resolve())


def _wrongly_typed(entry: dict) -> Optional[str]:
    """Why an entry's fields cannot be imported as they are, or None."""
    for key in ("relative_caption", "shared_concept"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f"{key} must be a string, not {type(entry[key]).__name__}"
    if entry.get("gt_img_ids") is not None and not isinstance(entry["gt_img_ids"], list):
        return f"gt_img_ids must be a list of image ids, not {type(entry['gt_img_ids']).__name__}"
    return None


def _import_entry(session: ImportSession, images_dir: Path, by_id: dict[int, Path], split: str,
                  file_name: str, index: int, entry) -> None:
    item = f"{file_name}[{index}]"
    if not isinstance(entry, dict) or "id" not in entry or entry.get("reference_img_id") is None:
        session.problem(item, "needs id and reference_img_id")
        return
    if isinstance(entry["id"], bool) or not isinstance(entry["id"], (int, str)):
        session.problem(item, f"id must be a whole number, not {entry['id']!r}")
        return
    item = f"{split} query {entry['id']}"
    wrong = _wrongly_typed(entry)
    if wrong:
        session.problem(item, wrong)
        return
    external_id = f"{split}:{entry['id']}"
    if session.pair_exists(external_id, item):
        return

    def image_id(coco_id) -> str:
        # An int, or digits in a string; not a bool or 11.5 (int() would make them 1, 11).
        if isinstance(coco_id, bool) or not (isinstance(coco_id, int)
                                             or (isinstance(coco_id, str) and coco_id.isdigit())):
            raise ImageError(f"{coco_id!r}: not a CIRCO image id")
        file = by_id.get(int(coco_id))
        if file is None:
            raise ImageError(f"image {coco_id}: no file {int(coco_id):012d}.jpg in {images_dir}")
        return session.image(str(file.resolve()), base=images_dir, name=str(int(coco_id)), split=split)

    try:
        reference_id = image_id(entry["reference_img_id"])
        target = entry.get("target_img_id")
        target_id = image_id(target) if target is not None else None
    except ImageError as exc:
        session.problem(item, str(exc))
        return
    if session.same_image(item, reference_id, target_id):
        return
    gt_image_ids = []
    for gt in entry.get("gt_img_ids") or ():
        try:
            gt_image_ids.append(image_id(gt))
        except ImageError as exc:
            session.problem(f"{item} ground truth {gt}", f"left out of gt_image_ids: {exc}",
                            drop_item=False)
    extra = {"circo_id": entry["id"], "shared_concept": entry.get("shared_concept"),
             "reference_img_id": entry["reference_img_id"], "target_img_id": target,
             "gt_img_ids": entry.get("gt_img_ids"), "gt_image_ids": gt_image_ids}
    extra.update({k: v for k, v in entry.items() if k not in extra and k not in ("id", "relative_caption")})
    caption = entry.get("relative_caption")
    session.add_pair(external_id, reference_id, target_id, split=split,
                     captions=[caption] if caption else [], extra=extra)
