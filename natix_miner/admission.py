"""Stake priority that does something: at most N requests in the engine, waiters by stake.

bittensor's axon runs a priority function but only to order a trivial task in its thread pool,
so it orders nothing; the engine's queues are first come, first served. This gate sits in the
forward, in front of the engine: up to `limit` requests are inside at once; the rest wait, and
when a slot frees the waiting caller with the highest stake (then the earliest) goes next. A
waiter whose answer budget runs out leaves with `False` and the neuron answers its fallback at
once. Validators' weights on a miner are stake-weighted, so under overload the heaviest
validators get the full cascade and the lightest get the fallback, not the other way round.

One event loop (the axon's) uses a gate; it is not thread-safe.
"""

import asyncio
import heapq
import itertools
from typing import Optional


class AdmissionGate:
    """At most `limit` holders (0 = unlimited); waiters served highest priority first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()
        self.waited = 0
        self.timed_out = 0

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    def _forget_done(self) -> None:
        if len(self._waiters) > 4 * self.limit + 64:
            self._waiters = [w for w in self._waiters if not w[2].done()]
            heapq.heapify(self._waiters)

    async def acquire(self, priority: float, timeout_s: float) -> bool:
        """True once admitted (call `release` after); False if `timeout_s` passed first."""
        if self.limit <= 0:
            return True
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        if timeout_s <= 0:
            self.timed_out += 1
            return False
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._seq), future))
        self.waited += 1
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
            return True
        except asyncio.TimeoutError:
            if future.done() and not future.cancelled():
                return True  # the slot arrived as the timer fired: keep it
            future.cancel()
            self.timed_out += 1
            self._forget_done()
            return False
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            future.cancel()
            raise

    def release(self) -> None:
        """Hand the slot to the best waiter, or free it."""
        if self.limit <= 0:
            return
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(True)
                return
        self.active = max(0, self.active - 1)

    def stats(self) -> dict[str, Optional[int]]:
        return {"limit": self.limit, "active": self.active, "waiting": self.waiting,
                "waited": self.waited, "timed_out": self.timed_out}
