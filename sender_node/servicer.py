"""The ``SenderService.Dispatch`` stream: the sender node's half of the protocol.

A leader opens one long-lived stream per node. What a leader can count on:

- **open.** The first request must be ``open`` with a positive ``authority_ms``
  (INVALID_ARGUMENT otherwise). An epoch below the highest the node knows (from an
  ``open`` or from etcd's election keys, ``leader_watch.py``) is refused with
  FAILED_PRECONDITION; a node without a trusted lease, or shut down, answers
  UNAVAILABLE. Otherwise every other stream ends (FAILED_PRECONDITION: one leader, one
  stream) and the node answers ``hello``: the results no leader has acknowledged
  (``replay``, oldest first), the batches it still holds (``held``: still running, or
  finishing transactions past their final dot, or waiting for their results' fsync),
  and its timeouts. A draining node still accepts streams, so results and releases
  reach the leader; it rejects every batch.
- **heartbeat.** Renews the stream's authority: the node starts a transaction of the
  stream's batches only before ``authority_ms`` (at most ``NodeTimings.max_authority_s``)
  after the last ``open`` or heartbeat it received, by its own clock. When that runs
  out, every batch of the stream stops as if the stream had ended (a later heartbeat
  only lets new batches start). A heartbeat of a lower epoch than known ends the stream
  (FAILED_PRECONDITION); one of another epoch than the stream's is INVALID_ARGUMENT.
- **batch.** ``rejected`` (``worker.REJECT_INVALID``, ``REJECT_STALE``,
  ``REJECT_DRAINING``, ``REJECT_UNHEALTHY``, ``REJECT_JOURNAL``,
  ``REJECT_NO_AUTHORITY``, ``REJECT_DUPLICATE``, ``REJECT_CAPACITY``: too
  many recipients held, or too many results unacknowledged) or run: results come as
  ``results`` (each journaled and fsynced first, with its ``seq`` and ``attempt``), then
  ``ack`` (``BatchAck`` with ``unattempted``, the recipients never tried) once the
  batch is released. ``load`` every ``load_interval_s`` and after each ack; a hello
  again when a relay's breaker changes (it replays nothing and lists every batch held).
- **results_ack.** The leader stored the results up to ``through_seq``; the journal
  forgets them (only on the current stream, see ``outbox.py``).
- **cancel.** The batch stops: no new transaction; those past their final dot finish
  and are reported; then its ``ack``.
- **the stream ends** (EOF, error, a newer stream, a higher epoch in etcd, a lost
  lease, lapsed authority, drain timeout, shutdown): its batches stop in the same way.
  Before a hand-back through etcd (no usable stream for ``handback_after_s``) the node
  ends every stream, and reads nothing more from an ended one, so the hand-back can
  name the last stream and the leader move what it sent that never arrived.
  They are not cancelled: a transaction past its final dot always finishes and its
  result is journaled. A batch released while another stream is current is acked on
  that one (with the batch's own epoch and attempt); one released while no stream is
  current is released implicitly: the next hello does not list it in ``held``, and a
  hand-back through etcd lists it (``handback.py``). After EOF the node ends the
  stream (OK) once the batches that came on it are released.

This module is the protocol: streams, their authority and their messages. Protobuf is
converted at this edge only (``_convert.py``); the worker (``worker.py``: taking,
running and releasing batches; ``transaction.py``: one SMTP transaction), the result
bookkeeping (``outbox.py``), the journal, the epoch and authority fences
(``fencing.py``) and the stream state (``stream.py``) see plain values.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from mailerpb.mailer.v1 import common_pb2, sender_pb2, sender_pb2_grpc
from mailers_runtime.message import MessageSigner
from mailers_runtime.verp import ReturnPath
from sender_node import _convert
from sender_node.config import NodeTimings, derive_timings
from sender_node.fencing import EpochFence, start_refusal
from sender_node.journal import Journal
from sender_node.metrics import NodeMetrics
from sender_node.model import BatchRef
from sender_node.outbox import DEFAULT_MAX_MERGE_RESULTS, Outbox
from sender_node.pacing import DomainPacer
from sender_node.stream import Ack, End, Hello, Load, Outgoing, Rejected, Results, Stream
from sender_node.transaction import Mailer, SendEngine
from sender_node.worker import REJECT_INVALID, Worker

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[sender_pb2.DispatchRequest, sender_pb2.DispatchResponse]


class RegistrationView(Protocol):
    """What the servicer needs from ``registration.Registration``."""

    @property
    def lease_id(self) -> int: ...

    @property
    def done(self) -> asyncio.Event: ...

    def healthy(self) -> bool: ...

    async def next_registration(self, after: asyncio.Event) -> None: ...


@dataclasses.dataclass(frozen=True)
class DispatchTuning:
    """Timing knobs of the dispatch stream."""

    load_interval_s: float = 1.0
    """Period of unsolicited load reports."""
    open_timeout_s: float = 10.0
    """How long a new stream may take to send ``open``."""
    max_merge_results: int = DEFAULT_MAX_MERGE_RESULTS
    """Bound on the results of one ``BatchResults`` message."""


class SenderServicer(sender_pb2_grpc.SenderServiceServicer):
    """Serves ``Dispatch`` for one node (see the module docstring).

    Owns every per-stream task, and the node's :class:`~sender_node.worker.Worker`,
    which owns every batch task. :meth:`drain` refuses new batches, :meth:`stop_all`
    stops the batches under way, :meth:`close` ends everything.

    Args:
        node_id: This node's id (in hello and every result).
        registration: The node's registration (see :class:`RegistrationView`).
        mailer: The SMTP pool.
        journal: The result journal (opened; its fsync task started by the owner).
        capacity: Recipients held at once. A batch is rejected when it would exceed
            it, unless the node holds nothing (so an oversized batch cannot starve).
        concurrency: Concurrent SMTP transactions of the node.
        timings: The node's time bounds (``config.timings_of``).
        max_unacked_results: Unacknowledged results beyond which batches are rejected.
        tuning: Stream timing.
        template_cache_jobs: Jobs whose compiled content is kept.
        clock: Monotonic seconds (authority, latency, load window).
        wall_clock: Unix seconds (``updated_at``, the Date header).
        signer: DKIM-signs messages whose From domain it has a key for.
        pacer: Per-recipient-domain concurrency and rate.
        pacing_wait_s: How long a transaction may wait for its domain's turn.
    """

    def __init__(
        self,
        *,
        node_id: str,
        registration: RegistrationView,
        mailer: Mailer,
        journal: Journal,
        capacity: int,
        concurrency: int,
        timings: NodeTimings | None = None,
        max_unacked_results: int = 50_000,
        tuning: DispatchTuning | None = None,
        template_cache_jobs: int = 64,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        metrics: NodeMetrics | None = None,
        signer: MessageSigner | None = None,
        pacer: DomainPacer | None = None,
        pacing_wait_s: float = 30.0,
        return_path: ReturnPath | None = None,
    ) -> None:
        self._node_id = node_id
        self._metrics = metrics or NodeMetrics()
        self._registration = registration
        self._mailer = mailer
        self._capacity = capacity
        self._timings = timings or derive_timings(
            smtp_timeout_s=30.0, lease_ttl_s=5, trust_margin_s=1.0
        )
        self._tuning = tuning or DispatchTuning()
        self._clock = clock
        self._outbox = Outbox(
            journal,
            _convert.results_payload,
            on_released=self._on_released,
            max_merge_results=self._tuning.max_merge_results,
        )
        engine = SendEngine(
            node_id=node_id,
            mailer=mailer,
            concurrency=concurrency,
            timings=self._timings,
            metrics=self._metrics,
            pacer=pacer,
            pacing_wait_s=pacing_wait_s,
            signer=signer,
            return_path=return_path,
            template_cache_jobs=template_cache_jobs,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._worker: Worker[Stream] = Worker(
            engine=engine,
            outbox=self._outbox,
            journal=journal,
            lease_trusted=registration.healthy,
            capacity=capacity,
            max_unacked_results=max_unacked_results,
        )
        self._init_streams()

    def _init_streams(self) -> None:
        """The protocol's own state: epochs seen, streams open, the current one."""
        self._fence = EpochFence()
        self._streams: set[Stream] = set()
        self._current: Stream | None = None
        self._closed = False
        self._acked = asyncio.Event()
        """Set by every ``results_ack``."""
        self._handback_left_out = 0
        self._last_opened: tuple[int, int] | None = None
        """(epoch, stream_no) of the last stream opened."""

    # -- state visible to the process and tests --------------------------------------

    @property
    def highest_epoch(self) -> int:
        """The highest leader epoch seen (in an ``open`` or from etcd)."""
        return self._fence.highest

    @property
    def in_flight(self) -> int:
        """Recipients accepted and not yet reported."""
        return self._worker.in_flight

    @property
    def outbox(self) -> Outbox:
        return self._outbox

    @property
    def draining(self) -> bool:
        return self._worker.draining

    def load(self) -> common_pb2.NodeLoad:
        """The node's current load report (also refreshes the relay breaker gauges)."""
        for relay in self._mailer.relays():
            self._metrics.set_relay_breaker(relay.address, relay.breaker_state)
        snapshot = self._worker.engine.load.snapshot(self._clock())
        return _convert.node_load(self._worker.in_flight, self._capacity, snapshot)

    def serving(self) -> bool:
        """Whether the node takes work: registered, not draining, its journal intact."""
        return self._worker.serving()

    def usable_stream(self) -> bool:
        """Whether a leader's stream is current and its authority has not lapsed."""
        stream = self._current
        return stream is not None and not stream.ended and stream.authorized(self._clock())

    def handback_bytes(self) -> bytes | None:
        """A serialized ``NodeHandback`` of what a leader has not acknowledged or not
        heard of; None when there is nothing to hand back. Once every stream is ended
        (:meth:`end_streams`) and everything fits, it also names the last stream, so
        the leader can move what it sent that never arrived."""
        content = self._outbox.handback()
        ended = self._last_opened if content.complete and not self._streams else None
        if not content.results and not content.released and ended is None:
            return None
        if content.left_out != self._handback_left_out:
            self._handback_left_out = content.left_out
            if content.left_out:
                log.warning(
                    "hand-back: %d released batches did not fit; they stay held until a "
                    "leader acknowledges results or connects",
                    content.left_out,
                )
        return _convert.handback(self._node_id, content, ended).SerializeToString()

    def observe_epoch(self, epoch: int) -> None:
        """A leader of ``epoch`` exists (etcd): streams of lower epochs end at once."""
        if not self._fence.observe(epoch):
            return
        for stream in list(self._streams):
            if stream.epoch < epoch:
                log.warning("epoch %d leads: ending the stream of epoch %d", epoch, stream.epoch)
                self._close_stream(
                    stream, grpc.StatusCode.FAILED_PRECONDITION, f"epoch {epoch} leads now"
                )

    def end_streams(self, reason: str) -> None:
        """End every stream (UNAVAILABLE), before a hand-back: nothing that comes on them
        later is taken, so the hand-back tells the leader all this node will ever do
        with what it sent on them."""
        for stream in list(self._streams):
            log.info("ending the stream of epoch %d: %s", stream.epoch, reason)
            self._close_stream(stream, grpc.StatusCode.UNAVAILABLE, reason)

    def drain(self) -> None:
        """Refuse new batches from now on; batches under way continue."""
        self._worker.drain()

    def stop_all(self, reason: str) -> None:
        """Stop every batch (no new transactions; those past their final dot finish)."""
        self._worker.stop_all(reason)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every batch is released; False if ``timeout_s`` passed first."""
        return await self._worker.wait_idle(timeout_s)

    async def release_all(self, grace_s: float | None = None, ack_wait_s: float = 2.0) -> bool:
        """Stop every batch and wait for their release (up to ``grace_s``, by default
        ``NodeTimings.release_s`` plus a second; past it the rest is cancelled), then
        for the journal's fsync, then (with a usable stream) up to ``ack_wait_s`` for
        the leader to acknowledge every result.

        Returns:
            Whether a usable stream took the releases (else a hand-back should).
        """
        await self._worker.release_all(grace_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ack_wait_s):
                while self._outbox.unacked_results and self.usable_stream():
                    self._acked.clear()
                    await self._acked.wait()
        return self.usable_stream()

    async def close(self, grace_s: float | None = None, ack_wait_s: float = 2.0) -> None:
        """:meth:`release_all`, then end every stream with UNAVAILABLE. Idempotent."""
        if self._closed:
            return
        await self.release_all(grace_s, ack_wait_s)
        self._closed = True
        for stream in list(self._streams):
            self._close_stream(stream, grpc.StatusCode.UNAVAILABLE, "node is shutting down")

    # -- the RPC -----------------------------------------------------------------------

    async def Dispatch(
        self,
        request_iterator: AsyncIterator[sender_pb2.DispatchRequest],
        context: Context,
    ) -> AsyncIterator[sender_pb2.DispatchResponse]:
        """Serve one dispatch stream until it ends (see the module docstring)."""
        opening = await self._read_open(request_iterator, context)
        if opening is None:
            return
        stream = await self._open_stream(opening, context)
        helpers = [
            asyncio.create_task(self._read(stream, request_iterator), name="dispatch-read"),
            asyncio.create_task(self._load_loop(stream), name="dispatch-load"),
            asyncio.create_task(self._watch_lease(stream), name="dispatch-lease"),
            asyncio.create_task(self._watch_authority(stream), name="dispatch-authority"),
        ]
        try:
            while True:
                item = await stream.out.get()
                if isinstance(item, End):
                    if item.code is not None:
                        await context.abort(item.code, item.details)
                    return
                yield self._to_proto(item)
        finally:
            for helper in helpers:
                helper.cancel()
            self._close_stream(stream, grpc.StatusCode.CANCELLED, "stream ended")
            await asyncio.gather(*helpers, return_exceptions=True)
            log.info("dispatch stream of epoch %d closed", stream.epoch)

    async def _read_open(
        self, requests: AsyncIterator[sender_pb2.DispatchRequest], context: Context
    ) -> sender_pb2.DispatchOpen | None:
        try:
            async with asyncio.timeout(self._tuning.open_timeout_s):
                first = await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no open request")
        if first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must be open")
        return first.open

    async def _open_stream(self, opening: sender_pb2.DispatchOpen, context: Context) -> Stream:
        """Admit a stream (or abort the call) and queue its hello."""
        epoch = opening.epoch
        if not self._fence.admits(epoch):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale epoch {epoch}: this node has seen epoch {self._fence.highest}",
            )
        if opening.authority_ms <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "authority_ms must be positive")
        self.observe_epoch(epoch)
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        # A node without a trusted lease still takes streams: it sends what it holds
        # (results, released batches) and refuses every batch ("not registered").
        for older in list(self._streams):
            self._close_stream(
                older,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"superseded by a stream with epoch {epoch}",
            )
        stream = Stream(
            epoch, opening.coordinator_id, max_authority_s=self._timings.max_authority_s
        )
        stream.grant(self._clock(), opening.authority_ms)
        self._streams.add(stream)
        self._last_opened = (epoch, opening.stream_no)
        self._current = stream
        greeting = self._outbox.attach(stream)
        stream.send(Hello(greeting))
        log.info(
            "dispatch stream opened by %s, epoch %d: replaying %d messages, %d batches held",
            stream.coordinator_id,
            epoch,
            len(greeting.replay),
            len(greeting.held),
        )
        return stream

    def _to_proto(self, item: Outgoing) -> sender_pb2.DispatchResponse:
        if isinstance(item, Results):
            return sender_pb2.DispatchResponse(results=_convert.results_message(item.message))
        if isinstance(item, Ack):
            return sender_pb2.DispatchResponse(ack=_convert.batch_ack(item.release))
        if isinstance(item, Load):
            return sender_pb2.DispatchResponse(load=self.load())
        if isinstance(item, Rejected):
            rejected = sender_pb2.BatchRejected(batch_id=item.batch_id, reason=item.reason)
            return sender_pb2.DispatchResponse(rejected=rejected)
        assert isinstance(item, Hello), item
        replay = item.greeting.replay if item.greeting is not None else []
        held = item.greeting.held if item.greeting is not None else list(item.held)
        hello = _convert.hello(
            node_id=self._node_id,
            lease_id=self._registration.lease_id,
            load=self.load(),
            relays=self._mailer.relays(),
            timings=self._timings,
            replay=replay,
            held=held,
        )
        return sender_pb2.DispatchResponse(hello=hello)

    # -- requests ------------------------------------------------------------------------

    async def _read(
        self, stream: Stream, requests: AsyncIterator[sender_pb2.DispatchRequest]
    ) -> None:
        try:
            async for request in requests:
                if stream.ended:
                    return  # what still comes on an ended stream is never taken
                kind = request.WhichOneof("kind")
                if kind == "batch":
                    self._on_batch(stream, request.batch)
                elif kind == "cancel":
                    self._on_cancel(request.cancel)
                elif kind == "results_ack":
                    self._outbox.ack(stream, request.results_ack.through_seq)
                    self._acked.set()
                elif kind == "heartbeat":
                    self._on_heartbeat(stream, request.heartbeat)
                else:
                    self._close_stream(
                        stream, grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} request"
                    )
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call broke; the writer side will see it too
            log.info("dispatch stream read failed: %s", exc)
            self._close_stream(stream, grpc.StatusCode.CANCELLED, "read failed")
            return
        # The leader half-closed: stop its batches; end once they are released.
        stream.half_closed = True
        self._stop_batches(stream, "the leader closed the stream")
        self._end_if_done(stream)

    def _on_heartbeat(self, stream: Stream, heartbeat: sender_pb2.Heartbeat) -> None:
        if not self._fence.admits(heartbeat.epoch):
            self._close_stream(
                stream, grpc.StatusCode.FAILED_PRECONDITION, f"stale epoch {heartbeat.epoch}"
            )
        elif heartbeat.epoch != stream.epoch or heartbeat.authority_ms <= 0:
            self._close_stream(
                stream,
                grpc.StatusCode.INVALID_ARGUMENT,
                "a heartbeat needs the stream's epoch and a positive authority_ms",
            )
        else:
            stream.grant(self._clock(), heartbeat.authority_ms)

    def _on_cancel(self, cancel: sender_pb2.CancelBatch) -> None:
        if not self._fence.admits(cancel.epoch):
            return  # a stale leader's stream is ended anyway
        self._worker.cancel(cancel.batch_id)

    def _on_batch(self, stream: Stream, batch: sender_pb2.Batch) -> None:
        reason = self._refusal(stream, batch)
        if reason is not None:
            log.info("rejected batch %s: %s", batch.batch_id, reason)
            stream.send(Rejected(batch.batch_id, reason))
            return
        work = _convert.work_from_proto(batch)
        self._worker.take(work, stream, permit=lambda: self._permit(stream))
        stream.batches[work.batch_id] = work.ref

    def _refusal(self, stream: Stream, batch: sender_pb2.Batch) -> str | None:
        """Why ``batch`` cannot be taken now; None when it can."""
        if not batch.batch_id or not batch.job_id:
            return REJECT_INVALID
        fence = self._fence
        return self._worker.refusal(
            batch.batch_id,
            len(batch.recipients),
            stale=not fence.admits(batch.epoch) or not fence.admits(stream.epoch),
            authorized=not stream.half_closed and stream.authorized(self._clock()),
        )

    # -- batches -----------------------------------------------------------------------

    def _permit(self, stream: Stream) -> str | None:
        """Why a transaction of ``stream``'s batches may not start now (or None)."""
        return start_refusal(
            stream,
            now_s=self._clock(),
            highest_epoch=self._fence.highest,
            lease_trusted=self._registration.healthy(),
            stopping=self._worker.halted(),
        )

    def _on_released(self, ref: BatchRef) -> None:
        """The outbox released ``ref`` (its ack is queued if a stream is current)."""
        stream = self._worker.forget(ref)
        if stream is None:
            return
        stream.batches.pop(ref.batch_id, None)
        current = self._current
        if current is not None and not current.ended:
            current.send(Load())
        self._end_if_done(stream)

    def _stop_batches(self, stream: Stream, reason: str) -> None:
        self._worker.stop(list(stream.batches), reason)

    def _end_if_done(self, stream: Stream) -> None:
        if stream.half_closed and not stream.batches:
            stream.end(None)
            self._forget(stream)

    def _close_stream(self, stream: Stream, code: grpc.StatusCode, details: str) -> None:
        """End ``stream`` and stop its batches (they finish what is past the final dot)."""
        if not stream.ended:
            stream.end(code, details)
        self._forget(stream)
        self._stop_batches(stream, f"stream ended: {details}")

    def _forget(self, stream: Stream) -> None:
        self._streams.discard(stream)
        if self._current is stream:
            self._current = None
            self._outbox.detach(stream)

    # -- per-stream tasks ----------------------------------------------------------------

    async def _load_loop(self, stream: Stream) -> None:
        breakers = [r.breaker_state for r in self._mailer.relays()]
        while True:
            await asyncio.sleep(self._tuning.load_interval_s)
            stream.send(Load())
            # The leader learns relay breaker changes from a repeated hello; it lists
            # the held batches like every hello, and replays nothing.
            now = [r.breaker_state for r in self._mailer.relays()]
            if now != breakers:
                breakers = now
                stream.send(Hello(None, tuple(self._outbox.held())))

    async def _watch_lease(self, stream: Stream) -> None:
        """Stop the stream's batches whenever the node's registration is lost. The stream
        stays open: the batches are released on it once what is past its final dot has
        finished, and the leader moves them at once instead of waiting for the lease."""
        while not stream.ended:
            done = self._registration.done
            await done.wait()
            if stream.batches:
                log.warning(
                    "registration lost: stopping %d batches of the stream of epoch %d",
                    len(stream.batches),
                    stream.epoch,
                )
                self._stop_batches(stream, "node lost its registration")
            await self._registration.next_registration(done)

    async def _watch_authority(self, stream: Stream) -> None:
        """Stop the stream's batches when its authority lapses (the permit already
        refuses new transactions; this releases the batches without waiting for one)."""
        while not stream.ended:
            remaining = stream.authority_until_s - self._clock()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            if stream.batches:
                log.warning(
                    "no heartbeat on the stream of epoch %d: stopping %d batches",
                    stream.epoch,
                    len(stream.batches),
                )
                self._stop_batches(stream, "authority lapsed")
            stream.renewed.clear()
            await stream.renewed.wait()
