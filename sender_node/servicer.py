"""The ``SenderService.Dispatch`` stream: batches in; results, acks and load out.

The leader coordinator opens one long-lived stream per node. Semantics:

- The first request must be ``open``. An ``open`` whose epoch is below the highest the
  node has seen is aborted with FAILED_PRECONDITION; if the node is draining or not
  (healthily) registered, with UNAVAILABLE. Otherwise the node answers ``hello``, and
  every older stream (epoch at most the new one) is closed with FAILED_PRECONDITION: one
  leader, one stream.
- A ``batch`` is ``rejected`` (reason :data:`REJECT_STALE`, :data:`REJECT_DRAINING`,
  :data:`REJECT_UNHEALTHY`, :data:`REJECT_DUPLICATE`, :data:`REJECT_CAPACITY` or
  :data:`REJECT_INVALID`) or sent: recipients go out concurrently through the SMTP
  pool, ``results`` are streamed as they happen (coalesced: up to 32 per message, at
  most ~50 ms late), and ``ack`` follows once every recipient has a result. ``load``
  is sent every second and after each ack.
- ``cancel`` stops a batch: no new SMTP transaction starts for it, transactions under
  way finish and are reported, then the batch is acked.
- Before each SMTP transaction the node checks its registration; once it is not
  healthy the batch stops without reporting its unsent recipients and without an ack
  (the coordinator reassigns them), and when the registration's ``done`` fires the
  stream is closed with UNAVAILABLE.
- When a stream ends for any reason, the batches that came on it are cancelled at once,
  including SMTP transactions under way: their results could not be reported, so
  finishing them would only create duplicates when the coordinator resends them.
- The results a stream sent lately (or had not yet sent) when it ended are kept and
  replayed in the ``hello`` of the next stream: a leader that died may not have
  persisted them, and the next one must not send those recipients again.

Only this module (among the node's) imports ``mailerpb``; conversion to the pure
``render.Content`` happens here.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import grpc

from mailerpb.mailer.v1 import common_pb2, sender_pb2, sender_pb2_grpc
from sender_node.classify import Failure, LoadStats, Outcome, Phase, classify
from sender_node.errors import RenderError
from sender_node.metrics import NodeMetrics
from sender_node.pacing import DomainPacer, PacingTimeout, Slot
from sender_node.relay_breaker import BreakerState
from sender_node.render import (
    Attachment,
    CompiledMessage,
    Content,
    Mailbox,
    MessageSigner,
    TemplateCache,
)
from sender_node.slots import PrioritySlots
from sender_node.smtp_client import RelayInfo, SendAborted, SendOutcome
from sender_node.throttle import recipient_domain

log = logging.getLogger(__name__)

REJECT_STALE = "stale epoch"
REJECT_DRAINING = "draining"
REJECT_UNHEALTHY = "not registered"
REJECT_DUPLICATE = "duplicate"
REJECT_CAPACITY = "at capacity"
REJECT_INVALID = "invalid batch"

_BREAKER_STATE = {
    BreakerState.CLOSED: common_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: common_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: common_pb2.BREAKER_STATE_HALF_OPEN,
}

_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

_STATUS = {
    Outcome.DELIVERED: common_pb2.RECIPIENT_STATUS_DELIVERED,
    Outcome.PERMANENT: common_pb2.RECIPIENT_STATUS_FAILED,
    Outcome.TRANSIENT: common_pb2.RECIPIENT_STATUS_DEFERRED,
    Outcome.AMBIGUOUS: common_pb2.RECIPIENT_STATUS_DEFERRED,
}


class RegistrationView(Protocol):
    """What the servicer needs from ``registration.Registration``."""

    @property
    def lease_id(self) -> int: ...

    @property
    def done(self) -> asyncio.Event: ...

    def healthy(self) -> bool: ...


class Mailer(Protocol):
    """What the servicer needs from ``smtp_client.RelayPool``."""

    async def send_group(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        data: bytes,
        may_send: Callable[[], bool] | None = None,
    ) -> list[SendOutcome]: ...

    def relays(self) -> list[RelayInfo]: ...


@dataclasses.dataclass(frozen=True)
class DispatchTuning:
    """Timing knobs of the dispatch stream."""

    flush_interval_s: float = 0.05
    """Results wait at most this long to be coalesced."""
    flush_max_results: int = 32
    """A batch's results are sent at once when this many are waiting."""
    load_interval_s: float = 1.0
    """Period of unsolicited load reports."""
    open_timeout_s: float = 10.0
    """How long a new stream may take to send ``open``."""
    cancel_grace_s: float = 2.0
    """How long stream teardown waits for its cancelled batches to unwind."""
    replay_max_results: int = 4_000
    """Results kept for replay to the next leader after a stream ends. The leader
    persists results every 100 ms, so what a dead leader may have lost is the last
    few hundred (a node sends ~2,000/s); 4,000 leaves a wide margin while keeping a
    node's memory flat (20,000 made RSS grow 30% from 10k to 200k recipients)."""


