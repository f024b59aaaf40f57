"""Chaos: a sender node frozen past its lease, and a node cut off from etcd only.

Both faults hit node0 while it holds batches. node0 relays to a sink of its own, so
the sink logs tell which messages it sent and when (``ts``, wall clock). Each test
asserts the invariants of ``invariants.check_job`` (0 lost, reasons for failures,
delivered implies in a sink), that node0 fences itself, that its batches move to the
other nodes within about the lease TTL, and that duplicates come only from the
transactions node0 had in flight or not yet reported when the fault struck.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.parser
import email.utils
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from client_sdk import MailerClient
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_dev.faultproxy import Fault, FaultProxy
from tests.chaos.cluster_helpers import (
    CONTENT,
    Stopwatch,
    batches_held,
    duplicates_by_id,
    etcd_client,
    index_of,
    job_lines,
    log_count,
    node_lease,
    recipients,
    running_cluster,
    until,
)
from tests.chaos.invariants import Report, check_job
from tests.helpers import wait_nodes_active

pytestmark = pytest.mark.chaos

TTL_S = 3
"""Lease TTL of the nodes (the sender's trust margin is its default, 1 s)."""
BATCH = 25
TOTAL = 1500
SMTP_CONNECTIONS = 2
# A result is flushed to the leader within ~50 ms of its SMTP reply; anything the node
# accepted earlier than this before the fault was reported and cannot be resent.
UNREPORTED_WINDOW_S = 1.0
MOVE_AFTER_S = 3 + (2 + (65536 + 65536 // 3 + 3) / 65536) + 2
"""How long after a node's lease is gone the leader moves its batches: the authority a
heartbeat grants, the node's final-reply bound (its timeout plus its largest message
at the slowest healthy rate) and the leader's margin (coordinator.timeouts)."""


def node_spec() -> ClusterSpec:
    return ClusterSpec(
        # A slow relay keeps transactions in flight when the fault strikes.
        sink_args=("--delay-ms", "5"),
        coordinator_env={"MAILER_BATCH_SIZE": str(BATCH)},
        node_env={
            "MAILER_LEASE_TTL_S": str(TTL_S),
            "MAILER_SMTP_CONNECTIONS": str(SMTP_CONNECTIONS),
            # Short SMTP bounds: the leader waits them out before moving the batches of
            # a node whose lease is gone (it may still be finishing a transaction).
            "MAILER_SMTP_TIMEOUT_S": "2",
            "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": "2",
            "MAILER_SMTP_MAX_MESSAGE_BYTES": "65536",
        },
        own_sink_nodes=(0,),
    )


def node0_lines(lines: list[dict[str, Any]], cluster: LocalCluster) -> list[dict[str, Any]]:
    return [line for line in lines if line["sink"] == cluster.node_sinks[0].name]


def assert_duplicates_only_from(
    lines: list[dict[str, Any]], cluster: LocalCluster, not_before_wall: float
) -> None:
    """Every duplicated Message-ID has a node0 copy accepted at or after not_before_wall:
    one the leader never heard of, so it handed the recipient to another node."""
    for message_id, copies in duplicates_by_id(lines).items():
        mine = node0_lines(copies, cluster)
        assert mine, f"duplicate {message_id} not involving node0: {copies}"
        assert max(float(c["ts"]) for c in mine) >= not_before_wall, (message_id, copies)


async def wait_node0_busy(client: MailerClient, cluster: LocalCluster) -> int:
    """Wait until node0 holds batches and has sent some; returns the batches it holds."""
    held: list[int] = []

    async def busy() -> bool:
        n = await batches_held(client, "node0")
        if n and len(cluster.node_sinks[0].delivered()) >= 20:
            held.append(n)
            return True
        return False

    await until(busy, 60, "node0 holding batches and sending")
    return held[-1]


@dataclasses.dataclass
class Frozen:
    """What happened around node0's SIGSTOP ... SIGCONT."""

    held: int
    fault: Stopwatch
    resumed: Stopwatch
    times: dict[str, float]
    stopped_s: float
    rejoin_s: float
    report: Report
    lines: list[dict[str, Any]]

    def sent_after_sigcont(self, cluster: LocalCluster) -> list[dict[str, Any]]:
        return [
            line
            for line in node0_lines(self.lines, cluster)
            if float(line["ts"]) >= self.resumed.wall
        ]


async def freeze_node0_past_its_lease(
    cluster: LocalCluster,
    domain: str,
    before_freeze: Callable[[], Awaitable[None]] | None = None,
    after_freeze: Callable[[], None] | None = None,
) -> Frozen:
    """Run a job, SIGSTOP node0 while it holds batches, SIGCONT it once its key has
    expired and its batches moved (and TTL + 1 s passed), wait for the job to finish.

    node0 is cordoned right after SIGSTOP, so it gets no new batch after it resumes:
    anything it sends then comes from a batch it held before the freeze.
    """
    async with (
        running_cluster(cluster),
        MailerClient(cluster.coordinator_addresses) as client,
        etcd_client(cluster.etcd.endpoints) as etcd,
    ):
        await wait_nodes_active(client, 3)
        old_lease = await node_lease(etcd, "node0")
        job = await client.submit(CONTENT, recipients(TOTAL, domain))
        held = await wait_node0_busy(client, cluster)
        if before_freeze is not None:
            await before_freeze()
        cluster.nodes["node0"].signal(signal.SIGSTOP)
        fault = Stopwatch()
        if after_freeze is not None:
            after_freeze()
        await client.cordon("node0")
        times: dict[str, float] = {}

        async def moved_and_expired() -> bool:
            if "moved" not in times and await batches_held(client, "node0") == 0:
                times["moved"] = fault.elapsed()
            if "expired" not in times and await node_lease(etcd, "node0") is None:
                times["expired"] = fault.elapsed()
            # Frozen for longer than its lease TTL, by a second.
            return len(times) == 2 and fault.elapsed() > TTL_S + 1

        await until(moved_and_expired, 60, "node0's batches moved and its key expired")
        stopped_s = fault.elapsed()
        cluster.nodes["node0"].signal(signal.SIGCONT)
        resumed = Stopwatch()

        async def reregistered() -> bool:
            lease = await node_lease(etcd, "node0")
            return lease is not None and lease != old_lease

        await until(reregistered, 30, "node0 registered under a new lease")
        rejoin_s = resumed.elapsed()
        async with asyncio.timeout(60):
            await client.wait(job.job_id)
        report = await check_job(client, cluster, job.job_id)
    lines = job_lines(cluster, job.job_id)
    return Frozen(held, fault, resumed, times, stopped_s, rejoin_s, report, lines)


def date_header_s(cluster: LocalCluster, line: dict[str, Any]) -> float:
    """The Date header (Unix seconds, whole) of a message node0's sink stored: when
    node0 rendered it."""
    path = cluster.node_sinks[0].maildir / "new" / str(line["file"])
    headers = email.parser.BytesHeaderParser().parsebytes(path.read_bytes())
    return email.utils.parsedate_to_datetime(str(headers["Date"])).timestamp()


async def test_node_stopped_past_its_lease_starts_nothing_after_sigcont(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c", node_spec())
    # When node0 is frozen (SIGSTOP) while it holds batches, and resumed once its
    # lease is gone
    frozen = await freeze_node0_past_its_lease(cluster, "sigstop.example")

    lines = frozen.lines
    mine = node0_lines(lines, cluster)
    after = frozen.sent_after_sigcont(cluster)
    # The Date header is rendered when a worker picks the recipient, right after its
    # health check: a message dated after the freeze was picked after SIGCONT.
    picked_after = [line for line in after if date_header_s(cluster, line) > frozen.fault.wall]
    # Batches node0 began but did not finish (on a busy machine it may have finished the
    # ones it began just before the freeze, and not begun the others it held)
    begun = collections.Counter(index_of(str(line["message_id"])) // BATCH for line in mine)
    partial = {b for b, n in begun.items() if n < BATCH}
    moved = [
        line
        for line in lines
        if line["sink"] == "sink" and index_of(str(line["message_id"])) // BATCH in partial
    ]
    print(frozen.report.line("node SIGSTOP past its lease"))
    print(
        f"node SIGSTOP: held {frozen.held} batches; moved after {frozen.times['moved']:.2f}s "
        f"(target <= TTL + move bound + 2 = {TTL_S + MOVE_AFTER_S + 2:.1f}s), key expired after "
        f"{frozen.times['expired']:.2f}s, frozen {frozen.stopped_s:.1f}s; re-registered "
        f"{frozen.rejoin_s:.2f}s after SIGCONT; node0 sent {len(mine) - len(after)} before, "
        f"{len(after)} after SIGCONT (picked before the freeze: "
        f"{len(after) - len(picked_after)}); {len(moved)} recipients of its batches sent "
        f"by others"
    )
    # Then it sent nothing after it resumed (it checks its lease after waiting for a
    # connection and again before the message body); its batches went to the others in
    # time; and duplicates are only what it had not reported when it froze
    assert picked_after == [], picked_after
    assert after == [], after
    assert moved or not partial, "no recipient of node0's unfinished batches was sent by another"
    assert_duplicates_only_from(lines, cluster, frozen.fault.wall - UNREPORTED_WINDOW_S)
    # (a frozen process is not a dead one: its batches wait until nothing of it can still
    # be on the wire, but no longer)
    assert frozen.times["moved"] >= MOVE_AFTER_S, frozen.times
    assert frozen.times["moved"] <= TTL_S + MOVE_AFTER_S + 2, frozen.times


class SentAfterResume(AssertionError):
    """The frozen node finished a transaction after SIGCONT."""


async def test_node_frozen_mid_transaction_does_not_finish_it_after_sigcont(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "c", node_spec())
    # node0's SMTP goes through a proxy, to freeze it at a known point of a transaction.
    proxy = FaultProxy(cluster.node_sinks[0].address)
    await proxy.start()
    cluster.node_relays[0] = [proxy.address]

    async def hold_a_354() -> None:
        # Given node0 has sent DATA and its relay's "354" reply is held back
        fired = proxy.on_pattern(b"\r\nDATA\r\n", Fault.blackhole())
        async with asyncio.timeout(10):
            await fired.wait()

    try:
        # When node0 is frozen then, the reply reaches its socket while it is frozen,
        # and it is resumed once its lease is gone and its batches moved
        frozen = await freeze_node0_past_its_lease(
            cluster, "midtx.example", before_freeze=hold_a_354, after_freeze=proxy.pass_through
        )
    finally:
        await proxy.stop()
    after = frozen.sent_after_sigcont(cluster)
    duplicated = duplicates_by_id(frozen.lines)
    dup_after = [line for line in after if str(line["message_id"]) in duplicated]
    print(frozen.report.line("node SIGSTOP mid-transaction"))
    print(
        f"node SIGSTOP mid-transaction: node0 finished {len(after)} messages after SIGCONT "
        f"({len(dup_after)} of them also sent by another node)"
    )
    # Then it does not send the message after it resumes (it would be a duplicate)
    if after:
        raise SentAfterResume(f"node0 sent {len(after)} messages after SIGCONT: {after[:2]}")


async def test_node_cut_off_from_etcd_fences_itself_and_its_batches_move(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "c", node_spec())
    # node0 reaches etcd only through the proxy; SMTP and the leader's stream are direct.
    proxy = FaultProxy(cluster.etcd.endpoints[0])
    await proxy.start()
    cluster.node_etcd_endpoints[0] = [proxy.address]
    try:
        async with (
            running_cluster(cluster),
            MailerClient(cluster.coordinator_addresses) as client,
            etcd_client(cluster.etcd.endpoints) as etcd,
        ):
            await wait_nodes_active(client, 3)
            old_lease = await node_lease(etcd, "node0")
            job = await client.submit(CONTENT, recipients(TOTAL, "partition.example"))
            held = await wait_node0_busy(client, cluster)
            # When node0's etcd traffic is blackholed while it holds batches
            proxy.blackhole()
            fault = Stopwatch()
            times: dict[str, float] = {}

            async def moved_and_expired() -> bool:
                if "moved" not in times and await batches_held(client, "node0") == 0:
                    times["moved"] = fault.elapsed()
                if "expired" not in times and await node_lease(etcd, "node0") is None:
                    times["expired"] = fault.elapsed()
                return len(times) == 2

            await until(moved_and_expired, 30, "node0's batches moved and its key expired")
            async with asyncio.timeout(60):
                await client.wait(job.job_id)
            report = await check_job(client, cluster, job.job_id)
            # When the partition heals, node0 registers again
            proxy.pass_through()
            healed = Stopwatch()

            async def reregistered() -> bool:
                lease = await node_lease(etcd, "node0")
                return lease is not None and lease != old_lease

            await until(reregistered, 30, "node0 registered under a new lease")
            rejoin_s = healed.elapsed()
    finally:
        await proxy.stop()

    lines = job_lines(cluster, job.job_id)
    mine = node0_lines(lines, cluster)
    last_sent_s = max(float(line["ts"]) for line in mine) - fault.wall
    during = [line for line in mine if float(line["ts"]) >= fault.wall]
    fenced_logs = log_count(cluster.nodes["node0"].log_path, "lost registration")
    print(report.line("node partitioned from etcd"))
    print(
        f"etcd partition: held {held} batches; node0's last SMTP accept {last_sent_s:.2f}s "
        f"after the fault (fence bound TTL = {TTL_S}s), {len(during)} sent meanwhile; "
        f"batches moved after {times['moved']:.2f}s (target <= TTL+1 = {TTL_S + 1}s), "
        f"key expired after {times['expired']:.2f}s; re-registered {rejoin_s:.2f}s after "
        f"healing; registration losses logged {fenced_logs}"
    )
    # Then node0 stopped starting SMTP transactions within the TTL
    assert last_sent_s <= TTL_S, last_sent_s
    assert fenced_logs >= 1
    # And it released its batches on its stream at once (it still reached the leader),
    # so they moved within the TTL and nothing was sent twice
    assert times["moved"] <= TTL_S + 1, times
    report.assert_exactly_once()
