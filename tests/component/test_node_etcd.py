"""A sender node against a real etcd: the leader's epoch, the hand-back, the whole
process (``sender_node.__main__.run``) draining on shutdown.

Real pieces: etcd (``tests/conftest.py``), the node's gRPC server, its journal in a
temporary directory, an aiosmtpd sink; the test plays the leader (election keys in
etcd, a Dispatch stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aetcd
import grpc
import pytest

from mailerpb.mailer.v1 import sender_pb2, sender_pb2_grpc
from mailers.etcd_auth import bootstrap
from mailers_dev.certs import make_dev_pki
from mailers_dev.procs import EtcdCluster
from mailers_runtime.etcd import EtcdTls, Keys, connect
from sender_node.__main__ import run
from sender_node.config import from_env
from sender_node.leader_watch import LeaderWatch
from tests.component.node_harness import (
    Coordinator,
    StartNode,
    addresses,
    make_batch,
    results_of,
    servers,
    sink,
)
from tests.helpers import assert_eventually
from tests.smtp_sink import Sink

__all__ = ["servers", "sink"]  # fixtures shared with the servicer's tests


async def campaign(client: aetcd.Client, keys: Keys, name: str) -> tuple[object, int]:
    """Enter the election as coordinator ``name``: its lease and epoch (create revision)."""
    lease = await client.lease(30)
    key = keys.election_key(lease.id)
    await client.put(key, json.dumps({"id": name, "address": "127.0.0.1:1"}).encode(), lease=lease)
    kv = await client.get(key)
    assert kv is not None
    return lease, int(kv.create_revision)


# ---- the leader's epoch -----------------------------------------------------------------


async def test_a_new_leader_in_etcd_ends_the_old_stream_and_fences_the_old_leader(
    sink: Sink, servers: StartNode, etcd: aetcd.Client, etcd_prefix: str
) -> None:
    # Given leader A (the first election key) with a stream to a node following etcd,
    # and candidate B waiting behind it
    keys = Keys(etcd_prefix)
    lease_a, epoch_a = await campaign(etcd, keys, "a")
    lease_b, epoch_b = await campaign(etcd, keys, "b")
    node = await servers([sink.address])
    watch = LeaderWatch(etcd, keys, node.servicer.observe_epoch, poll_s=30)
    watch.start()
    try:
        await assert_eventually(lambda: watch.epoch == epoch_a, timeout_s=10)
        old = Coordinator(node.stub)
        await old.open(epoch=epoch_a)

        # When A's key goes (its lease revoked) and B leads with a higher epoch
        await lease_a.revoke()  # type: ignore[attr-defined]

        # Then the node ends A's stream at once, without waiting for its authority
        assert await old.status() == grpc.StatusCode.FAILED_PRECONDITION
        assert node.servicer.highest_epoch == epoch_b
        # And refuses A if it tries again
        again = Coordinator(node.stub)
        await again.call.write(
            sender_pb2.DispatchRequest(
                open=sender_pb2.DispatchOpen(coordinator_id="a", epoch=epoch_a, authority_ms=5000)
            )
        )
        assert await again.status() == grpc.StatusCode.FAILED_PRECONDITION
        # While B is welcome
        assert (await Coordinator(node.stub).open(epoch=epoch_b)).WhichOneof("kind") == "hello"
    finally:
        await watch.stop()
        await lease_b.revoke()  # type: ignore[attr-defined]


async def test_the_epoch_watch_resumes_after_etcd_restarts(tmp_path: Path) -> None:
    # Given a node following the election of an etcd of its own
    cluster = EtcdCluster(tmp_path / "etcd", size=1)
    await asyncio.to_thread(cluster.start)
    client = connect(cluster.endpoints)
    seen: list[int] = []
    watch = LeaderWatch(client, Keys("/restart"), seen.append, retry_s=0.2, poll_s=60)
    try:
        await client.connect()
        keys = Keys("/restart")
        lease_a, epoch_a = await campaign(client, keys, "a")
        watch.start()
        await assert_eventually(lambda: seen == [epoch_a], timeout_s=10)

        # When etcd restarts (the watch stream breaks) and then leadership changes
        (member,) = cluster.members
        assert member.proc is not None
        await asyncio.to_thread(member.proc.stop)
        await asyncio.to_thread(cluster.restart_member, member)
        lease_b, epoch_b = await _retry(lambda: campaign(client, keys, "b"))
        await lease_a.revoke()  # type: ignore[attr-defined]

        # Then the watch, resumed, reports the new epoch (well before the backup poll)
        await assert_eventually(lambda: seen == [epoch_a, epoch_b], timeout_s=20)
    finally:
        await watch.stop()
        await client.close()
        await asyncio.to_thread(cluster.stop)


async def _retry(make: object, timeout_s: float = 20.0) -> tuple[object, int]:
    """Call ``make()`` until etcd answers again after its restart."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await make()  # type: ignore[operator,no-any-return]
            except (aetcd.ClientError, grpc.aio.AioRpcError):
                await asyncio.sleep(0.2)


