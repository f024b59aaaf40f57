"""The leader's scheduler: which batch goes to which node, and what happens when it returns.

Owned by the leader for one reign. Everything here runs on one event loop, so the
in-memory state needs no locks; PostgreSQL is the durable copy, written before anything
leaves the leader:

1. a round picks, for a few turns of the fairness order, one ready batch per
   (priority, tenant) and turn (:func:`fairness.round_order`) and a node for each
   (:class:`Balancer`), loads their recipients still to send,
2. records the holds, fenced (:meth:`Store.assign`) — a new leader sees who holds what,
3. and only then sends them, and only while the election lease is trusted.

A batch comes back only when its holder releases it: an ack on the stream, its absence
from the holder's next hello, a hand-back through etcd, or the holder's lease being gone
long enough (:mod:`coordinator.timeouts`). A release goes through the result writer after
the outcomes that came before it, and the store settles the batch from its recipients:
done, waiting (deferred recipients, retried after a backoff) or ready (unattempted).
A stream that breaks moves nothing.

Nothing stops mid-dispatch: rounds pause while the writer's backlog is above its bound,
while PostgreSQL refuses writes, and while the lease may have lapsed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence, Set

from coordinator import backoff
from coordinator.balancer import Balancer, Candidate
from coordinator.batching import batch_id, batch_range, parse_batch_id
from coordinator.breaker import NodeFault, Released
from coordinator.config import CoordinatorConfig
from coordinator.db.store import (
    BatchRelease,
    BatchSettled,
    CommitUnknown,
    JobCounts,
    StatusChange,
    Store,
    StoreUnavailable,
)
from coordinator.errors import Conflict, NotFound
from coordinator.fairness import Eligible, round_order
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import (
    JobRecord,
    JobState,
    JobStatus,
    PendingRecipient,
    RecipientOutcome,
    Result,
    Status,
)
from coordinator.node_messages import (
    AckMessage,
    HandbackMessage,
    HeldRef,
    HelloMessage,
    OutboundBatch,
    RejectedMessage,
    ResultsMessage,
)
from coordinator.plan import JobPlan
from coordinator.registry import NodeEntry, Registry
from coordinator.suppression import is_hard_bounce
from coordinator.timeouts import LeaderTimeouts
from coordinator.writer import NodeResults, ResultWriter

log = logging.getLogger(__name__)

RANGE_SLICE = 50_000
"""Recipients per statement when the leader changes a whole job (cancel, expire)."""
TURNS_PER_ROUND = 8
"""Turns of the fairness order whose batches one round reads and records together.
Each round is a store transaction that takes the events lock; with one turn a lone job
got one batch per round, and a job sharing its message (a batch: one transaction of
100 recipients) went no faster than the rounds."""


@dataclasses.dataclass
class JobRun:
    """A job the leader is working on."""

    record: JobRecord
    plan: JobPlan
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    closing: str = ""
    """Why the job sends nothing more ("cancelled", "expired"); "" while it runs."""
    closed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """Set once a closing job's last holds came back and its recipients were settled."""
    finished: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def job_id(self) -> str:
        return self.record.spec.job_id

    @property
    def status(self) -> JobStatus:
        return self.record.status

    def notify(self) -> None:
        """Wake every watcher; they pick up a fresh event for the next change."""
        self.changed.set()
        self.changed = asyncio.Event()


