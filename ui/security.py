"""What keeps the review app safe to open: who may log in, where it may listen, which
files it may serve, and how untrusted text reaches the page.

- The app listens on 127.0.0.1 unless told otherwise; any other address needs --auth.
- Images are served by id only (never by a path from the browser), and only when the
  stored path resolves inside the dataset folder it was imported from and the file
  starts with an image signature (or, a TIFF and the like, was decoded by the import and
  is sent re-encoded as PNG), so a crafted row or a symlink cannot leak other files.
- Every caption, descriptor and name goes through `escape_text` before it is placed in
  HTML. Besides the HTML specials it escapes `$`, `{`, `}` and the backtick, because
  Gradio's gr.HTML runs its template through Handlebars and a JS template literal.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import quote

import sqlite_utils

from store.images import load_image_rgb

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
IMAGE_MEDIA_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".webp": "image/webp", ".bmp": "image/bmp", ".avif": "image/avif",
}
# Leading bytes of the browser formats above; a file that claims to be an image but is
# not is refused (e.g. a row pointing at a text file renamed .png). The media type comes
# from them, not from the name: a PNG named .jpg is sent as image/png.
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF87a": "image/gif",
               b"GIF89a": "image/gif", b"BM": "image/bmp"}


class SecurityError(Exception):
    """A request or setting the app refuses, with the reason."""


class ImageRefusedError(SecurityError):
    """An image that may not be served. `public` is the reason without server paths, for
    an HTTP answer; the message (with paths) is for the server's log and the owner."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public or message


def escape_text(value: object) -> str:
    """Text made inert for HTML *and* for gr.HTML's template evaluation."""
    text = html.escape("" if value is None else str(value), quote=True)
    return (
        text.replace("$", "&#36;").replace("{", "&#123;").replace("}", "&#125;")
        .replace("`", "&#96;")
    )


# ---------------------------------------------------------------- binding and auth

def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: Optional[list[tuple[str, str]]]) -> None:
    """Refuse to listen beyond this machine without a login."""
    if not is_loopback(host) and not auth:
        raise SecurityError(
            f"refusing to listen on {host!r} without a login: pass --auth USER:PASSWORD "
            "(or --auth FILE with one user:password per line), or use --host 127.0.0.1"
        )


def loopback_host_header(host_header: Optional[str]) -> bool:
    """Whether a request's Host header names this machine ("127.0.0.1:7860", "[::1]:7860",
    "localhost", ...). Without a login the app answers only those: a web page whose own
    name an attacker re-points at 127.0.0.1 (DNS rebinding) is then not same-origin with
    the app, so it cannot read the store or start runs paid with the server's API key."""
    if not host_header:
        return True  # no Host: not a browser (every browser sends one)
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    return is_loopback(host) or host.endswith(".localhost")


def parse_auth(spec: Optional[str]) -> Optional[list[tuple[str, str]]]:
    """`user:password`, or the path of a file with one `user:password` per line."""
    if not spec:
        return None
    if os.path.isfile(spec):
        try:
            # utf-8-sig: a BOM from a Windows editor would otherwise join the first user name
            lines = Path(spec).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
            raise SecurityError(f"--auth {spec}: cannot read the users file: {why}") from None
        source = spec
    else:
        if ":" not in spec:
            raise SecurityError(f"--auth {spec!r}: no such file, and not USER:PASSWORD")
        lines = [spec]
        source = "--auth"
    pairs = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise SecurityError(
                f"{source} line {number}: expected user:password (a non-empty user and password)"
            )
        pairs.append((user.strip(), password))
    if not pairs:
        raise SecurityError(f"{source}: no user:password entries found")
    return pairs


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def login_checker(users: list[tuple[str, str]]) -> Callable[[str, str], bool]:
    """The login check given to Gradio. Gradio's own check for a list of users looks the
    name up first and compares a password only for a known name, so a wrong user name
    was answered sooner than a wrong password. Here every entry is compared, name and
    password both, as equal-length digests with no early exit: the time taken does not
    depend on which part was wrong, nor on where the first difference lies."""
    entries = [(_digest(user), _digest(password)) for user, password in users]

    def check(username: str, password: str) -> bool:
        given_user, given_password = _digest(username), _digest(password)
        accepted = False
        for user, expected in entries:
            same_user = hmac.compare_digest(user, given_user)
            same_password = hmac.compare_digest(expected, given_password)
            accepted |= same_user & same_password
        return accepted

    return check


# Failed logins one client address may make within LOGIN_WINDOW_S seconds before its
# next attempts are refused (429) until the oldest failure ages out: a password guesser
# gets LOGIN_FAILURES_ALLOWED tries a minute instead of thousands.
LOGIN_FAILURES_ALLOWED = 10
LOGIN_WINDOW_S = 60.0