# ---- the whole node process -------------------------------------------------------------


@dataclasses.dataclass
class RunningNode:
    stop: asyncio.Event
    task: asyncio.Task[None]
    stub: sender_pb2_grpc.SenderServiceAsyncStub
    keys: Keys
    node_id: str


@contextlib.asynccontextmanager
async def running_node(
    etcd: aetcd.Client, env: Mapping[str, str], node_id: str = "n1"
) -> AsyncIterator[RunningNode]:
    """``sender_node.__main__.run`` in this process, until the block ends."""
    config = from_env({**env, "MAILER_NODE_ID": node_id, "MAILER_PLAINTEXT": "1"})
    keys = Keys(config.etcd.prefix)
    stop = asyncio.Event()
    task = asyncio.create_task(run(config, stop))

    async def registered() -> bool:
        if task.done():
            task.result()  # a failed start fails the test with its error
        return await etcd.get(keys.node(node_id)) is not None

    await assert_eventually(registered, timeout_s=30, message="node registered")
    kv = await etcd.get(keys.node(node_id))
    address = json.loads(kv.value)["address"]
    channel = grpc.aio.insecure_channel(address)
    try:
        yield RunningNode(stop, task, sender_pb2_grpc.SenderServiceStub(channel), keys, node_id)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(60):
                await task
        await channel.close()


def node_env(sink: Sink, etcd_cluster: EtcdCluster, prefix: str, state: Path) -> dict[str, str]:
    return {
        "MAILER_ETCD_ENDPOINTS": ",".join(etcd_cluster.endpoints),
        "MAILER_ETCD_PREFIX": prefix,
        "MAILER_RELAYS": sink.address,
        "MAILER_STATE_DIR": str(state),
        "MAILER_SMTP_TIMEOUT_S": "5",
        "MAILER_DRAIN_TIMEOUT_S": "0.5",
    }


async def test_a_node_without_a_leader_hands_back_through_etcd(
    sink: Sink, etcd: aetcd.Client, etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path
) -> None:
    env = node_env(sink, etcd_cluster, etcd_prefix, tmp_path / "state")
    async with running_node(etcd, env) as node:
        # Given a batch delivered and released on a stream whose leader then vanished
        # before acknowledging the results
        leader = Coordinator(node.stub)
        await leader.open(epoch=1, authority_ms=3000)
        await leader.send_batch(make_batch("b1", addresses(3)))
        sent = await leader.read_until("ack", "b1")
        assert len(results_of(sent)) == 3
        leader.call.cancel()

        # When no leader connects for a while
        key = node.keys.handback(node.node_id)

        async def handed_back() -> bool:
            return await etcd.get(key) is not None

        await assert_eventually(handed_back, timeout_s=20, message="hand-back written")

        # Then the hand-back holds the results and the released batch
        kv = await etcd.get(key)
        handback = sender_pb2.NodeHandback.FromString(kv.value)
        assert handback.node_id == "n1"
        assert sorted(r.index for m in handback.results for r in m.results) == [0, 1, 2]
        assert list(handback.released) == [sender_pb2.HeldBatch(batch_id="b1", attempt=1)]
        # And the key has no lease: it outlives the node
        assert kv.lease == 0


async def test_a_silent_leader_s_stream_is_ended_and_named_by_the_hand_back(
    sink: Sink, etcd: aetcd.Client, etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path
) -> None:
    env = node_env(sink, etcd_cluster, etcd_prefix, tmp_path / "state")
    async with running_node(etcd, env) as node:
        # Given a stream (the leader's 7th) on which a batch was sent and acked, whose
        # leader then falls silent without closing it (a link that drops everything)
        leader = Coordinator(node.stub)
        await leader.open(epoch=1, authority_ms=1000, stream_no=7)
        await leader.send_batch(make_batch("b1", addresses(3)))
        await leader.read_until("ack", "b1")

        # When its authority lapses and no leader comes
        key = node.keys.handback(node.node_id)

        async def handed_back() -> bool:
            return await etcd.get(key) is not None

        await assert_eventually(handed_back, timeout_s=20, message="hand-back written")

        # Then the node ended the stream first (what still comes on it is never taken)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await leader.read()
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
        # And the hand-back names that stream: it is complete, the node holds nothing,
        # so the leader can move whatever it sent on it that never arrived
        kv = await etcd.get(key)
        handback = sender_pb2.NodeHandback.FromString(kv.value)
        assert (handback.ended.epoch, handback.ended.stream_no) == (1, 7)
        assert list(handback.held) == []
        assert sorted(r.index for m in handback.results for r in m.results) == [0, 1, 2]


