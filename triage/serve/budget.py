"""How many bytes of received instances the STOW-RS route holds in memory at once.

Checking and storing an instance reads it into memory (its bytes, and pydicom's copy of its
pixel data). Spooling keeps request bodies out of memory; this budget keeps the parts being
ingested within ``TRIAGE_STOW_MEMORY_BYTES`` together, whatever the number of concurrent
uploads. Parts wait their turn in arrival order; a part larger than the whole budget waits
until it can hold all of it, then runs alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    """A first-come, first-served byte semaphore for the server's event loop."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("the byte budget must be positive")
        self.capacity = capacity
        self.used = 0
        self._queue: deque[object] = deque()
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or (self._loop is not loop and self.used == 0 and not self._queue):
            # A server runs one loop; a test client may start a new one per request.
            self._cond, self._loop = asyncio.Condition(), loop
        return self._cond

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[int]:
        """Hold ``nbytes`` (at least 1, at most the capacity) while the block runs."""
        share = min(max(nbytes, 1), self.capacity)
        cond = self._condition()
        ticket = object()
        async with cond:
            self._queue.append(ticket)
            try:
                await cond.wait_for(
                    lambda: self._queue[0] is ticket and self.used + share <= self.capacity
                )
            finally:
                self._queue.remove(ticket)
                cond.notify_all()
            self.used += share
        try:
            yield share
        finally:
            async with cond:
                self.used -= share
                cond.notify_all()
