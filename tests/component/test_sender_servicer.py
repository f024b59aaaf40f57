"""The sender's Dispatch stream driven as the coordinator drives it.

Real pieces: a ``grpc.aio`` server on port 0 with ``SenderServicer``, a ``grpc.aio``
channel playing the coordinator, the real ``RelayPool`` speaking SMTP to an aiosmtpd
sink on loopback (``tests/smtp_sink.py``). Fake piece: the registration, replaced by
:class:`FakeRegistration`, which implements the same three members the servicer uses
(``healthy()``, ``lease_id``, ``done``); the real one is covered against etcd in
``tests/integration/test_registration.py``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import dkim  # type: ignore[import-untyped]
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailerpb.mailer.v1 import common_pb2, sender_pb2, sender_pb2_grpc
from mailers.procs import free_port
from sender_node.dkim import DkimKey, DkimSigner
from sender_node.pacing import DomainPacer
from sender_node.servicer import DispatchTuning, SenderServicer
from sender_node.smtp_client import RelayPool
from sender_node.throttle import Limits
from tests.helpers import assert_eventually
from tests.smtp_sink import Sink, smtp_sink

READ_TIMEOUT_S = 10.0
DELIVERED = common_pb2.RECIPIENT_STATUS_DELIVERED
FAILED = common_pb2.RECIPIENT_STATUS_FAILED
DEFERRED = common_pb2.RECIPIENT_STATUS_DEFERRED


class FakeRegistration:
    """Stands in for ``registration.Registration``: healthy until :meth:`lose`."""

    def __init__(self) -> None:
        self.lease_id = 0x5EED
        self.done = asyncio.Event()
        self.is_healthy = True

    def healthy(self) -> bool:
        return self.is_healthy

    def lose(self) -> None:
        self.is_healthy = False
        self.done.set()


@dataclasses.dataclass
class Node:
    servicer: SenderServicer
    registration: FakeRegistration
    stub: sender_pb2_grpc.SenderServiceAsyncStub


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
    ) -> Node: ...


class Coordinator:
    """One Dispatch stream, as the leader coordinator holds it."""

    def __init__(self, stub: sender_pb2_grpc.SenderServiceAsyncStub) -> None:
        self.call = stub.Dispatch()
        self.seen: list[sender_pb2.DispatchResponse] = []

    async def open(self, epoch: int) -> sender_pb2.DispatchResponse:
        await self.call.write(
            sender_pb2.DispatchRequest(
                open=sender_pb2.DispatchOpen(coordinator_id="coord-test", epoch=epoch)
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

    async def read(self) -> sender_pb2.DispatchResponse:
        response = await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S)
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
            while await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S) is not grpc.aio.EOF:
                pass
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


@pytest.fixture
async def servers() -> AsyncIterator[StartNode]:
    """Factory starting a node (servicer + gRPC server + pool); everything stops at teardown."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(
        relays: list[str],
        *,
        capacity: int = 100,
        smtp_timeout_s: float = 5.0,
        pacer: DomainPacer | None = None,
        pacing_wait_s: float = 30.0,
        signer: DkimSigner | None = None,
    ) -> Node:
        registration = FakeRegistration()
        pool = RelayPool(relays, connections_per_relay=4, timeout_s=smtp_timeout_s, cooldown_s=60)
        servicer = SenderServicer(
            node_id="node-test",
            registration=registration,
            mailer=pool,
            capacity=capacity,
            concurrency=4,
            tuning=DispatchTuning(flush_interval_s=0.01, load_interval_s=0.2),
            pacer=pacer,
            pacing_wait_s=pacing_wait_s,
            signer=signer,
        )
        server = grpc.aio.server()
        sender_pb2_grpc.add_SenderServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

        async def cleanup() -> None:
            await channel.close()
            await servicer.close()
            await server.stop(0)
            await pool.close()

        cleanups.append(cleanup)
        return Node(servicer, registration, sender_pb2_grpc.SenderServiceStub(channel))

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()


