"""A bounded pool of slots granted by urgency, not only by arrival.

The reconciler's pull slots (`--pull-concurrency`). Three ranks: URGENT (a request waits for
this pull), BACKGROUND (a preload, a prefetch), CHECK (a periodic source check).

- Urgent first: when a slot frees it goes to the most urgent waiter (then first come, first
  served), however many background pulls and checks queued before it.
- Urgency is asked again each time a slot frees, so a background pull becomes urgent the moment
  a request starts waiting for its model.
- The last slot is kept for urgent work (with two slots or more): background pulls and checks
  together hold at most `size - 1`, so a request's pull starts at once even while slow
  downloads or checks fill the others. With one slot it waits for that one to free."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

URGENT, BACKGROUND, CHECK = 0, 1, 2  # lower is sooner


@dataclass(eq=False)
class _Waiter:
    rank: Callable[[], int]
    order: int
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class PrioritySlots:
    """`async with slots.slot(rank): ...` holds one of `size` slots; `rank()` is evaluated
    whenever a slot is granted."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._in_use = 0
        self._background = 0  # slots held by non-urgent work
        self._waiters: list[_Waiter] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, rank: Callable[[], int]) -> AsyncIterator[None]:
        background = await self._acquire(rank)
        try:
            yield
        finally:
            self._give_back(background)

    def _fits(self, rank: int) -> bool:
        if self._in_use >= self.size:
            return False
        return rank == URGENT or self.size == 1 or self._background < self.size - 1

    def _take(self, rank: int) -> bool:
        self._in_use += 1
        background = rank != URGENT
        self._background += background
        return background

    def _give_back(self, background: bool) -> None:
        self._in_use -= 1
        self._background -= background
        self._grant()

    async def _acquire(self, rank: Callable[[], int]) -> bool:
        now = rank()
        if not self._waiters and self._fits(now):
            return self._take(now)
        waiter = _Waiter(rank, next(self._order))
        self._waiters.append(waiter)
        self._grant()  # it may be the one that fits (an urgent pull beside queued checks)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                self._give_back(waiter.future.result())  # granted as it was cancelled: hand it on
            raise

    def _grant(self) -> None:
        while self._waiters and self._in_use < self.size:
            ranked = sorted(((w.rank(), w.order, w) for w in self._waiters), key=lambda t: t[:2])
            for rank, _, w in ranked:
                if self._fits(rank):
                    break
            else:
                return  # only background work waits, and the last slot is kept for urgent work
            self._waiters.remove(w)
            if not w.future.done():
                w.future.set_result(self._take(rank))