class Dispatcher:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        registry_factory: Callable[[Dispatcher], Registry],
        *,
        may_lead: Callable[[], bool],
        timeouts: LeaderTimeouts,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.may_lead = may_lead
        self.timeouts = timeouts
        self.clock = clock
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.metrics = metrics or CoordinatorMetrics()
        self.writer = ResultWriter(store, self, self._retry_at, clock=clock)
        self.registry = registry_factory(self)
        self.jobs: dict[int, JobRun] = {}
        self.by_id: dict[str, int] = {}
        self.balancer = Balancer()
        self._wake = asyncio.Event()
        self._released = asyncio.Event()
        self._turn = 0
        self._outcomes: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._guards: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._to_finish: set[int] = set()
        self._store_trouble_until = 0.0
        self._handed_out = False

    @property
    def nodes(self) -> dict[str, NodeEntry]:
        return self.registry.nodes

    @property
    def cordoned(self) -> set[str]:
        return self.registry.cordoned

    # ---- loading --------------------------------------------------------------------

    async def load(self) -> None:
        """Read every unfinished job and its open batches (a new leader's whole view)."""
        started = self.monotonic()
        batches = 0
        async for record in self.store.unfinished_jobs():
            batches += await self._load_job(record)
        log.info(
            "resumed %d jobs (%d open batches) in %.3fs",
            len(self.jobs), batches, self.monotonic() - started,
        )  # fmt: skip

    async def _load_job(self, record: JobRecord) -> int:
        plan = JobPlan(record.spec.batch_count, record.cursor)
        now = self.monotonic()
        count = 0
        async for b in self.store.open_batches(record.job_no):
            plan.restore(b.seq, b.attempt, b.lost, b.node_id or None, b.retry_at, now)
            count += 1
        job = JobRun(record=record, plan=plan)
        if record.status.state is JobState.CANCELLED:
            job.closing = "cancelled"
            plan.clear_queue()
        self.jobs[record.job_no] = job
        self.by_id[record.spec.job_id] = record.job_no
        self._check_finished(job)
        return count

    def add_job(self, record: JobRecord) -> JobRun:
        """Start working on a job just stored."""
        job = JobRun(record=record, plan=JobPlan(record.spec.batch_count))
        self.jobs[record.job_no] = job
        self.by_id[record.spec.job_id] = record.job_no
        self._wake.set()
        return job

    def job(self, job_id: str) -> JobRun | None:
        job_no = self.by_id.get(job_id)
        return self.jobs.get(job_no) if job_no is not None else None

    # ---- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until cancelled. Raises LostLeadership when a fenced write fails."""
        while True:
            now = self.clock()
            self._sweep_nodes()
            wake_at = now + 1.0
            for job in list(self.jobs.values()):
                wake_at = min(wake_at, self._tend(job, now))
            for job_no in list(self._to_finish):
                await self._finish(job_no)
            if self._may_dispatch(now):
                wake_at = min(wake_at, await self._dispatch_rounds(now))
            self._update_gauges()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, wake_at - self.clock())):
                    await self._wake.wait()

    def wake(self) -> None:
        self._wake.set()

    def _may_dispatch(self, now: float) -> bool:
        if not self.may_lead() or now < self._store_trouble_until:
            return False
        if self.writer.failing_since is not None:
            return False
        return self.writer.backlog < self.config.max_unsaved_results

    def _tend(self, job: JobRun, now: float) -> float:
        """Promote due batches, expire the job when its time is up; when to look again."""
        job.plan.promote(now)
        if not job.closing and now >= self._expires_at(job):
            self._close(job, "expired")
        when = job.plan.next_wait()
        return when if when is not None else now + 1.0

    def _expires_at(self, job: JobRun) -> float:
        options = job.record.spec.options
        if options.expires_at is not None:
            return options.expires_at
        return job.record.spec.created_at + self.config.max_job_age_s

    async def _dispatch_rounds(self, now: float) -> float:
        """Hand out ready batches while nodes have room; returns when to look again."""
        next_wake = now + 1.0
        while True:
            eligible = []
            for job in self.jobs.values():
                if job.closing or job.status.state in (JobState.PAUSED, JobState.CANCELLED):
                    continue
                send_at = job.record.spec.options.send_at
                if send_at is not None and send_at > now:
                    next_wake = min(next_wake, send_at)
                    continue
                if job.plan.peek() is not None:
                    spec = job.record.spec
                    eligible.append(Eligible(spec.job_id, spec.tenant, spec.options.priority))
            if not eligible:
                return next_wake
            picks = self._pick(eligible, now)
            if not picks:
                return next_wake
            if not await self._send(picks, now):
                return next_wake

    def _pick(self, eligible: list[Eligible], now: float) -> list[tuple[JobRun, int, int, str]]:
        """One round: (job, seq, attempt, node) for up to :data:`TURNS_PER_ROUND` turns of
        the fairness order, one batch per eligible job and turn, while nodes have room."""
        picks: list[tuple[JobRun, int, int, str]] = []
        held = self._held_by_node()
        extra: dict[str, int] = {}
        for _ in range(TURNS_PER_ROUND):
            self._turn += 1
            took = False
            for job_id in round_order(eligible, self._turn):
                job = self.job(job_id)
                if job is None or job.plan.peek() is None:
                    continue
                seq = job.plan.peek()
                assert seq is not None
                spec = job.record.spec
                size = len(batch_range(seq, spec.batch_size, spec.total))
                node_id = self.balancer.choose(self._candidates(now, held, extra), size)
                if node_id is None:
                    return picks
                seq, attempt = job.plan.take(node_id, self.monotonic())
                extra[node_id] = extra.get(node_id, 0) + size
                picks.append((job, seq, attempt, node_id))
                took = True
            if not took:
                break
        return picks

    def _held_by_node(self) -> dict[str, int]:
        """Recipients of the batches each node holds."""
        held: dict[str, int] = {}
        for job in self.jobs.values():
            spec = job.record.spec
            for seq, hold in job.plan.held.items():
                held[hold.node_id] = held.get(hold.node_id, 0) + len(
                    batch_range(seq, spec.batch_size, spec.total)
                )
        return held

    def _candidates(
        self, now: float, held: dict[str, int], extra: dict[str, int]
    ) -> list[Candidate]:
        return [
            Candidate(
                node_id=node.node_id,
                capacity=node.link.load.capacity or node.capacity,
                in_flight=held.get(node.node_id, 0) + extra.get(node.node_id, 0),
                error_rate=node.link.load.recent_error_rate,
                schedulable=(
                    node.registered
                    and node.link.connected
                    and node.node_id not in self.cordoned
                    and node.full_until <= now
                    and node.breaker.admits()
                ),
            )
            for node in self.nodes.values()
        ]

    async def _send(self, picks: list[tuple[JobRun, int, int, str]], now: float) -> bool:
        """Load, record and send one round's picks; False when the store failed."""
        ranges = []
        for job, seq, _, _ in picks:
            spec = job.record.spec
            r = batch_range(seq, spec.batch_size, spec.total)
            ranges.append((job.record.job_no, r.start, r.stop, spec.tenant))
        try:
            pending = await self.store.pending(ranges)
        except StoreUnavailable as exc:
            self._store_trouble(exc)
            for job, seq, _, _ in picks:
                job.plan.unsend(seq)
            return False
        by_pick = self._split(picks, pending)
        assignments = []
        finished = []
        for (job, seq, attempt, node_id), (to_send, suppressed) in zip(picks, by_pick, strict=True):
            if not to_send and not suppressed:
                finished.append((job.record.job_no, seq))
            else:
                holder = node_id if to_send else ""
                job.plan.held[seq].node_id = holder
                assignments.append((job.record.job_no, seq, holder, attempt))
        cursors = {job.record.job_no: job.plan.cursor for job, _, _, _ in picks}
        try:
            await self.store.assign(assignments, finished, cursors, now)
        except CommitUnknown as exc:
            self._store_trouble(exc)
            for job, seq, attempt, _ in picks:
                self._verify_hold(job, seq, attempt)
            return False
        except StoreUnavailable as exc:
            self._store_trouble(exc)
            for job, seq, _, _ in picks:
                job.plan.unsend(seq)
            return False
        self.metrics.dispatch_rounds.inc()
        for (job, seq, attempt, node_id), (to_send, suppressed) in zip(picks, by_pick, strict=True):
            self._hand_out(job, seq, attempt, node_id, to_send, suppressed, now)
        return True

    def _split(
        self,
        picks: list[tuple[JobRun, int, int, str]],
        pending: dict[int, list[PendingRecipient]],
    ) -> list[tuple[list[PendingRecipient], list[PendingRecipient]]]:
        """Per pick: (recipients to send, recipients on the tenant's suppression list)."""
        out = []
        for job, seq, _, _ in picks:
            spec = job.record.spec
            r = batch_range(seq, spec.batch_size, spec.total)
            mine = [p for p in pending.get(job.record.job_no, ()) if r.start <= p.index < r.stop]
            out.append(
                ([p for p in mine if p.suppressed is None], [p for p in mine if p.suppressed])
            )
        return out

    def _hand_out(
        self,
        job: JobRun,
        seq: int,
        attempt: int,
        node_id: str,
        to_send: list[PendingRecipient],
        suppressed: list[PendingRecipient],
        now: float,
    ) -> None:
        spec = job.record.spec
        job_no = job.record.job_no
        r = batch_range(seq, spec.batch_size, spec.total)
        if suppressed:
            self.writer.suppress(
                [(job_no, p.index, f"suppressed: {p.suppressed}") for p in suppressed]
            )
            self.metrics.recipients.labels(Status.SUPPRESSED.value).inc(len(suppressed))
        if not to_send and not suppressed:
            job.plan.settle(seq, done=True, retry_at=None, lost=0)
            self._check_finished(job)
            return
        if not to_send:
            # Everything was suppressed: the leader held it; settle it after the writer.
            self.writer.release(BatchRelease(job_no, seq, "", attempt, r.start, r.stop))
            return
        if job.status.state is JobState.QUEUED:
            job.status.state = JobState.RUNNING
            job.notify()
        bid = batch_id(spec.job_id, seq)
        batch = OutboundBatch(
            batch_id=bid,
            job_id=spec.job_id,
            epoch=self.store.epoch or 0,
            attempt=attempt,
            content=spec.content,
            recipients=tuple(to_send),
            priority=spec.options.priority,
            bounce_domain=spec.bounce_domain,
        )
        node = self.nodes.get(node_id)
        if node is None or not node.link.send_batch(batch):
            # Never left the leader: give it back at once (its recipients unattempted).
            self.writer.release(BatchRelease(job_no, seq, node_id, attempt, r.start, r.stop))
            return
        job.plan.held[seq].stream_no = node.link.stream_no
        self.metrics.batches_dispatched.labels(node_id).inc()
        self._track(node, bid, attempt)
        if not self._handed_out:
            self._handed_out = True
            log.info("first batch of this reign handed out (%s to %s)", bid, node_id)

    def _verify_hold(self, job: JobRun, seq: int, attempt: int) -> None:
        """The holds' commit outcome is unknown: release them through the writer (a no-op
        if they were never recorded), then put back whatever is still held in memory."""
        hold = job.plan.held.get(seq)
        if hold is None:
            return
        spec = job.record.spec
        r = batch_range(seq, spec.batch_size, spec.total)
        done = self.writer.release(
            BatchRelease(job.record.job_no, seq, hold.node_id, attempt, r.start, r.stop)
        )

        def after(_: asyncio.Future[None]) -> None:
            if job.plan.holds(seq, hold.node_id, attempt):
                job.plan.unsend(seq)
                self._wake.set()

        done.add_done_callback(after)

    def _store_trouble(self, exc: Exception) -> None:
        log.warning("dispatch paused: PostgreSQL: %s", exc)
        self._store_trouble_until = self.clock() + 1.0

    def _retry_at(self, release: BatchRelease, deferred: int) -> float:
        return (
            self.clock()
            + backoff.delay(self.config.retry, max(1, release.attempt), self.rng).total_seconds()
        )

    # ---- releases -------------------------------------------------------------------

    def _release(
        self, job: JobRun, seq: int, node_id: str, attempt: int, lost: bool = False
    ) -> asyncio.Future[None]:
        spec = job.record.spec
        r = batch_range(seq, spec.batch_size, spec.total)
        self._resolve(spec.job_id, seq, NodeFault("node lost") if lost else None)
        return self.writer.release(
            BatchRelease(job.record.job_no, seq, node_id, attempt, r.start, r.stop, lost=lost)
        )

    def settled(self, batches: list[BatchSettled]) -> None:
        """WriterEvents: released batches as the store settled them."""
        now = self.clock()
        for b in batches:
            job = self.jobs.get(b.job_no)
            if job is None or b.seq not in job.plan.held:
                continue
            retry_at = b.retry_at
            if b.lost >= self.config.max_dispatches and not b.done:
                self._give_up(job, b.seq, b.lost)
            elif b.lost > 1 and retry_at is None and not b.done:
                wait = backoff.delay(self.config.reassign, b.lost - 1, self.rng).total_seconds()
                retry_at = now + wait
            job.plan.settle(b.seq, b.done, retry_at if not job.closing else None, b.lost)
            if job.closing:
                job.plan.clear_queue()
            self._check_finished(job)
        self._batch_released()
        self._wake.set()

    def _give_up(self, job: JobRun, seq: int, lost: int) -> None:
        """A batch every node loses must not take the cluster down node by node."""
        spec = job.record.spec
        r = batch_range(seq, spec.batch_size, spec.total)
        self.writer.change(
            StatusChange(
                job.record.job_no, r.start, r.stop, (Status.QUEUED, Status.DEFERRED),
                Status.FAILED, f"lost by a node {lost} times in a row", spec.batch_size,
            )
        )  # fmt: skip

    def jobs_changed(self, counts: dict[int, JobCounts], reopened: dict[int, list[int]]) -> None:
        """WriterEvents: new counts of jobs, and batches with recipients to send again."""
        for job_no, c in counts.items():
            job = self.jobs.get(job_no)
            if job is None:
                continue
            mine = job.status.counts
            mine.delivered, mine.failed, mine.deferred = c.delivered, c.failed, c.deferred
            mine.cancelled, mine.suppressed = c.cancelled, c.suppressed
            job.status.updated_at = c.updated_at
            job.record = dataclasses.replace(job.record, duplicates=c.duplicates)
            job.notify()
        for job_no, seqs in reopened.items():
            job = self.jobs.get(job_no)
            if job is not None:
                job.plan.reopen(seqs)
        self._wake.set()

    def acked(self, node_id: str, through_seq: int) -> None:
        """WriterEvents: a node's results up to through_seq are durable."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.link.acknowledge(through_seq)

    # ---- node events (from links) ---------------------------------------------------

    def on_hello(self, link: object, hello: HelloMessage) -> None:
        node_id = hello.node_id or getattr(link, "node_id", "")
        node = self.nodes.get(node_id)
        if node is not None:
            node.limits = hello.limits
        for replayed in hello.replay:
            self._results(node_id, replayed)
        held = hello.held
        self._release_unlisted(node_id, held)
        log.info(
            "node %s connected: %d results replayed, holds %d batches",
            node_id, sum(len(r.results) for r in hello.replay), len(held),
        )  # fmt: skip
        self._wake.set()

    def on_disconnected(self, link: object) -> None:
        log.info("stream to node %s closed; its batches stay with it", getattr(link, "node_id", ""))

    def on_results(self, link: object, results: ResultsMessage) -> None:
        self._results(getattr(link, "node_id", ""), results)

    def _results(self, node_id: str, results: ResultsMessage, ack: bool = True) -> None:
        try:
            job_id, seq = parse_batch_id(results.batch_id)
        except ValueError:
            return
        job = self.job(job_id)
        tenant_known = job is not None
        outcomes: list[RecipientOutcome] = []
        # A shared message's recipients share one reported result: it is judged once,
        # and counted once for all of them (runs: each result stored, and where its
        # recipients begin in outcomes).
        runs: list[tuple[Result, int]] = []
        judged: tuple[Result, Result, bool] | None = None
        for index, reported in results.results:
            if judged is None or judged[0] is not reported:
                judged = (reported, *self._judged(reported))
                runs.append((judged[1], len(outcomes)))
            outcomes.append(RecipientOutcome(job_id, index, judged[1], judged[2]))
        done = self._count(runs, len(outcomes))
        if job is not None:
            hold = job.plan.held.get(seq)
            if hold is not None and hold.node_id == node_id:
                hold.progress_at = self.monotonic()
        node = self.nodes.get(node_id)
        if node is not None and tenant_known:
            node.recipients_done += done
        self.writer.results(NodeResults(node_id, results.seq if ack else 0, outcomes))

    def _count(self, runs: list[tuple[Result, int]], end: int) -> int:
        """Count recipients' results in the metrics (see :func:`tally`) and return how
        many are final. One increment per label, not per recipient: a labelled child
        costs a lookup."""
        statuses, codes = tally(runs, end)
        for status, n in statuses.items():
            self.metrics.recipients.labels(status.value).inc(n)
        for code, n in codes.items():
            self.metrics.smtp_replies.labels(str(code)).inc(n)
        return sum(n for status, n in statuses.items() if status.final)

    def _judged(self, result: Result) -> tuple[Result, bool]:
        """The result to store (a deferral out of attempts fails), and whether it is a
        hard bounce."""
        bounced = is_hard_bounce(result.status is Status.FAILED, result.code, result.enhanced_code)
        if result.status is Status.DEFERRED and result.attempts >= self.config.max_attempts:
            last = result.reason or result.text
            result = dataclasses.replace(
                result,
                status=Status.FAILED,
                reason=f"gave up after {result.attempts} attempts; last: {last}",
            )
        return result, bounced

    def on_ack(self, link: object, ack: AckMessage) -> None:
        node_id = getattr(link, "node_id", "")
        try:
            job_id, seq = parse_batch_id(ack.batch_id)
        except ValueError:
            return
        job = self.job(job_id)
        if job is None:
            return
        hold = job.plan.held.get(seq)
        attempt = ack.attempt or (hold.attempt if hold is not None else 0)
        if job.plan.holds(seq, node_id, attempt):
            assert hold is not None
            self.metrics.batch_ack_seconds.observe(max(0.0, self.monotonic() - hold.since))
            self._release(job, seq, node_id, attempt)

    def on_rejected(self, link: object, rejected: RejectedMessage) -> None:
        node_id = getattr(link, "node_id", "")
        log.info("node %s rejected %s: %s", node_id, rejected.batch_id, rejected.reason)
        node = self.nodes.get(node_id)
        capacity = "capacity" in rejected.reason
        if node is not None and capacity:
            node.full_until = self.clock() + 1.0
        try:
            job_id, seq = parse_batch_id(rejected.batch_id)
        except ValueError:
            return
        job = self.job(job_id)
        if job is None:
            return
        hold = job.plan.held.get(seq)
        if hold is not None and hold.node_id == node_id:
            self._resolve(job_id, seq, Released() if capacity else NodeFault(rejected.reason))
            self._release(job, seq, node_id, hold.attempt)

    def on_load(self, link: object) -> None:
        node = self.nodes.get(getattr(link, "node_id", ""))
        if node is not None:
            node.full_until = 0.0
        self._wake.set()

    # ---- registry events ------------------------------------------------------------

    def node_left(self, node: NodeEntry) -> None:
        held = sum(len(j.plan.held_by(node.node_id)) for j in self.jobs.values())
        if held:
            log.warning(
                "node %s left holding %d batches; they move in %.0fs unless it releases them",
                node.node_id, held, self.timeouts.move_after_s(node.limits),
            )  # fmt: skip

    def node_back(self, node: NodeEntry) -> None:
        self._wake.set()

    async def handback(self, node_id: str, handback: HandbackMessage) -> None:
        """A node that cannot reach us left its results and released batches in etcd:
        apply them (returns once they are written)."""
        for results in handback.results:
            self._results(node_id, results, ack=False)
        waits: list[asyncio.Future[None]] = []
        for released_id, attempt in handback.released:
            try:
                job_id, seq = parse_batch_id(released_id)
            except ValueError:
                continue
            job = self.job(job_id)
            if job is not None and job.plan.holds(seq, node_id, attempt):
                waits.append(self._release(job, seq, node_id, attempt))
        waits += self._lost_on_the_way(node_id, handback)
        if not waits:
            waits.append(self.writer.release(BatchRelease(0, -1, node_id, -1, 0, 0)))
        await asyncio.gather(*waits)

    def _lost_on_the_way(
        self, node_id: str, handback: HandbackMessage
    ) -> list[asyncio.Future[None]]:
        """Release what this reign sent on streams the node has ended and that the
        complete hand-back does not list: it never reached the node (it was on the wire
        when the link broke), and nothing that still arrives on those streams is taken.
        Like a hello's reconciliation, but without a stream."""
        if handback.ended is None:
            return []
        epoch, stream_no = handback.ended
        if epoch != self.store.epoch:
            return []  # numbered by another reign: nothing to conclude
        listed = handback.held | set(handback.released)
        waits = self._release_unlisted(node_id, listed, through_stream=stream_no)
        if waits:
            log.info(
                "node %s never received %d batches sent before it ended its stream %d; "
                "they move", node_id, len(waits), stream_no,
            )  # fmt: skip
        return waits

    def _release_unlisted(
        self, node_id: str, listed: Set[HeldRef], through_stream: int | None = None
    ) -> list[asyncio.Future[None]]:
        """Release the node's holds that ``listed`` (what it has, or released) does not
        name: it never got them and will take none of them now. With ``through_stream``,
        only those sent on that stream or an earlier one (a later one may still bring
        them)."""
        waits = []
        for job in self.jobs.values():
            for seq in job.plan.held_by(node_id):
                hold = job.plan.held[seq]
                if through_stream is not None and hold.stream_no > through_stream:
                    continue
                if (batch_id(job.job_id, seq), hold.attempt) not in listed:
                    waits.append(self._release(job, seq, node_id, hold.attempt))
        return waits

    def _gone(self, node: NodeEntry, now: float) -> bool:
        """Whether a node whose lease is gone can no longer be sending anything."""
        assert node.left_at is not None
        return self.timeouts.node_gone(
            node.limits, left_at=node.left_at, refused_at=node.link.refused_at, now=now
        )

    def _sweep_nodes(self) -> None:
        """Move the batches of nodes gone long enough; ask stalled batches back."""
        now = self.monotonic()
        for node in list(self.nodes.values()):
            if node.left_at is not None and self._gone(node, now):
                moved = 0
                for job in self.jobs.values():
                    for seq in job.plan.held_by(node.node_id):
                        self._release(job, seq, node.node_id, job.plan.held[seq].attempt, lost=True)
                        moved += 1
                if moved:
                    self.metrics.reassignments.labels("node_left").inc(moved)
                    log.warning("node %s is gone: its %d batches move", node.node_id, moved)
                task = asyncio.ensure_future(self.registry.forget(node.node_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                continue
            if not node.link.connected:
                continue
            stall = self.timeouts.stall_s(node.limits)
            for job in self.jobs.values():
                for seq in job.plan.held_by(node.node_id):
                    hold = job.plan.held[seq]
                    if not hold.cancel_sent and now - hold.progress_at > stall:
                        hold.cancel_sent = node.link.cancel(batch_id(job.job_id, seq))
                        log.warning(
                            "batch %s/%d: no news from %s; asked it back",
                            job.job_id,
                            seq,
                            node.node_id,
                        )

    # ---- job control ----------------------------------------------------------------

    async def pause(self, job: JobRun) -> None:
        if job.closing or job.status.state.final or job.status.state is JobState.PAUSED:
            return
        await self._set_state(job, JobState.PAUSED)
        self._cancel_holds(job)

    async def resume(self, job: JobRun) -> None:
        if job.status.state is not JobState.PAUSED:
            return
        counts = job.status.counts
        await self._set_state(job, JobState.RUNNING if counts.done else JobState.QUEUED)
        self._wake.set()

    async def cancel(self, job: JobRun) -> None:
        if job.status.state.final:
            return
        await self._set_state(job, JobState.CANCELLED)
        self._close(job, "cancelled")

    async def settled_holds(self, job: JobRun) -> None:
        """Wait until no node holds a batch of the job (each holder stopped and said so,
        and its results are written). The caller's deadline bounds the wait."""
        while job.plan.held:
            await self._released.wait()

    def _close(self, job: JobRun, why: str) -> None:
        """Send nothing more of the job; once its holds are back, settle the rest."""
        job.closing = why
        job.plan.clear_queue()
        if why == "cancelled":
            self._cancel_holds(job)
        self._check_finished(job)

    def _cancel_holds(self, job: JobRun) -> None:
        for seq, hold in job.plan.held.items():
            node = self.nodes.get(hold.node_id)
            if node is not None:
                node.link.cancel(batch_id(job.job_id, seq))

    def _check_finished(self, job: JobRun) -> None:
        if not job.plan.open:
            self._to_finish.add(job.record.job_no)
            self._wake.set()

    async def _finish(self, job_no: int) -> None:
        """A job with nothing open: settle what a close leaves, then mark it finished."""
        job = self.jobs.get(job_no)
        self._to_finish.discard(job_no)
        if job is None or job.plan.open:
            return
        now = self.clock()
        spec = job.record.spec
        if job.closing:
            status = Status.CANCELLED if job.closing == "cancelled" else Status.FAILED
            reason = (
                "job cancelled" if job.closing == "cancelled" else "job expired before delivery"
            )
            for lo in range(0, spec.total, RANGE_SLICE):
                change = StatusChange(
                    job_no, lo, min(spec.total, lo + RANGE_SLICE), (Status.QUEUED, Status.DEFERRED),
                    status, reason, spec.batch_size,
                )  # fmt: skip
                await self.writer.change(change)
        state = JobState.CANCELLED if job.closing == "cancelled" else JobState.COMPLETED
        try:
            record = await self.store.set_job_state(job_no, state, now, now)
        except StoreUnavailable as exc:
            self._store_trouble(exc)
            self._to_finish.add(job_no)
            return
        if record is not None:
            job.record = record
        log.info(
            "job %s %s: %d delivered, %d failed, %d cancelled, %d suppressed",
            spec.job_id, state.value, job.status.counts.delivered, job.status.counts.failed,
            job.status.counts.cancelled, job.status.counts.suppressed,
        )  # fmt: skip
        job.closed.set()
        job.finished.set()
        job.notify()
        del self.jobs[job_no]
        self.by_id.pop(spec.job_id, None)
        self.registry.job_finished(spec.job_id)

    async def _set_state(self, job: JobRun, state: JobState) -> None:
        record = await self.store.set_job_state(job.record.job_no, state, self.clock(), None)
        if record is not None:
            job.record = dataclasses.replace(record, status=dataclasses.replace(record.status))
        job.notify()

    async def retry_failed(self, job_id: str) -> tuple[JobRecord, int]:
        """Queue again the recipients that failed without a 5xx reply (out of attempts,
        expired, given up after losses). Returns the job and how many were queued.

        Raises:
            NotFound: no such job.
            Conflict: the job was cancelled.
        """
        job = self.job(job_id)
        record = job.record if job is not None else await self.store.job(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} not found")
        if record.status.state is JobState.CANCELLED:
            raise Conflict(f"job {job_id!r} was cancelled")
        spec = record.spec
        requeued = 0
        for lo in range(0, spec.total, RANGE_SLICE):
            requeued += await self.writer.change(
                StatusChange(
                    record.job_no, lo, min(spec.total, lo + RANGE_SLICE), (Status.FAILED,),
                    Status.QUEUED, "", spec.batch_size, skip_permanent=True,
                )
            )  # fmt: skip
        if requeued and self.job(job_id) is None:
            fresh = await self.store.set_job_state(
                record.job_no, JobState.RUNNING, self.clock(), None
            )
            if fresh is not None:
                await self._load_job(fresh)
        elif requeued:
            job = self.job(job_id)
            if job is not None and job.status.state is JobState.COMPLETED:
                await self._set_state(job, JobState.RUNNING)
        self._wake.set()
        found = self.job(job_id)
        return (found.record if found is not None else record), requeued

    # ---- breakers -------------------------------------------------------------------

    def _track(self, node: NodeEntry, bid: str, attempt: int) -> None:
        """Count the batch's fate against the node's breaker once it is known."""
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job_id, seq = parse_batch_id(bid)
        self._outcomes[(job_id, seq)] = outcome
        task = asyncio.create_task(node.breaker.guard(outcome), name=f"breaker-{bid}")
        self._guards.add(task)
        task.add_done_callback(self._guards.discard)

    def _resolve(self, job_id: str, seq: int, error: Exception | None = None) -> None:
        outcome = self._outcomes.pop((job_id, seq), None)
        if outcome is None or outcome.done():
            return
        if error is None:
            outcome.set_result(None)
        else:
            outcome.set_exception(error)

    # ---- admin ----------------------------------------------------------------------

    def node_batches(self, node_id: str) -> int:
        return sum(len(job.plan.held_by(node_id)) for job in self.jobs.values())

    async def wait_idle(self, node_id: str) -> None:
        """Wait until node_id holds no batch. The caller's deadline bounds the wait."""
        while self.node_batches(node_id) > 0:
            await self._released.wait()

    def _batch_released(self) -> None:
        self._released.set()
        self._released = asyncio.Event()

    def active_jobs(self, tenant: str | None = None) -> Iterable[JobRun]:
        return (j for j in self.jobs.values() if tenant is None or j.record.spec.tenant == tenant)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_batches.labels("ready").set(sum(len(j.plan.ready) for j in self.jobs.values()))
        m.queue_batches.labels("waiting").set(sum(len(j.plan.waiting) for j in self.jobs.values()))
        m.queue_batches.labels("in_flight").set(sum(len(j.plan.held) for j in self.jobs.values()))
        m.jobs_active.set(len(self.jobs))
        m.nodes_connected.set(sum(1 for n in self.nodes.values() if n.link.connected))
        for node in self.nodes.values():
            m.set_breaker(node.node_id, node.breaker.state().value)

    async def stop(self) -> None:
        for task in list(self._guards) + list(self._background):
            task.cancel()


def tally(
    runs: Sequence[tuple[Result, int]], end: int
) -> tuple[collections.Counter[Status], collections.Counter[int]]:
    """Recipients by status and by SMTP reply code (none counted for code 0), from runs
    of consecutive recipients that share a result: each run is the result and where its
    recipients begin, and the last run ends at ``end``. A shared message's recipients
    are one run, so this costs per result, not per recipient."""
    ends = [start for _, start in runs[1:]]
    if runs:
        ends.append(end)
    counted: collections.Counter[tuple[Status, int]] = collections.Counter()
    for (result, start), stop in zip(runs, ends, strict=True):
        counted[result.status, result.code] += stop - start
    statuses: collections.Counter[Status] = collections.Counter()
    codes: collections.Counter[int] = collections.Counter()
    for (status, code), n in counted.items():
        statuses[status] += n
        if code:
            codes[code] += n
    return statuses, codes
