"""Concurrency of one run's LLM calls: an AIMD limit and a shared Retry-After pause.

The limit starts at the run's concurrency (its ceiling). A 429 halves it (multiplicative
decrease; only once per "generation": the other calls already in flight when the limit was
lowered do not lower it again) and makes every new call of the run wait out the Retry-After.
After `increase_after` successful calls in a row the limit grows by one (additive increase),
never above the ceiling.
"""

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)


class AimdLimiter:
    """Bounds the calls in flight; adapts the bound to the provider's rate limits.

    Waiters queue in FIFO order and a freed slot wakes exactly one of them (a run may have
    thousands of calls waiting; waking all of them on every release would cost O(n^2))."""

    def __init__(self, ceiling: int, increase_after: int) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.increase_after = increase_after
        self.in_flight = 0
        self.decreases = 0
        self._successes = 0
        self._generation = 0
        self._paused_until = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Hold one call slot; yields the generation to report a 429 against."""
        await self._acquire()
        try:
            await self._wait_pause()
            yield self._generation
        finally:
            self.in_flight -= 1
            self._wake()

    async def _acquire(self) -> None:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1  # the slot was handed over as we were cancelled
                self._wake()
            else:
                self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        """Hands free slots to the oldest waiters (the slot is taken on their behalf)."""
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    @property
    def generation(self) -> int:
        """Changes with every decrease: a holder of a slot from an earlier generation that has
        not called yet gives its slot back and queues again under the lowered limit."""
        return self._generation

    async def _wait_pause(self) -> None:
        """Waits out the Retry-After pause (a 429 during the wait may extend it)."""
        loop = asyncio.get_running_loop()
        while True:
            delay = self._paused_until - loop.time()
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    def on_success(self) -> None:
        self._successes += 1
        if self._successes >= self.increase_after and self.limit < self.ceiling:
            self._successes = 0
            self.limit += 1
            self._wake()

    def on_rate_limited(self, generation: int, retry_after_s: float | None) -> None:
        """A call started in `generation` got a 429 (retry_after_s: the provider's wait)."""
        self._successes = 0
        if retry_after_s:
            until = asyncio.get_running_loop().time() + retry_after_s
            self._paused_until = max(self._paused_until, until)
        if generation != self._generation:
            return
        self._generation += 1
        self.decreases += 1
        previous, self.limit = self.limit, max(1, self.limit // 2)
        log.warning("LLM rate limited: concurrency %d -> %d (decrease %d), pause %.3fs",
                    previous, self.limit, self.decreases, retry_after_s or 0.0)
