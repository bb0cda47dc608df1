"""What every import format shares: image validation with a per-run cache, stable pair
ids, per-item problems, and batched idempotent writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import unquote

import sqlite_utils
from tqdm import tqdm

from ..db import transaction, utc_now
from ..errors import FormatError, ImageError
from ..images import ImageInfo, hash_file, inspect_image, is_url, url_image_id
from ._download import DOWNLOAD_DIR, download_images
from ..models import ImportProblem, ImportReport

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

# Pairs written per transaction: small enough that a reviewer's save waits only
# milliseconds for the import's write lock, large enough to be fast.
BATCH_PAIRS = 500


def pair_id_for(source: str, external_id: str) -> str:
    """Stable pair id: the same (source, external id) always gets the same id."""
    return hashlib.sha256(f"{source}\x1f{external_id}".encode("utf-8")).hexdigest()[:24]


def resolve_location(location: str, base: Path) -> str | Path:
    """A URL stays a string; a path (absolute, relative to base, or file://) becomes a Path."""
    location = str(location).strip()
    if is_url(location):
        return location
    if location.startswith("file://"):
        # A file URL is percent-encoded (Path.as_uri writes 'my%20photo.jpg', 'caf%C3%A9')
        # and may name its host: file://localhost/srv/a.jpg.
        raw = location[len("file://"):]
        raw = raw[len("localhost"):] if raw.startswith("localhost/") else raw
        location = unquote(raw) if not os.path.lexists(raw) else raw  # 'a%20b.jpg' may be a name
    path = _joined(location, base)
    # lexists: never raises (a name too long, a NUL byte) and keeps a broken link as named.
    return path if os.path.lexists(path) else _spelled_otherwise(location, base, path)


def _joined(location: str, base: Path) -> Path:
    path = Path(location).expanduser()
    return path if path.is_absolute() else base / path


def _spelled_otherwise(location: str, base: Path, path: Path) -> Path:
    """The file a missing location names under another spelling, else `path`: a pairs
    file written on Windows ('photos\\a.jpg'), or a name typed in one Unicode form while
    the disk holds the other (macOS writes 'café' decomposed, NFD; an editor or a script
    writes it composed, NFC): both look the same to a user who lists the folder."""
    spellings = [location.replace("\\", "/")] if "\\" in location else [location]
    spellings += [unicodedata.normalize(form, s) for s in list(spellings) for form in ("NFC", "NFD")]
    for spelling in dict.fromkeys(spellings):
        if spelling != location and os.path.lexists(candidate := _joined(spelling, base)):
            return candidate
    return path


def read_text(path: Path) -> str:
    """A dataset file's text. UTF-8, with or without a BOM (Windows editors add one);
    anything else is a FormatError naming the file, not a bare UnicodeDecodeError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "save it as UTF-8 and import again") from None
    if not text.strip():
        raise FormatError(f"{path}: the file is empty")
    return text


def read_json(path: Path, kind: type, what: str = ""):
    """A dataset file's JSON, which must be a `kind` (list or dict): else a FormatError
    naming the file and, when given, what it should hold."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, kind):
        raise FormatError(f"{path}: expected a JSON {kind.__name__}" + (f" of {what}" if what else ""))
    return data


def read_lines(path: Path) -> list[tuple[Optional[str], Optional[str]]]:
    """A JSON-lines file as (text, None) per line, or (None, why) for a line that is not
    UTF-8: one bad line is reported on its own while the others import."""
    lines = []
    for raw in path.read_bytes().splitlines():
        try:
            # A BOM opens a Windows editor's file, and so a line of `cat a.jsonl b.jsonl`.
            lines.append((raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"), None))
        except UnicodeDecodeError as exc:
            lines.append((None, f"not UTF-8 text (byte {exc.start}: {exc.reason})"))
    return lines


class ImportSession:
    """One import run into one store. Call `image()` per image, `add_pair()` per pair,
    `problem()` for a bad item, and `finish()` at the end."""

    def __init__(self, db: sqlite_utils.Database, source: str, root: Path, *,
                 progress: bool = False, images_dir: Optional[Path] = None):
        self.db = db
        self.source = source
        self.root = root.resolve()
        self._lexical_root = Path(os.path.abspath(root))  # before links are followed
        # The folders the review app may serve this dataset's images from: the import's
        # own, and the one `--images` names (an export's absolute paths, a linked folder).
        self.roots = [self.root] + ([Path(images_dir).resolve()] if images_dir else [])
        self.progress = progress
        self.report = ImportReport()
        self._by_path: dict[str, ImageInfo | ImageError] = {}
        self._known_ids: set[str] = set()
        self._moved: dict[str, tuple[str, str]] = {}  # image id -> (path, root)
        self._rerooted: dict[str, str] = {}  # image id -> a root that now holds it
        self._staged: list[tuple[str, dict, Optional[Any]]] = []
        self._pending_images: dict[str, dict] = {}
        self._pending_scenes: dict[str, str] = {}
        self._pending_pairs: list[dict] = []
        self._seen_pairs: set[str] = set()
        self._outside_noted: set[str] = set()
        # URL image id -> its downloaded copy (import --download); the rows that exist
        # already, with no local file, get it at the next flush.
        self._downloads: dict[str, ImageInfo] = {}
        self._fill: dict[str, ImageInfo] = {}
        self._failed_downloads: dict[str, ImageError] = {}
        self._url_only: dict[str, str] = {}  # image id -> URL, for images stored with no file
        # New pairs whose two images a pair of another source already joins (an export
        # imported back into its own store): (count, first such (external id, source, id)).
        self._twins: tuple[int, Optional[tuple[str, str, str]]] = (0, None)
        self._outside_folders: dict[str, tuple[str, str]] = {}  # folder -> (item, real path)
        self._animated: dict[str, str] = {}  # image id -> location, of new animated images
        self._unnamed: dict[tuple, str] = {}  # (source, reference, target) -> item, pairs with no id
        self._respelled: tuple[int, Optional[tuple[str, str]]] = (0, None)  # (count, first (item, stored id))

    # ---- items -----------------------------------------------------------------------

    def iterate(self, items: Iterable, total: Optional[int] = None, desc: str = "import"):
        return tqdm(items, total=total, desc=desc, unit="pair", disable=not self.progress,
                    leave=False)

    def problem(self, item: str, reason: str, *, drop_item: bool = True) -> None:
        """Record a bad item. drop_item: the item is not imported, so images validated
        for it so far are not stored either."""
        if drop_item:
            self._staged = []
        self.report.problems.append(ImportProblem(item=str(item), reason=reason))

    def same_image(self, item: str, reference_id: str, target_id: Optional[str]) -> bool:
        """True, with a problem recorded, when a pair's reference and target are one image
        (one file named twice, or two files with the same content): a CIR pair of one image
        has no modification to describe, and annotating it would pay a VLM to say so."""
        if target_id is None or target_id != reference_id:
            return False
        self.problem(item, "reference and target are the same image (same content): a pair needs "
                           "two different images; fix the target's path")
        return True

    def respelled(self, item: str, reference_id: str, target_id: Optional[str],
                  source: Optional[str] = None) -> bool:
        """For a pair with no id of its own (its id is its two paths as written): True when
        the same two images are joined already under other spellings ('a.jpg' and
        './a.jpg', 'sub\\a.jpg' and 'sub/a.jpg'): a stored one is skipped (with one note),
        one earlier in this import is a duplicate. Else a pairs file whose paths were
        tidied up imported every pair a second time, to be annotated and paid twice."""
        source = source or self.source
        key = (source, reference_id, target_id)
        if key in self._unnamed:
            self.problem(item, f"names the same two images as {self._unnamed[key]}, spelled otherwise: "
                               "left out; give each pair its own id to keep both")
            return True
        self._unnamed[key] = item
        row = self.db.execute("SELECT external_id FROM pairs WHERE source = ? AND reference_id = ?"
                              " AND target_id IS ? LIMIT 1", [source, reference_id, target_id]).fetchone()
        if row is None:
            return False
        count, first = self._respelled
        self._respelled = (count + 1, first or (item, row[0]))
        self.report.pairs_skipped += 1
        return True

    def warn(self, item: str, reason: str) -> None:
        self.report.warnings.append(ImportProblem(item=str(item), reason=reason))

    def pair_exists(self, external_id: str, item: Optional[str] = None,
                    reference: Optional[str] = None, base: Optional[Path] = None,
                    source: Optional[str] = None) -> bool:
        """True when this pair was imported before: counted as skipped, or, when its
        reference image is now a different file (another dataset under the same source
        name, e.g. a regenerated demo world), reported as a problem. `source`: the
        pair's own, where it is not the session's (a line of a JSONL export)."""
        source = source or self.source
        pair_id = pair_id_for(source, external_id)
        if pair_id in self._seen_pairs:
            # Twice in one dataset: the second is a different item under the same id
            # (or a copy); it would be silently lost if merely counted as skipped.
            self.problem(item or str(external_id),
                         f"duplicate id {external_id!r}: an earlier item of this import has the "
                         "same id, so this one is left out; give each pair its own id")
            return True
        row = self.db.execute("SELECT reference_id FROM pairs WHERE id = ?", [pair_id]).fetchone()
        if row is None:
            return False
        self._seen_pairs.add(pair_id)  # a second copy in this import is still a duplicate
        if reference is not None and base is not None:
            resolved = resolve_location(reference, base)
            now = url_image_id(resolved) if isinstance(resolved, str) else self._by_path.get(str(resolved))
            now_id = getattr(now, "id", now)
            if isinstance(now_id, str) and now_id != row[0]:
                self.problem(item or str(external_id),
                             f"a pair {external_id!r} from source {source!r} is already stored "
                             "with a different reference image; to keep both, import this one "
                             "under another name with --source NAME")
                return True
        self.report.pairs_skipped += 1
        return True

    def image(self, location: str, *, base: Path, name: Optional[str] = None,
              split: Optional[str] = None, scene: Optional[Any] = None) -> str:
        """Validate (once per run) and queue an image; returns its id. Raises ImageError."""
        resolved = resolve_location(location, base)
        if isinstance(resolved, str):  # a URL: its id is the URL's hash, fetched or not
            image_id = url_image_id(resolved)
            if image_id in self._failed_downloads:
                raise self._failed_downloads[image_id]
            copy = self._downloads.get(image_id)
            self._staged.append((image_id, {
                "id": image_id, "name": name or resolved, "path": copy and copy.path, "url": resolved,
                "root": copy and str(self._root_for(Path(copy.path)) or self.root),
                "width": copy and copy.width, "height": copy and copy.height,
                "size_bytes": copy and copy.size_bytes, "format": copy and copy.format, "split": split,
            }, scene))
            return image_id
        key = str(resolved)
        cached = self._by_path.get(key)
        if cached is None:
            cached = self._check_path(resolved)
            self._by_path[key] = cached
        if isinstance(cached, ImageError):
            if _WINDOWS_DRIVE.match(str(location).strip()) and not os.path.lexists(resolved):
                raise ImageError(f"{location}: a Windows drive path, which names no file on this machine: "
                                 "name images relative to the dataset folder (or by their path here)")
            raise cached
        if cached.frames > 1:
            self._animated.setdefault(cached.id, str(location))
        root = self._root_for(Path(cached.path))
        if root is None:
            root = self.root
            self._note_outside(str(location), resolved, cached.path)
        self._staged.append((cached.id, {
            "id": cached.id, "name": name or str(location), "path": cached.path, "url": None,
            "root": str(root), "width": cached.width, "height": cached.height,
            "size_bytes": cached.size_bytes, "format": cached.format, "split": split,
        }, scene))
        return cached.id

    def download(self, locations: Iterable[str]) -> None:
        """import --download: fetch the http(s) images among `locations` into the dataset
        folder's downloaded_images/. `image()` then records a URL with its file (a row
        stored before without one gets it too), or raises what went wrong with it."""
        urls = [str(location).strip() for location in locations if is_url(str(location).strip())]
        for url, result in download_images(urls, self.root / DOWNLOAD_DIR, progress=self.progress).items():
            image_id = url_image_id(url)
            if isinstance(result, ImageError):
                self._failed_downloads[image_id] = result
                if self.db.execute("SELECT 1 FROM images WHERE id = ? AND path IS NULL",
                                   [image_id]).fetchone():
                    self.warn(url, f"{result}; an earlier import recorded it by URL only, and so it stays")
            else:
                self._downloads[image_id] = result
                self._fill[image_id] = result

    def _note_outside(self, location: str, named: Path, real: str) -> None:
        """Say once per folder (or once per linked folder inside the dataset, such as
        CIRR's img_raw linked to another disk, with its hundred subfolders) that images
        there lie outside the dataset folder, so the review app will not show them."""
        link = self._link_inside(named)
        key = str(link) if link is not None else str(Path(real).parent)
        if key in self._outside_noted:
            return
        self._outside_noted.add(key)
        if link is not None:
            self.warn(location, f"{link} is a link to {link.resolve()}, outside the dataset folder "
                      f"{self.root}: the images through it are imported, but the review app will not "
                      f"show them; to let it, import again with --images {link}")
            return
        self._outside_folders[key] = (location, real)

    def _note_outside_folders(self, most: int = 5) -> None:
        """The notes of images outside the dataset folder: one per folder, or, past
        `most` folders (an export's absolute paths into CIRR's hundred subfolders), one
        naming the folder that holds them all."""
        folders = self._outside_folders
        if len(folders) > most:
            common = Path(os.path.commonpath(list(folders)))
            location, _ = next(iter(folders.values()))
            # Never advise a whole disk: the app would serve anything on it.
            where, all_in = ((f" under {common}", f" ({common} holds them all)") if common.parent != common
                             else (f" (first {', '.join(list(folders)[:3])})", ""))
            self.warn(location, f"images in {len(folders)} folders{where} lie outside the dataset "
                      f"folder {self.root} (named by absolute paths, '../' or links): imported, but the "
                      "review app will not show them; to let it, import again with --images naming a "
                      f"folder that holds them{all_in}")
        else:
            for folder, (location, real) in folders.items():
                self.warn(location, f"{real} lies outside the dataset folder {self.root} "
                          "(named by an absolute path, '../' or a link): imported, but the review app "
                          f"will not show images in {folder}; to let it, import again with --images "
                          "naming a folder that holds them")
        self._outside_folders = {}

    def _link_inside(self, named: Path) -> Optional[Path]:
        """The outermost folder link inside the dataset folder on the way to `named`, or None."""
        path = Path(os.path.abspath(named))
        for folder in reversed(path.parents):
            if folder != self._lexical_root and folder.is_relative_to(self._lexical_root) \
                    and folder.is_symlink():
                return folder
        return None

    def _root_for(self, real: Path) -> Optional[Path]:
        """The dataset folder recorded for an image (the review app serves a file only
        from inside it): the first of self.roots that holds the real file, else None."""
        return next((root for root in self.roots if real.is_relative_to(root)), None)

    def prefetch(self, locations: Iterable[str], base: Path) -> None:
        """Validate many local images at once, on all cores (decoding releases the GIL),
        so that the per-item `image()` calls that follow hit the cache."""
        paths: dict[str, Path] = {}
        for location in locations:
            resolved = resolve_location(str(location), base)
            if isinstance(resolved, Path) and str(resolved) not in self._by_path:
                paths[str(resolved)] = resolved
        if not paths:
            return
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Hash first: images validated by an earlier import are not decoded again.
            hashes = dict(zip(paths, pool.map(_hash_or_none, paths.values())))
            unknown = []
            for key, image_id in hashes.items():
                known = self._known_info(image_id, paths[key]) if image_id else None
                if known is not None:
                    self._by_path[key] = known
                else:
                    unknown.append(key)
            results = pool.map(_inspect_or_error, (paths[k] for k in unknown))
            for key, result in zip(unknown, tqdm(results, total=len(unknown), desc="checking images",
                                                   unit="img", disable=not self.progress, leave=False)):
                self._by_path[key] = result

    def _known_info(self, image_id: str, path: Path) -> Optional[ImageInfo]:
        row = self.db.execute(
            "SELECT width, height, size_bytes, format, path, root FROM images WHERE id = ?", [image_id]
        ).fetchone()
        if row is None or row[0] is None:
            return None
        self._known_ids.add(image_id)
        if row[4] is not None and not Path(row[4]).exists():
            # The dataset moved: point the stored row at the file found now.
            real = path.resolve()
            self._moved[image_id] = (str(real), str(self._root_for(real) or self.root))
        elif row[4] is not None and row[5] is not None and not Path(row[4]).is_relative_to(row[5]):
            # Stored from outside its dataset folder (through a link, or by an absolute
            # path), so the review app refuses it; the folders of this import (--images)
            # may hold it, as the import's note advised: record the one that does.
            root = self._root_for(Path(row[4]))
            if root is not None:
                self._rerooted[image_id] = str(root)
        return ImageInfo(id=image_id, path=str(path.resolve()), width=row[0], height=row[1],
                         size_bytes=row[2], format=row[3])

    def _check_path(self, path: Path) -> ImageInfo | ImageError:
        try:
            image_id = _hash_or_none(path)
            known = self._known_info(image_id, path) if image_id else None
            # Already validated by an earlier import: skip the full decode.
            return known if known is not None else inspect_image(path)
        except ImageError as exc:
            return exc
        except OSError as exc:
            return ImageError(f"{path}: cannot be read ({exc})")

    def _queue_image(self, image_id: str, row: dict, scene: Optional[Any]) -> None:
        if row["url"] and row["path"] is None and image_id not in self._url_only and not self.db.execute(
                "SELECT 1 FROM images WHERE id = ? AND path IS NOT NULL", [image_id]).fetchone():
            self._url_only[image_id] = row["url"]
        if image_id not in self._pending_images and image_id not in self._known_ids:
            row["scene_json"] = None if scene is None else json.dumps(scene, sort_keys=True)
            row["created_at"] = utc_now()
            self._pending_images[image_id] = row
        elif scene is not None:
            self._pending_scenes[image_id] = json.dumps(scene, sort_keys=True)

    def add_pair(self, external_id: str, reference_id: str, target_id: Optional[str], *,
                 split: Optional[str] = None, captions: Iterable[str] = (),
                 img_set: Optional[list[str]] = None, ground_truth: Any = None,
                 extra: Optional[dict] = None, source: Optional[str] = None) -> str:
        source = source or self.source
        pair_id = pair_id_for(source, external_id)
        self._seen_pairs.add(pair_id)
        for image_id, row, scene in self._staged:
            self._queue_image(image_id, row, scene)
        self._staged = []
        self._pending_pairs.append({
            "id": pair_id, "source": source, "external_id": str(external_id),
            "reference_id": reference_id, "target_id": target_id, "split": split,
            "original_captions": json.dumps([str(c) for c in captions], ensure_ascii=False),
            "img_set": None if img_set is None else json.dumps(img_set),
            "ground_truth": None if ground_truth is None else json.dumps(ground_truth, sort_keys=True),
            "extra": json.dumps(extra or {}, sort_keys=True, ensure_ascii=False),
            "created_at": utc_now(),
        })
        if len(self._pending_pairs) >= BATCH_PAIRS:
            self.flush()
        return pair_id

    # ---- writes ----------------------------------------------------------------------

    def flush(self) -> None:
        if not (self._pending_pairs or self._pending_images or self._pending_scenes or self._moved
                or self._rerooted or self._fill):
            return
        images = list(self._pending_images.values())
        pairs = self._pending_pairs
        with transaction(self.db):
            conn = self.db.conn
            if images:
                cols = list(images[0])
                cursor = conn.executemany(
                    f"INSERT OR IGNORE INTO images ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                    [[row[c] for c in cols] for row in images],
                )
                self.report.images_added += max(cursor.rowcount, 0)
            if self._moved:
                conn.executemany(
                    "UPDATE images SET path = ?, root = ? WHERE id = ?",
                    [(path, root, image_id) for image_id, (path, root) in self._moved.items()],
                )
                self.report.images_moved += len(self._moved)
            if self._rerooted:
                conn.executemany("UPDATE images SET root = ? WHERE id = ?",
                                 [(root, image_id) for image_id, root in self._rerooted.items()])
                self.report.images_rerooted += len(self._rerooted)
            if self._fill:
                cursor = conn.executemany(
                    "UPDATE images SET path = ?, root = ?, width = ?, height = ?, size_bytes = ?,"
                    " format = ? WHERE id = ? AND path IS NULL",
                    [(info.path, str(self._root_for(Path(info.path)) or self.root), info.width,
                      info.height, info.size_bytes, info.format, image_id)
                     for image_id, info in self._fill.items()],
                )
                self.report.images_downloaded += max(cursor.rowcount, 0)
            if self._pending_scenes:
                conn.executemany(
                    "UPDATE images SET scene_json = ? WHERE id = ? AND scene_json IS NULL",
                    [(scene, image_id) for image_id, scene in self._pending_scenes.items()],
                )
            if pairs:
                self._count_twins(pairs)
                cols = list(pairs[0])
                cursor = conn.executemany(
                    f"INSERT OR IGNORE INTO pairs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                    [[row[c] for c in cols] for row in pairs],
                )
                added = max(cursor.rowcount, 0)
                self.report.pairs_added += added
                # Another process imported the same pair meanwhile: still idempotent.
                self.report.pairs_skipped += len(pairs) - added
        self._known_ids.update(self._pending_images)
        self._pending_images = {}
        self._pending_scenes = {}
        self._moved = {}
        self._fill = {}
        self._rerooted = {}
        self._pending_pairs = []

    def _count_twins(self, pairs: list[dict]) -> None:
        count, first = self._twins
        for pair in pairs:
            twin = self.db.execute(
                "SELECT source, external_id FROM pairs WHERE reference_id = ? AND target_id IS ?"
                " AND source != ? LIMIT 1", [pair["reference_id"], pair["target_id"], pair["source"]],
            ).fetchone()
            if twin is not None:
                count += 1
                first = first or (pair["external_id"], twin[0], twin[1])
        self._twins = (count, first)

    def finish(self) -> ImportReport:
        self.flush()
        if self._url_only:  # one note, not one per image: a dataset of URLs has thousands
            first = next(iter(self._url_only.values()))
            count = len(self._url_only)
            self.warn(first, f"{count} image{'s' if count != 1 else ''} named by URL (the first: {first}) "
                      "were recorded without downloading: not checked, the review app cannot show them "
                      "and training leaves their pairs out; import again with --download to fetch them "
                      f"into {self.root / DOWNLOAD_DIR}")
        count, first = self._twins
        if count:
            external_id, other, other_id = first
            self.warn(external_id, f"{count} pair{'s' if count != 1 else ''} of this import show the "
                      f"same reference and target images as pairs stored from source {other!r} (this "
                      f"one as {other_id!r}): imported as new pairs of source {self.source!r}, so the "
                      "store now holds both; if this file is an export of that dataset, import it "
                      "into a new store instead")
        if self._animated:
            first = next(iter(self._animated.values()))
            count = len(self._animated)
            self.warn(first, f"{count} animated image{'s' if count != 1 else ''} (the first: {first}): the "
                      "VLM and retrieval use only the first frame of each, while the review app shows it "
                      "moving; to review what the VLM saw, import its first frame as a still image instead")
        count, first = self._respelled
        if count:
            item, stored = first
            self.warn(item, f"{count} pair{'s' if count != 1 else ''} with no id name{'s' if count == 1 else ''} "
                      f"the same two images as a pair stored already under other spellings (this one as "
                      f"{stored!r}): skipped as already there; to import such a pair as a new one, give "
                      "it an \"id\"")
        self._note_outside_folders()
        return self.report


def _hash_or_none(path: Path) -> Optional[str]:
    try:
        return hash_file(path) if path.is_file() and path.stat().st_size > 0 else None
    except OSError:
        return None


def _inspect_or_error(path: Path) -> ImageInfo | ImageError:
    try:
        return inspect_image(path)
    except ImageError as exc:
        return exc
    except OSError as exc:
        return ImageError(f"{path}: cannot be read ({exc})")
