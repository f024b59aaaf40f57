"""Chaos: SMTP relay faults under a whole cluster of real processes.

Each test starts etcd, two coordinators, three sender nodes and the SMTP sink as
processes, injects one relay fault, and checks the invariants of
``tests/chaos/invariants.py`` (0 lost, every failure explained, delivered ⇒ stored,
duplicates counted) plus the scenario's own expectations:

5. The relay answers 421 to everything for a while, then recovers: all delivered exactly
   once, each recipient retried, the attempts spaced by the coordinator's backoff.
6. The relay rejects some recipients with 550: those fail after exactly one attempt
   with the 550, the others are delivered.
7. The relay hangs after DATA, cuts the connection mid-DATA, or cuts it after the final
   dot before its 250: the ambiguous outcomes are retried with the same Message-ID;
   duplicates only where the relay had stored the message, at most one per fault.
8. Every relay down for a while: nobody fails, the nodes' relay breakers open, and
   delivery resumes once the relay is back.

Faults come from the sink's control file (``mailers_dev.sink``), written before the cluster
starts or changed at runtime without restarting the sink; scenario 8 stops the sink
process and starts it again on the same port. Each test prints a one-line figure.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from client_sdk import (
    Address,
    BreakerState,
    MailerClient,
    MessageContent,
    Recipient,
    RecipientResult,
    RecipientStatus,
)
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_dev.sink import FaultPlan, Window, write_control
from tests.chaos.conftest import ClusterFactory
from tests.chaos.invariants import check_job
from tests.helpers import assert_eventually, wait_nodes_active

pytestmark = pytest.mark.chaos

CONTENT = MessageContent(
    sender=Address("news@example.com", "Fault Tests"),
    subject="Hello {{ name }}",
    text_body="Hi {{ name }}, this is a test of relay faults.",
)
RECIPIENTS = 60
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 4.0
BACKOFF_JITTER = 0.5
"""The coordinator's default jitter: each retry delay lies in [base/2, base]."""
SMTP_TIMEOUT_S = 3.0
NODE_BREAKER_RESET_S = 5.0
"""``RelayPool``'s default reset timeout (nodes do not configure it)."""
JOB_TIMEOUT_S = 60.0


def _spec(control: Path) -> ClusterSpec:
    return ClusterSpec(
        sink_args=("--control", str(control)),
        coordinator_env={
            "MAILER_RETRY_INITIAL_S": str(RETRY_INITIAL_S),
            "MAILER_RETRY_MAX_S": str(RETRY_MAX_S),
            # Attempt budgets stay at their defaults (5 SMTP attempts per recipient, 10
            # node losses per batch): rounds in which every relay breaker was open attempt
            # nothing and so do not use them up; an outage must not turn into failures.
            "MAILER_BATCH_SIZE": "20",
        },
        node_env={
            "MAILER_SMTP_TIMEOUT_S": str(SMTP_TIMEOUT_S),
            # The reply to the final dot too: a relay that hangs there costs 3 s.
            "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": str(SMTP_TIMEOUT_S),
            "MAILER_SMTP_CONNECTIONS": "2",
        },
    )


def _people(domain: str, bounce_every: int = 0) -> list[Recipient]:
    def local(i: int) -> str:
        return f"bounce{i}" if bounce_every and i % bounce_every == 0 else f"user{i}"

    return [Recipient(f"{local(i)}@{domain}", f"User {i}") for i in range(RECIPIENTS)]


def _announcements(cluster: LocalCluster) -> int:
    assert cluster.sink is not None
    return cluster.sink.log().count("mailers-sink faults #")


async def _set_faults(cluster: LocalCluster, control: Path, plan: FaultPlan) -> float:
    """Change the running sink's faults; returns the wall time just before the change."""
    before = _announcements(cluster)
    changed_at = time.time()
    write_control(control, plan)
    await assert_eventually(
        lambda: _announcements(cluster) > before, timeout_s=10, message="sink applied the faults"
    )
    return changed_at


async def _run_job(
    client: MailerClient, people: list[Recipient]
) -> tuple[str, list[RecipientResult]]:
    job = await client.submit(CONTENT, people)
    await asyncio.wait_for(client.wait(job.job_id), JOB_TIMEOUT_S)
    return job.job_id, [r async for r in client.results(job.job_id)]


def _delivery_times(cluster: LocalCluster, job_id: str) -> dict[int, list[float]]:
    """Recipient index → wall times the sink stored its message (one per copy)."""
    times: dict[int, list[float]] = collections.defaultdict(list)
    for line in cluster.delivered():
        message_id = str(line["message_id"])
        if message_id.startswith(f"<{job_id}."):
            ts: Any = line["ts"]
            times[int(message_id.split("@")[0].rpartition(".")[2])].append(float(ts))
    return times


