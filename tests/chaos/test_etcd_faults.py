"""Chaos: etcd faults under load. One member of a 3-member etcd cluster SIGKILLed, and
the leader coordinator cut off from etcd (but not from clients and nodes).

Every coordinator and node gets all three endpoints, as host names (``localhost:port``),
and starts with the first one (etcd0). So the member killed is always etcd0, which
refuses connections from then on and forces every client to fail over: once as a
follower (the leadership is moved away first, so raft keeps its leader) and once as the
etcd leader (moved to it first, so raft must also elect a new one). The job must
complete with 0 lost; figures: how long the survivors took to agree on a leader, how
long until the cluster accepted a new job, and whether any lease (node registration,
coordinator leadership) was lost on the way.

The leader coordinator reaches etcd through a fault proxy in the second scenario; when
the proxy blackholes, the leader must step down within its election TTL, the standby
must lead, the job must complete with 0 lost, and a client watching the job through the
old leader must be moved to the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from client_sdk import MailerClient
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_dev.faultproxy import FaultProxy
from tests.chaos.cluster_helpers import (
    CONTENT,
    Stopwatch,
    etcd_leader,
    etcd_move_leader,
    log_count,
    log_times,
    recipients,
    running_cluster,
    until,
    wait_final,
)
from tests.chaos.invariants import check_job
from tests.helpers import wait_nodes_active

pytestmark = pytest.mark.chaos

TOTAL = 1500


def etcd_spec(ttl_s: int, etcd_members: int = 3) -> ClusterSpec:
    return ClusterSpec(
        etcd_members=etcd_members,
        sink_args=("--delay-ms", "5"),
        coordinator_env={"MAILER_BATCH_SIZE": "25", "MAILER_ELECTION_TTL_S": str(ttl_s)},
        node_env={"MAILER_LEASE_TTL_S": str(ttl_s), "MAILER_SMTP_CONNECTIONS": "2"},
    )


@pytest.mark.parametrize(
    ("role", "ttl_s"),
    # With the default TTL (5 s), a sick leader is test_etcd_partition's, and a dead
    # member that clients were using its "dead" case.
    [("leader", 3)],
    ids=["leader-ttl3"],
)
async def test_etcd_member_killed_under_load(tmp_path: Path, role: str, ttl_s: int) -> None:
    """ttl_s: lease TTL of the nodes and of the coordinators' election keys."""
    cluster = LocalCluster(tmp_path / "c", etcd_spec(ttl_s))
    # Every process gets the members by host name (resolved locally), etcd0 first.
    names = [f"localhost:{m.client_port}" for m in cluster.etcd.members]
    for i in range(len(cluster.coordinator_ports)):
        cluster.coordinator_etcd_endpoints[i] = names
    for i in range(cluster.spec.nodes):
        cluster.node_etcd_endpoints[i] = names
    async with running_cluster(cluster), MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        endpoints = cluster.etcd.endpoints
        victim = cluster.etcd.members[0]
        survivors = endpoints[1:]
        # Given etcd0, the member every client is connected to, as follower or leader
        await etcd_move_leader(endpoints, endpoints[0] if role == "leader" else endpoints[1])
        leader_before = (await client.cluster_status()).leader
        assert leader_before is not None
        job = await client.submit(CONTENT, recipients(TOTAL, f"etcd-{role}-{ttl_s}.example"))

        async def some_delivered() -> bool:
            return (await client.get(job.job_id)).progress.delivered >= 200

        await until(some_delivered, 60, "200 delivered")
        # When it is SIGKILLed mid-job
        assert victim.proc is not None
        victim.proc.signal(signal.SIGKILL)
        fault = Stopwatch()

        async def survivors_agree() -> bool:
            with contextlib.suppress(RuntimeError):
                await etcd_leader(survivors)
                return True
            return False

        await until(survivors_agree, 30, "the two surviving etcd members agree on a leader")
        etcd_leader_s = fault.elapsed()

        # Then the cluster accepts jobs again (SubmitJob writes to etcd) ...
        async def accepts_jobs() -> bool:
            try:
                await client.submit(
                    CONTENT,
                    recipients(1, f"probe-{role}-{ttl_s}.example"),
                    idempotency_key=f"probe-{role}-{ttl_s}",
                    timeout=timedelta(seconds=3),
                )
            except Exception:
                return False
            return True

        await until(accepts_jobs, 30, "a job accepted after the kill")
        submit_s = fault.elapsed()
        # ... and the job completes with nothing lost
        completed_s = await wait_final(client, job.job_id) - fault.start
        report = await check_job(client, cluster, job.job_id)
        leader_after = (await client.cluster_status()).leader

    lost_leases = sum(log_count(p.log_path, "lost registration") for p in cluster.nodes.values())
    step_downs = sum(
        log_count(p.log_path, "stepping down: lease lost")
        + log_count(p.log_path, "stepping down: fence lost")
        for p in cluster.coordinators.values()
    )
    changed = leader_after is None or leader_after.address != leader_before.address
    print(report.line(f"etcd {role} SIGKILLed, TTL {ttl_s}s"))
    print(
        f"etcd {role} kill, TTL {ttl_s}s: survivors agreed on an etcd leader after "
        f"{etcd_leader_s:.2f}s, a new job was accepted after {submit_s:.2f}s, the job "
        f"completed {completed_s:.1f}s after the kill; node registrations lost "
        f"{lost_leases}, leader step-downs {step_downs} (leader changed: {changed})"
    )
    assert report.failed == 0
    assert submit_s < 15, submit_s
    # Duplicates can only come from batches in flight at a lost lease: bounded by them.
    assert report.duplicates <= 3 * 16 * 25, report.duplicates