@dataclasses.dataclass(frozen=True)
class _End:
    code: grpc.StatusCode | None
    details: str = ""


@dataclasses.dataclass(eq=False)
class _Batch:
    batch: sender_pb2.Batch
    stream: _Stream
    next_index: int = 0
    unreported: int = 0
    cancel_requested: bool = False
    lost_registration: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def batch_id(self) -> str:
        return self.batch.batch_id


class _Stream:
    """One open Dispatch stream: its outbound queue, pending results and batches."""

    def __init__(
        self,
        epoch: int,
        coordinator_id: str,
        tuning: DispatchTuning,
        orphaned: Callable[[str, list[common_pb2.RecipientResult]], None] = lambda b, r: None,
    ) -> None:
        self.epoch = epoch
        # Results sent lately: if the leader dies before persisting them, the next
        # leader gets them replayed in our hello (see ``SenderServicer._replay``).
        self.recent: collections.deque[tuple[str, common_pb2.RecipientResult]] = collections.deque(
            maxlen=tuning.replay_max_results
        )
        self._orphaned = orphaned
        self.coordinator_id = coordinator_id
        self.tuning = tuning
        self.out: asyncio.Queue[sender_pb2.DispatchResponse | _End] = asyncio.Queue()
        self.batches: dict[str, _Batch] = {}
        self.pending: dict[str, list[common_pb2.RecipientResult]] = {}
        self.flush_needed = asyncio.Event()
        self.ended = False
        self.reader_done = False

    def send(self, response: sender_pb2.DispatchResponse) -> None:
        if not self.ended:
            self.out.put_nowait(response)

    def end(self, code: grpc.StatusCode | None, details: str = "") -> None:
        if not self.ended:
            self.ended = True
            self.out.put_nowait(_End(code, details))
            # Sent lately or never sent: either way the next leader should hear of them.
            for batch_id, result in self.recent:
                self._orphaned(batch_id, [result])
            self.recent.clear()
            for batch_id, results in self.pending.items():
                self._orphaned(batch_id, results)
            self.pending.clear()

    def add_result(self, batch_id: str, result: common_pb2.RecipientResult) -> None:
        if self.ended:
            self._orphaned(batch_id, [result])
            return
        pending = self.pending.setdefault(batch_id, [])
        pending.append(result)
        if len(pending) >= self.tuning.flush_max_results:
            self.flush(batch_id)
        else:
            self.flush_needed.set()

    def flush(self, batch_id: str) -> None:
        results = self.pending.pop(batch_id, None)
        if results:
            self.recent.extend((batch_id, r) for r in results)
            self.send(
                sender_pb2.DispatchResponse(
                    results=sender_pb2.BatchResults(batch_id=batch_id, results=results)
                )
            )

    def flush_all(self) -> None:
        for batch_id in list(self.pending):
            self.flush(batch_id)


def content_from_proto(content: common_pb2.MessageContent) -> Content:
    """The pure rendering input for a job's ``MessageContent``."""
    reply_to = None
    if content.HasField("reply_to") and content.reply_to.email:
        reply_to = Mailbox(content.reply_to.email, content.reply_to.name)
    sender = getattr(content, "from")  # "from" is a Python keyword
    return Content(
        sender=Mailbox(sender.email, sender.name),
        subject=content.subject,
        text_body=content.text_body,
        html_body=content.html_body,
        reply_to=reply_to,
        headers=tuple((h.name, h.value) for h in content.headers),
        unsubscribe_url=content.unsubscribe_url,
        attachments=tuple(
            Attachment(a.filename, a.content_type, a.content) for a in content.attachments
        ),
        recipients_per_message=max(1, content.recipients_per_message),
    )