def _max_attempts_within(elapsed_s: float) -> int:
    """The most attempts the backoff allows in elapsed_s: each retry k waits at least
    (1 - jitter) * min(max, initial * 2**(k-1))."""
    attempts, spent = 1, 0.0
    while True:
        base = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (attempts - 1))
        spent += (1 - BACKOFF_JITTER) * base
        if spent > elapsed_s:
            return attempts
        attempts += 1


def _spread(values: Iterable[int]) -> str:
    v = sorted(values)
    return f"{v[0]}/{statistics.median(v):g}/{v[-1]}"


@pytest.mark.parametrize(
    ("code", "window_s"),
    [
        # 421: the relay is unwell. It opens the nodes' relay breakers; rounds in which no
        # transaction could start use up no recipient's attempts.
        (421, 6.0),
        # 451: "try again later" for this message; each one is an attempt, so the window
        # is kept well inside the 5 attempts the compressed backoff allows (>= 3.75 s).
        (451, 2.0),
    ],
)
async def test_5_relay_tempfails_then_recovers(
    tmp_path: Path, cluster_factory: ClusterFactory, code: int, window_s: float
) -> None:
    control = tmp_path / "sink-control.json"
    cluster = await cluster_factory(_spec(control))
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        # Given a relay answering 421 or 451 to every MAIL for a few seconds
        fault_at = await _set_faults(
            cluster, control, FaultPlan(tempfail=Window(for_s=window_s), tempfail_code=code)
        )
        # When a job is submitted during that window
        job_id, results = await _run_job(client, _people("tempfail.example"))
        report = await check_job(client, cluster, job_id)

    # Then every recipient is delivered exactly once
    assert (report.delivered, report.failed, report.duplicates) == (RECIPIENTS, 0, 0)
    times = _delivery_times(cluster, job_id)
    first = min(t[0] for t in times.values()) - fault_at
    last = max(t[0] for t in times.values()) - fault_at
    # And nothing got through during the window (it started after fault_at; 10 ms for
    # the sink's two clocks): every recipient was deferred and retried
    assert first >= window_s - 0.01, first
    if code == 451:
        # Every 451 is an attempt of that recipient: all were retried
        assert min(r.attempts for r in results) >= 2
    else:
        # A 421 is the relay's fault: it uses up no recipient's attempts
        assert all(r.attempts == 1 for r in results)
    # And the retries followed the backoff: nobody made more attempts than the shortest
    # backoff delays allow before its delivery
    for r in results:
        elapsed = times[r.index][0] - fault_at
        assert r.attempts <= _max_attempts_within(elapsed), (r, elapsed)
    # And delivery resumed promptly after the window: a failed trial keeps a node's
    # breaker open one more reset timeout, and recipients deferred meanwhile (or while
    # the single trial ran) wait up to the longest backoff, twice; plus slack
    assert last <= window_s + 2 * (NODE_BREAKER_RESET_S + RETRY_MAX_S) + 10, last
    print(
        report.line(f"scenario 5 ({code})")
        + f" window={window_s:g}s first_delivery=+{first:.1f}s last_delivery=+{last:.1f}s"
        + f" attempts(min/median/max)={_spread(r.attempts for r in results)}"
    )


async def test_6_rejected_recipients_fail_once_and_the_rest_are_delivered(
    tmp_path: Path, cluster_factory: ClusterFactory
) -> None:
    # Given a relay rejecting recipients named bounce* with 550 5.1.1
    control = tmp_path / "sink-control.json"
    write_control(control, FaultPlan(reject_pattern=r"^bounce"))
    cluster = await cluster_factory(_spec(control))
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        # When a job with every fifth recipient such an address is sent
        job_id, results = await _run_job(client, _people("reject.example", bounce_every=5))
        report = await check_job(client, cluster, job_id)

    # Then exactly those failed, each with the 550 after a single attempt (never retried)
    failed = sorted(
        (r for r in results if r.status is RecipientStatus.FAILED), key=lambda r: r.index
    )
    assert [r.index for r in failed] == list(range(0, RECIPIENTS, 5))
    for r in failed:
        assert r.reply is not None and (r.reply.code, r.reply.enhanced_code) == (550, "5.1.1"), r
        assert r.attempts == 1, r
    # And one refusal did not fail the others: all delivered, once, at the first attempt
    assert report.delivered == RECIPIENTS - len(failed)
    assert {r.attempts for r in results} == {1}
    assert report.duplicates == 0
    print(report.line("scenario 6") + f" failed_with_550={len(failed)} attempts_each=1")


FAULTS_7 = 6
"""How many transactions the relay breaks in each sub-case of scenario 7."""