async def test_batch_is_delivered_reported_and_acked(sink: Sink, servers: StartNode) -> None:
    # Given a healthy node and a coordinator with an open stream
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    hello = await coordinator.open(epoch=1)
    assert hello.WhichOneof("kind") == "hello"
    assert hello.hello.node_id == "node-test"
    assert hello.hello.lease_id == 0x5EED
    assert hello.hello.load.capacity == 100
    assert [r.address for r in hello.hello.relays] == [sink.address]

    # When a batch of 20 recipients is dispatched (each already attempted once)
    await coordinator.send_batch(make_batch("b1", addresses(20), attempts=1))
    responses = await coordinator.read_until("ack", "b1")

    # Then every recipient is reported delivered with the relay's 250, then acked
    results = results_of(responses)
    assert sorted(r.index for r in results) == list(range(20))
    for result in results:
        assert result.status == DELIVERED
        assert result.reply.code == 250
        assert result.reply.enhanced_code == "2.0.0"
        assert result.attempts == 2
        assert result.node_id == "node-test"
        assert result.email == f"user{result.index}@example.org"
        assert not result.ambiguous
        assert result.updated_at.seconds > 0
    assert responses[-1].ack == sender_pb2.BatchAck(batch_id="b1", epoch=1)
    # And a load report follows the ack
    after_ack = await coordinator.read_until("load")
    assert after_ack[-1].load.capacity == 100
    # And the relay got 20 personalised messages with deterministic Message-IDs
    assert len(sink.handler.messages) == 20
    by_id = {m.parsed()["Message-ID"]: m for m in sink.handler.messages}
    assert set(by_id) == {f"<job-1.{i}@example.com>" for i in range(20)}
    seventh = by_id["<job-1.7@example.com>"]
    assert seventh.rcpt_tos == ("user7@example.org",)
    assert seventh.mail_from == "news@example.com"
    parsed = seventh.parsed()
    assert parsed["Subject"] == "Hello User 7"
    text = parsed.get_body(("plain",))
    assert text is not None
    assert "your code is 7." in text.get_content()
    assert node.servicer.in_flight == 0


async def test_open_with_stale_epoch_is_failed_precondition(sink: Sink, servers: StartNode) -> None:
    # Given a node that has seen epoch 5
    node = await servers([sink.address])
    current = Coordinator(node.stub)
    await current.open(epoch=5)

    # When a stream opens with epoch 3
    stale = Coordinator(node.stub)
    await stale.call.write(
        sender_pb2.DispatchRequest(open=sender_pb2.DispatchOpen(coordinator_id="old", epoch=3))
    )

    # Then it is aborted with FAILED_PRECONDITION, and the current stream is untouched
    assert await stale.status() == grpc.StatusCode.FAILED_PRECONDITION
    await current.send_batch(make_batch("b1", addresses(2), epoch=5))
    assert len(results_of(await current.read_until("ack", "b1"))) == 2


async def test_newer_epoch_closes_older_stream(sink: Sink, servers: StartNode) -> None:
    # Given a stream of epoch 1
    node = await servers([sink.address])
    old = Coordinator(node.stub)
    await old.open(epoch=1)

    # When a new leader opens a stream with epoch 2
    new = Coordinator(node.stub)
    assert (await new.open(epoch=2)).WhichOneof("kind") == "hello"

    # Then the old stream is closed as stale, and batches of epoch 1 are refused
    assert await old.status() == grpc.StatusCode.FAILED_PRECONDITION
    await new.send_batch(make_batch("b-old", addresses(1), epoch=1))
    rejected = (await new.read_until("rejected"))[-1].rejected
    assert rejected == sender_pb2.BatchRejected(batch_id="b-old", reason="stale epoch")


async def test_duplicate_batch_is_rejected(sink: Sink, servers: StartNode) -> None:
    # Given a batch in flight (the relay holds its reply to the message)
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(2)))
    await assert_eventually(lambda: sink.handler.data_started > 0, timeout_s=5)

    # When the same batch id arrives again
    await coordinator.send_batch(make_batch("b1", addresses(2)))

    # Then it is rejected as a duplicate, and the original still completes
    rejected = (await coordinator.read_until("rejected"))[-1].rejected
    assert rejected == sender_pb2.BatchRejected(batch_id="b1", reason="duplicate")
    sink.handler.hold.set()
    results = results_of(await coordinator.read_until("ack", "b1"))
    assert sorted(r.index for r in results) == [0, 1]


async def test_batch_over_capacity_is_rejected(sink: Sink, servers: StartNode) -> None:
    # Given a node of capacity 5 holding 4 recipients
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address], capacity=5)
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(4)))
    await assert_eventually(lambda: node.servicer.in_flight == 4, timeout_s=5)

    # When a batch of 2 more arrives
    await coordinator.send_batch(make_batch("b2", addresses(2), job_id="job-2"))

    # Then it is rejected for capacity
    rejected = (await coordinator.read_until("rejected"))[-1].rejected
    assert rejected == sender_pb2.BatchRejected(batch_id="b2", reason="at capacity")


async def test_refused_recipients_fail_and_the_rest_are_delivered(
    sink: Sink, servers: StartNode
) -> None:
    # Given a relay that does not know two of the recipients
    emails = addresses(6)
    sink.handler.refuse = {emails[1]: "550 5.1.1 No such user", emails[4]: "550 5.1.1 No such user"}
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When the batch is sent
    await coordinator.send_batch(make_batch("b1", emails))
    results = {r.index: r for r in results_of(await coordinator.read_until("ack", "b1"))}

    # Then those two fail permanently with the relay's 550, the rest are delivered
    assert set(results) == set(range(6))
    for index, result in results.items():
        if index in (1, 4):
            assert result.status == FAILED
            assert result.reply.code == 550
            assert result.reply.enhanced_code == "5.1.1"
            assert "No such user" in result.reply.text
        else:
            assert result.status == DELIVERED
            assert result.reply.code == 250
    assert len(sink.handler.messages) == 4


