"""The leader's dispatch stream to one sender node (the gRPC shell of dispatching).

A link dials the node (over the coordinator's :class:`mailers_runtime.tls.Transport`),
opens ``SenderService.Dispatch`` with the leader's epoch and the authority a heartbeat
grants, waits for the node's hello, and then forwards what the node sends to a
:class:`LinkEvents` sink as :mod:`coordinator.node_messages` (the batches it is given
are encoded by a :class:`_convert.BatchEncoder`). While the stream is open it sends a
heartbeat every ``heartbeat_interval_s``, but only while ``may_lead()`` says the
leader's election lease is still trusted: a leader that may have lost its lease stops
granting authority, and the node stops starting transactions within ``authority_s``.

A stream that fails is dialled again with a growing pause until :meth:`close`. Losing a
stream moves nothing: the node keeps its batches until it releases them (in a later
hello, through etcd, or by losing its lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from coordinator import _convert
from coordinator.node_messages import (
    AckMessage,
    HelloMessage,
    OutboundBatch,
    RejectedMessage,
    ResultsMessage,
)
from mailerpb.mailer.v1 import common_pb2, sender_pb2, sender_pb2_grpc
from mailers_runtime.tls import Transport

log = logging.getLogger(__name__)

# A SIGKILLed node closes its sockets and the stream fails at once; keepalive pings
# catch the silent cases (a stopped process, a cut network) within a few seconds.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class LinkEvents(Protocol):
    def on_hello(self, link: NodeLink, hello: HelloMessage) -> None: ...
    def on_disconnected(self, link: NodeLink) -> None: ...
    def on_results(self, link: NodeLink, results: ResultsMessage) -> None: ...
    def on_ack(self, link: NodeLink, ack: AckMessage) -> None: ...
    def on_rejected(self, link: NodeLink, rejected: RejectedMessage) -> None: ...
    def on_load(self, link: NodeLink) -> None: ...


class NodeLink:
    """One node's stream. Owned by the registry; :meth:`close` cancels its task.

    Args:
        may_lead: Asked before each batch and heartbeat is sent: False once the
            leader's election lease may have lapsed.
        authority_s: How long one heartbeat lets the node start transactions.
        heartbeat_interval_s: Period of heartbeats.
        encoder: Encodes the batches; the registry shares one among its links, so a
            job's content is encoded once.
        stream_numbers: Numbers each stream opened (``DispatchOpen.stream_no``); the
            registry shares one counter among its links.
    """

    def __init__(
        self,
        node_id: str,
        address: str,
        coordinator_id: str,
        epoch: int,
        events: LinkEvents,
        *,
        transport: Transport,
        may_lead: Callable[[], bool],
        authority_s: float = 3.0,
        heartbeat_interval_s: float = 1.0,
        hello_timeout_s: float = 10.0,
        encoder: _convert.BatchEncoder | None = None,
        stream_numbers: Callable[[], int],
    ) -> None:
        self.node_id = node_id
        self.address = address
        self._transport = transport
        self._coordinator_id = coordinator_id
        self._epoch = epoch
        self._events = events
        self._may_lead = may_lead
        self._authority_ms = int(authority_s * 1000)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._hello_timeout_s = hello_timeout_s
        self._encoder = encoder or _convert.BatchEncoder()
        self._stream_numbers = stream_numbers
        self.stream_no = 0
        """The number of the current (or last) stream, unique among the links that
        share ``stream_numbers`` (the registry's: one reign)."""
        self._queue: asyncio.Queue[sender_pb2.DispatchRequest | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.connected = False
        self.lease_id = 0
        self.load = common_pb2.NodeLoad()
        self.relays: list[common_pb2.RelayStatus] = []
        self.connects = 0
        self.refused_at: float | None = None
        """When the last dial was refused outright (nothing listens at the node's
        address: its process is gone); None once a dial did not end that way."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"link-{self.node_id}")

    async def close(self) -> None:
        """Stop the link; the stream is cancelled. Safe to call twice."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def send(self, request: sender_pb2.DispatchRequest) -> bool:
        """Queue a request for the node; False when there is no open stream."""
        if not self.connected:
            return False
        self._queue.put_nowait(request)
        return True

    def send_batch(self, batch: OutboundBatch) -> bool:
        """Queue a batch, if the stream is open and the leader may still lead."""
        if not self._may_lead() or not self.connected:
            return False
        return self.send(sender_pb2.DispatchRequest(batch=self._encoder.encode(batch)))

    def cancel(self, batch_id: str) -> bool:
        return self.send(
            sender_pb2.DispatchRequest(
                cancel=sender_pb2.CancelBatch(batch_id=batch_id, epoch=self._epoch)
            )
        )

    def acknowledge(self, through_seq: int) -> bool:
        return self.send(
            sender_pb2.DispatchRequest(results_ack=sender_pb2.ResultsAck(through_seq=through_seq))
        )

    async def _requests(
        self, queue: asyncio.Queue[sender_pb2.DispatchRequest | None]
    ) -> AsyncIterator[sender_pb2.DispatchRequest]:
        yield sender_pb2.DispatchRequest(
            open=sender_pb2.DispatchOpen(
                coordinator_id=self._coordinator_id,
                epoch=self._epoch,
                authority_ms=self._authority_ms if self._may_lead() else 0,
                stream_no=self.stream_no,
            )
        )
        while True:
            request = await queue.get()
            if request is None:
                return
            yield request

    async def _run(self) -> None:
        pause_s = 0.1
        while not self._closed:
            try:
                await self._session()
                pause_s = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                refused = "Connection refused" in (exc.details() or "")
                self.refused_at = time.monotonic() if refused else None
                log.info("stream to node %s ended: %s %s", self.node_id, exc.code(), exc.details())
            except Exception as exc:
                log.warning("stream to node %s failed: %r", self.node_id, exc)
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            if self._may_lead():
                self.send(
                    sender_pb2.DispatchRequest(
                        heartbeat=sender_pb2.Heartbeat(
                            epoch=self._epoch, authority_ms=self._authority_ms
                        )
                    )
                )

    async def _session(self) -> None:
        self._queue = asyncio.Queue()
        self.stream_no = self._stream_numbers()
        async with self._transport.aio_channel(self.address, CHANNEL_OPTIONS) as channel:
            stub = sender_pb2_grpc.SenderServiceStub(channel)
            call = stub.Dispatch(self._requests(self._queue))
            heartbeats: asyncio.Task[None] | None = None
            try:
                async with asyncio.timeout(self._hello_timeout_s):
                    first = await call.read()
                if (
                    not isinstance(first, sender_pb2.DispatchResponse)
                    or first.WhichOneof("kind") != "hello"
                ):
                    raise ConnectionError(f"node {self.node_id} did not say hello")
                self._hello(first.hello)
                self.refused_at = None
                self.connected = True
                self.connects += 1
                # Replayed results and released batches are handled before anything else
                # this node sends, and before it can get a batch.
                self._events.on_hello(self, _convert.hello_from(first.hello))
                heartbeats = asyncio.create_task(self._heartbeats(), name=f"hb-{self.node_id}")
                while True:
                    message = await call.read()
                    if not isinstance(message, sender_pb2.DispatchResponse):
                        return  # EOF: the node closed the stream
                    self._handle(message)
            finally:
                if heartbeats is not None:
                    heartbeats.cancel()
                was_connected = self.connected
                self.connected = False
                # End the request generator too, so gRPC's task reading it finishes
                # instead of being destroyed while it waits.
                self._queue.put_nowait(None)
                call.cancel()
                if was_connected:
                    self._events.on_disconnected(self)

    def _hello(self, hello: sender_pb2.NodeHello) -> None:
        self.lease_id = hello.lease_id
        self.load = hello.load
        self.relays = list(hello.relays)

    def _handle(self, message: sender_pb2.DispatchResponse) -> None:
        kind = message.WhichOneof("kind")
        if kind == "results":
            self._events.on_results(self, _convert.results_from(message.results))
        elif kind == "ack":
            self._events.on_ack(self, _convert.ack_from(message.ack))
        elif kind == "load":
            self.load = message.load
            self._events.on_load(self)
        elif kind == "rejected":
            self._events.on_rejected(self, _convert.rejected_from(message.rejected))
        elif kind == "hello":
            # A repeated hello mid-stream refreshes load and relays (breaker changes).
            self._hello(message.hello)