async def test_sigterm_drains_then_releases_without_cutting_a_transaction(
    sink: Sink, etcd: aetcd.Client, etcd_cluster: EtcdCluster, etcd_prefix: str, tmp_path: Path
) -> None:
    env = node_env(sink, etcd_cluster, etcd_prefix, tmp_path / "state")
    env["MAILER_SMTP_CONNECTIONS"] = "4"
    sink.handler.hold = asyncio.Event()
    async with running_node(etcd, env) as node:
        # Given a batch of 12 with 4 transactions (one per connection) past their final
        # dot (replies held)
        leader = Coordinator(node.stub)
        await leader.open(epoch=1, authority_ms=4000)

        async def beat() -> None:
            while True:
                await asyncio.sleep(0.5)
                await leader.heartbeat(epoch=1, authority_ms=4000)

        beating = asyncio.create_task(beat())
        await leader.send_batch(make_batch("b1", addresses(12)))
        await assert_eventually(lambda: sink.handler.data_started == 4, timeout_s=10)

        # When the node is told to stop and its drain time (0.5 s) runs out first
        node.stop.set()
        await asyncio.sleep(1.5)
        sink.handler.hold.set()

        # Then the 4 transactions finish and are reported, the batch is released with 8
        # never attempted, and the stream ends with the node
        responses = await leader.read_until("ack", "b1")
        beating.cancel()
        assert sorted(r.index for r in results_of(responses)) == [0, 1, 2, 3]
        assert responses[-1].ack.unattempted == 8
        assert await leader.status() == grpc.StatusCode.UNAVAILABLE
        async with asyncio.timeout(30):
            await node.task
        assert sink.handler.data_started == 4
        assert len(sink.handler.messages) == 4
        # And its registration is gone at once (the lease revoked)
        assert await etcd.get(node.keys.node(node.node_id)) is None


# ---- what the node's etcd role allows -----------------------------------------------------


async def test_a_node_role_can_follow_the_election_and_hand_back(tmp_path: Path) -> None:
    # Given etcd with client-certificate auth and the roles of mailers.etcd_auth
    pki = tmp_path / "pki"
    make_dev_pki(pki, ["n1", "n2"])
    cluster = EtcdCluster(tmp_path / "etcd", size=1, tls=EtcdTls.from_dir(pki, "etcd"))
    await asyncio.to_thread(cluster.start)
    keys = Keys("/mailers")
    coordinator = connect(cluster.endpoints, tls=EtcdTls.from_dir(pki, "coordinator"))
    node = connect(cluster.endpoints, tls=EtcdTls.from_dir(pki, "node-n1"))
    seen: list[int] = []
    watch = LeaderWatch(node, keys, seen.append, poll_s=60)
    try:
        root = EtcdTls.from_dir(pki, "etcd-root")
        await bootstrap(cluster.endpoints, root, "/mailers", ["n1", "n2"], ready_timeout_s=30)
        await coordinator.connect()
        await node.connect()
        _, epoch = await campaign(coordinator, keys, "c1")

        # When node n1 follows the election
        watch.start()

        # Then its role lets it read the leader (a limited range read) and watch
        await assert_eventually(lambda: seen == [epoch], timeout_s=10)
        _, later = await campaign(coordinator, keys, "c2")
        await coordinator.delete(keys.election_key(await _lease_of(coordinator, keys, "c1")))
        await assert_eventually(lambda: seen == [epoch, later], timeout_s=10)
        # And write its own hand-back key, but not another node's
        await node.put(keys.handback("n1"), b"x")
        with pytest.raises(aetcd.ClientError):
            await node.put(keys.handback("n2"), b"x")
        # And still not enter the election itself
        with pytest.raises(aetcd.ClientError):
            await node.put(keys.election_key(1), b"{}")
    finally:
        await watch.stop()
        await node.close()
        await coordinator.close()
        await asyncio.to_thread(cluster.stop)


async def _lease_of(client: aetcd.Client, keys: Keys, name: str) -> int:
    """The lease id in the election key of coordinator ``name``."""
    listing = await client.get_prefix(keys.election)
    for kv in listing:
        if json.loads(kv.value)["id"] == name:
            return int(kv.lease)
    raise AssertionError(f"{name} has no election key")
