"""Chaos: SIGKILL the processes that do the work, mid-job, and check the invariants.

1. A sender node dies mid-batch (slow relay, so SMTP transactions are in flight) and
   is restarted; 1b. it dies for good.
2. The leader coordinator dies while jobs are being submitted and dispatched; the SDK
   retries with the same idempotency keys and no job is created twice.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_sdk import Address, MailerClient, MessageContent, Recipient
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.chaos.invariants import check_job
from tests.helpers import assert_eventually, wait_new_leader, wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.chaos

CONTENT = MessageContent(
    sender=Address("news@example.com"),
    subject="Chaos {{ name }}",
    text_body="Hello {{ name }}",
)
LEASE_TTL_S = 3
CONNECTIONS = 2


def _spec(etcd_members: int = 1) -> ClusterSpec:
    return ClusterSpec(
        etcd_members=etcd_members,
        # Each accepted message takes the relay 20 ms: transactions are in flight.
        sink_args=("--delay-ms", "20"),
        coordinator_env={"MAILER_ELECTION_TTL_S": str(LEASE_TTL_S), "MAILER_BATCH_SIZE": "20"},
        node_env={
            "MAILER_LEASE_TTL_S": str(LEASE_TTL_S),
            "MAILER_SMTP_CONNECTIONS": str(CONNECTIONS),
        },
    )


def _recipients(n: int, domain: str) -> list[Recipient]:
    return [Recipient(f"r{i}@{domain}", f"R{i}") for i in range(n)]


@pytest.fixture
def clusters() -> Iterator[list[LocalCluster]]:
    made: list[LocalCluster] = []
    yield made
    for c in made:
        c.stop()


async def _node0_sending(client: MailerClient) -> None:
    async def node0_holds_batches() -> bool:
        nodes = {n.node_id: n for n in await client.list_nodes()}
        n0 = nodes.get("node0")
        return n0 is not None and n0.batches_in_flight > 0 and n0.recipients_done >= 20

    await assert_eventually(node0_holds_batches, timeout_s=60, message="node0 sending")


async def test_1_sender_node_sigkilled_and_restarted_sends_nothing_twice(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster = start_cluster(tmp_path / "c", _spec())
    clusters.append(cluster)
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        job = await client.submit(CONTENT, _recipients(600, "kill-node.example"))
        await _node0_sending(client)
        # When node0 is SIGKILLed while it holds batches, and its supervisor restarts it
        cluster.nodes["node0"].signal(signal.SIGKILL)
        await asyncio.to_thread(cluster.nodes["node0"].popen.wait, 10)
        cluster.start_node(0)
        await client.wait(job.job_id)
        report = await check_job(client, cluster, job.job_id)
    # Then nothing is lost, and what it sent before dying came back from its journal:
    # copies only where the relay's 250 may not have reached it
    assert report.delivered == 600 and report.failed == 0
    print(report.line("chaos 1 (SIGKILL node, restarted)"))
    report.assert_exactly_once()


async def test_1b_sender_node_sigkilled_for_good_loses_nothing(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster = start_cluster(tmp_path / "c", _spec())
    clusters.append(cluster)
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        job = await client.submit(CONTENT, _recipients(600, "kill-node.example"))
        await _node0_sending(client)
        # When node0 is SIGKILLed while it holds batches and never comes back
        cluster.nodes["node0"].signal(signal.SIGKILL)
        killed = time.monotonic()

        async def moved() -> bool:
            nodes = {n.node_id: n for n in await client.list_nodes()}
            n0 = nodes.get("node0")
            return n0 is None or n0.batches_in_flight == 0

        await assert_eventually(moved, timeout_s=30, message="node0's batches moved")
        moved_s = time.monotonic() - killed
        await client.wait(job.job_id)
        report = await check_job(client, cluster, job.job_id)
    # Then nothing is lost; its batches moved once its lease was gone (its address
    # refusing connections shows nothing of it is still sending)
    assert report.delivered == 600 and report.failed == 0
    print(report.line("chaos 1b (SIGKILL node for good)") + f" batches_moved_in={moved_s:.2f}s")
    assert moved_s < LEASE_TTL_S + 3
    # The only copies: results it had journaled but not yet reported when it died, which
    # only its own disk holds (a node restarted on that disk replays them: test 1).
    assert report.unexplained <= CONNECTIONS + 4


async def test_2_leader_sigkilled_during_submits_and_dispatch(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster = start_cluster(tmp_path / "c", _spec(etcd_members=3))
    clusters.append(cluster)
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        status = await client.cluster_status()
        assert status.leader is not None
        old_leader = status.leader
        keys = [f"chaos2-{i}" for i in range(12)]
        # Submits keep coming (one every 0.2 s) while the leader is killed
        # after the fourth; each is retried by the SDK with its own key.
        submitted: dict[str, str] = {}

        async def submit_all() -> None:
            for i, key in enumerate(keys):
                job = await client.submit(
                    CONTENT, _recipients(150, f"j{i}.example"), idempotency_key=key
                )
                submitted[key] = job.job_id
                await asyncio.sleep(0.2)

        submitter = asyncio.create_task(submit_all())
        await assert_eventually(lambda: len(submitted) >= 4, timeout_s=60, message="4 submits")
        cluster.coordinator_at(old_leader.address).signal(signal.SIGKILL)
        takeover_s = await wait_new_leader(client, old_leader.address)
        await asyncio.wait_for(submitter, 120)
        # Resubmitting every key returns the job already made for it
        for i, key in enumerate(keys):
            again = await client.submit(
                CONTENT, _recipients(150, f"j{i}.example"), idempotency_key=key
            )
            assert again.created is False and again.job_id == submitted[key]
        # And the cluster holds exactly one job per key
        per_key = collections.Counter(
            [j.idempotency_key async for j in client.list_jobs() if j.idempotency_key in keys]
        )
        assert per_key == dict.fromkeys(keys, 1)
        reports = []
        for key in keys:
            await client.wait(submitted[key])
            reports.append(await check_job(client, cluster, submitted[key]))
    total_dups = sum(r.duplicates for r in reports)
    assert all(r.delivered == 150 and r.failed == 0 for r in reports)
    print(
        f"chaos 2 (SIGKILL leader): jobs={len(keys)} recipients={150 * len(keys)} lost=0 "
        f"duplicates={total_dups} takeover={takeover_s:.2f}s"
    )
    # A standby leads within the election TTL plus a second (plus the client's polling)
    assert takeover_s < LEASE_TTL_S + 3
    # Duplicates only after an accept the node could not have seen
    for report in reports:
        print(report.line(report.job_id))
    for report in reports:
        report.assert_exactly_once()