async def test_transient_reply_to_data_is_deferred(sink: Sink, servers: StartNode) -> None:
    # Given a relay answering 451 to every message
    sink.handler.data_reply = "451 4.3.0 Try again later"
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When a batch is sent
    await coordinator.send_batch(make_batch("b1", addresses(3)))
    results = results_of(await coordinator.read_until("ack", "b1"))

    # Then every recipient is deferred with the 451, not ambiguous
    assert [r.status for r in results] == [DEFERRED] * 3
    assert {r.reply.code for r in results} == {451}
    assert not any(r.ambiguous for r in results)


async def test_closed_relay_port_defers_with_reason(servers: StartNode) -> None:
    # Given a node whose only relay has nothing listening
    node = await servers([f"127.0.0.1:{free_port()}"])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When a batch is sent
    await coordinator.send_batch(make_batch("b1", addresses(3)))
    responses = await coordinator.read_until("ack", "b1")

    # Then every recipient is deferred with no reply code and a reason
    results = results_of(responses)
    assert len(results) == 3
    for result in results:
        assert result.status == DEFERRED
        assert result.reply.code == 0
        assert "connect" in result.reason
        assert not result.ambiguous
    # And the load report counts the relay errors
    load = (await coordinator.read_until("load"))[-1].load
    assert load.recent_error_rate == 1.0


async def test_failover_to_second_relay(sink: Sink, servers: StartNode) -> None:
    # Given a preferred relay that is down and a second one that works
    node = await servers([f"127.0.0.1:{free_port()}", sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When a batch is sent
    await coordinator.send_batch(make_batch("b1", addresses(5)))
    results = results_of(await coordinator.read_until("ack", "b1"))

    # Then everything is delivered through the second relay
    assert [r.status for r in results] == [DELIVERED] * 5
    assert len(sink.handler.messages) == 5


async def test_no_reply_after_data_is_ambiguous(sink: Sink, servers: StartNode) -> None:
    # Given a relay that takes the message and never answers the final dot
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address], smtp_timeout_s=0.5)
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When a recipient is sent
    await coordinator.send_batch(make_batch("b1", addresses(1)))
    results = results_of(await coordinator.read_until("ack", "b1"))

    # Then it is deferred and flagged ambiguous: the relay may have it
    assert len(results) == 1
    assert results[0].status == DEFERRED
    assert results[0].ambiguous
    assert results[0].reply.code == 0


async def test_cancel_stops_the_batch_then_acks(sink: Sink, servers: StartNode) -> None:
    # Given a batch of 12 whose first 4 transactions (one per connection) are under way
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(12)))
    await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=5)

    # When the coordinator cancels it and the relay then answers
    await coordinator.cancel("b1", epoch=1)
    # (requests are handled in order: once this stale probe is rejected, so was the cancel seen)
    await coordinator.send_batch(make_batch("probe", addresses(1), epoch=0))
    assert (await coordinator.read_until("rejected"))[-1].rejected.batch_id == "probe"
    sink.handler.hold.set()
    responses = await coordinator.read_until("ack", "b1")

    # Then only the transactions under way are reported, then the ack; nothing else is sent
    results = results_of(responses)
    assert len(results) == 4
    assert all(r.status == DELIVERED for r in results)
    assert len(sink.handler.messages) == 4
    assert node.servicer.in_flight == 0


async def test_unhealthy_node_refuses_open(sink: Sink, servers: StartNode) -> None:
    # Given a node without a trustworthy registration
    node = await servers([sink.address])
    node.registration.is_healthy = False

    # When a coordinator opens a stream
    coordinator = Coordinator(node.stub)
    await coordinator.call.write(
        sender_pb2.DispatchRequest(open=sender_pb2.DispatchOpen(coordinator_id="c", epoch=1))
    )

    # Then it is refused as UNAVAILABLE
    assert await coordinator.status() == grpc.StatusCode.UNAVAILABLE


async def test_losing_registration_stops_sending_and_closes_stream(
    sink: Sink, servers: StartNode
) -> None:
    # Given a batch with transactions under way
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(12)))
    await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=5)

    # When the node loses its registration
    node.registration.lose()

    # Then the stream is closed UNAVAILABLE, the batch is dropped, and no new transaction starts
    assert await coordinator.status() == grpc.StatusCode.UNAVAILABLE
    await assert_eventually(lambda: node.servicer.in_flight == 0, timeout_s=5)
    sink.handler.hold.set()
    assert sink.handler.data_started == 4


