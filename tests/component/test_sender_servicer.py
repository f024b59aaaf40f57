"""The sender's Dispatch stream driven as the coordinator drives it (see
``node_harness.py`` for what is real): batches, results, releases, the journal's
replays and acknowledgements, authority, drain and health."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import grpc
import pytest
from aiosmtpd.smtp import SMTP
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mailerpb.mailer.v1 import common_pb2, sender_pb2
from mailers_dev.procs import free_port
from sender_node.dkim import DkimKey, DkimSigner
from sender_node.journal import Journal
from sender_node.pacing import DomainPacer
from sender_node.throttle import Limits
from tests.component.node_harness import (
    DEFERRED,
    DELIVERED,
    FAILED,
    Coordinator,
    StartNode,
    addresses,
    make_batch,
    results_of,
    servers,
    sink,
)
from tests.helpers import assert_eventually
from tests.smtp_sink import Sink, SinkHandler

__all__ = ["servers", "sink"]  # fixtures


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
    # And it owes nothing yet: no replay, no batch held, and it states its timeouts
    assert not hello.hello.replay and not hello.hello.held
    assert hello.hello.timeouts == sender_pb2.NodeTimeouts(
        final_reply_ms=6_000, transaction_ms=66_000
    )

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
    assert responses[-1].ack == sender_pb2.BatchAck(batch_id="b1", epoch=1, attempt=1)
    # And every results message names the attempt and has a rising seq
    messages = [r.results for r in responses if r.WhichOneof("kind") == "results"]
    assert {m.attempt for m in messages} == {1}
    seqs = [m.seq for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > 0
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
        sender_pb2.DispatchRequest(
            open=sender_pb2.DispatchOpen(coordinator_id="old", epoch=3, authority_ms=5000)
        )
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
    sink.handler.hold.set()


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

    # Then only the transactions under way are reported, then the ack naming the 8 never
    # attempted; nothing else is sent
    results = results_of(responses)
    assert len(results) == 4
    assert all(r.status == DELIVERED for r in results)
    assert responses[-1].ack == sender_pb2.BatchAck(
        batch_id="b1", epoch=1, attempt=1, unattempted=8
    )
    assert len(sink.handler.messages) == 4
    assert node.servicer.in_flight == 0


async def test_unregistered_node_takes_a_stream_but_refuses_batches(
    sink: Sink, servers: StartNode
) -> None:
    # Given a node without a trustworthy registration
    node = await servers([sink.address])
    node.registration.is_healthy = False

    # When a coordinator opens a stream and sends a batch
    coordinator = Coordinator(node.stub)
    hello = (await coordinator.open(epoch=1)).hello
    await coordinator.send_batch(make_batch("b1", addresses(2)))

    # Then the node says hello (so what it holds can reach the leader) and refuses it
    assert hello.node_id
    (rejected,) = [r for r in await coordinator.read_until("rejected") if r.HasField("rejected")]
    assert rejected.rejected.batch_id == "b1"
    assert len(sink.handler.messages) == 0


async def test_losing_registration_stops_sending_and_releases_on_the_stream(
    sink: Sink, servers: StartNode
) -> None:
    # Given a batch with 4 transactions past their final dot (the relay holds its replies)
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(12)))
    await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=10)

    # When the node loses its registration
    node.registration.lose()

    # Then no new transaction starts, and the transactions past their final dot are not
    # cut: they finish, are reported and the batch is released on the same stream (the
    # leader can move the rest at once)
    sink.handler.hold.set()
    responses = await coordinator.read_until("ack", "b1")
    assert sink.handler.data_started == 4
    assert sorted(r.index for r in results_of(responses)) == [0, 1, 2, 3]
    assert responses[-1].ack.unattempted == 8
    assert node.servicer.outbox.unacked_results == 4
    # And once registered again, the next leader hears of them (and of nothing held)
    node.registration.regain()
    hello = (await Coordinator(node.stub).open(epoch=2)).hello
    assert sorted(r.index for m in hello.replay for r in m.results) == [0, 1, 2, 3]
    assert all(r.status == DELIVERED for m in hello.replay for r in m.results)
    assert not hello.held


async def test_stream_end_stops_its_batches_without_cutting_transactions(
    sink: Sink, servers: StartNode
) -> None:
    # Given a batch with 4 transactions past their final dot (the relay holds its replies)
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(12)))
    await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=10)

    # When the coordinator goes away, and a successor connects while the relay still holds
    coordinator.call.cancel()
    successor = Coordinator(node.stub)
    hello = (await successor.open(epoch=2)).hello

    # Then the successor hears the batch is still held (finishing past its final dot)
    assert list(hello.held) == [sender_pb2.HeldBatch(batch_id="b1", attempt=1)]
    # And when the relay answers, the 4 results and the release (8 never attempted) come
    # on the successor's stream; no other transaction of the batch started
    sink.handler.hold.set()
    responses = await successor.read_until("ack", "b1")
    assert sorted(r.index for r in results_of(responses)) == [0, 1, 2, 3]
    assert responses[-1].ack == sender_pb2.BatchAck(
        batch_id="b1", epoch=1, attempt=1, unattempted=8
    )
    assert sink.handler.data_started == 4
    assert len(sink.handler.messages) == 4
    # And the batch id is free again for its next attempt
    retry = make_batch("b1", addresses(12)[4:6], epoch=2)
    retry.attempt = 2
    await successor.send_batch(retry)
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


# ---- results are journaled, replayed and acknowledged -----------------------------------


def replayed(hello: sender_pb2.NodeHello) -> list[common_pb2.RecipientResult]:
    return [r for message in hello.replay for r in message.results]


async def test_results_are_replayed_to_the_next_leader_until_acknowledged(
    sink: Sink, servers: StartNode
) -> None:
    # Given a batch delivered and reported on a stream that ends before acknowledging
    node = await servers([sink.address])
    first = Coordinator(node.stub)
    await first.open(epoch=1)
    await first.send_batch(make_batch("b1", addresses(5)))
    sent = await first.read_until("ack", "b1")
    first.call.cancel()

    # When the next leader opens a stream
    second = Coordinator(node.stub)
    hello = (await second.open(epoch=2)).hello

    # Then its hello replays every result, with the seqs and attempt they were sent with
    assert sorted(r.index for r in replayed(hello)) == list(range(5))
    assert all(r.status == DELIVERED for r in replayed(hello))
    assert {m.attempt for m in hello.replay} == {1}
    last_seq = max(r.results.seq for r in sent if r.WhichOneof("kind") == "results")
    assert hello.replay[-1].seq == last_seq
    assert not hello.held

    # And once that leader acknowledges them, the node forgets them
    await second.ack(hello.replay[-1].seq)
    await assert_eventually(lambda: node.servicer.outbox.unacked_results == 0, timeout_s=10)
    third = Coordinator(node.stub)
    assert not (await third.open(epoch=3)).hello.replay


class JournalWatchingHandler(SinkHandler):
    """A sink noting, at each MAIL, how many results the node has journaled."""

    def __init__(self) -> None:
        super().__init__()
        self.journal: Journal | None = None
        self.journaled_at_mail: list[int] = []

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        assert self.journal is not None
        self.journaled_at_mail.append(self.journal.last_seq)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"


async def test_a_result_is_journaled_before_its_connection_carries_another_transaction(
    servers: StartNode,
) -> None:
    # Given a node with one relay connection that two transactions at a time compete
    # for, its relay noting the journal at each MAIL
    handler = JournalWatchingHandler()
    loop = asyncio.get_running_loop()
    relay = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test", loop=loop), "127.0.0.1", 0
    )
    try:
        port = relay.sockets[0].getsockname()[1]
        node = await servers([f"127.0.0.1:{port}"], connections=1, concurrency=2)
        handler.journal = node.journal
        coordinator = Coordinator(node.stub)
        await coordinator.open(epoch=1)

        # When a batch of 4 goes out over that one connection
        await coordinator.send_batch(make_batch("b1", addresses(4)))
        await coordinator.read_until("ack", "b1")
    finally:
        relay.close()

    # Then each transaction began only after the previous one's result was in the journal
    assert handler.journaled_at_mail == [0, 1, 2, 3]


async def test_results_survive_a_restart_of_the_node(
    sink: Sink, servers: StartNode, tmp_path: Path
) -> None:
    # Given a node that delivered and reported a batch nobody acknowledged, then stopped
    state = tmp_path / "node-state"
    node = await servers([sink.address], state_dir=state)
    leader = Coordinator(node.stub)
    await leader.open(epoch=1)
    await leader.send_batch(make_batch("b1", addresses(4)))
    await leader.read_until("ack", "b1")
    leader.call.cancel()
    await node.stop()

    # When a new node process starts over the same state directory
    restarted = await servers([sink.address], state_dir=state)
    successor = Coordinator(restarted.stub)
    hello = (await successor.open(epoch=2)).hello

    # Then its hello replays the results the old process journaled
    assert sorted(r.index for r in replayed(hello)) == [0, 1, 2, 3]
    # And its own results continue the sequence
    await successor.send_batch(make_batch("b2", addresses(1), epoch=2, job_id="job-2"))
    responses = await successor.read_until("ack", "b2")
    new_seqs = [r.results.seq for r in responses if r.WhichOneof("kind") == "results"]
    assert min(new_seqs) > hello.replay[-1].seq

    # And after an acknowledgement of everything and another restart, nothing is replayed
    await successor.ack(max(new_seqs))
    await assert_eventually(lambda: restarted.servicer.outbox.unacked_results == 0, timeout_s=10)
    await restarted.stop()
    again = await servers([sink.address], state_dir=state)
    assert not (await Coordinator(again.stub).open(epoch=3)).hello.replay


async def test_unacknowledged_results_past_the_bound_reject_new_batches(
    sink: Sink, servers: StartNode
) -> None:
    # Given a node that holds at most 3 unacknowledged results and already holds 3
    node = await servers([sink.address], max_unacked_results=3)
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(3)))
    responses = await coordinator.read_until("ack", "b1")

    # When another batch arrives, it is rejected for capacity
    await coordinator.send_batch(make_batch("b2", addresses(1), job_id="job-2"))
    rejected = (await coordinator.read_until("rejected"))[-1].rejected
    assert rejected == sender_pb2.BatchRejected(batch_id="b2", reason="at capacity")

    # And once the leader acknowledges the results, batches are taken again
    await coordinator.ack(
        max(m.results.seq for m in responses if m.WhichOneof("kind") == "results")
    )
    await assert_eventually(lambda: node.servicer.outbox.unacked_results == 0, timeout_s=10)
    await coordinator.send_batch(make_batch("b3", addresses(1), job_id="job-3"))
    assert len(results_of(await coordinator.read_until("ack", "b3"))) == 1


# ---- authority ----------------------------------------------------------------------------


async def test_heartbeats_keep_a_batch_going(sink: Sink, servers: StartNode) -> None:
    # Given a stream granting 1.5 s of authority at a time, renewed every 0.3 s
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1, authority_ms=1500)

    async def beat() -> None:
        while True:
            await asyncio.sleep(0.3)
            await coordinator.heartbeat(epoch=1, authority_ms=1500)

    beating = asyncio.create_task(beat())
    try:
        # When a batch whose relay answers slowly is sent, taking longer than one grant
        sink.handler.hold = asyncio.Event()
        await coordinator.send_batch(make_batch("b1", addresses(8)))
        await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=10)
        await asyncio.sleep(2.0)
        sink.handler.hold.set()
        responses = await coordinator.read_until("ack", "b1")
    finally:
        beating.cancel()

    # Then every recipient is sent: authority never lapsed
    assert len(results_of(responses)) == 8
    assert responses[-1].ack.unattempted == 0


async def test_lapsed_authority_stops_new_transactions_and_reports_those_past_the_dot(
    sink: Sink, servers: StartNode
) -> None:
    # Given a stream whose leader grants 3 s of authority and then falls silent, and a
    # batch of 12 whose first 4 transactions are past their final dot (replies held)
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1, authority_ms=3000)
    await coordinator.send_batch(make_batch("b1", addresses(12)))
    await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=10)

    # When the authority lapses (no heartbeat) and only then the relay answers
    await assert_eventually(lambda: not node.servicer.usable_stream(), timeout_s=10)
    sink.handler.hold.set()

    # Then the 4 transactions complete and are reported, the batch is released with the
    # other 8 never attempted, and no other transaction started
    responses = await coordinator.read_until("ack", "b1")
    results = results_of(responses)
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    assert all(r.status == DELIVERED for r in results)
    assert responses[-1].ack == sender_pb2.BatchAck(
        batch_id="b1", epoch=1, attempt=1, unattempted=8
    )
    assert sink.handler.data_started == 4
    # And a batch sent while the authority is lapsed is refused
    await coordinator.send_batch(make_batch("b2", addresses(1), job_id="job-2"))
    rejected = (await coordinator.read_until("rejected"))[-1].rejected
    assert rejected == sender_pb2.BatchRejected(batch_id="b2", reason="no authority")


async def test_an_open_without_authority_or_a_stale_heartbeat_is_refused(
    sink: Sink, servers: StartNode
) -> None:
    node = await servers([sink.address])
    # An open that grants no authority is invalid
    coordinator = Coordinator(node.stub)
    await coordinator.call.write(
        sender_pb2.DispatchRequest(open=sender_pb2.DispatchOpen(coordinator_id="c", epoch=1))
    )
    assert await coordinator.status() == grpc.StatusCode.INVALID_ARGUMENT

    # A heartbeat of an epoch below the highest known ends its stream
    old = Coordinator(node.stub)
    await old.open(epoch=2)
    new = Coordinator(node.stub)
    await new.open(epoch=3)
    assert await old.status() == grpc.StatusCode.FAILED_PRECONDITION
    await new.heartbeat(epoch=2, authority_ms=1000)
    assert await new.status() == grpc.StatusCode.FAILED_PRECONDITION


# ---- drain --------------------------------------------------------------------------------


async def test_drain_timeout_releases_unstarted_work_without_cutting_a_transaction(
    sink: Sink, servers: StartNode
) -> None:
    # Given a batch of 12 with 4 transactions past their final dot (replies held)
    sink.handler.hold = asyncio.Event()
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)
    await coordinator.send_batch(make_batch("b1", addresses(12)))
    await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=10)

    # When the node drains and the drain time runs out with the replies still held
    node.servicer.drain()
    assert not await node.servicer.wait_idle(0.2)
    node.servicer.stop_all("drain timed out")
    await asyncio.sleep(0.5)
    sink.handler.hold.set()

    # Then the 4 transactions finish and are reported (none was cut), the batch is
    # released with the other 8 never attempted, and nothing else was sent
    responses = await coordinator.read_until("ack", "b1")
    assert sorted(r.index for r in results_of(responses)) == [0, 1, 2, 3]
    assert responses[-1].ack.unattempted == 8
    assert await node.servicer.wait_idle(10)
    assert sink.handler.data_started == 4
    assert len(sink.handler.messages) == 4
    # And a draining node rejects new batches
    await coordinator.send_batch(make_batch("b2", addresses(1), job_id="job-2"))
    rejected = (await coordinator.read_until("rejected"))[-1].rejected
    assert rejected == sender_pb2.BatchRejected(batch_id="b2", reason="draining")


# ---- health -------------------------------------------------------------------------------


async def test_health_is_serving_while_registered_and_not_draining(
    sink: Sink, servers: StartNode
) -> None:
    # Given a node with the health service on its port
    node = await servers([sink.address])
    health = health_pb2_grpc.HealthStub(node.channel)

    async def status() -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)

    # Then it serves while registered
    await assert_eventually(
        lambda: _is(status(), health_pb2.HealthCheckResponse.SERVING), timeout_s=10
    )
    # And not once its lease is lost
    node.registration.lose()
    await assert_eventually(
        lambda: _is(status(), health_pb2.HealthCheckResponse.NOT_SERVING), timeout_s=10
    )
    # And serves again when registered again, until it drains
    node.registration.regain()
    await assert_eventually(
        lambda: _is(status(), health_pb2.HealthCheckResponse.SERVING), timeout_s=10
    )
    node.servicer.drain()
    await assert_eventually(
        lambda: _is(status(), health_pb2.HealthCheckResponse.NOT_SERVING), timeout_s=10
    )


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


async def test_a_failed_journal_stops_the_node_taking_work(
    sink: Sink, servers: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a node whose journal disk fails
    node = await servers([sink.address])
    coordinator = Coordinator(node.stub)
    await coordinator.open(epoch=1)

    def broken(fd: int, data: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("sender_node.journal.os.write", broken)

    # When a batch is sent, its result still reaches the leader (from memory)
    await coordinator.send_batch(make_batch("b1", addresses(1)))
    assert len(results_of(await coordinator.read_until("ack", "b1"))) == 1

    # Then the node takes no more batches and stops reporting SERVING
    await coordinator.send_batch(make_batch("b2", addresses(1), job_id="job-2"))
    rejected = (await coordinator.read_until("rejected"))[-1].rejected
    assert rejected == sender_pb2.BatchRejected(batch_id="b2", reason="journal failed")
    assert not node.servicer.serving()
    monkeypatch.undo()