@pytest.mark.parametrize(
    ("fault", "stored"),
    [
        ("hang_after_data", True),
        ("cut_mid_data", False),
        ("cut_after_data", True),
    ],
)
async def test_7_relay_fails_during_data(
    tmp_path: Path, cluster_factory: ClusterFactory, fault: str, stored: bool
) -> None:
    # Given a relay that breaks the next 6 transactions in the DATA phase: it goes silent
    # after the final dot (the node's deadline is 3 s) having stored the message, drops
    # the connection mid-message (nothing stored), or stores it and drops the connection
    # before the 250 (the lost reply)
    control = tmp_path / "sink-control.json"
    windows: dict[str, Window] = {fault: Window(count=FAULTS_7)}
    write_control(control, FaultPlan(hang_stores=stored, **windows))  # type: ignore[arg-type]
    cluster = await cluster_factory(_spec(control))
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        # When a job is sent
        started = time.monotonic()
        job_id, results = await _run_job(client, _people(f"{fault.replace('_', '-')}.example"))
        elapsed = time.monotonic() - started
        report = await check_job(client, cluster, job_id)

    # Then everyone ends delivered (the ambiguous outcomes were deferred and retried with
    # the same Message-ID), and each broken transaction cost its recipient an attempt
    assert (report.delivered, report.failed) == (RECIPIENTS, 0)
    retried = {r.index for r in results if r.attempts >= 2}
    assert len(retried) >= FAULTS_7, sorted(retried)
    # And duplicates come only from messages the relay had stored, at most one per fault,
    # and only for recipients that were retried
    copies = _delivery_times(cluster, job_id)
    duplicated = {index for index, ts in copies.items() if len(ts) > 1}
    if stored:
        assert report.duplicates <= FAULTS_7
        assert duplicated <= retried
    else:
        assert report.duplicates == 0
    # And every copy follows an accept whose 250 the node never read
    report.assert_exactly_once()
    print(
        report.line(f"scenario 7 {fault}")
        + f" faults={FAULTS_7} retried={len(retried)}"
        + f" attempts(min/median/max)={_spread(r.attempts for r in results)}"
        + f" elapsed={elapsed:.1f}s"
    )


async def test_8_all_relays_down_then_back(tmp_path: Path, cluster_factory: ClusterFactory) -> None:
    # A ~20 s outage (not minutes, to keep the suite fast) is four times the nodes'
    # breaker reset timeout: breakers open, trials fail and re-open them, and retries
    # run through the coordinator's whole backoff range.
    outage_s = 20.0
    control = tmp_path / "sink-control.json"
    cluster = await cluster_factory(_spec(control))
    assert cluster.sink is not None
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        # Given every relay down: the sink process is stopped, connections are refused
        await asyncio.to_thread(cluster.sink.stop)
        down_at = time.monotonic()
        # When a job is submitted during the outage
        job = await client.submit(CONTENT, _people("outage.example"))

        # Then the nodes' relay breakers open (each node logs its transitions; the admin
        # RPC shows them as the leader learns them)
        def opened_in_logs() -> set[str]:
            return {
                name
                for name, proc in cluster.nodes.items()
                if "circuit breaker closed -> open" in proc.log()
            }

        seen_open_rpc: set[str] = set()
        first_open_s: float | None = None
        while time.monotonic() - down_at < outage_s:
            try:
                listed = await client.list_nodes(timeout=timedelta(seconds=2))
            except Exception:
                listed = []
            for node in listed:
                if any(r.breaker_state is BreakerState.OPEN for r in node.relays):
                    seen_open_rpc.add(node.node_id)
            if first_open_s is None and opened_in_logs():
                first_open_s = time.monotonic() - down_at
            await asyncio.sleep(0.25)
        opened = opened_in_logs()
        assert opened, "no node's relay breaker opened"
        assert seen_open_rpc, "the admin RPC never showed an open relay breaker"
        # And nobody failed meanwhile: they are deferred, waiting for a relay
        during = await client.get(job.job_id)
        assert (during.progress.delivered, during.progress.failed) == (0, 0)

        # When the relay comes back on the same port (the clock read first: the sink may
        # take a message before start_sink returns)
        up_at = time.time()
        await asyncio.to_thread(cluster.start_sink)
        async with asyncio.timeout(JOB_TIMEOUT_S):
            await client.wait(job.job_id)
        report = await check_job(client, cluster, job.job_id)
        results = [r async for r in client.results(job.job_id)]

    # Then delivery resumed and everyone was delivered, once; nobody failed permanently
    assert (report.delivered, report.failed, report.duplicates) == (RECIPIENTS, 0, 0)
    times = _delivery_times(cluster, job.job_id)
    resumed = min(t[0] for t in times.values()) - up_at
    done = max(t[0] for t in times.values()) - up_at
    assert resumed >= 0
    assert done <= 2 * (NODE_BREAKER_RESET_S + RETRY_MAX_S) + 10, done
    print(
        report.line("scenario 8")
        + f" outage={outage_s:g}s breakers_open_on={len(opened)}/3 nodes"
        + f" (first after {first_open_s or 0:.1f}s; via admin RPC: {len(seen_open_rpc)})"
        + f" resumed=+{resumed:.1f}s all_delivered=+{done:.1f}s after relay back"
        + f" attempts(min/median/max)={_spread(r.attempts for r in results)}"
    )