class WatchHung(AssertionError):
    """A watch stream opened through the old leader never ended."""


async def test_leader_cut_off_from_etcd_steps_down_and_watchers_follow(tmp_path: Path) -> None:
    ttl_s = 3
    cluster = LocalCluster(tmp_path / "c", etcd_spec(ttl_s, etcd_members=1))
    # Each coordinator reaches etcd through a proxy of its own.
    proxies = [FaultProxy(cluster.etcd.endpoints[0]) for _ in cluster.coordinator_ports]
    for i, proxy in enumerate(proxies):
        await proxy.start()
        cluster.coordinator_etcd_endpoints[i] = [proxy.address]
    watch: asyncio.Task[object] | None = None
    try:
        async with (
            running_cluster(cluster),
            MailerClient(cluster.coordinator_addresses) as client,
        ):
            await wait_nodes_active(client, 3)
            old = (await client.cluster_status()).leader
            assert old is not None
            job = await client.submit(CONTENT, recipients(TOTAL, "leader-cut.example"))
            # A client waits for the job through the leader's watch stream.
            watch = asyncio.create_task(client.wait(job.job_id))

            async def some_delivered() -> bool:
                return (await client.get(job.job_id)).progress.delivered >= 200

            await until(some_delivered, 60, "200 delivered")
            # When the leader's etcd traffic is blackholed
            old_index = cluster.coordinator_ports.index(int(old.address.rpartition(":")[2]))
            proxies[old_index].blackhole()
            fault = Stopwatch()

            async def new_leader() -> bool:
                try:
                    status = await client.cluster_status(timeout=timedelta(seconds=3))
                except Exception:
                    return False
                return status.leader is not None and status.leader.address != old.address

            await until(new_leader, 30, "the standby leads")
            takeover_s = fault.elapsed()
            # Then the job completes with nothing lost
            completed_s = await wait_final(client, job.job_id) - fault.start
            report = await check_job(client, cluster, job.job_id)
            # And the client's wait() through the old leader returns too
            watch_done = True
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(watch)
            except TimeoutError:
                watch_done = False
    finally:
        if watch is not None and not watch.done():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
        for proxy in proxies:
            await proxy.stop()
    old_proc = cluster.coordinator_at(old.address)
    new_proc = next(p for p in cluster.coordinators.values() if p is not old_proc)
    stepped_down = [t - fault.wall for t in log_times(old_proc.log_path, "stepping down")]
    won = [t - fault.wall for t in log_times(new_proc.log_path, "won the election")]
    print(report.line("leader cut off from etcd"))
    print(
        f"leader cut off from etcd (election TTL {ttl_s}s): old leader stepped down after "
        f"{stepped_down[0] if stepped_down else float('nan'):.2f}s, the standby won after "
        f"{won[-1] if won else float('nan'):.2f}s, clients saw it after {takeover_s:.2f}s; "
        f"job completed {completed_s:.1f}s after the fault; wait() through the old leader "
        f"returned: {watch_done}"
    )
    # Then the old leader stepped down before its lease could expire, and the standby
    # won within about the TTL
    assert stepped_down and stepped_down[0] <= ttl_s, stepped_down
    assert won and won[-1] <= ttl_s + 1, won
    if not watch_done:
        raise WatchHung("client.wait() through the old leader did not return")
