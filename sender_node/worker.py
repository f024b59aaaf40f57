"""The node's worker: it takes batches, runs their SMTP transactions, and releases them.

:class:`Worker` takes a batch (or says why not: the ``REJECT_*`` reasons), holds it
until the outbox releases it, and runs it in a task of its own; it counts the
recipients in flight and owns every batch task. :class:`BatchRun` sends one batch with
up to ``concurrency`` transactions at a time (workers taking the next recipients in
order; a job sharing its message puts up to ``recipients_per_message`` recipients of one
domain in one transaction). Each transaction is ``transaction.SendEngine``'s.

Starting and stopping, the promise this module keeps:

- A transaction starts only with the run's *permit* (asked before taking recipients,
  after every wait, and by the SMTP client right before the message body goes out:
  ``may_send``), and only within the start budget (``NodeTimings.start_budget_s``).
- Its results are handed to ``record`` (the journal) synchronously, right after the SMTP
  client returns and before anything else can run on the event loop, so before the
  connection can carry another transaction.
- :meth:`BatchRun.stop` stops starting transactions. Workers waiting for a slot are
  cancelled at once; a transaction inside the SMTP client is never cancelled while it
  may be past its final dot: it finishes (asked ``may_send`` before its body, it gives
  up there), or, once ``NodeTimings.release_s`` has passed since the stop, it is cut:
  a transaction past its final dot before the stop has its verdict by then (the
  final-reply bound), so one still running has not sent its body, and closing its
  connection makes the relay discard it.
- Nothing else cancels a run (except :meth:`BatchRun.run`'s own cancellation, which
  :meth:`Worker.release_all` does only after that bound, at shutdown).

No protobuf here: batches are ``model.Work`` values, results ``model.Result`` values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from mailers_runtime.message import CompiledMessage, RenderError
from sender_node.journal import Journal
from sender_node.model import BatchRef, Recipient, Release, Result, Work
from sender_node.outbox import Outbox
from sender_node.throttle import recipient_domain
from sender_node.transaction import Guard, Record, SendEngine

log = logging.getLogger(__name__)

REJECT_INVALID = "invalid batch"
REJECT_STALE = "stale epoch"
REJECT_DRAINING = "draining"
REJECT_UNHEALTHY = "not registered"
REJECT_JOURNAL = "journal failed"
REJECT_NO_AUTHORITY = "no authority"
REJECT_DUPLICATE = "duplicate"
REJECT_CAPACITY = "at capacity"

CANCELLED = "cancelled"
"""Why a batch the leader cancelled stopped."""

_Owner = TypeVar("_Owner")


@dataclasses.dataclass(eq=False)
class _Held(Generic[_Owner]):
    run: BatchRun
    owner: _Owner
    task: asyncio.Task[None] | None = None


class Worker(Generic[_Owner]):
    """Takes batches, runs each in a task of its own, and releases them through the outbox.

    A batch is taken for an *owner* (the stream it came on), which :meth:`forget` hands
    back once the outbox has released the batch. :meth:`drain` refuses new batches,
    :meth:`stop_all` stops those under way, :meth:`release_all` waits for their release
    and cancels what outlasts its bound.

    Args:
        engine: What the batches' transactions share (SMTP pool, slots, pacing, metrics).
        outbox: Journals results and releases batches; its ``on_released`` must call
            :meth:`forget`.
        journal: The outbox's journal (no batch is taken once it has failed).
        lease_trusted: Whether the node's registration lease is trusted now.
        capacity: Recipients held at once. A batch is rejected when it would exceed
            it, unless the node holds nothing (so an oversized batch cannot starve).
        max_unacked_results: Unacknowledged results beyond which batches are rejected.
    """

    def __init__(
        self,
        *,
        engine: SendEngine,
        outbox: Outbox,
        journal: Journal,
        lease_trusted: Callable[[], bool],
        capacity: int,
        max_unacked_results: int,
    ) -> None:
        self.engine = engine
        self._outbox = outbox
        self._journal = journal
        self._lease_trusted = lease_trusted
        self._capacity = capacity
        self._max_unacked = max_unacked_results
        self._metrics = engine.metrics
        self._held: dict[str, _Held[_Owner]] = {}
        self._arrivals = itertools.count()
        self._in_flight = 0
        self._draining = False
        self._stopping: str | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._metrics.in_flight.set_function(lambda: self._in_flight)

    @property
    def in_flight(self) -> int:
        """Recipients accepted and not yet reported."""
        return self._in_flight

    @property
    def draining(self) -> bool:
        """New batches are refused (:meth:`drain` or :meth:`stop_all`)."""
        return self._draining

    @property
    def stopping(self) -> str | None:
        """Why :meth:`stop_all` stopped every batch; None until it did."""
        return self._stopping

    def halted(self) -> str | None:
        """Why no transaction may start at all (every batch stopped, or the journal
        failed); None when transactions may start."""
        failed = self._journal.failed
        return self._stopping or (f"journal failed: {failed}" if failed else None)

    def serving(self) -> bool:
        """Whether batches are taken: registered, not draining, the journal intact."""
        return not self._draining and self._journal.failed is None and self._lease_trusted()

    def refusal(self, batch_id: str, size: int, *, stale: bool, authorized: bool) -> str | None:
        """Why a valid batch cannot be taken now; None when it can.

        Args:
            batch_id: The batch.
            size: Its recipients.
            stale: The batch, or the stream it came on, is of an epoch below the
                highest known.
            authorized: The stream it came on is open and its authority has not lapsed.
        """
        unacked = self._outbox.unacked_results
        if stale:
            return REJECT_STALE
        if self._draining or self._stopping is not None:
            return REJECT_DRAINING
        if not self._lease_trusted():
            return REJECT_UNHEALTHY
        if self._journal.failed is not None:
            return REJECT_JOURNAL
        if not authorized:
            return REJECT_NO_AUTHORITY
        if batch_id in self._held:
            return REJECT_DUPLICATE
        if self._in_flight > 0 and self._in_flight + size > self._capacity:
            return REJECT_CAPACITY
        if unacked > 0 and unacked + size > self._max_unacked:
            return REJECT_CAPACITY
        return None

    def take(self, work: Work, owner: _Owner, permit: Callable[[], str | None]) -> None:
        """Hold ``work`` and start running it (once :meth:`refusal` said None).

        Args:
            work: The batch.
            owner: Handed back by :meth:`forget` when the batch is released.
            permit: Why a transaction of the batch may not start now, or None (the
                stream's authority, epoch, lease; see ``fencing.start_refusal``).
        """
        ref = work.ref
        run = BatchRun(
            work,
            self.engine,
            permit=permit,
            record=lambda results: self._record(ref, results),
            order=next(self._arrivals),
        )
        held = _Held(run, owner)
        self._held[ref.batch_id] = held
        self._outbox.hold(ref)
        self._in_flight += len(work.recipients)
        self._idle.clear()
        held.task = asyncio.create_task(self._run(held), name=f"batch-{ref.batch_id}")

    def stop(self, batch_ids: Iterable[str], reason: str) -> None:
        """Stop these batches (no new transactions; those past their final dot finish)."""
        for batch_id in batch_ids:
            held = self._held.get(batch_id)
            if held is not None:
                held.run.stop(reason)

    def cancel(self, batch_id: str) -> None:
        """The leader cancelled the batch: stop it (see :meth:`stop`)."""
        self.stop((batch_id,), CANCELLED)

    def drain(self) -> None:
        """Refuse new batches from now on; batches under way continue."""
        self._draining = True

    def stop_all(self, reason: str) -> None:
        """Refuse new batches and stop every batch (see :meth:`stop`)."""
        self._draining = True
        self._stopping = reason
        for held in list(self._held.values()):
            held.run.stop(reason)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every batch is released; False if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def release_all(self, grace_s: float | None = None) -> None:
        """Stop every batch, wait for their release, then for the journal's last fsync.

        Args:
            grace_s: Bound of each wait; by default ``NodeTimings.release_s`` plus a
                second. Batches not released by then are cancelled (and awaited).
        """
        self.stop_all(self._stopping or "node is shutting down")
        grace = self.engine.timings.release_s + 1.0 if grace_s is None else grace_s
        if not await self.wait_idle(grace):
            tasks = [h.task for h in self._held.values() if h.task is not None]
            log.error("%d batches did not end within %.1fs; cancelling them", len(tasks), grace)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(grace):
                await self._journal.wait_durable(self._journal.last_seq)
        except TimeoutError:
            log.error("the journal's last fsync did not finish within %.1fs", grace)

    def forget(self, ref: BatchRef) -> _Owner | None:
        """The outbox released ``ref``: forget the batch and return its owner (None when
        the batch is not, or no longer, held here)."""
        held = self._held.get(ref.batch_id)
        if held is None or held.run.work.ref != ref:
            return None
        del self._held[ref.batch_id]
        if not self._held:
            self._idle.set()
        return held.owner

    def _record(self, ref: BatchRef, results: Sequence[Result]) -> None:
        self._outbox.record(ref, results)
        self._in_flight -= len(results)

    async def _run(self, held: _Held[_Owner]) -> None:
        run = held.run
        try:
            await run.run()
        except Exception:
            log.exception("batch %s failed", run.work.batch_id)
        finally:
            self._in_flight -= run.unreported
            outcome = "completed" if not run.unreported else "stopped"
            if run.stopped == CANCELLED:
                outcome = "cancelled"
            self._metrics.batches.labels(outcome).inc()
            if run.unreported:
                log.info(
                    "batch %s released with %d unattempted: %s",
                    run.work.batch_id,
                    run.unreported,
                    run.stopped,
                )
            self._outbox.release(run.release())


class BatchRun:
    """One batch being sent (see the module docstring for start and stop).

    Args:
        work: The batch.
        engine: The node's shared sending machinery.
        permit: Why a transaction of this batch may not start now, or None (the
            stream's authority, epoch, lease; see ``fencing.start_refusal``).
        record: Journals a transaction's results (synchronously).
        order: The batch's arrival on the node: among batches of equal priority, the
            earlier one's transactions get slots first (see ``slots``).
    """

    def __init__(
        self,
        work: Work,
        engine: SendEngine,
        *,
        permit: Callable[[], str | None],
        record: Record,
        order: int = 0,
    ) -> None:
        self.work = work
        self.order = order
        self._engine = engine
        self._permit = permit
        self._record = record
        self._next = 0
        self.reported = 0
        """Recipients with a recorded result."""
        self.stopped: str | None = None
        """Why the run stopped starting transactions; None while it may."""
        self._workers: dict[asyncio.Task[None], Guard] = {}
        self._cut: asyncio.TimerHandle | None = None

    @property
    def unreported(self) -> int:
        return len(self.work.recipients) - self.reported

    def release(self) -> Release:
        """The batch's release: every recipient without a result was never attempted."""
        return Release(self.work.ref, self.work.epoch, self.unreported)

    def may_start(self) -> bool:
        """Whether a transaction of this batch may start (or send its body) now."""
        return self.stopped is None and self._permit() is None

    def stop(self, reason: str) -> None:
        """Start no more transactions; let those past their final dot finish. Idempotent."""
        if self.stopped is not None:
            return
        self.stopped = reason
        current = asyncio.current_task()
        for task, guard in self._workers.items():
            if not guard.sending and task is not current:
                task.cancel()  # waiting for a slot: nothing sent yet
        if any(not task.done() for task in self._workers):
            loop = asyncio.get_running_loop()
            self._cut = loop.call_later(self._engine.timings.release_s, self._cut_workers)

    def _cut_workers(self) -> None:
        running = [task for task in self._workers if not task.done()]
        if running:
            log.info(
                "batch %s: cutting %d transactions still short of their message body",
                self.work.batch_id,
                len(running),
            )
        for task in running:
            task.cancel()

    async def run(self) -> Release:
        """Send the batch until every recipient has a result or the run is stopped.

        Cancellation cancels the workers (the owner does this only past the bound of
        :meth:`stop`, at shutdown).
        """
        try:
            compiled = self._engine.compile(self.work)
        except RenderError as exc:
            log.warning("job %s cannot be rendered: %s", self.work.job_id, exc)
            rest = self.work.recipients[self._next :]
            self._next = len(self.work.recipients)
            self._report([self._engine.failed(item, f"render error: {exc}") for item in rest])
            return self.release()
        count = min(self._engine.concurrency, len(self.work.recipients))
        for _ in range(count):
            guard = Guard()
            name = f"batch-{self.work.batch_id}"
            task = asyncio.create_task(self._work(compiled, guard), name=name)
            self._workers[task] = guard
        try:
            outcomes = await asyncio.gather(*self._workers, return_exceptions=True)
        finally:
            if self._cut is not None:
                self._cut.cancel()
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                log.error("batch %s: a worker failed", self.work.batch_id, exc_info=outcome)
        return self.release()

    def _report(self, results: Sequence[Result]) -> None:
        self.reported += len(results)
        self._record(results)

    async def _work(self, compiled: CompiledMessage, guard: Guard) -> None:
        while self.stopped is None:
            why = self._permit()
            if why is not None:
                self.stop(why)
                return
            group = self._take_group(compiled)
            if not group:
                return
            sent = await self._engine.transact(
                compiled,
                group,
                self.work.priority,
                self.may_start,
                self._report,
                guard,
                self.order,
            )
            if not sent:
                self.stop(self.stopped or self._permit() or "stopped")

    def _take_group(self, compiled: CompiledMessage) -> list[Recipient]:
        recipients = self.work.recipients
        if self._next >= len(recipients):
            return []
        group = [recipients[self._next]]
        self._next += 1
        if compiled.recipients_per_message > 1:
            # A shared message: the following recipients of the same domain join the
            # transaction (one domain per group keeps per-domain throttles exact).
            domain = recipient_domain(group[0].email)
            while (
                len(group) < compiled.recipients_per_message
                and self._next < len(recipients)
                and recipient_domain(recipients[self._next].email) == domain
            ):
                group.append(recipients[self._next])
                self._next += 1
        return group
