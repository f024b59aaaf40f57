"""The leader's dispatch loop: wires jobs, ledger, balancer and breakers to node streams.

Owned by the coordinator while it leads; :meth:`Dispatcher.stop` cancels every task
it started. Everything here runs on one event loop, so the in-memory state needs no
locks; etcd is the durable copy and is written by the flush task.

The flow of a batch: *ready* -> dispatched to a node (held in the ledger with a
progress deadline) -> results arrive and are applied -> the node acks -> the batch is
*done* if every recipient is final, else *waiting* (retry after a backoff delay when
something was deferred) or *ready* again (nothing tried, e.g. after a pause). A node
that disconnects, leaves etcd or misses the deadline loses its batches to *ready*.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import json
import logging
import random
import time
from collections.abc import Callable

import aetcd

from coordinator import _convert, backoff
from coordinator.balancer import Balancer, Candidate
from coordinator.batching import batch_id, batch_range, parse_batch_id
from coordinator.breaker import NodeBreaker, NodeFault, Released
from coordinator.config import CoordinatorConfig
from coordinator.errors import Conflict, NotFound
from coordinator.fairness import Eligible, round_order
from coordinator.ledger import Entry, Ledger
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import (
    BatchState,
    Counts,
    JobSpec,
    JobState,
    JobStatus,
    Recipient,
    Result,
    Status,
)
from coordinator.node_link import NodeLink
from coordinator.store import Fence, JobStore, LostLeadership
from coordinator.suppression import Reason, Suppression, is_hard_bounce, normalize
from mailerpb.mailer.v1 import common_pb2, sender_pb2
from mailers.etcd import Keys, watch_prefix
from mailers.tls import Transport

log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobRuntime:
    """A job the leader is working on."""

    spec: JobSpec
    status: JobStatus
    done: set[int] = dataclasses.field(default_factory=set)
    """Batches whose every recipient is final (and whose state need not stay in memory)."""
    ready: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    waiting: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    inflight: set[int] = dataclasses.field(default_factory=set)
    states: dict[int, BatchState] = dataclasses.field(default_factory=dict)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    content_pb: common_pb2.MessageContent | None = None
    reassignments: dict[int, int] = dataclasses.field(default_factory=dict)
    """Consecutive times a batch was lost by the node holding it, by seq."""
    duplicates: int = 0

    @property
    def open_batches(self) -> int:
        return self.spec.batch_count - len(self.done)

    def notify(self) -> None:
        """Wake every watcher; they pick up a fresh event for the next change."""
        self.changed.set()
        self.changed = asyncio.Event()


@dataclasses.dataclass
class NodeEntry:
    node_id: str
    address: str
    capacity: int
    lease_id: int
    link: NodeLink
    breaker: NodeBreaker
    recipients_done: int = 0
    full_until: float = 0.0


class Dispatcher:
    def __init__(
        self,
        config: CoordinatorConfig,
        client: aetcd.Client,
        keys: Keys,
        fence: Fence,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        metrics: CoordinatorMetrics | None = None,
        *,
        transport: Transport,
    ) -> None:
        self.config = config
        self.transport = transport
        """How node links dial: mutual TLS (or plaintext, chosen explicitly)."""
        self.client = client
        self.keys = keys
        self.fence = fence
        self.store = JobStore(client, keys, fence)
        self.clock = clock
        self.rng = rng or random.Random()
        self.metrics = metrics or CoordinatorMetrics()
        self.jobs: dict[str, JobRuntime] = {}
        self.nodes: dict[str, NodeEntry] = {}
        self.cordoned: set[str] = set()
        self.ledger = Ledger()
        self.balancer = Balancer()
        self.lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._dirty_states: set[tuple[str, int]] = set()
        self._dirty_jobs: set[str] = set()
        self._flushed = asyncio.Event()
        self._released = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._job_order: collections.deque[str] = collections.deque()
        self._registry_listed = False
        self._turn = 0
        self._outcomes: dict[str, asyncio.Future[None]] = {}
        self._guards: set[asyncio.Task[None]] = set()
        self._suppressed: dict[str, dict[str, Suppression]] = {}
        """Tenant -> its suppression list, loaded from etcd on first use and kept in
        step by every change made through this leader."""
        self._dirty_suppressions: dict[tuple[str, str], Suppression] = {}
        """Hard bounces found in results, written by the next flush."""

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Load cordons and every unfinished job from etcd, then start dispatching."""
        self.cordoned = await self.store.cordoned()
        statuses = await self.store.list_statuses()
        for job_id, status in sorted(statuses.items()):
            if status.state.final:
                continue
            spec = await self.store.load_spec(job_id)
            if spec is None:
                continue
            await self._resume(spec, status)
        log.info("leading with epoch %d; resumed %d jobs", self.fence.revision, len(self.jobs))
        self._tasks = [
            asyncio.create_task(self._guard(self._flush_loop()), name="flush"),
            asyncio.create_task(
                self._guard(
                    watch_prefix(
                        self.client, self.keys.nodes, self._nodes_snapshot, self._node_change
                    )
                ),
                name="registry",
            ),
            asyncio.create_task(self._guard(self._loop()), name="dispatch"),
        ]

    async def _await_known_nodes(self) -> None:
        """Give the nodes registered at takeover a moment to connect and replay the
        results the previous leader may not have persisted, before any batch moves."""
        deadline = self.clock() + self.config.takeover_grace_s
        while self.clock() < deadline:
            if self._registry_listed and all(n.link.connects > 0 for n in self.nodes.values()):
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.05)

    async def stop(self) -> None:
        """Stop dispatching: cancel tasks and close every node stream (nodes then drop
        the batches that came on them). Unflushed results are written if we still lead."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for guard in list(self._guards):
            guard.cancel()
        for node in list(self.nodes.values()):
            await node.link.close()
        self.nodes.clear()
        if not self.lost.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_once(), 5)
        # Whatever ended our reign, request handlers still holding this dispatcher (a
        # WatchJob stream) must see it is over and send their clients elsewhere.
        self.lost.set()

    async def _guard(self, coro: object) -> None:
        """Run a background coroutine; losing leadership or crashing ends our reign."""
        try:
            await coro  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except LostLeadership as exc:
            log.error("lost leadership: %s", exc)
            self.lost.set()
        except Exception:
            log.exception("dispatcher task crashed; stepping down")
            self.lost.set()

    async def _resume(self, spec: JobSpec, status: JobStatus, reopen: bool = False) -> JobRuntime:
        """Rebuild a job's runtime from etcd. With reopen, a finished job is loaded
        too (to retry its failures); otherwise a job found complete is finished."""
        states = await self.store.list_states(spec.job_id)
        counts = Counts(total=spec.total)
        job = JobRuntime(spec=spec, status=status)
        for seq in range(spec.batch_count):
            state = states.get(seq)
            indexes = batch_range(seq, spec.batch_size, spec.total)
            if state is not None:
                for result in state.results.values():
                    counts.add(result.status)
            if state is not None and all(
                i in state.results and state.results[i].status.final for i in indexes
            ):
                job.done.add(seq)
                continue
            if state is not None:
                job.states[seq] = state
                if state.retry_at is not None:
                    heapq.heappush(job.waiting, (state.retry_at, seq))
                    continue
            job.ready.append(seq)
        status.counts = counts
        self.jobs[spec.job_id] = job
        self._job_order.append(spec.job_id)
        if job.open_batches == 0 and not reopen:
            self._maybe_finish(job)
        self._dirty_jobs.add(spec.job_id)
        return job

    # ---- jobs -----------------------------------------------------------------------

    def add_job(self, spec: JobSpec, status: JobStatus) -> JobRuntime:
        """Start working on a job just committed to etcd."""
        job = JobRuntime(
            spec=spec,
            status=status,
            ready=collections.deque(range(spec.batch_count)),
        )
        self.jobs[spec.job_id] = job
        self._job_order.append(spec.job_id)
        self._wake.set()
        return job

    async def retry_failed(self, job_id: str) -> tuple[JobRuntime, int]:
        """Queue again the recipients that failed for a transient or ambiguous reason.

        A recipient qualifies when it FAILED without a 5xx reply: out of attempts on
        4xx or connection errors, expired, or given up after repeated node losses.
        Returns the job and how many recipients were queued.

        Raises:
            NotFound: no such job.
            Conflict: the job was cancelled.
        """
        job = self.jobs.get(job_id)
        if job is None:
            spec = await self.store.load_spec(job_id)
            status = await self.store.load_status(job_id)
            if spec is None or status is None:
                raise NotFound(f"job {job_id!r} not found")
            job = await self._resume(spec, status, reopen=True)
        if job.status.state is JobState.CANCELLED:
            raise Conflict(f"job {job_id!r} was cancelled")
        requeued = 0
        for seq in range(job.spec.batch_count):
            if seq in job.inflight:
                continue
            state = await self._state_for(job, seq)
            again = [
                i
                for i, r in state.results.items()
                if r.status is Status.FAILED and not 500 <= r.code < 600
            ]
            for i in again:
                job.status.counts.add(Status.FAILED, -1)
                del state.results[i]
            if not again:
                if seq in job.done and (job_id, seq) not in self._dirty_states:
                    del job.states[seq]  # loaded only to look; stays done
                continue
            requeued += len(again)
            state.dispatches = 0
            state.retry_at = None
            job.reassignments.pop(seq, None)
            self._dirty_states.add((job_id, seq))
            if seq in job.done:
                job.done.discard(seq)
                job.ready.append(seq)
        if requeued:
            job.status.state = JobState.RUNNING
            job.status.finished_at = None
            if job_id not in self._job_order:
                self._job_order.append(job_id)
            self._wake.set()
        self._job_changed(job)
        return job, requeued

    async def settled(self, job: JobRuntime) -> None:
        """Wait until no node holds a batch of job (after a pause or cancel, every node
        has acknowledged and no new SMTP transaction of the job starts). The caller's
        deadline bounds the wait."""
        while job.inflight:
            await self._released.wait()

    def pause(self, job: JobRuntime) -> None:
        if job.status.state.final or job.status.state is JobState.PAUSED:
            return
        job.status.state = JobState.PAUSED
        self._cancel_inflight(job)
        self._job_changed(job)

    def resume(self, job: JobRuntime) -> None:
        if job.status.state is not JobState.PAUSED:
            return
        job.status.state = JobState.RUNNING if job.status.counts.done else JobState.QUEUED
        self._job_changed(job)
        self._wake.set()

    def cancel(self, job: JobRuntime) -> None:
        if job.status.state.final:
            return
        job.status.state = JobState.CANCELLED
        job.ready.clear()
        job.waiting.clear()
        self._cancel_inflight(job)
        self._maybe_finish(job)
        self._job_changed(job)

    def _cancel_inflight(self, job: JobRuntime) -> None:
        for seq in job.inflight:
            bid = batch_id(job.spec.job_id, seq)
            holder = self.ledger.holder(bid)
            if holder in self.nodes:
                self.nodes[holder].link.send(
                    sender_pb2.DispatchRequest(
                        cancel=sender_pb2.CancelBatch(batch_id=bid, epoch=self.fence.revision)
                    )
                )

    def _job_changed(self, job: JobRuntime) -> None:
        job.status.updated_at = self.clock()
        self._dirty_jobs.add(job.spec.job_id)
        job.notify()

    def _maybe_finish(self, job: JobRuntime) -> None:
        if job.inflight:
            return
        if job.status.state is JobState.CANCELLED:
            counts = job.status.counts
            counts.cancelled += counts.queued + counts.deferred
            counts.deferred = 0
        elif job.open_batches == 0:
            job.status.state = JobState.COMPLETED
        else:
            return
        job.status.finished_at = self.clock()
        log.info(
            "job %s %s: %d delivered, %d failed, %d cancelled",
            job.spec.job_id,
            job.status.state.value,
            job.status.counts.delivered,
            job.status.counts.failed,
            job.status.counts.cancelled,
        )
        self._job_changed(job)

    # ---- suppression lists ----------------------------------------------------------

    async def suppressions(self, tenant: str) -> dict[str, Suppression]:
        """The tenant's suppression list by normalised address: one etcd read per tenant
        per reign, then memory. Callers must not modify the returned dict."""
        known = self._suppressed.get(tenant)
        if known is not None:
            return known
        loaded = await self.store.suppressions(tenant)
        known = self._suppressed.get(tenant)  # another caller loaded it meanwhile
        if known is not None:
            return known
        # Hard bounces found before the list was loaded and not yet flushed.
        for (t, email), s in self._dirty_suppressions.items():
            if t == tenant:
                loaded.setdefault(email, s)
        self._suppressed[tenant] = loaded
        return loaded

    async def add_suppression(self, tenant: str, suppression: Suppression) -> Suppression:
        """Put an address on the tenant's list (replacing its entry). Durable on return.
        Raises LostLeadership."""
        listed = await self.suppressions(tenant)
        await self.store.put_suppression(tenant, suppression)
        self._dirty_suppressions.pop((tenant, suppression.email), None)
        listed[suppression.email] = suppression
        return suppression

    async def remove_suppression(self, tenant: str, email: str) -> bool:
        """Take an address off the tenant's list; False when it was not on it.
        Raises LostLeadership."""
        listed = await self.suppressions(tenant)
        present = email in listed
        self._dirty_suppressions.pop((tenant, email), None)
        await self.store.delete_suppression(tenant, email)
        listed.pop(email, None)
        return present

    def _note_hard_bounce(self, tenant: str, email: str, result: Result) -> None:
        email = normalize(email)
        listed = self._suppressed.get(tenant)
        if (listed is not None and email in listed) or (tenant, email) in self._dirty_suppressions:
            return  # the first reason stays (e.g. an unsubscribe)
        entry = Suppression(
            email=email,
            reason=Reason.HARD_BOUNCE,
            created_at=self.clock(),
            code=result.code,
            enhanced_code=result.enhanced_code,
            text=result.text,
        )
        self._dirty_suppressions[(tenant, email)] = entry
        if listed is not None:
            listed[email] = entry
        log.info("suppressing %s for tenant %r: %d %s", email, tenant, result.code,
                 result.enhanced_code)  # fmt: skip

    # ---- dispatching ----------------------------------------------------------------

    async def _loop(self) -> None:
        await self._await_known_nodes()
        while True:
            now = self.clock()
            for entry in self.ledger.expired(now):
                log.warning(
                    "batch %s: no progress from %s; reassigning", entry.batch_id, entry.node_id
                )
                node = self.nodes.get(entry.node_id)
                self._resolve(entry.batch_id, NodeFault("no progress before the deadline"))
                if node is not None:
                    node.link.send(
                        sender_pb2.DispatchRequest(
                            cancel=sender_pb2.CancelBatch(
                                batch_id=entry.batch_id, epoch=self.fence.revision
                            )
                        )
                    )
                self._requeue(entry.batch_id, now, failed=True, reason="deadline")
            next_wake = await self._dispatch_ready(now)
            self._update_gauges()
            deadline = self.ledger.next_deadline()
            if deadline is not None:
                next_wake = min(next_wake, deadline)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, next_wake - self.clock()))

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_batches.labels("ready").set(sum(len(j.ready) for j in self.jobs.values()))
        m.queue_batches.labels("waiting").set(sum(len(j.waiting) for j in self.jobs.values()))
        m.queue_batches.labels("in_flight").set(len(self.ledger))
        m.jobs_active.set(sum(1 for j in self.jobs.values() if not j.status.state.final))
        m.nodes_connected.set(sum(1 for n in self.nodes.values() if n.link.connected))
        for node in self.nodes.values():
            m.set_breaker(node.node_id, node.breaker.state().value)

    def _candidates(self, now: float) -> list[Candidate]:
        return [
            Candidate(
                node_id=node.node_id,
                capacity=node.link.load.capacity or node.capacity,
                in_flight=self.ledger.recipients_on(node.node_id),
                error_rate=node.link.load.recent_error_rate,
                schedulable=(
                    node.link.connected
                    and node.node_id not in self.cordoned
                    and node.full_until <= now
                    and node.breaker.admits()
                ),
            )
            for node in self.nodes.values()
        ]

    async def _dispatch_ready(self, now: float) -> float:
        """Hand out ready batches while nodes have room; returns when to look again."""
        next_wake = now + 1.0
        for _ in range(len(self._job_order)):
            job_id = self._job_order[0]
            self._job_order.rotate(-1)
            job = self.jobs.get(job_id)
            if job is None or (job.status.state.final and not job.inflight):
                # Only the flush drops a finished job from memory, after writing it.
                self._job_order.remove(job_id)
                continue
            while job.waiting and job.waiting[0][0] <= now:
                _, seq = heapq.heappop(job.waiting)
                job.ready.append(seq)
            if not job.status.state.final and now >= self._expires_at(job):
                await self._expire(job, now)
                continue
            if job.waiting:
                next_wake = min(next_wake, job.waiting[0][0])
        # Rounds of one batch per (priority, tenant): see fairness.round_order.
        while True:
            eligible = []
            for job_id in self._job_order:
                job = self.jobs.get(job_id)
                if job is None or not job.ready:
                    continue
                if job.status.state in (JobState.PAUSED, JobState.CANCELLED):
                    continue
                if job.spec.options.send_at is not None and job.spec.options.send_at > now:
                    next_wake = min(next_wake, job.spec.options.send_at)
                    continue
                eligible.append(Eligible(job_id, job.spec.tenant, job.spec.options.priority))
            if not eligible:
                return next_wake
            self._turn += 1
            waiting_before = self._ready_count(eligible)
            for job_id in round_order(eligible, self._turn):
                # A job can finish (and leave memory) while another's batch is handed out.
                job = self.jobs.get(job_id)
                if job is None or not job.ready:
                    continue
                seq = job.ready[0]
                size = len(batch_range(seq, job.spec.batch_size, job.spec.total))
                node_id = self.balancer.choose(self._candidates(now), size)
                if node_id is None:
                    return next_wake
                job.ready.popleft()
                await self._dispatch(job, seq, self.nodes[node_id], now)
            if self._ready_count(eligible) >= waiting_before:
                return next_wake  # a round that placed nothing: look again later

    def _ready_count(self, eligible: list[Eligible]) -> int:
        return sum(len(j.ready) for e in eligible if (j := self.jobs.get(e.job_id)) is not None)

    def _expires_at(self, job: JobRuntime) -> float:
        if job.spec.options.expires_at is not None:
            return job.spec.options.expires_at
        return job.spec.created_at + self.config.max_job_age_s

    async def _expire(self, job: JobRuntime, now: float) -> None:
        """Fail every recipient still waiting; each keeps the last reply it got.

        Batches in flight finish their current attempt and are failed when they come back.
        """
        seqs = list(job.ready) + [seq for _, seq in job.waiting]
        job.ready.clear()
        job.waiting.clear()
        for seq in seqs:
            await self._state_for(job, seq)
            self._fail_pending(job, seq, "job expired before delivery")
            self._settle(job, seq, now, deferred=False)
        self._job_changed(job)

    async def _state_for(self, job: JobRuntime, seq: int) -> BatchState:
        """The batch's results, loaded from etcd the first time they are needed."""
        state = job.states.get(seq)
        if state is None:
            state = await self.store.load_state(job.spec.job_id, seq) or BatchState()
            job.states[seq] = state
        return state

    async def _dispatch(self, job: JobRuntime, seq: int, node: NodeEntry, now: float) -> None:
        state = await self._state_for(job, seq)
        first, recipients = await self.store.load_batch(job.spec.job_id, seq)
        listed = await self.suppressions(job.spec.tenant)
        if listed:
            self._suppress_pending(job, seq, state, first, recipients, listed, now)
        pending = [
            sender_pb2.BatchRecipient(
                index=first + offset,
                recipient=_convert.recipient_to(recipient),
                attempts=state.results[first + offset].attempts
                if first + offset in state.results
                else 0,
            )
            for offset, recipient in enumerate(recipients)
            if not (first + offset in state.results and state.results[first + offset].status.final)
        ]
        if not pending:
            self._settle(job, seq, now, deferred=False)
            return
        if job.status.state is JobState.CANCELLED or job.status.state is JobState.PAUSED:
            job.ready.appendleft(seq)
            return
        lost = job.reassignments.get(seq, 0)
        if lost >= self.config.max_dispatches:
            # A batch that every node loses (crash, silence) is given up on, so it
            # cannot take the cluster down node by node.
            self._fail_pending(job, seq, f"lost by a node {lost} times in a row")
            self._settle(job, seq, now, deferred=False)
            return
        if not node.link.connected:
            job.ready.appendleft(seq)
            return
        state.dispatches += 1
        state.retry_at = None
        if job.content_pb is None:
            job.content_pb = _convert.content_to(job.spec.content)
        bid = batch_id(job.spec.job_id, seq)
        batch = sender_pb2.Batch(
            batch_id=bid,
            job_id=job.spec.job_id,
            epoch=self.fence.revision,
            attempt=state.dispatches,
            content=job.content_pb,
            recipients=pending,
            ack_deadline_ms=int(self.config.ack_timeout_s * 1000),
            priority=job.spec.options.priority,
        )
        node.link.send(sender_pb2.DispatchRequest(batch=batch))
        self.ledger.add(bid, node.node_id, len(pending), now, self.config.ack_timeout_s)
        self.metrics.batches_dispatched.labels(node.node_id).inc()
        self._track(node, bid)
        job.inflight.add(seq)
        self._dirty_states.add((job.spec.job_id, seq))
        if job.status.state is JobState.QUEUED:
            job.status.state = JobState.RUNNING
            self._job_changed(job)

    def _suppress_pending(
        self,
        job: JobRuntime,
        seq: int,
        state: BatchState,
        first: int,
        recipients: list[Recipient],
        listed: dict[str, Suppression],
        now: float,
    ) -> None:
        """End the batch's unsent recipients whose address is listed as SUPPRESSED."""
        applied = 0
        for offset, recipient in enumerate(recipients):
            index = first + offset
            old = state.results.get(index)
            if old is not None and old.status.final:
                continue
            entry = listed.get(normalize(recipient.email))
            if entry is None:
                continue
            result = Result(
                status=Status.SUPPRESSED,
                code=old.code if old else 0,
                enhanced_code=old.enhanced_code if old else "",
                text=old.text if old else "",
                reason=f"suppressed: {entry.reason.value}",
                attempts=old.attempts if old else 0,
                updated_at=now,
            )
            if self._apply(job, state, index, result):
                applied += 1
        if applied:
            self.metrics.recipients.labels(Status.SUPPRESSED.value).inc(applied)
            self._dirty_states.add((job.spec.job_id, seq))
            self._job_changed(job)

    def _requeue(self, bid: str, now: float, failed: bool, reason: str = "") -> None:
        """Put a batch no node holds any more back in line.

        After a failure (its node died, went silent or refused it) the first move is
        immediate; repeated failures of the same batch wait an exponential backoff with
        jitter, so a batch that kills nodes cannot take the whole cluster down at once.
        """
        self._batch_released()
        if reason:
            self.metrics.reassignments.labels(reason).inc()
        job_id, seq = parse_batch_id(bid)
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.inflight.discard(seq)
        if job.status.state is JobState.CANCELLED:
            self._maybe_finish(job)
            return
        moves = job.reassignments.get(seq, 0) + 1 if failed else 0
        job.reassignments[seq] = moves
        if moves > 1:
            wait_s = backoff.delay(self.config.reassign, moves - 1, self.rng).total_seconds()
            heapq.heappush(job.waiting, (now + wait_s, seq))
        else:
            job.ready.appendleft(seq)
        self._wake.set()

    def _fail_pending(self, job: JobRuntime, seq: int, reason: str) -> None:
        state = job.states.setdefault(seq, BatchState())
        now = self.clock()
        for index in batch_range(seq, job.spec.batch_size, job.spec.total):
            old = state.results.get(index)
            if old is not None and old.status.final:
                continue
            new = Result(
                status=Status.FAILED,
                code=old.code if old else 0,
                enhanced_code=old.enhanced_code if old else "",
                text=old.text if old else "",
                reason=reason,
                attempts=old.attempts if old else 0,
                node_id=old.node_id if old else "",
                ambiguous=old.ambiguous if old else False,
                updated_at=now,
            )
            self._apply(job, state, index, new)
        self._dirty_states.add((job.spec.job_id, seq))

    def _apply(self, job: JobRuntime, state: BatchState, index: int, new: Result) -> bool:
        """Record a recipient's outcome; the first final outcome wins. True if applied."""
        old = state.results.get(index)
        if old is not None and old.status.final:
            replayed = old.node_id == new.node_id and old.updated_at == new.updated_at
            if old.status is Status.DELIVERED and new.status is Status.DELIVERED and not replayed:
                job.duplicates += 1
                self.metrics.duplicates.inc()
            return False
        if old is not None:
            job.status.counts.add(old.status, -1)
            # Once an attempt may have reached the relay, the recipient stays marked.
            new.ambiguous = new.ambiguous or old.ambiguous
        state.results[index] = new
        job.status.counts.add(new.status)
        return True

    def _settle(self, job: JobRuntime, seq: int, now: float, deferred: bool) -> None:
        """Decide what happens to a batch no node holds any more."""
        job.inflight.discard(seq)
        state = job.states.setdefault(seq, BatchState())
        indexes = batch_range(seq, job.spec.batch_size, job.spec.total)
        pending = [i for i in indexes if not (i in state.results and state.results[i].status.final)]
        if not pending:
            job.done.add(seq)
            self._dirty_states.add((job.spec.job_id, seq))
            self._maybe_finish(job)
            return
        if job.status.state is JobState.CANCELLED:
            self._maybe_finish(job)
            return
        if now >= self._expires_at(job):
            self._fail_pending(job, seq, "job expired before delivery")
            self._settle(job, seq, now, deferred=False)
            return
        if deferred:
            # The delay grows with the batch's rounds, not the recipients' SMTP attempts:
            # a round in which every relay was down attempted nothing but still waits longer.
            rounds = max(1, state.dispatches)
            retry_at = now + backoff.delay(self.config.retry, rounds, self.rng).total_seconds()
            state.retry_at = retry_at
            heapq.heappush(job.waiting, (retry_at, seq))
        else:
            job.ready.appendleft(seq)
        self._dirty_states.add((job.spec.job_id, seq))
        self._wake.set()

    # ---- breakers -------------------------------------------------------------------

    def _track(self, node: NodeEntry, bid: str) -> None:
        """Count the batch's fate against the node's breaker once it is known."""
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outcomes[bid] = outcome
        task = asyncio.create_task(node.breaker.guard(outcome), name=f"breaker-{bid}")
        self._guards.add(task)
        task.add_done_callback(self._guards.discard)

    def _resolve(self, bid: str, error: Exception | None = None) -> None:
        outcome = self._outcomes.pop(bid, None)
        if outcome is None or outcome.done():
            return
        if error is None:
            outcome.set_result(None)
        else:
            outcome.set_exception(error)

    def _fail_orphans(self, orphans: list[Entry]) -> None:
        """A node that vanished holding several batches failed once, not once per batch."""
        for i, entry in enumerate(orphans):
            self._resolve(entry.batch_id, NodeFault("node lost") if i == 0 else Released())

    # ---- node events (called by NodeLink) -------------------------------------------

    def on_connected(self, link: NodeLink) -> None:
        log.info("stream to node %s open (lease %x)", link.node_id, link.lease_id)
        self._wake.set()

    def on_disconnected(self, link: NodeLink) -> None:
        now = self.clock()
        orphans = self.ledger.orphaned(link.node_id)
        if orphans:
            log.warning(
                "node %s disconnected holding %d batches; moving them", link.node_id, len(orphans)
            )
        self._fail_orphans(orphans)
        for entry in orphans:
            self._requeue(entry.batch_id, now, failed=True, reason="node_lost")

    def on_results(self, link: NodeLink, results: sender_pb2.BatchResults) -> None:
        try:
            job_id, seq = parse_batch_id(results.batch_id)
        except ValueError:
            return
        job = self.jobs.get(job_id)
        if job is None:
            return
        now = self.clock()
        self.ledger.touch(results.batch_id, link.node_id, now)
        if seq in job.done:
            # Final and persisted already (e.g. replayed after a leader change); a fresh
            # state here would overwrite the stored one.
            return
        # Not in memory and not done means nothing of it was ever persisted.
        state = job.states.setdefault(seq, BatchState())
        node = self.nodes.get(link.node_id)
        applied = 0
        for pb in results.results:
            index, result = _convert.result_from(pb)
            if index not in batch_range(seq, job.spec.batch_size, job.spec.total):
                continue
            # Judged before "out of attempts" may turn a deferral into a failure below.
            bounced = is_hard_bounce(
                result.status is Status.FAILED, result.code, result.enhanced_code
            )
            if result.status is Status.DEFERRED and result.attempts >= self.config.max_attempts:
                result.status = Status.FAILED
                last = result.reason or result.text
                result.reason = f"gave up after {result.attempts} attempts; last: {last}"
            if self._apply(job, state, index, result):
                applied += 1
                if bounced and pb.email:
                    self._note_hard_bounce(job.spec.tenant, pb.email, result)
                self.metrics.recipients.labels(result.status.value).inc()
                if result.code:
                    self.metrics.smtp_replies.labels(str(result.code)).inc()
                if node is not None and result.status.final:
                    node.recipients_done += 1
        if applied:
            self._dirty_states.add((job_id, seq))
            self._job_changed(job)

    def on_ack(self, link: NodeLink, ack: sender_pb2.BatchAck) -> None:
        entry = self.ledger.remove(ack.batch_id, link.node_id)
        if entry is None:
            return
        self._batch_released()
        now = self.clock()
        self.metrics.batch_ack_seconds.observe(max(0.0, now - entry.dispatched_at))
        self._resolve(ack.batch_id)
        job_id, seq = parse_batch_id(ack.batch_id)
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.reassignments.pop(seq, None)
        state = job.states.get(seq, BatchState())
        deferred = any(r.status is Status.DEFERRED for r in state.results.values())
        self._settle(job, seq, now, deferred=deferred)
        self._wake.set()

    def on_rejected(self, link: NodeLink, rejected: sender_pb2.BatchRejected) -> None:
        now = self.clock()
        entry = self.ledger.remove(rejected.batch_id, link.node_id)
        node = self.nodes.get(link.node_id)
        log.info("node %s rejected %s: %s", link.node_id, rejected.batch_id, rejected.reason)
        if node is not None:
            # A full node is skipped until it reports load again.
            node.full_until = now + 1.0
        # A full node is not a faulty one; other refusals count against its breaker.
        self._resolve(
            rejected.batch_id,
            Released() if "capacity" in rejected.reason else NodeFault(rejected.reason),
        )
        if entry is not None:
            job_id, seq = parse_batch_id(rejected.batch_id)
            job = self.jobs.get(job_id)
            if job is not None:
                state = job.states.get(seq)
                if state is not None and state.dispatches > 0:
                    state.dispatches -= 1  # a refusal is not a try
            self._requeue(
                rejected.batch_id, now, failed="capacity" not in rejected.reason, reason="rejected"
            )

    def on_load(self, link: NodeLink) -> None:
        node = self.nodes.get(link.node_id)
        if node is not None:
            node.full_until = 0.0
        self._wake.set()

    # ---- registry -------------------------------------------------------------------

    async def _nodes_snapshot(self, items: list[tuple[bytes, bytes]]) -> None:
        self._registry_listed = True
        seen = {}
        for key, value in items:
            seen[self.keys.tail(key, self.keys.nodes)] = value
        for node_id in [n for n in self.nodes if n not in seen]:
            await self._remove_node(node_id)
        for node_id, value in seen.items():
            await self._upsert_node(node_id, value)

    async def _node_change(self, kind: str, key: bytes, value: bytes) -> None:
        node_id = self.keys.tail(key, self.keys.nodes)
        if kind == "DELETE":
            await self._remove_node(node_id)
        else:
            await self._upsert_node(node_id, value)

    async def _upsert_node(self, node_id: str, value: bytes) -> None:
        try:
            info = json.loads(value)
            address = str(info["address"])
            capacity = int(info.get("capacity", 0))
            lease_id = int(info.get("lease_id", 0))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed registration of node %s", node_id)
            return
        existing = self.nodes.get(node_id)
        if existing is not None:
            if existing.address == address:
                existing.capacity = capacity
                existing.lease_id = lease_id
                return
            await self._remove_node(node_id)
        log.info("node %s registered at %s", node_id, address)
        link = NodeLink(
            node_id, address, self.config.name, self.fence.revision, self, transport=self.transport
        )
        self.nodes[node_id] = NodeEntry(
            node_id=node_id,
            address=address,
            capacity=capacity,
            lease_id=lease_id,
            link=link,
            breaker=NodeBreaker(node_id, self.config.breaker_failures, self.config.breaker_reset_s),
        )
        link.start()

    async def _remove_node(self, node_id: str) -> None:
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        log.warning("node %s left the registry", node_id)
        await node.link.close()
        now = self.clock()
        orphans = self.ledger.orphaned(node_id)
        self._fail_orphans(orphans)
        for entry in orphans:
            self._requeue(entry.batch_id, now, failed=True, reason="node_left")

    # ---- persistence ----------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_s)
            try:
                await self._flush_once()
            except LostLeadership:
                raise
            except aetcd.ClientError as exc:
                log.warning("could not persist progress yet: %s", exc)

    async def _flush_once(self) -> None:
        if not self._dirty_states and not self._dirty_jobs and not self._dirty_suppressions:
            return
        state_keys, self._dirty_states = self._dirty_states, set()
        job_ids, self._dirty_jobs = self._dirty_jobs, set()
        bounces, self._dirty_suppressions = self._dirty_suppressions, {}
        states = {}
        for job_id, seq in state_keys:
            job = self.jobs.get(job_id)
            if job is not None and seq in job.states:
                states[(job_id, seq)] = job.states[seq]
        statuses = {j: self.jobs[j].status for j in job_ids if j in self.jobs}
        try:
            await self.store.save(states, statuses, [(t, e) for (t, _), e in bounces.items()])
        except BaseException:
            self._dirty_states |= state_keys
            self._dirty_jobs |= job_ids
            for key, entry in bounces.items():
                self._dirty_suppressions.setdefault(key, entry)
            raise
        # Batches that are done and written need not stay in memory. Results that
        # arrived during the write made them dirty again: those stay for the next flush.
        for job_id, seq in state_keys:
            job = self.jobs.get(job_id)
            if job is None or seq in job.inflight or seq in job.ready:
                continue
            if (job_id, seq) in self._dirty_states:
                continue
            if any(s == seq for _, s in job.waiting):
                continue
            state = job.states.get(seq)
            indexes = batch_range(seq, job.spec.batch_size, job.spec.total)
            if state is not None and all(
                i in state.results and state.results[i].status.final for i in indexes
            ):
                del job.states[seq]
        pending_jobs = self._dirty_jobs | {j for j, _ in self._dirty_states}
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is None or job_id in pending_jobs:
                continue
            if job.status.state.final and not job.inflight:
                self.jobs.pop(job_id, None)
        self._flushed.set()
        self._flushed = asyncio.Event()

    async def flushed(self) -> None:
        """Wait until the next flush has written what is dirty now."""
        if not self._dirty_states and not self._dirty_jobs and not self._dirty_suppressions:
            return
        await self._flushed.wait()

    # ---- admin ----------------------------------------------------------------------

    async def set_cordon(self, node_id: str, cordoned: bool) -> None:
        await self.store.set_cordon(node_id, cordoned)
        if cordoned:
            self.cordoned.add(node_id)
        else:
            self.cordoned.discard(node_id)
            self._wake.set()

    def node_batches(self, node_id: str) -> int:
        return len(self.ledger.held_by(node_id))

    async def wait_idle(self, node_id: str) -> None:
        """Wait until node_id holds no batch. The caller's deadline bounds the wait."""
        while self.node_batches(node_id) > 0:
            await self._released.wait()

    def _batch_released(self) -> None:
        self._released.set()
        self._released = asyncio.Event()