class SenderServicer(sender_pb2_grpc.SenderServiceServicer):
    """Serves ``Dispatch`` for one node.

    The servicer owns every batch task and every per-stream task; :meth:`close`
    cancels them all. :meth:`drain` makes it refuse new streams and batches, and
    :meth:`wait_idle` waits for the batches under way.

    Args:
        node_id: This node's id (in hello and every result).
        registration: The node's registration (see :class:`RegistrationView`).
        mailer: The SMTP pool (see :class:`Mailer`).
        capacity: Recipients held at once. A batch is rejected when it would exceed
            it, unless the node holds nothing (so an oversized batch cannot starve).
        concurrency: Concurrent SMTP transactions per batch; usually the connections per relay.
        tuning: Stream timing.
        template_cache_jobs: Jobs whose compiled content is kept.
        clock: Monotonic seconds (latency, load window).
        wall_clock: Unix seconds (``updated_at``, the Date header).
        signer: DKIM-signs messages whose From domain it has a key for.
        pacer: Per-recipient-domain concurrency and rate (default: 20 transactions at
            once per domain, no rate limit, slowed down by 421/451 replies).
        pacing_wait_s: How long a transaction may wait for its domain's turn; past
            that its recipients are deferred (without using up an attempt).
    """

    def __init__(
        self,
        *,
        node_id: str,
        registration: RegistrationView,
        mailer: Mailer,
        capacity: int,
        concurrency: int,
        tuning: DispatchTuning | None = None,
        template_cache_jobs: int = 64,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        metrics: NodeMetrics | None = None,
        signer: MessageSigner | None = None,
        pacer: DomainPacer | None = None,
        pacing_wait_s: float = 30.0,
    ) -> None:
        self._node_id = node_id
        self._metrics = metrics or NodeMetrics()
        self._metrics.in_flight.set_function(lambda: self._in_flight)
        self._registration = registration
        self._mailer = mailer
        self._capacity = capacity
        self._concurrency = max(1, concurrency)
        self._slots = PrioritySlots(self._concurrency)
        self._tuning = tuning or DispatchTuning()
        self._cache = TemplateCache(template_cache_jobs, signer=signer)
        self._pacer = pacer if pacer is not None else DomainPacer(clock=clock)
        self._pacing_wait_s = pacing_wait_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._load = LoadStats()
        self._highest_epoch = 0
        self._streams: set[_Stream] = set()
        self._batches: dict[str, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._replay: collections.deque[tuple[str, common_pb2.RecipientResult]] = collections.deque(
            maxlen=self._tuning.replay_max_results
        )

    # -- state visible to the process and tests --------------------------------------

    @property
    def highest_epoch(self) -> int:
        """The highest coordinator epoch seen in an ``open``."""
        return self._highest_epoch

    @property
    def in_flight(self) -> int:
        """Recipients accepted and not yet reported."""
        return self._in_flight

    def load(self) -> common_pb2.NodeLoad:
        """The node's current load report (also refreshes the relay breaker gauges)."""
        for relay in self._mailer.relays():
            self._metrics.relay_breaker_state.labels(relay.address).set(
                _BREAKER_GAUGE[relay.breaker_state]
            )
        snapshot = self._load.snapshot(self._clock())
        return common_pb2.NodeLoad(
            in_flight=self._in_flight,
            capacity=self._capacity,
            recent_latency_ms=snapshot.latency_ms,
            recent_error_rate=snapshot.error_rate,
        )

    def drain(self) -> None:
        """Refuse new streams and batches from now on; batches under way continue."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no batch is under way; False if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """End every stream with UNAVAILABLE and cancel every batch; waits for them."""
        self._draining = True
        for stream in list(self._streams):
            self._close_stream(stream, grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._tuning.cancel_grace_s)

    # -- the RPC -----------------------------------------------------------------------

    async def Dispatch(
        self,
        request_iterator: AsyncIterator[sender_pb2.DispatchRequest],
        context: grpc.aio.ServicerContext[sender_pb2.DispatchRequest, sender_pb2.DispatchResponse],
    ) -> AsyncIterator[sender_pb2.DispatchResponse]:
        """Serve one dispatch stream until it ends (see the module docstring)."""
        try:
            async with asyncio.timeout(self._tuning.open_timeout_s):
                first = await anext(request_iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no open request")
        if first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must be open")
        epoch = first.open.epoch
        if epoch < self._highest_epoch:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale epoch {epoch}: this node has seen epoch {self._highest_epoch}",
            )
        self._highest_epoch = epoch
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is draining")
        if not self._registration.healthy():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is not registered")
        for older in list(self._streams):
            self._close_stream(
                older,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"superseded by a stream with epoch {epoch}",
            )
        stream = _Stream(epoch, first.open.coordinator_id, self._tuning, self._keep_for_replay)
        self._streams.add(stream)
        # Read together, without an await: the registration this stream lives under.
        lease_done = self._registration.done
        stream.send(sender_pb2.DispatchResponse(hello=self._hello()))
        log.info("dispatch stream opened by %s, epoch %d", stream.coordinator_id, epoch)
        helpers = [
            asyncio.create_task(self._read(stream, request_iterator), name="dispatch-read"),
            asyncio.create_task(self._flush_loop(stream), name="dispatch-flush"),
            asyncio.create_task(self._load_loop(stream), name="dispatch-load"),
            asyncio.create_task(self._watch_lease(stream, lease_done), name="dispatch-lease"),
        ]
        try:
            while True:
                item = await stream.out.get()
                if isinstance(item, _End):
                    if item.code is not None:
                        await context.abort(item.code, item.details)
                    return
                yield item
        finally:
            for helper in helpers:
                helper.cancel()
            self._close_stream(stream, grpc.StatusCode.CANCELLED, "stream ended")
            pending = [b.task for b in list(stream.batches.values()) if b.task is not None]
            if pending:
                await asyncio.wait(pending, timeout=self._tuning.cancel_grace_s)
            await asyncio.gather(*helpers, return_exceptions=True)
            log.info("dispatch stream of epoch %d closed", epoch)

    def _keep_for_replay(self, batch_id: str, results: list[common_pb2.RecipientResult]) -> None:
        self._replay.extend((batch_id, r) for r in results)

    def _take_replay(self) -> list[sender_pb2.BatchResults]:
        """Results of ended streams, grouped by batch, handed out once."""
        by_batch: dict[str, list[common_pb2.RecipientResult]] = {}
        for batch_id, result in self._replay:
            by_batch.setdefault(batch_id, []).append(result)
        self._replay.clear()
        return [sender_pb2.BatchResults(batch_id=b, results=r) for b, r in by_batch.items()]

    def _relay_statuses(self) -> list[common_pb2.RelayStatus]:
        return [
            common_pb2.RelayStatus(
                address=relay.address,
                breaker_state=_BREAKER_STATE[relay.breaker_state],
                open_connections=relay.open_connections,
            )
            for relay in self._mailer.relays()
        ]

    def _hello(self, replay: bool = True) -> sender_pb2.NodeHello:
        """The node's hello; ``replay`` hands over the results of ended streams (only a
        new stream's first hello does; a repeated one just refreshes relay states)."""
        return sender_pb2.NodeHello(
            node_id=self._node_id,
            lease_id=self._registration.lease_id,
            load=self.load(),
            relays=self._relay_statuses(),
            replay=self._take_replay() if replay else [],
        )

    def _close_stream(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        """End ``stream`` and cancel its batches now, freeing their ids for a resend."""
        stream.end(code, details)
        self._streams.discard(stream)
        for batch in list(stream.batches.values()):
            if self._batches.get(batch.batch_id) is batch:
                del self._batches[batch.batch_id]
            if batch.task is not None:
                batch.task.cancel()

    async def _read(
        self, stream: _Stream, requests: AsyncIterator[sender_pb2.DispatchRequest]
    ) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "batch":
                    self._accept(stream, request.batch)
                elif kind == "cancel":
                    batch = stream.batches.get(request.cancel.batch_id)
                    if batch is not None:
                        batch.cancel_requested = True
                else:
                    stream.end(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} request")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call broke; the writer side will see it too
            log.info("dispatch stream read failed: %s", exc)
            stream.end(grpc.StatusCode.CANCELLED, "read failed")
            return
        # The coordinator half-closed: finish the batches under way, then end cleanly.
        stream.reader_done = True
        if not stream.batches:
            stream.end(None)

    async def _flush_loop(self, stream: _Stream) -> None:
        while True:
            await stream.flush_needed.wait()
            await asyncio.sleep(self._tuning.flush_interval_s)
            stream.flush_needed.clear()
            stream.flush_all()

    async def _load_loop(self, stream: _Stream) -> None:
        breakers = [r.breaker_state for r in self._mailer.relays()]
        while True:
            await asyncio.sleep(self._tuning.load_interval_s)
            stream.send(sender_pb2.DispatchResponse(load=self.load()))
            # The leader learns relay breaker changes from a repeated hello (NodeLink
            # applies a hello mid-stream); without replay, which only a new stream gets.
            now = [r.breaker_state for r in self._mailer.relays()]
            if now != breakers:
                breakers = now
                stream.send(sender_pb2.DispatchResponse(hello=self._hello(replay=False)))

    async def _watch_lease(self, stream: _Stream, done: asyncio.Event) -> None:
        await done.wait()
        log.warning("registration lost: closing the dispatch stream of epoch %d", stream.epoch)
        self._close_stream(stream, grpc.StatusCode.UNAVAILABLE, "node lost its registration")

    # -- batches -------------------------------------------------------------------------

    def _reject(self, stream: _Stream, batch_id: str, reason: str) -> None:
        log.info("rejected batch %s: %s", batch_id, reason)
        stream.send(
            sender_pb2.DispatchResponse(
                rejected=sender_pb2.BatchRejected(batch_id=batch_id, reason=reason)
            )
        )

    def _accept(self, stream: _Stream, batch: sender_pb2.Batch) -> None:
        size = len(batch.recipients)
        if not batch.batch_id or not batch.job_id:
            self._reject(stream, batch.batch_id, REJECT_INVALID)
        elif batch.epoch < self._highest_epoch or stream.epoch < self._highest_epoch:
            self._reject(stream, batch.batch_id, REJECT_STALE)
        elif self._draining:
            self._reject(stream, batch.batch_id, REJECT_DRAINING)
        elif not self._registration.healthy():
            self._reject(stream, batch.batch_id, REJECT_UNHEALTHY)
        elif batch.batch_id in self._batches:
            self._reject(stream, batch.batch_id, REJECT_DUPLICATE)
        elif self._in_flight > 0 and self._in_flight + size > self._capacity:
            self._reject(stream, batch.batch_id, REJECT_CAPACITY)
        else:
            state = _Batch(batch=batch, stream=stream, unreported=size)
            self._batches[batch.batch_id] = state
            stream.batches[batch.batch_id] = state
            self._in_flight += size
            self._idle.clear()
            task = asyncio.create_task(self._run_batch(state), name=f"batch-{batch.batch_id}")
            state.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, state: _Batch) -> None:
        stream = state.stream
        batch = state.batch
        try:
            try:
                compiled = self._cache.get(batch.job_id, content_from_proto(batch.content))
            except RenderError as exc:
                log.warning("job %s cannot be rendered: %s", batch.job_id, exc)
                while state.next_index < len(batch.recipients):
                    item = batch.recipients[state.next_index]
                    state.next_index += 1
                    self._report(state, self._failed(item, f"render error: {exc}"))
            else:
                workers = min(self._concurrency, len(batch.recipients))
                async with asyncio.TaskGroup() as group:
                    for _ in range(workers):
                        group.create_task(self._work(state, compiled))
            stream.flush(state.batch_id)
            if state.lost_registration:
                log.warning("batch %s stopped: registration not healthy", state.batch_id)
                self._metrics.batches.labels("fenced").inc()
                return
            stream.send(
                sender_pb2.DispatchResponse(
                    ack=sender_pb2.BatchAck(batch_id=state.batch_id, epoch=batch.epoch)
                )
            )
            outcome = "cancelled" if state.cancel_requested else "completed"
            self._metrics.batches.labels(outcome).inc()
            stream.send(sender_pb2.DispatchResponse(load=self.load()))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s failed", state.batch_id)
        finally:
            self._in_flight -= state.unreported
            state.unreported = 0
            if self._batches.get(state.batch_id) is state:
                del self._batches[state.batch_id]
            if stream.batches.get(state.batch_id) is state:
                del stream.batches[state.batch_id]
            if not self._batches:
                self._idle.set()
            if stream.reader_done and not stream.batches:
                stream.end(None)

    def _report(self, state: _Batch, result: common_pb2.RecipientResult) -> None:
        state.unreported -= 1
        self._in_flight -= 1
        state.stream.add_result(state.batch_id, result)

    async def _work(self, state: _Batch, compiled: CompiledMessage) -> None:
        recipients = state.batch.recipients
        while True:
            if state.cancel_requested or state.stream.ended:
                return
            if not self._registration.healthy():
                state.lost_registration = True
                return
            if state.next_index >= len(recipients):
                return
            group = [recipients[state.next_index]]
            state.next_index += 1
            if compiled.recipients_per_message > 1:
                # A shared message: the following recipients of the same domain join the
                # transaction (one domain per group keeps per-domain throttles exact).
                domain = recipient_domain(group[0].recipient.email)
                while (
                    len(group) < compiled.recipients_per_message
                    and state.next_index < len(recipients)
                    and recipient_domain(recipients[state.next_index].recipient.email) == domain
                ):
                    group.append(recipients[state.next_index])
                    state.next_index += 1
            results = await self._deliver(compiled, group, state)
            if results is None:
                # Stopped before the message could reach the relay: nothing to report;
                # the coordinator sends these recipients again.
                state.lost_registration = not self._registration.healthy()
                return
            for result in results:
                self._report(state, result)

    def _may_send(self, state: _Batch) -> bool:
        """Still allowed to start (or finish handing over) a transaction of this batch:
        the lease is trusted, the batch not cancelled and its stream still open."""
        return (
            self._registration.healthy() and not state.cancel_requested and not state.stream.ended
        )

    def _render(
        self, compiled: CompiledMessage, group: Sequence[sender_pb2.BatchRecipient]
    ) -> bytes:
        date = datetime.fromtimestamp(self._wall_clock(), UTC)
        if compiled.recipients_per_message > 1:
            return compiled.render_shared(first_index=group[0].index, date=date)
        recipient = group[0].recipient
        return compiled.render(
            index=group[0].index,
            email=recipient.email,
            name=recipient.name,
            variables=recipient.variables,
            date=date,
        )

    async def _deliver(
        self,
        compiled: CompiledMessage,
        group: Sequence[sender_pb2.BatchRecipient],
        state: _Batch,
    ) -> list[common_pb2.RecipientResult] | None:
        """Send one message to the recipients of ``group`` (one, unless the job shares
        its message) in one transaction; None when stopped before it could be delivered
        (the lease lapsed, the batch was cancelled or its stream ended meanwhile)."""
        try:
            data = self._render(compiled, group)
        except RenderError as exc:
            return [self._failed(item, f"render error: {exc}") for item in group]
        rcpts = [item.recipient.email for item in group]
        domain = recipient_domain(rcpts[0])
        try:
            sent = await self._paced_send(compiled, rcpts, data, state, domain)
        except PacingTimeout:
            self._metrics.throttled.labels(domain).inc()
            return [self._throttled(item) for item in group]
        if sent is None:
            return None
        outcomes, started, finished = sent
        self._metrics.transaction_seconds.observe(finished - started)
        relay_fault = False
        results = []
        for item, outcome in zip(group, outcomes, strict=True):
            result, fault = self._outcome_result(item, outcome)
            relay_fault = relay_fault or fault
            results.append(result)
        self._load.record(finished, finished - started, relay_fault)
        return results

    async def _paced_send(
        self,
        compiled: CompiledMessage,
        rcpts: list[str],
        data: bytes,
        state: _Batch,
        domain: str,
    ) -> tuple[list[SendOutcome], float, float] | None:
        """One transaction in a node-wide slot and a slot of the recipients' domain.

        Raises:
            PacingTimeout: the domain gave no slot within ``pacing_wait_s``.
        """
        priority = state.batch.priority
        # Usually the domain has a slot free: take it, without waiting, inside a node slot.
        async with self._slots.slot(priority):
            paced = self._pacer.try_take(domain)
            if paced is not None:
                try:
                    return await self._timed_send(compiled, rcpts, data, state, paced)
                finally:
                    self._pacer.give_back(paced)
        # The domain is busy or throttled: wait for its turn without holding a node slot
        # that transactions to other domains could use.
        deadline_s = self._clock() + self._pacing_wait_s
        async with self._pacer.slot(domain, deadline_s=deadline_s) as paced:
            async with self._slots.slot(priority):
                return await self._timed_send(compiled, rcpts, data, state, paced)

    async def _timed_send(
        self,
        compiled: CompiledMessage,
        rcpts: list[str],
        data: bytes,
        state: _Batch,
        paced: Slot,
    ) -> tuple[list[SendOutcome], float, float] | None:
        # Waiting for slots can take long (or the process was frozen): check again.
        if not self._may_send(state):
            return None
        started = self._clock()
        try:
            outcomes = await self._mailer.send_group(
                compiled.envelope_from, rcpts, data, lambda: self._may_send(state)
            )
        except SendAborted:
            return None
        finished = self._clock()
        for outcome in outcomes:
            if outcome.phase is not Phase.CONNECT and outcome.code > 0:
                # A 421/451 from the transaction slows the domain down; one at connect
                # time is about the relay, not the destination.
                if paced.reply(outcome.code):
                    self._metrics.domain_slowdowns.labels(paced.domain).inc()
        return outcomes, started, finished

    def _throttled(self, item: sender_pb2.BatchRecipient) -> common_pb2.RecipientResult:
        result = self._result(
            item,
            common_pb2.RECIPIENT_STATUS_DEFERRED,
            f"throttled: no turn for its domain within {self._pacing_wait_s:g}s",
        )
        # The node held it back: no attempt was made, so none is used up.
        result.attempts = item.attempts
        return result

    def _outcome_result(
        self, item: sender_pb2.BatchRecipient, outcome: SendOutcome
    ) -> tuple[common_pb2.RecipientResult, bool]:
        """The result reported for one recipient, and whether the relay was at fault."""
        verdict = classify(outcome.code, outcome.text, outcome.phase, outcome.failure)
        m = self._metrics
        domain = recipient_domain(item.recipient.email)
        m.messages.labels(outcome.relay, domain, verdict.outcome.name.lower()).inc()
        if outcome.code > 0:
            m.smtp_replies.labels(str(outcome.code)).inc()
        result = self._result(item, _STATUS[verdict.outcome], verdict.reason)
        if outcome.failure is Failure.UNAVAILABLE or (
            verdict.relay_fault and verdict.outcome is not Outcome.AMBIGUOUS
        ):
            # No relay was tried (every breaker open), or the relay failed before the
            # message could have reached it (refused connection, 421, auth): the relay's
            # fault, not the recipient's, so it does not use up the recipient's attempts
            # while relays are down. The job's maximum age bounds such an outage.
            result.attempts = item.attempts
        result.ambiguous = verdict.outcome is Outcome.AMBIGUOUS
        if outcome.code > 0:
            result.reply.code = outcome.code
            result.reply.enhanced_code = verdict.enhanced_code
            result.reply.text = outcome.text
        return result, verdict.relay_fault

    def _failed(self, item: sender_pb2.BatchRecipient, reason: str) -> common_pb2.RecipientResult:
        return self._result(item, common_pb2.RECIPIENT_STATUS_FAILED, reason)

    def _result(
        self,
        item: sender_pb2.BatchRecipient,
        status: common_pb2.RecipientStatus.ValueType,
        reason: str,
    ) -> common_pb2.RecipientResult:
        result = common_pb2.RecipientResult(
            index=item.index,
            email=item.recipient.email,
            status=status,
            reason=reason,
            attempts=item.attempts + 1,
            node_id=self._node_id,
        )
        result.updated_at.FromNanoseconds(int(self._wall_clock() * 1e9))
        return result