async def test_stream_end_cancels_its_batches(sink: Sink, servers: StartNode) -> None:
    # Given a batch with transactions under way
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(12)))
    await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=5)

    # When the coordinator goes away
    coordinator.call.cancel()

    # Then the node drops the batch: its id is free again and nothing more is sent
    await assert_eventually(lambda: node.servicer.in_flight == 0, timeout_s=5)
    sink.handler.hold.set()
    successor = Coordinator(node.stub)
    await successor.open(epoch=2)
    await successor.send_batch(make_batch("b1", addresses(2), epoch=2))
    assert len(results_of(await successor.read_until("ack", "b1"))) == 2
    assert sink.handler.data_started == 4 + 2


async def test_invalid_recipient_address_fails_without_sending(
    sink: Sink, servers: StartNode
) -> None:
    # Given a batch with one malformed address
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When it is sent
    await coordinator.send_batch(
        make_batch("b1", ["ok@example.org", "bad address\r\nRCPT TO:<x@y>"])
    )
    results = {r.index: r for r in results_of(await coordinator.read_until("ack", "b1"))}

    # Then the malformed one fails permanently without reaching the relay
    assert results[0].status == DELIVERED
    assert results[1].status == FAILED
    assert "invalid email address" in results[1].reason
    assert len(sink.handler.messages) == 1


async def test_a_shared_message_is_one_transaction_per_group(
    sink: Sink, servers: StartNode
) -> None:
    # Given a job sharing its message, 3 recipients per transaction, one refused address
    emails = addresses(7)
    sink.handler.refuse = {emails[4]: "550 5.1.1 No such user"}
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When a batch of 7 is sent
    await coordinator.send_batch(make_batch("b1", emails, shared=3))
    results = {r.index: r for r in results_of(await coordinator.read_until("ack", "b1"))}

    # Then each recipient has its own result: the refused one its 550, the rest 250
    assert set(results) == set(range(7))
    assert results[4].status == FAILED and results[4].reply.code == 550
    assert all(r.status == DELIVERED for i, r in results.items() if i != 4)
    # And the relay got 3 messages (3, 2 accepted of 3, 1), one Message-ID per group
    groups = sorted(m.rcpt_tos for m in sink.handler.messages)
    assert groups == sorted([tuple(emails[0:3]), (emails[3], emails[5]), (emails[6],)])
    ids = {m.parsed()["Message-ID"] for m in sink.handler.messages}
    assert len(ids) == 3
    assert all(m.parsed()["To"] == "undisclosed-recipients:;" for m in sink.handler.messages)


async def test_a_throttled_domain_defers_without_using_an_attempt(
    sink: Sink, servers: StartNode
) -> None:
    # Given a node whose limits allow slow.example one message per 1,000 s
    pacer = DomainPacer(overrides={"slow.example": Limits(rate_per_s=0.001, burst=1)})
    node = await servers([sink.address], pacer=pacer, pacing_wait_s=1.0)
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When a batch has 3 recipients there and 3 elsewhere (each attempted once before)
    emails = [f"s{i}@slow.example" for i in range(3)] + [f"f{i}@fast.example" for i in range(3)]
    await coordinator.send_batch(make_batch("b1", emails, attempts=1))
    results = {r.email: r for r in results_of(await coordinator.read_until("ack", "b1"))}

    # Then one slow.example message went out; the other two were deferred as throttled
    # without using up an attempt, and fast.example was not held back at all
    slow = [results[e] for e in emails[:3]]
    assert sorted(r.status for r in slow) == sorted([DELIVERED, DEFERRED, DEFERRED])
    for r in slow:
        if r.status == DEFERRED:
            assert r.reason.startswith("throttled") and r.attempts == 1
    assert all(results[e].status == DELIVERED for e in emails[3:])
    assert len(sink.handler.messages) == 4


async def test_mail_from_a_domain_with_a_key_leaves_dkim_signed(
    sink: Sink, servers: StartNode
) -> None:
    # Given a node with an RSA-2048 DKIM key for example.com (the From domain)
    private = rsa.generate_private_key(65537, 2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    signer = DkimSigner({"example.com": DkimKey("s1", pem)})
    node = await servers([sink.address], signer=signer)
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    # When a batch is sent
    await coordinator.send_batch(make_batch("b1", addresses(3)))
    await coordinator.read_until("ack", "b1")

    # Then every message the relay got carries a signature that dkimpy verifies
    def dns(name: bytes, timeout: int = 5) -> bytes:
        return record if name == b"s1._domainkey.example.com." else b""

    assert len(sink.handler.messages) == 3
    for message in sink.handler.messages:
        assert message.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
        assert dkim.verify(message.data, dnsfunc=dns)
