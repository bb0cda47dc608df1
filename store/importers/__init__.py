"""Import datasets into the store: `import_dataset(db, format, path)`.

Formats: "pairs" (the project's folder + pairs.jsonl, as the demo world writes it),
"good4cir" (the authors' dataset.json), "cirr" (a CIRR root), "circo" (CIRCO
annotations + images). Every import is idempotent (pair ids are hashes of source and
the dataset's own id) and reports bad items one by one while the rest imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import sqlite_utils

from ..models import ImportReport
from ._session import ImportSession, pair_id_for
from .pairs import import_pairs

FORMATS = ("pairs", "good4cir", "cirr", "circo")


def import_dataset(
    db: sqlite_utils.Database,
    format: str,
    path: str | Path,
    *,
    split: Optional[str] = None,
    source: Optional[str] = None,
    images_dir: Optional[str | Path] = None,
    progress: bool = False,
    download: bool = False,
) -> ImportReport:
    """Import PATH in `format`. split filters formats that name splits and sets it for
    those that do not; source overrides the dataset name pairs are recorded under;
    images_dir: CIRCO's images, CIRR's image folder, and for every format a folder
    outside PATH whose images the review app may show. download (good4cir, pairs): fetch
    images named by URL into the dataset's folder instead of recording the URL alone."""
    path = Path(path)
    if download and format not in ("good4cir", "pairs"):
        raise ValueError(f"--download fetches the URLs of the good4cir and pairs formats; {format} "
                         "names local files")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder to import")
    if format == "pairs":
        return import_pairs(db, path, split=split, source=source, images_dir=images_dir, progress=progress,
                            download=download)
    if format == "good4cir":
        from .good4cir import import_good4cir
        return import_good4cir(db, path, split=split, source=source, images_dir=images_dir,
                               progress=progress, download=download)
    if format == "cirr":
        from .cirr import import_cirr
        return import_cirr(db, path, split=split, source=source, images_dir=images_dir, progress=progress)
    if format == "circo":
        from .circo import import_circo
        return import_circo(db, path, split=split, source=source, images_dir=images_dir,
                            progress=progress)
    raise ValueError(f"unknown import format {format!r}; choose one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "ImportSession", "import_dataset", "pair_id_for"]