class LoginThrottle:
    """Failed logins per client address, in a sliding window."""

    def __init__(self, allowed: Optional[int] = None, window: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.allowed = LOGIN_FAILURES_ALLOWED if allowed is None else allowed
        self.window = LOGIN_WINDOW_S if window is None else window
        self._clock = clock
        self._failures: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str) -> deque:
        failures = self._failures.setdefault(client, deque())
        horizon = self._clock() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures

    def wait_seconds(self, client: str) -> float:
        """0 when the client may try; else how long until it may."""
        with self._lock:
            failures = self._recent(client)
            if len(failures) < self.allowed:
                return 0.0
            return max(failures[0] + self.window - self._clock(), 0.001)

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client).append(self._clock())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def login_user(request) -> Optional[str]:
    """The logged-in user behind a request: a gr.Request from an event, or the raw
    Starlette request a component's server function receives (read from Gradio's own
    login cookie, as Gradio's routes do)."""
    if request is None:
        return None
    user = getattr(request, "username", None)
    if user:
        return user
    raw = getattr(request, "request", None) or request
    scope = getattr(raw, "scope", None) or {}
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not tokens or cookie_id is None:
        return None
    cookies = getattr(raw, "cookies", {}) or {}
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None


# ---------------------------------------------------------------- images

@dataclass(frozen=True)
class ServedImage:
    path: Path
    media_type: str
    convert: bool = False  # send it re-encoded as PNG (a format browsers do not show)


def converted_png(path: Path) -> bytes:
    """A ServedImage with convert=True, as PNG bytes. Raises store's ImageError."""
    import io

    buffer = io.BytesIO()
    load_image_rgb(path).save(buffer, format="PNG")
    return buffer.getvalue()


def _sniffed_media_type(head: bytes) -> Optional[str]:
    for signature, media_type in _SIGNATURES.items():
        if head.startswith(signature):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "image/avif"
    return None


def resolve_image(db: sqlite_utils.Database, image_id: str) -> ServedImage:
    """The file to send for image `image_id`, or ImageRefusedError saying why not."""
    row = db.execute("SELECT path, root, url, format FROM images WHERE id = ?", [image_id]).fetchone()
    if row is None:
        raise ImageRefusedError(f"image {image_id!r} is not in the store")
    path_text, root_text, url, image_format = row
    if not path_text:
        # Remote images are never fetched by the app (it makes no network requests).
        raise ImageRefusedError(f"image {image_id!r} has no local file ({url or 'no url'})")
    path = Path(path_text).resolve()
    # The dataset's own folder: the import root when recorded, else the folder that
    # held the image at import. resolve() first, so '..' and symlinks cannot escape it.
    folder = Path(root_text).resolve() if root_text else Path(path_text).parent.resolve()
    if not path.is_relative_to(folder):
        raise ImageRefusedError(f"image {image_id!r}: {path} is outside its dataset folder {folder}",
                                f"image {image_id!r} is outside its dataset folder")
    # A row the import wrote names the format it decoded, whatever the file's name
    # ('.jfif', none at all); one with none must at least be named as an image.
    if not image_format and path.suffix.lower() not in IMAGE_MEDIA_TYPES:
        raise ImageRefusedError(f"image {image_id!r}: {path.name} does not have an image file extension")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise ImageRefusedError(f"image {image_id!r}: cannot read {path} ({exc.strerror})",
                                f"image {image_id!r}: its file cannot be read ({exc.strerror})") from exc
    media_type = _sniffed_media_type(head)
    if media_type is not None:
        return ServedImage(path=path, media_type=media_type)
    if image_format:  # the import decoded it, in a format browsers do not show (TIFF, ...)
        return ServedImage(path=path, media_type="image/png", convert=True)
    raise ImageRefusedError(f"image {image_id!r}: {path.name} is not an image file")


def uploaded_file(path_text: str) -> Path:
    """The file behind an upload's "path", or SecurityError. A browser's upload lies in
    Gradio's upload folder; an API call can name any path there, so anything else is
    refused before it is opened (it would otherwise be read, decoded and searched with)."""
    from gradio.utils import get_upload_folder

    path = Path(path_text).resolve()
    if not path.is_relative_to(Path(get_upload_folder()).resolve()):
        raise SecurityError(f"{path_text!r} is not an uploaded file")
    return path


def image_url(image_id: Optional[str]) -> Optional[str]:
    """The app's URL for a stored image: by id, never by path."""
    if not image_id:
        return None
    return f"/g4c/image/{quote(image_id, safe='')}"
