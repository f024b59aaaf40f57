"""Chaos: exactly once, as far as SMTP allows, across the faults a cluster meets.

Each test runs a real cluster (etcd, PostgreSQL, two coordinators, three nodes, an SMTP
sink), strikes while a job is sending, and checks at the sink: nothing lost, and every
extra copy of a message follows an accept whose ``250`` the sender could not have read
(the sink records those, see ``mailers_dev.sink``). Nodes run short SMTP deadlines and a
64 KiB message cap, so the leader's wait before moving the batches of a node that
vanished (``coordinator.timeouts``) stays short.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from client_sdk import DeadlineExceededError, JobOptions, JobState, MailerClient, MailerError
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_dev.faultproxy import FaultProxy
from mailers_dev.procs import free_port
from mailers_dev.sink import FaultPlan, Window, write_control
from tests.chaos.cluster_helpers import (
    CONTENT,
    Stopwatch,
    log_times,
    recipients,
    until,
)
from tests.chaos.invariants import Report, check_job
from tests.helpers import wait_new_leader, wait_nodes_active

pytestmark = pytest.mark.chaos

TTL_S = 3
NODE_ENV = {
    "MAILER_LEASE_TTL_S": str(TTL_S),
    "MAILER_SMTP_CONNECTIONS": "2",
    "MAILER_SMTP_TIMEOUT_S": "3",
    "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": "3",
    "MAILER_SMTP_MAX_MESSAGE_BYTES": "65536",
    "MAILER_DRAIN_TIMEOUT_S": "2",
}
COORDINATOR_ENV = {"MAILER_ELECTION_TTL_S": str(TTL_S), "MAILER_BATCH_SIZE": "20"}


def spec(**kw: object) -> ClusterSpec:
    base: dict[str, object] = {
        # A relay that takes 10 ms per message keeps transactions in flight.
        "sink_args": ("--delay-ms", "10"),
        "coordinator_env": COORDINATOR_ENV,
        "node_env": NODE_ENV,
        "durable_database": False,
    }
    base.update(kw)
    return ClusterSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clusters() -> Iterator[list[LocalCluster]]:
    made: list[LocalCluster] = []
    yield made
    for c in made:
        c.stop()


async def started(made: list[LocalCluster], cluster: LocalCluster) -> MailerClient:
    made.append(cluster)
    await asyncio.to_thread(cluster.start)
    client = MailerClient(cluster.coordinator_addresses)
    await wait_nodes_active(client, cluster.spec.nodes)
    return client


async def delivered_at_least(
    client: MailerClient, job_id: str, n: int, timeout_s: float = 120
) -> None:
    async def enough() -> bool:
        try:
            job = await client.get(job_id, timeout=timedelta(seconds=3))
        except MailerError:
            return False
        return job.progress.delivered >= n

    await until(enough, timeout_s, f"{n} delivered")


async def finish(client: MailerClient, cluster: LocalCluster, job_id: str, label: str) -> Report:
    async with asyncio.timeout(240):
        await client.wait(job_id)
    report = await check_job(client, cluster, job_id, allow_cancelled=True)
    print(report.line(label))
    return report


# ---- 2. every process SIGKILLed at once ---------------------------------------------


async def test_every_coordinator_and_node_sigkilled_at_once(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster = LocalCluster(tmp_path / "c", spec())
    client = await started(clusters, cluster)
    async with client:
        job = await client.submit(CONTENT, recipients(3000, "all-killed.example"))
        await delivered_at_least(client, job.job_id, 800)
        # When every coordinator and node is SIGKILLed at the same moment
        procs = [*cluster.coordinators.values(), *cluster.nodes.values()]
        for proc in procs:
            proc.signal(signal.SIGKILL)
        for proc in procs:
            await asyncio.to_thread(proc.popen.wait, 10)
        # And all are restarted (as their supervisors would)
        for i, port in enumerate(cluster.coordinator_ports):
            cluster.start_coordinator(i, port)
        for i in range(cluster.spec.nodes):
            cluster.start_node(i)
        report = await finish(client, cluster, job.job_id, "every process SIGKILLed")
    # Then nothing is lost and nothing was sent twice: the nodes' journals told the new
    # leader what the old one never wrote, before any batch moved
    assert report.delivered == 3000
    report.assert_exactly_once()


async def partitioned_node0(
    tmp_path: Path, clusters: list[LocalCluster]
) -> tuple[LocalCluster, FaultProxy, MailerClient]:
    """A cluster whose leader reaches node0 only through a proxy (see test 3)."""
    port = free_port()
    proxy = FaultProxy(f"127.0.0.1:{port}")
    await proxy.start()
    node0 = {"MAILER_LISTEN": f"127.0.0.1:{port}", "MAILER_ADVERTISE": proxy.address}
    cluster = LocalCluster(tmp_path / "c", spec(per_node_env={0: node0}))
    return cluster, proxy, await started(clusters, cluster)


# ---- 3. a node cut off from the leader only -------------------------------------------


async def test_node_cut_off_from_the_leader_only(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    # node0's dispatch port is reached only through a proxy; its etcd and SMTP are direct
    cluster, proxy, client = await partitioned_node0(tmp_path, clusters)
    try:
        async with client:
            job = await client.submit(CONTENT, recipients(3000, "leader-cut.example"))
            await delivered_at_least(client, job.job_id, 500)
            # When the leader's link to node0 is blackholed for 15 s
            proxy.blackhole()
            cut = Stopwatch()
            await asyncio.sleep(15)
            proxy.pass_through()
            report = await finish(client, cluster, job.job_id, "node cut off from the leader")
        handed_back = log_times(cluster.coordinators["coordinator0"].log_path, "handed back")
        handed_back += log_times(cluster.coordinators["coordinator1"].log_path, "handed back")
    finally:
        await proxy.stop()
    # Then node0 stopped and handed its batches back through etcd (it still reached it),
    # so they moved without waiting for the partition to heal, and nothing was sent twice
    assert any(t >= cut.wall for t in handed_back), handed_back
    assert report.delivered == 3000
    report.assert_exactly_once()


# ---- 5. etcd loses quorum -------------------------------------------------------------


async def test_etcd_losing_quorum_for_30_seconds(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster = LocalCluster(tmp_path / "c", spec(etcd_members=3))
    client = await started(clusters, cluster)
    async with client:
        job = await client.submit(CONTENT, recipients(3000, "quorum.example"))
        await delivered_at_least(client, job.job_id, 600)
        # When two of the three etcd members freeze for 30 s
        frozen = cluster.etcd.members[1:]
        for member in frozen:
            assert member.proc is not None
            member.proc.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(30)
        finally:
            for member in frozen:
                assert member.proc is not None
                member.proc.signal(signal.SIGCONT)
        report = await finish(client, cluster, job.job_id, "etcd without quorum for 30 s")
    # Then everyone stopped sending while no lease could be trusted, and afterwards the
    # job completed with nothing lost and nothing sent twice
    assert report.delivered == 3000
    report.assert_exactly_once()


# ---- 6. a slow relay ------------------------------------------------------------------


async def test_slow_relay_moves_no_batch(tmp_path: Path, clusters: list[LocalCluster]) -> None:
    # Given a relay that takes 10 s per RCPT and 25 s before its final reply (within the
    # nodes' deadlines: 15 s per step, 30 s for the final reply)
    slow_node = {
        **NODE_ENV,
        "MAILER_SMTP_TIMEOUT_S": "15",
        "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": "30",
        "MAILER_SMTP_CONNECTIONS": "4",
    }
    cluster = LocalCluster(
        tmp_path / "c",
        spec(
            sink_args=("--rcpt-delay-ms", "10000", "--final-delay-ms", "25000"),
            node_env=slow_node,
            coordinator_env={**COORDINATOR_ENV, "MAILER_BATCH_SIZE": "4"},
        ),
    )
    client = await started(clusters, cluster)
    async with client:
        # When a job of 12 recipients goes out, one transaction per recipient
        job = await client.submit(CONTENT, recipients(12, "slow.example"))
        report = await finish(client, cluster, job.job_id, "slow relay")
    moved = sum(
        len(log_times(p.log_path, "asked it back")) + len(log_times(p.log_path, "move"))
        for p in cluster.coordinators.values()
    )
    # Then every recipient is delivered once, and no batch was asked back or moved
    assert report.delivered == 12 and report.duplicates == 0
    assert moved == 0


# ---- 7. relays that lie ---------------------------------------------------------------


async def test_relays_answering_2xx_out_of_turn_deliver_nothing_unsent(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    # Given a relay that answers DATA with 250 (no body read) for the first 12
    # transactions, and accepts every RCPT with 252
    control = tmp_path / "sink-control.json"
    write_control(control, FaultPlan(data_2xx=Window(count=12), rcpt_252=Window()))
    metrics = {i: free_port() for i in range(3)}
    per_node = {i: {"MAILER_METRICS_LISTEN": f"127.0.0.1:{port}"} for i, port in metrics.items()}
    cluster = LocalCluster(
        tmp_path / "c", spec(sink_args=("--control", str(control)), per_node_env=per_node)
    )
    client = await started(clusters, cluster)
    async with client:
        job = await client.submit(CONTENT, recipients(200, "liar.example"))
        report = await finish(client, cluster, job.job_id, "relay answering DATA with 250")
    transient = sum(
        value
        for port in metrics.values()
        for name, value in _scrape(port).items()
        if name.startswith("mailers_node_messages_total{") and 'status="transient"' in name
    )
    # Then the twelve lied-to transactions were relay faults (transient, retried), every
    # recipient reported delivered reached the relay whole (check_job), and nothing was
    # sent twice
    assert transient >= 12
    assert report.delivered == 200
    assert report.duplicates == 0


async def test_relay_answering_starttls_with_250_gets_nothing(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    # Given nodes that require STARTTLS and a relay that answers it with 250 and stays
    # plaintext
    cluster = LocalCluster(
        tmp_path / "c",
        spec(sink_args=("--starttls-2xx",), relay_options="tls=starttls;verify=false"),
    )
    client = await started(clusters, cluster)
    async with client:
        # When a job that expires in 8 s is sent
        options = JobOptions(expires_at=datetime.now(UTC) + timedelta(seconds=8))
        job = await client.submit(CONTENT, recipients(20, "no-tls.example"), options=options)
        report = await finish(client, cluster, job.job_id, "relay faking STARTTLS")
    # Then nothing was reported delivered, and nothing reached the relay in plaintext
    assert report.delivered == 0 and report.failed == 20
    assert [line for line in cluster.delivered() if job.job_id in str(line["message_id"])] == []


# ---- 8. cancel and pause while batches move -------------------------------------------


async def _cut_node0_when_busy(client: MailerClient, proxy: FaultProxy, job_id: str) -> None:
    """Cut node0 off from the leader while it holds batches: it stops them and hands
    them back through etcd, and the leader moves them."""

    async def node0_holds() -> bool:
        nodes = {n.node_id: n for n in await client.list_nodes()}
        return nodes["node0"].batches_in_flight > 0

    await delivered_at_least(client, job_id, 200)
    await until(node0_holds, 60, "node0 holds batches")
    proxy.blackhole()


def _scrape(port: int) -> dict[str, float]:
    """A process's Prometheus metrics: {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _sent(cluster: LocalCluster, job_id: str) -> int:
    """Messages of the job the sink holds (each Message-ID once)."""
    ids = {str(x["message_id"]) for x in cluster.delivered()}
    return sum(1 for i in ids if job_id in i)


