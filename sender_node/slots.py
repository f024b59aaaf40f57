"""Transaction slots handed out by priority, then by batch, then in arrival order.

A node runs every batch it holds at once, but only ``size`` SMTP transactions at a
time; when a slot frees, the waiting transaction of the highest-priority batch gets it,
so transactional mail overtakes a campaign already queued on the node. Among batches of
equal priority the one the node took first goes first (``order``): a batch finishes
sooner instead of all of them advancing together, and the results written in one
journal sync belong to few batches, so they leave the node in few stream messages
(``outbox.merge_by_batch`` sends one per batch and sync).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from types import TracebackType


class PrioritySlots:
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._free = size
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def slot(self, priority: int, order: int = 0) -> _Hold:
        """Hold one slot for the block: waiters of a higher ``priority`` first, then of a
        lower ``order`` (the batch's arrival), then first come. Cancellation while
        waiting gives nothing up."""
        return _Hold(self, priority, order)

    async def _acquire(self, priority: int, order: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, order, next(self._order), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived just as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = heapq.heappop(self._waiters)[-1]
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class _Hold:
    """The block of :meth:`PrioritySlots.slot`: a plain class, not an
    ``asynccontextmanager`` generator, since every transaction enters one."""

    __slots__ = ("_slots", "_priority", "_order")

    def __init__(self, slots: PrioritySlots, priority: int, order: int) -> None:
        self._slots = slots
        self._priority = priority
        self._order = order

    async def __aenter__(self) -> None:
        await self._slots._acquire(self._priority, self._order)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._slots._release()
