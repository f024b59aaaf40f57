"""A sender node in-process for component tests, and a leader driving its stream.

Real pieces: a ``grpc.aio`` server on port 0 with ``SenderServicer`` and the health
service, a ``grpc.aio`` channel playing the coordinator, the real ``RelayPool`` speaking
SMTP to an aiosmtpd sink on loopback (``tests/smtp_sink.py``), the real result journal
in a temporary directory. Fake piece: the registration, replaced by
:class:`FakeRegistration`, which implements the same three members the servicer uses
(``healthy()``, ``lease_id``, ``done``); the real one is covered against etcd in
``tests/integration/test_registration.py``.

Test modules import the fixtures (``sink``, ``servers``) by name.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from mailerpb.mailer.v1 import common_pb2, sender_pb2, sender_pb2_grpc
from sender_node.config import NodeTimings
from sender_node.dkim import DkimSigner
from sender_node.health import NodeHealth
from sender_node.journal import Journal
from sender_node.pacing import DomainPacer
from sender_node.servicer import DispatchTuning, SenderServicer
from sender_node.smtp_client import RelayPool
from tests.smtp_sink import Sink, smtp_sink

READ_TIMEOUT_S = 10.0
# Long enough that no test depends on heartbeats unless it sends them.
AUTHORITY_MS = 120_000
DELIVERED = common_pb2.RECIPIENT_STATUS_DELIVERED
FAILED = common_pb2.RECIPIENT_STATUS_FAILED
DEFERRED = common_pb2.RECIPIENT_STATUS_DEFERRED


class FakeRegistration:
    """Stands in for ``registration.Registration``: healthy until :meth:`lose`."""

    def __init__(self) -> None:
        self.lease_id = 0x5EED
        self.done = asyncio.Event()
        self.is_healthy = True
        self._renewed = asyncio.Event()

    def healthy(self) -> bool:
        return self.is_healthy

    def lose(self) -> None:
        self.is_healthy = False
        self.done.set()

    def regain(self) -> None:
        self.lease_id += 1
        self.done = asyncio.Event()
        self.is_healthy = True
        self._renewed.set()
        self._renewed = asyncio.Event()

    async def next_registration(self, after: asyncio.Event) -> None:
        while self.done is after:
            await self._renewed.wait()


def timings(smtp_timeout_s: float = 5.0) -> NodeTimings:
    """Bounds for a node whose SMTP steps time out after ``smtp_timeout_s``."""
    return NodeTimings(
        final_reply_s=smtp_timeout_s + 1.0,
        start_budget_s=60.0,
        max_authority_s=AUTHORITY_MS / 1000,
        stop_slack_s=0.5,
    )


@dataclasses.dataclass
class Node:
    servicer: SenderServicer
    registration: FakeRegistration
    stub: sender_pb2_grpc.SenderServiceAsyncStub
    journal: Journal
    channel: grpc.aio.Channel
    health: NodeHealth
    stop: Callable[[], Awaitable[None]]
    """Stops the node as its process would end (idempotent)."""


class StartNode(Protocol):
    async def __call__(
        self,
        relays: list[str],
        *,
        capacity: int = 100,
        smtp_timeout_s: float = 5.0,
        pacer: DomainPacer | None = None,
        pacing_wait_s: float = 30.0,
        signer: DkimSigner | None = None,
        state_dir: Path | None = None,
        max_unacked_results: int = 50_000,
        connections: int = 4,
        concurrency: int | None = None,
    ) -> Node: ...


class Coordinator:
    """One Dispatch stream, as the leader coordinator holds it."""

    def __init__(self, stub: sender_pb2_grpc.SenderServiceAsyncStub) -> None:
        self.call = stub.Dispatch()
        self.seen: list[sender_pb2.DispatchResponse] = []

    async def open(
        self, epoch: int, authority_ms: int = AUTHORITY_MS, stream_no: int = 0
    ) -> sender_pb2.DispatchResponse:
        await self.call.write(
            sender_pb2.DispatchRequest(
                open=sender_pb2.DispatchOpen(
                    coordinator_id="coord-test",
                    epoch=epoch,
                    authority_ms=authority_ms,
                    stream_no=stream_no,
                )
            )
        )
        return await self.read()

    async def send_batch(self, batch: sender_pb2.Batch) -> None:
        await self.call.write(sender_pb2.DispatchRequest(batch=batch))

    async def cancel(self, batch_id: str, epoch: int) -> None:
        await self.call.write(
            sender_pb2.DispatchRequest(
                cancel=sender_pb2.CancelBatch(batch_id=batch_id, epoch=epoch)
            )
        )

    async def heartbeat(self, epoch: int, authority_ms: int) -> None:
        await self.call.write(
            sender_pb2.DispatchRequest(
                heartbeat=sender_pb2.Heartbeat(epoch=epoch, authority_ms=authority_ms)
            )
        )

    async def ack(self, through_seq: int) -> None:
        await self.call.write(
            sender_pb2.DispatchRequest(results_ack=sender_pb2.ResultsAck(through_seq=through_seq))
        )

    async def read(self) -> sender_pb2.DispatchResponse:
        async with asyncio.timeout(READ_TIMEOUT_S):
            response = await self.call.read()
        assert isinstance(response, sender_pb2.DispatchResponse), f"stream ended: {response!r}"
        self.seen.append(response)
        return response

    async def read_until(
        self, kind: str, batch_id: str | None = None
    ) -> list[sender_pb2.DispatchResponse]:
        """Read responses up to and including the first of ``kind`` (for ``batch_id``)."""
        got = []
        while True:
            response = await self.read()
            got.append(response)
            if response.WhichOneof("kind") == kind:
                message = getattr(response, kind)
                if batch_id is None or getattr(message, "batch_id", None) == batch_id:
                    return got

    async def status(self) -> grpc.StatusCode:
        """Drain the stream and return its final status code."""
        try:
            while True:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                assert isinstance(response, sender_pb2.DispatchResponse)
                self.seen.append(response)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return await self.call.code()


def results_of(
    responses: Sequence[sender_pb2.DispatchResponse],
) -> list[common_pb2.RecipientResult]:
    return [
        r
        for resp in responses
        if resp.WhichOneof("kind") == "results"
        for r in resp.results.results
    ]


def last_seq(responses: Sequence[sender_pb2.DispatchResponse]) -> int:
    """The seq of the last results message among ``responses``."""
    return max(m.results.seq for m in responses if m.WhichOneof("kind") == "results")


def make_batch(
    batch_id: str,
    emails: Sequence[str],
    *,
    epoch: int = 1,
    job_id: str = "job-1",
    attempts: int = 0,
    shared: int = 0,
) -> sender_pb2.Batch:
    if shared:
        content = common_pb2.MessageContent(
            subject="Notice", text_body="Same for all.", recipients_per_message=shared
        )
    else:
        content = common_pb2.MessageContent(
            subject="Hello {{ name }}",
            text_body="Hi {{ name }}, your code is {{ code }}.",
            html_body="<p>Hi {{ name }}</p>",
        )
    getattr(content, "from").CopyFrom(common_pb2.Address(email="news@example.com", name="News"))
    recipients = [
        sender_pb2.BatchRecipient(
            index=i,
            attempts=attempts,
            recipient=common_pb2.Recipient(
                email=address, name=f"User {i}", variables={"code": str(i)}
            ),
        )
        for i, address in enumerate(emails)
    ]
    return sender_pb2.Batch(
        batch_id=batch_id,
        job_id=job_id,
        epoch=epoch,
        attempt=1,
        content=content,
        recipients=recipients,
    )


def addresses(n: int) -> list[str]:
    return [f"user{i}@example.org" for i in range(n)]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with smtp_sink() as running:
        yield running


async def _serve(
    servicer: SenderServicer, registration: FakeRegistration, journal: Journal, pool: RelayPool
) -> Node:
    """Serve ``servicer`` and the health service on a free port; the node's ``stop`` ends
    it all (idempotent)."""
    health = NodeHealth(servicer.serving, interval_s=0.05)
    server = grpc.aio.server()
    sender_pb2_grpc.add_SenderServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    health.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        await channel.close()
        await servicer.close(ack_wait_s=0)
        await health.stop()
        await server.stop(0)
        await pool.close()
        await journal.close()

    stub = sender_pb2_grpc.SenderServiceStub(channel)
    return Node(servicer, registration, stub, journal, channel, health, stop)


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[StartNode]:
    """Factory starting a node (servicer + gRPC server + pool + journal); everything
    stops at teardown."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(
        relays: list[str],
        *,
        capacity: int = 100,
        smtp_timeout_s: float = 5.0,
        pacer: DomainPacer | None = None,
        pacing_wait_s: float = 30.0,
        signer: DkimSigner | None = None,
        state_dir: Path | None = None,
        max_unacked_results: int = 50_000,
        connections: int = 4,
        concurrency: int | None = None,
    ) -> Node:
        registration = FakeRegistration()
        journal = Journal.open(state_dir or tmp_path / f"state-{len(cleanups)}")
        journal.start()
        pool = RelayPool(
            relays,
            connections_per_relay=connections,
            timeout_s=smtp_timeout_s,
            # The final reply waits as long as each step: a relay holding it is seen soon.
            final_reply_timeout_s=smtp_timeout_s,
            cooldown_s=60,
        )
        servicer = SenderServicer(
            node_id="node-test",
            registration=registration,
            mailer=pool,
            journal=journal,
            capacity=capacity,
            concurrency=concurrency or connections,
            timings=timings(smtp_timeout_s),
            max_unacked_results=max_unacked_results,
            tuning=DispatchTuning(load_interval_s=0.2),
            pacer=pacer,
            pacing_wait_s=pacing_wait_s,
            signer=signer,
        )
        node = await _serve(servicer, registration, journal, pool)
        cleanups.append(node.stop)
        return node

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()
