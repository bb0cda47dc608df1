"""Images as the VLM sees them: downscaled, re-encoded, base64 data URLs.

Decoding and encoding run in a small thread pool so the event loop that drives the
HTTP calls never waits on Pillow; results are cached (LRU) because a reference image
is sent once per pair in the single-stage method and stage 1 may be retried.
A file that cannot be read raises BadImageError naming the file: only the items that
need that image fail.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from store.images import to_rgb

from .backends.base import PermanentError

DETAILS = ("low", "high", "auto")
# Refuse to decode anything this large: a crafted file can claim gigapixels.
MAX_PIXELS = 12_000 * 12_000


class BadImageError(PermanentError):
    """An image file is missing, unreadable or unsafe to decode."""


def encode_image(path: str | Path, max_side: int, quality: int = 85) -> str:
    """Read `path`, shrink it to fit max_side × max_side, return a JPEG data URL."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise BadImageError(
                    f"image {path.name}: {image.width}x{image.height} is too large to decode safely"
                )
            image.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced size
            # store's conversion, as the review app and retrieval see the image: PIL's own
            # convert clips 16-bit samples, so a 16-bit PNG went out nearly white.
            image = to_rgb(ImageOps.exif_transpose(image))
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"image {path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"image {path.name}: cannot decode ({exc})") from None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ImageEncoder:
    """Data URLs for image files, encoded off the event loop and cached (LRU).

    Concurrent requests for the same image share one encoding.
    """

    def __init__(self, max_side: int = 512, quality: int = 85, cache_size: int = 512,
                 workers: int = 2):
        if max_side < 16:
            raise ValueError(f"image max side must be at least 16 px, not {max_side}")
        self.max_side = max_side
        self.quality = quality
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="g4c-image")

    async def data_url(self, path: str, key: Optional[str] = None) -> str:
        """A data URL for a local file; an http(s) URL (an image recorded only by its URL)
        is passed on as it is, for the provider to fetch."""
        if path.startswith(("https://", "http://")):
            return path
        key = key or path
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, encode_image, path, self.max_side, self.quality)
        self._pending[key] = future
        try:
            url = await asyncio.shield(future)
        finally:
            self._pending.pop(key, None)
        self._cache[key] = url
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return url

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