async def test_cancel_while_batches_move_counts_what_the_sink_got(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster, proxy, client = await partitioned_node0(tmp_path, clusters)
    try:
        async with client:
            job = await client.submit(CONTENT, recipients(3000, "cancel-move.example"))
            # When node0's batches are being moved (it is cut off from the leader and
            # hands them back through etcd) and the job is cancelled
            await _cut_node0_when_busy(client, proxy, job.job_id)
            cancelled = await client.cancel(job.job_id, timeout=timedelta(seconds=60))
            proxy.pass_through()
            report = await finish(client, cluster, job.job_id, "cancel while batches move")
            final = await client.get(job.job_id)
    finally:
        await proxy.stop()
    # Then cancel returned once every holder had stopped (its counts final), and they are
    # exactly what the sink received: nothing delivered is reported cancelled
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.progress.finished_at is not None
    assert cancelled.progress.delivered == final.progress.delivered == _sent(cluster, job.job_id)
    assert final.progress.delivered + final.progress.cancelled == 3000
    report.assert_exactly_once()


async def test_pause_while_batches_move_then_resume(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster, proxy, client = await partitioned_node0(tmp_path, clusters)
    try:
        async with client:
            job = await client.submit(CONTENT, recipients(2000, "pause-move.example"))
            # When the job is paused while node0's batches are being moved
            await _cut_node0_when_busy(client, proxy, job.job_id)
            paused = await client.pause(job.job_id, timeout=timedelta(seconds=60))
            at_pause = _sent(cluster, job.job_id)
            await asyncio.sleep(3)
            later = _sent(cluster, job.job_id)
            proxy.pass_through()
            await client.resume(job.job_id)
            report = await finish(client, cluster, job.job_id, "pause while batches move")
    finally:
        await proxy.stop()
    # Then pause returned once nothing was being sent any more: the sink got nothing new
    # while paused, and the count pause returned was what the sink had
    assert paused.state is JobState.PAUSED
    assert later == at_pause == paused.progress.delivered
    assert report.delivered == 2000
    report.assert_exactly_once()


# ---- 9. a submit whose deadline expires, then a leader change -------------------------


# Four uploads of 100,000 recipients, then four more and all read back: ~45 s, on a
# busy machine twice that.
@pytest.mark.timeout(300)
async def test_submit_deadline_expiring_then_leader_killed(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    # Nodes that hold one recipient at a time: the jobs barely start meanwhile.
    cluster = LocalCluster(tmp_path / "c", spec(node_env={**NODE_ENV, "MAILER_CAPACITY": "1"}))
    client = await started(clusters, cluster)
    n = 100_000
    async with client:
        status = await client.cluster_status()
        assert status.leader is not None
        # When large submits give up after deadlines that end at different points of
        # their upload and its commit
        keys = {f"deadline-{ms}": ms for ms in (150, 400, 650, 900)}
        expired = 0
        for key, ms in keys.items():
            try:
                await client.submit(
                    CONTENT,
                    recipients(n, f"{key}.example"),
                    idempotency_key=key,
                    timeout=timedelta(milliseconds=ms),
                )
            except DeadlineExceededError:
                expired += 1
        assert expired > 0
        # And the leader is SIGKILLed right after
        cluster.coordinator_at(status.leader.address).signal(signal.SIGKILL)
        await wait_new_leader(client, status.leader.address)
        # Then the cluster leads, and each key names a whole job or none: submitting
        # again gives a job holding every recipient, once
        for key in keys:
            job = await client.submit(CONTENT, recipients(n, f"{key}.example"), idempotency_key=key)
            assert job.progress.total == n, key
            counted, token = 0, ""
            while True:
                page = await client.results_page(job.job_id, page_size=5000, page_token=token)
                counted += len(page.items)
                token = page.next_page_token
                if not token:
                    break
            assert counted == n, key
            await client.cancel(job.job_id, timeout=timedelta(seconds=60))
        per_key = [j.idempotency_key async for j in client.list_jobs() if j.idempotency_key in keys]
    assert sorted(per_key) == sorted(keys)
    print(f"submit deadlines: {expired} of {len(keys)} expired before the leader was killed")


# ---- 10. a rolling restart ------------------------------------------------------------


async def test_rolling_restart_with_sigterm_sends_nothing_twice(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    cluster = LocalCluster(tmp_path / "c", spec())
    client = await started(clusters, cluster)
    async with client:
        job = await client.submit(CONTENT, recipients(4000, "rolling.example"))
        await delivered_at_least(client, job.job_id, 300)
        # When every node and then every coordinator is restarted with SIGTERM, one at a
        # time, each waiting for the cluster to be whole again
        for i in range(cluster.spec.nodes):
            started_at = time.monotonic()
            await asyncio.to_thread(cluster.restart_node, i, 20.0)
            print(f"node{i} restarted in {time.monotonic() - started_at:.1f}s")
            await wait_nodes_active(client, cluster.spec.nodes)
        for i in range(len(cluster.coordinator_ports)):
            await asyncio.to_thread(cluster.restart_coordinator, i, 20.0)
            await until(_has_leader(client), 30, "a leader")
        report = await finish(client, cluster, job.job_id, "rolling restart")
    # Then nothing is lost and nothing was sent twice: a node that could not finish in
    # its drain time handed its unstarted work back instead of cutting transactions
    assert report.delivered == 4000
    report.assert_exactly_once()


def _has_leader(client: MailerClient) -> Callable[[], object]:
    async def check() -> bool:
        try:
            status = await client.cluster_status(timeout=timedelta(seconds=3))
        except MailerError:
            return False
        return status.leader is not None

    return check
