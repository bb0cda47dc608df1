"""Request slots for a run: bounded concurrency, served by stage priority."""

from __future__ import annotations

import asyncio
import contextlib
import heapq

# Later stages first: a pair that has started finishes before new pairs start, so the
# run ends with few half-done pairs whose remaining calls can only go one after another.
STAGE_PRIORITY = {"stage3": 0, "repair": 0, "single": 1, "stage2": 1, "stage1": 2}


class PrioritySlots:
    """A semaphore whose waiters are served by priority (lower first), then FIFO."""

    def __init__(self, slots: int):
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._counter = 0

    @contextlib.asynccontextmanager
    async def slot(self, priority: int):
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            future = asyncio.get_running_loop().create_future()
            self._counter += 1
            heapq.heappush(self._waiters, (priority, self._counter, future))
            try:
                await future  # the releaser hands its slot over: _free unchanged
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # handed a slot while being cancelled: pass it on
                else:
                    self._waiters = [w for w in self._waiters if w[2] is not future]
                    heapq.heapify(self._waiters)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1
