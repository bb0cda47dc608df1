"""Which pair each open review page shows, so that reviewers working down one queue at
the same time are not all handed the same pair (each would review it, the last decision
replacing the others'), and each sees who else has the pair open.

Kept in the app's memory: a page tells it on every move and every live tick (a few
seconds apart); a page not heard from for OPEN_SECONDS has been closed or left.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

OPEN_SECONDS = 15.0  # about three live ticks (ui.app.LIVE_SECONDS): one late tick does not count as gone


class Presence:
    def __init__(self, open_seconds: float = OPEN_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._open_seconds = open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pages: dict[str, tuple[Optional[str], str, float]] = {}  # page -> (annotation, reviewer, heard)

    def touch(self, page: Optional[str], annotation_id: Optional[str], reviewer: Optional[str] = None) -> None:
        """Page `page` (Gradio's session hash) shows `annotation_id`; `reviewer` None keeps
        the name it gave before (moves do not carry the Reviewer box, ticks do)."""
        if not page:
            return
        with self._lock:
            known = self._pages.get(page)
            name = reviewer if reviewer is not None else (known[1] if known else "")
            self._pages[page] = (annotation_id, (name or "").strip(), self._clock())

    def _open(self) -> dict[str, tuple[Optional[str], str, float]]:
        oldest = self._clock() - self._open_seconds
        with self._lock:
            for page in [p for p, (_, _, heard) in self._pages.items() if heard < oldest]:
                del self._pages[page]
            return dict(self._pages)

    def open_elsewhere(self, page: Optional[str]) -> set[str]:
        """The annotations shown on other pages than `page`."""
        return {shown for other, (shown, _, _) in self._open().items() if other != page and shown}

    def others_on(self, annotation_id: Optional[str], page: Optional[str]) -> list[str]:
        """Who else has `annotation_id` open: their names, one each, sorted ('someone'
        for a page with no name yet). Pages under this page's own name are left out: the
        page a reload replaced is heard of until it times out."""
        if not annotation_id:
            return []
        pages = self._open()
        mine = pages[page][1] if page in pages else ""
        return sorted({name or "someone" for other, (shown, name, _) in pages.items()
                       if other != page and shown == annotation_id and not (mine and name == mine)})
