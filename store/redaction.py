"""Credentials out of what gets stored: a `--base-url` may carry them, the store may not.

Some OpenAI-compatible servers and proxies take a key in the URL (`https://user:key@host/v1`,
`...?api-key=...`). The live client keeps the URL as given; runs, call records and exports
keep only `redact_url`'s version.
"""

from __future__ import annotations

import base64
import re
from typing import Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

SECRET_NAME = re.compile(r"key|token|secret|password|passwd|authorization|bearer|credential|sig", re.I)
REDACTED = "[redacted]"


def redact_url(url: Optional[str]) -> Optional[str]:
    """The URL without user info, and with the values of secret-looking query parameters
    replaced by "[redacted]"."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if SECRET_NAME.search(k) else v) for k, v in pairs], safe="[]")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_secrets(url: Optional[str]) -> tuple[str, ...]:
    """The secret parts of a URL as a server may echo them back in an error: the user info
    (as written and unquoted, and as the `Basic base64(user:password)` credentials the client
    sends for it) and the values of secret-looking query parameters. Parts under 4
    characters are left out: replacing them would garble every message."""
    if not url:
        return ()
    parts = urlsplit(url)
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        user, _, password = userinfo.partition(":")
        found += [userinfo, user, password, unquote(user), unquote(password)]
        found.append(base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode())
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if SECRET_NAME.search(key):
            found.append(value)
    return tuple(dict.fromkeys(part for part in found if len(part) >= 4))
