"""Images a dataset names by http(s) URL, fetched on request (`import --download`) into
a folder inside the dataset's own: the review app serves images only from there, and
training and the pipeline read local files. Each URL is fetched once: a file already
there is used as it is, so a rerun asks the server only for what failed before."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from ..errors import FormatError, ImageError
from ..images import ImageInfo, inspect_image

DOWNLOAD_DIR = "downloaded_images"
# Far above any CIR dataset image; a link to a video or an archive stops here, not on a full disk.
MAX_DOWNLOAD_BYTES = 64 << 20
TIMEOUT_S = 30
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}


def download_images(urls: Iterable[str], folder: Path, *, progress: bool = False
                    ) -> dict[str, ImageInfo | ImageError]:
    """url -> the validated local copy in `folder`, or the ImageError naming the URL and
    what went wrong (HTTP status, not an image, too large)."""
    unique = list(dict.fromkeys(urls))
    if not unique:
        return {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FormatError(f"cannot create {folder} to download the dataset's images into "
                          f"({exc.strerror}); import without --download to record the URLs only") from None
    with ThreadPoolExecutor(max_workers=8) as pool:  # network-bound: more threads than cores
        results = pool.map(lambda url: _fetch_or_error(url, folder), unique)
        return dict(zip(unique, tqdm(results, total=len(unique), desc="downloading images",
                                     unit="img", disable=not progress, leave=False)))


def _fetch_or_error(url: str, folder: Path) -> ImageInfo | ImageError:
    try:
        return fetch_image(url, folder)
    except ImageError as exc:
        return exc


def fetch_image(url: str, folder: Path) -> ImageInfo:
    """The local copy of `url` in `folder` (fetched now unless there already), validated."""
    stem = hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
    kept = next(folder.glob(f"{stem}.*"), None)  # a .part being written starts with "."
    if kept is not None:
        try:
            return inspect_image(kept)
        except ImageError:  # a copy cut short or changed since: fetch it again
            kept.unlink(missing_ok=True)
    data, content_type = _get(url)
    part = folder / f".{stem}.{uuid.uuid4().hex}.part"
    part.write_bytes(data)
    try:
        info = inspect_image(part)
    except ImageError as exc:
        part.unlink(missing_ok=True)
        why = str(exc).split(": ", 1)[-1]
        raise ImageError(f"{url}: {why} (the server sent {content_type or 'no Content-Type'})") from None
    final = folder / f"{stem}{_SUFFIXES.get(info.format, '.' + info.format.lower())}"
    os.replace(part, final)
    return dataclasses.replace(info, path=str(final.resolve()))


def _get(url: str) -> tuple[bytes, str]:
    # As a browser does: spaces and non-ASCII letters percent-encoded, "%XX" kept.
    quoted = urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")
    request = urllib.request.Request(quoted, headers={"User-Agent": "good4cir-import"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
                raise ImageError(f"{url}: refused, {int(length):,} bytes is more than the "
                                 f"download limit of {MAX_DOWNLOAD_BYTES:,}")
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise ImageError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ImageError(f"{url}: download failed ({reason})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageError(f"{url}: refused, more than the download limit of {MAX_DOWNLOAD_BYTES:,} bytes")
    if not data:
        raise ImageError(f"{url}: the server sent an empty body")
    return data, content_type
