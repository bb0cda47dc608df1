"""Credentials out of what gets stored: a `--base-url` may carry them, the store may not.

Some OpenAI-compatible servers and proxies take a key in the URL (`https://user:key@host/v1`,
`...?api-key=...`). The live client keeps the URL as given; runs, call records and exports
keep only `redact_url`'s version.
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
