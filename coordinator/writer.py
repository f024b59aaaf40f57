"""The result writer: the one task of a leader that changes recipient rows.

Everything that changes where a recipient stands goes through it, in arrival order:
outcomes reported by nodes (live, replayed in a hello, or handed back through etcd),
suppressions found at dispatch, the leader's decisions over ranges of a job (cancel,
expire, retry failures, give up a batch), and batch releases, which are settled from
their recipients' state after the outcomes that came before them were applied. Having
one writer keeps the job counts, moved in the same statements, exact.

Each flush is one fenced transaction (:meth:`coordinator.db.store.Store.write`) of up to
``max_items`` queued items. After it commits, nodes are acknowledged up to the highest
sequence number applied (:class:`WriterEvents.acked`), and the owner hears of settled
batches and changed jobs. When PostgreSQL cannot take the write, the same items are
tried again after a pause (the write is idempotent, so a commit whose outcome was lost
is simply repeated) while new items queue behind them; :attr:`ResultWriter.backlog` tells
the owner to stop handing out work. :class:`LostLeadership` ends :meth:`ResultWriter.run`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

from coordinator.db.store import (
    BatchRelease,
    BatchSettled,
    JobCounts,
    StatusChange,
    Store,
    StoreUnavailable,
)
from coordinator.model import RecipientOutcome

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NodeResults:
    """Outcomes from one node, with the node's sequence number to acknowledge."""

    node_id: str
    seq: int
    """0 when there is nothing to acknowledge (hand-backs are acknowledged in etcd)."""
    outcomes: list[RecipientOutcome]


@dataclasses.dataclass
class Change:
    change: StatusChange
    done: asyncio.Future[int]


@dataclasses.dataclass
class Suppress:
    """Recipients found on their tenant's list at dispatch: (job_no, index, reason)."""

    items: list[tuple[int, int, str]]


@dataclasses.dataclass
class Release:
    release: BatchRelease
    done: asyncio.Future[None] | None = None


Item = NodeResults | Change | Suppress | Release


class WriterEvents(Protocol):
    def acked(self, node_id: str, through_seq: int) -> None: ...
    def settled(self, batches: list[BatchSettled]) -> None: ...
    def jobs_changed(
        self, counts: dict[int, JobCounts], reopened: dict[int, list[int]]
    ) -> None: ...


class ResultWriter:
    """Owned by the leader; :meth:`run` is its task.

    Args:
        store: The leader's fenced store.
        events: Told what each committed flush did.
        retry_at: When a released batch with deferred recipients may go again.
        flush_interval_s: Items wait at most about this long to be written, unless a
            full flush is queued sooner. A flush has a fixed cost (a fenced transaction,
            its commit): ``bench.e2e --recipients 20000`` made 146 flushes of a median
            129 outcomes at 0.02 s, 45 of 452 at 0.1 s.
        max_items: Items per transaction.
        clock: Unix seconds.
    """

    def __init__(
        self,
        store: Store,
        events: WriterEvents,
        retry_at: Callable[[BatchRelease, int], float],
        *,
        flush_interval_s: float = 0.1,
        max_items: int = 2000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._events = events
        self._retry_at = retry_at
        self._flush_interval_s = flush_interval_s
        self._max_items = max_items
        self._clock = clock
        self._queue: collections.deque[Item] = collections.deque()
        self._queued_outcomes = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._written = asyncio.Event()
        self.failing_since: float | None = None
        """Since when (unix s) writes have been failing; None while they succeed."""

    # ---- intake ---------------------------------------------------------------------

    def results(self, batch: NodeResults) -> None:
        self._queue.append(batch)
        self._queued_outcomes += len(batch.outcomes)
        self._wake.set()
        if self._full_flush_queued:
            self._full.set()

    def release(self, release: BatchRelease) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(Release(release, done))
        self._wake.set()
        return done

    def change(self, change: StatusChange) -> asyncio.Future[int]:
        """Queue a leader decision; the future gives how many recipients it changed."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(Change(change, done))
        self._wake.set()
        return done

    def suppress(self, items: list[tuple[int, int, str]]) -> None:
        if items:
            self._queue.append(Suppress(items))
            self._wake.set()

    @property
    def backlog(self) -> int:
        """Outcomes received and not yet written."""
        return self._queued_outcomes

    @property
    def _full_flush_queued(self) -> bool:
        return self._queued_outcomes >= self._max_items

    @property
    def idle(self) -> bool:
        return not self._queue

    async def drained(self) -> None:
        """Wait until everything queued now (and after) is written. The caller bounds it."""
        while self._queue:
            await self._written.wait()

    # ---- the task -------------------------------------------------------------------

    async def run(self) -> None:
        """Write until cancelled. Raises LostLeadership when the fence fails."""
        pause_s = 0.2
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            items = self._take()
            try:
                await self._write(items)
            except StoreUnavailable as exc:
                self._queue.extendleft(reversed(items))
                if self.failing_since is None:
                    self.failing_since = self._clock()
                    log.warning("cannot write results: %s; retrying", exc)
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, 5.0)
                continue
            if self.failing_since is not None:
                log.warning("writing results again after %.1fs", self._clock() - self.failing_since)
                self.failing_since = None
            pause_s = 0.2
            self._queued_outcomes -= sum(
                len(i.outcomes) for i in items if isinstance(i, NodeResults)
            )
            self._written.set()
            self._written = asyncio.Event()

    async def _gather(self) -> None:
        """Let items gather for the flush interval, or until a full flush is queued."""
        if self._full_flush_queued:
            return
        self._full.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._flush_interval_s):
                await self._full.wait()

    def _take(self) -> list[Item]:
        taken: list[Item] = []
        weight = 0
        while self._queue and (not taken or weight < self._max_items):
            item = self._queue.popleft()
            taken.append(item)
            weight += len(item.outcomes) if isinstance(item, NodeResults) else 1
        return taken

    async def _write(self, items: list[Item]) -> None:
        outcomes = [o for i in items if isinstance(i, NodeResults) for o in i.outcomes]
        changes = [i for i in items if isinstance(i, Change)]
        suppressed = [s for i in items if isinstance(i, Suppress) for s in i.items]
        releases = [i for i in items if isinstance(i, Release)]
        out = await self._store.write(
            outcomes,
            [c.change for c in changes],
            suppressed,
            [r.release for r in releases],
            self._retry_at,
            self._clock(),
        )
        acks: dict[str, int] = {}
        for item in items:
            if isinstance(item, NodeResults) and item.seq:
                acks[item.node_id] = max(acks.get(item.node_id, 0), item.seq)
        for node_id, seq in acks.items():
            self._events.acked(node_id, seq)
        if out.settled:
            self._events.settled(out.settled)
        if out.jobs or out.reopened:
            self._events.jobs_changed(out.jobs, out.reopened)
        for change, n in zip(changes, out.changed, strict=True):
            if not change.done.done():
                change.done.set_result(n)
        for release in releases:
            if release.done is not None and not release.done.done():
                release.done.set_result(None)
