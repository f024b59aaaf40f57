"""Chaos: one sick etcd member out of three, each member on a host of its own.

The members run in network namespaces of a :class:`NetLab` (``tests/deploy/netlab.py``);
coordinators, nodes, PostgreSQL and the sink run in the root namespace and reach the
members through the lab's bridge. Every process lists etcd0 first, so etcd0 is the
member each one talks to when the fault strikes, 30 s long, in the middle of a job:

- ``follower``: etcd0, a raft follower, is cut off from its two peers (iptables in its
  namespace) but not from clients. It loses its leader, so every call, marked "require
  leader", is refused there, and the clients must move to a member of the majority.
- ``leader``: the same with etcd0 the raft leader; the other two elect a new one.
- ``slow``: etcd0 answers slowly: every process reaches it through a fault proxy that
  holds each chunk 2 s, in both directions, so a lease refresh misses its deadline.
- ``dead``: etcd0 is SIGKILLed (connections to it are refused) and started again 30 s
  later. (``test_etcd_faults`` kills it with a 3 s TTL and the members named by host.)

With the project's lease and election TTLs (5 s), each time: the sink's accepts never
pause for more than the TTL, clients always find a leading coordinator (never more than
TTL + 2 s without one), and the job completes with 0 lost and no duplicate except after an
ambiguous accept.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from client_sdk import MailerClient, MailerError
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_dev.faultproxy import FaultProxy
from mailers_dev.sink import FaultPlan, write_control
from tests.chaos.cluster_helpers import (
    CONTENT,
    Stopwatch,
    etcd_move_leader,
    log_count,
    recipients,
    running_cluster,
    until,
    wait_final,
)
from tests.chaos.invariants import check_job
from tests.deploy.netlab import NetLab, unavailable_reason
from tests.helpers import unavailable, wait_nodes_active

# Labs pick a free subnet: one at a time (see tests/conftest.py).
pytestmark = [pytest.mark.chaos, pytest.mark.xdist_group("netlab")]

TTL_S = 5
"""The project's default node lease and coordinator election TTLs."""
FAULT_S = 30
LATENCY_S = 2.0
# A relay that takes 40 ms per message until the fault is healed, 2 connections per
# node: at most 150 messages a second, so the job outlasts the fault; then at full speed.
TOTAL = 6_000


def spec(control: Path) -> ClusterSpec:
    return ClusterSpec(
        etcd_members=3,
        sink_args=("--delay-ms", "40", "--no-store", "--control", str(control)),
        coordinator_env={"MAILER_BATCH_SIZE": "50"},
        node_env={"MAILER_SMTP_CONNECTIONS": "2"},
    )


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetLab]:
    reason = unavailable_reason()
    if reason is not None:
        unavailable(reason, f"etcd partition tests cannot run on this CI machine: {reason}")
    with NetLab(tmp_path / "lab") as made:
        yield made
    assert made.leftovers() == [], "the lab left namespaces or links behind"


async def longest_without_leader(client: MailerClient, seconds: float) -> float:
    """Ask for the cluster's status for ``seconds``; the longest stretch in which no
    answer named a leader (a failed call counts as none)."""
    started = last_led = time.monotonic()
    longest = 0.0
    while (now := time.monotonic()) - started < seconds:
        try:
            status = await client.cluster_status(timeout=timedelta(seconds=2))
        except MailerError:
            status = None
        now = time.monotonic()
        if status is not None and status.leader is not None:
            last_led = now
        longest = max(longest, now - last_led)
        await asyncio.sleep(0.2)
    return longest


def longest_pause(stamps: list[float], start: float, end: float) -> float:
    """The longest time between accepts (and from start to the first) within
    [start, end]."""
    inside = sorted(t for t in stamps if start <= t <= end)
    edges = [start, *inside]
    return max((b - a for a, b in zip(edges, edges[1:], strict=False)), default=end - start)


