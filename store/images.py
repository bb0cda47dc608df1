"""Images: content hashes, validation before import, and the one safe way to decode.

Every part of good4cir that shows or encodes an image (pipeline, review app, retrieval)
reads it through `load_image_rgb`, so CMYK, 16-bit, palette, alpha and EXIF-rotated
files look the same everywhere, and a decompression bomb is refused everywhere.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

# 50 megapixels (e.g. 8000 x 6250): far above any CIR dataset image, far below what
# would exhaust memory. Checked from the header, before any pixel is decoded. PIL's own
# bomb check (at ~89 MP warning, ~179 MP error) stays in force as a second line.
MAX_PIXELS = 50_000_000

# What a file that PIL cannot read is, by its name, and what to do: "not an image" is
# puzzling for an iPhone photo that every viewer shows.
_UNREAD_FORMATS = {
    **dict.fromkeys((".heic", ".heif"), "a HEIC/HEIF photo (as iPhones save them), which cannot be "
                                        "read here: convert it to JPEG and name that file instead"),
    ".svg": "an SVG drawing, not a pixel image: export it as PNG and name that file instead",
    ".pdf": "a PDF document, not an image: export the page as PNG and name that file instead",
}

_EXIF_ORIENTATION = 0x0112
_ROTATED_90 = {5, 6, 7, 8}  # orientations whose transpose swaps width and height
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageInfo:
    """What the store records about a valid local image."""

    id: str          # sha256 of the file's bytes
    path: str        # absolute path
    width: int       # after EXIF orientation, i.e. as displayed
    height: int
    size_bytes: int
    format: str      # PIL's format name: PNG, JPEG, ...
    frames: int = 1  # an animated GIF, PNG or WebP has more; all but the first are unused


def is_url(location: str) -> bool:
    """True for http(s) URLs; local paths and file:// URLs are not remote."""
    return urlparse(str(location)).scheme in ("http", "https")


def url_image_id(url: str) -> str:
    """Id of an image known only by its URL: sha256 of the URL text.

    The content is never downloaded at import, so the id identifies the address, not
    the bytes; the same picture under two URLs gets two ids.
    """
    return hashlib.sha256(url.strip().encode("utf-8")).hexdigest()


def hash_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_checked(path: Path) -> Image.Image:
    """Open an image lazily (header only), refusing bombs and non-images."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between ~89 and ~179 MP; make that a refusal too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused, too many pixels to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        hint = _UNREAD_FORMATS.get(path.suffix.lower())
        raise ImageError(f"{path}: " + (hint or "not an image file PIL can read")) from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc})") from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageError(
            f"{path}: refused, {width}x{height} is {width * height:,} pixels, more than "
            f"the limit of {MAX_PIXELS:,} (a decompression bomb or a huge scan)"
        )
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError(f"{path}: has no pixels ({width}x{height})")
    return image


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not hide a good picture
        orientation = None
    if orientation in _ROTATED_90:
        return height, width
    return width, height


def inspect_image(path: str | Path) -> ImageInfo:
    """Validate a local image completely and describe it.

    Raises ImageError naming the file and the reason: missing, empty, not an image,
    truncated or corrupt, or too many pixels. The whole image is decoded once, since
    a truncated file is only found that way.
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # exists() follows links: a dangling one or a loop
            raise ImageError(f"{path}: a symbolic link to {os.readlink(path)}, which leads to no file "
                             "(missing, or a loop of links)")
        raise ImageError(f"{path}: file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    size_bytes = path.stat().st_size
    if size_bytes == 0:
        raise ImageError(f"{path}: file is empty (0 bytes)")
    image = _open_checked(path)
    try:
        image_format = image.format or "unknown"
        width, height = _displayed_size(image)
        frames = getattr(image, "n_frames", 1) if getattr(image, "is_animated", False) else 1
        try:
            image.load()
        except OSError as exc:
            raise ImageError(f"{path}: truncated or corrupt {image_format} ({exc})") from exc
        except (ValueError, SyntaxError) as exc:  # some decoders raise these on bad data
            raise ImageError(f"{path}: corrupt {image_format} ({exc})") from exc
    finally:
        image.close()
    return ImageInfo(
        id=hash_file(path), path=str(path.resolve()), width=width, height=height,
        size_bytes=size_bytes, format=image_format, frames=frames,
    )


def load_image_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode an image as 8-bit RGB, upright (EXIF orientation applied).

    Transparent pixels are composited onto `background` (white: what a viewer shows);
    16-bit samples are scaled to 8 bits rather than clipped. Raises ImageError.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    image = _open_checked(path)
    try:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except OSError as exc:
            raise ImageError(f"{path}: truncated or corrupt ({exc})") from exc
        return to_rgb(upright, background)
    finally:
        image.close()


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A decoded image as 8-bit RGB: alpha onto `background`, 16-bit samples scaled."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        image = _deep_to_l(image)
        mode = image.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "RGB":
        return image.copy()
    # CMYK, YCbCr, LAB, L, 1, P: PIL's converters are correct for these.
    return image.convert("RGB")


def _deep_to_l(image: Image.Image) -> Image.Image:
    """16-bit or 32-bit single-channel image to 8-bit L, keeping the full range."""
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        top = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
        values = values * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