@pytest.mark.parametrize("fault", ["follower", "leader", "slow", "dead"])
async def test_one_sick_etcd_member_for_30_seconds(tmp_path: Path, lab: NetLab, fault: str) -> None:
    control = tmp_path / "sink-control.json"
    cluster = LocalCluster(tmp_path / "c", spec(control))
    hosts = [lab.add_host(f"etcd{i}", 11 + i) for i in range(3)]
    for member, host in zip(cluster.etcd.members, hosts, strict=True):
        member.host, member.netns = host.address, host.netns
    endpoints = cluster.etcd.endpoints
    proxy = FaultProxy(endpoints[0])
    await proxy.start()
    if fault == "slow":
        listed = [proxy.address, *endpoints[1:]]
        for i in range(len(cluster.coordinator_ports)):
            cluster.coordinator_etcd_endpoints[i] = listed
        for i in range(cluster.spec.nodes):
            cluster.node_etcd_endpoints[i] = listed
    try:
        async with running_cluster(cluster), MailerClient(cluster.coordinator_addresses) as client:
            await wait_nodes_active(client, 3)
            # Given etcd0, the member every process talks to, as a follower or the leader
            await etcd_move_leader(endpoints, endpoints[0] if fault == "leader" else endpoints[1])
            job = await client.submit(CONTENT, recipients(TOTAL, f"sick-{fault}.example"))

            async def some_delivered() -> bool:
                return (await client.get(job.job_id)).progress.delivered >= 300

            await until(some_delivered, 60, "300 delivered")
            # When etcd0 is sick for 30 s mid-job
            sick = Stopwatch()
            etcd0 = cluster.etcd.members[0]
            if fault == "slow":
                proxy.add_latency(LATENCY_S)
            elif fault == "dead":
                assert etcd0.proc is not None
                etcd0.proc.signal(signal.SIGKILL)
            else:
                lab.isolate(hosts[0], hosts[1:])
            leaderless_s = await longest_without_leader(client, FAULT_S)
            if fault == "slow":
                proxy.pass_through()
            elif fault == "dead":
                await asyncio.to_thread(cluster.etcd.restart_member, etcd0)
            else:
                lab.heal(hosts[0])
            healed = time.time()
            write_control(control, FaultPlan())  # the rest at full speed
            # Then the job completes with nothing lost
            completed_s = await wait_final(client, job.job_id, timeout_s=120) - sick.start
            report = await check_job(client, cluster, job.job_id)
    finally:
        await proxy.stop()
    stamps = [
        float(str(line["ts"]))
        for line in cluster.delivered()
        if str(line["message_id"]).startswith(f"<{job.job_id}.")
    ]
    assert max(stamps) > healed, "the job ended before the fault did: make it larger"
    paused_s = longest_pause(stamps, sick.wall, healed)
    lost_leases = sum(log_count(p.log_path, "lost registration") for p in cluster.nodes.values())
    step_downs = sum(
        log_count(p.log_path, "stepping down: lease lost")
        + log_count(p.log_path, "stepping down: fence lost")
        for p in cluster.coordinators.values()
    )
    print(report.line(f"etcd0 {fault} for {FAULT_S}s"))
    print(
        f"etcd0 {fault} for {FAULT_S}s: longest pause of the sink's accepts {paused_s:.2f}s, "
        f"longest time clients saw no leading coordinator {leaderless_s:.2f}s, job completed "
        f"{completed_s:.1f}s after the fault began; node registrations lost {lost_leases}, "
        f"coordinator step-downs {step_downs}"
    )
    # And sending never paused for as long as a lease lives, a coordinator led throughout
    # (or again within TTL + 2 s), and nothing was sent twice but after an ambiguous accept
    assert paused_s < TTL_S, paused_s
    assert leaderless_s <= TTL_S + 2, leaderless_s
    assert report.failed == 0 and report.delivered == TOTAL
    report.assert_exactly_once()
