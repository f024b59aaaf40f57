"""Delivery events through the SDK clients and ``mailers events``, against a real cluster:
what a small finished job's events look like, the CLI's formats and filters, resuming
from a cursor, and a stream that goes on across a leader failover."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from client_sdk import (
    Address,
    DeliveryEvent,
    EventStream,
    EventType,
    JobOptions,
    MailerClient,
    MessageContent,
    Recipient,
    SyncMailerClient,
)
from mailers.cli import main
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import assert_eventually, wait_new_leader, wait_nodes_active, wait_until
from tests.integration.conftest import start_cluster
from tests.integration.test_admin_cli import _in_terminal

pytestmark = pytest.mark.integration

CONTENT = MessageContent(Address("ops@example.com"), subject="Hi {{ name }}", text_body="Hello")
RECIPIENTS = 20
TAGS = ("events", "2026-12")


def recipients(n: int, domain: str) -> list[Recipient]:
    return [Recipient(f"u{i}@{domain}", f"U {i}", metadata={"crm": f"c{i}"}) for i in range(n)]


@pytest.fixture(scope="module")
def job_id(cluster: LocalCluster) -> str:
    """A finished job of 20 recipients, each with metadata, the job with tags."""

    async def send() -> str:
        async with MailerClient(cluster.coordinator_addresses) as client:
            await wait_nodes_active(client, 1)
            job = await client.submit(
                CONTENT,
                recipients(RECIPIENTS, "events.example"),
                options=JobOptions(tags=TAGS),
                idempotency_key="event-clients-job",
            )
            await client.wait(job.job_id)
            return job.job_id

    return asyncio.run(send())


def assert_the_jobs_story(events: list[DeliveryEvent], job_id: str) -> None:
    """Each recipient accepted then delivered, ids increasing, the caller's data on each."""
    ids = [e.event_id for e in events]
    assert ids == sorted(set(ids)), ids
    assert {e.job_id for e in events} == {job_id}
    for event_type in (EventType.ACCEPTED, EventType.DELIVERED):
        of_type = [e for e in events if e.type is event_type]
        assert sorted(e.index for e in of_type) == list(range(RECIPIENTS)), event_type
    for e in events:
        assert e.email == f"u{e.index}@events.example"
        assert e.metadata == {"crm": f"c{e.index}"} and tuple(e.tags) == TAGS
        assert e.time is not None
    accepted = {e.index: e.event_id for e in events if e.type is EventType.ACCEPTED}
    for e in events:
        if e.type is EventType.DELIVERED:
            assert e.event_id > accepted[e.index]
            assert e.reply is not None and e.reply.code == 250
            assert e.message_id == f"<{job_id}.{e.index}@example.com>" and e.node_id


async def take(events: EventStream, n: int) -> list[DeliveryEvent]:
    """The next ``n`` events of a stream, within a generous deadline."""
    read: list[DeliveryEvent] = []
    async with asyncio.timeout(60):
        async for event in events:
            read.append(event)
            if len(read) == n:
                break
    return read


async def test_the_async_client_reads_a_jobs_events(cluster: LocalCluster, job_id: str) -> None:
    async with MailerClient(cluster.coordinator_addresses) as client:
        # When the job's events are read from the start
        async with client.events(job_ids=[job_id]) as events:
            read = await take(events, 2 * RECIPIENTS)
            # Then its cursor is the last one read, and nothing had to be resumed
            assert events.last_event_id == read[-1].event_id
            assert events.reconnects == 0
    # And they tell each recipient's story: 20 accepted, 20 delivered
    assert_the_jobs_story(read, job_id)


def test_the_sync_client_reads_the_same_events(cluster: LocalCluster, job_id: str) -> None:
    with (
        SyncMailerClient(cluster.coordinator_addresses) as client,
        client.events(job_ids=[job_id]) as events,
    ):
        # When the job's events are read, and the deliveries after the 10th on their own
        read = list(itertools.islice(events, 2 * RECIPIENTS))
        tenth = [e for e in read if e.type is EventType.DELIVERED][9]
        with client.events(tenth.event_id, job_ids=[job_id], types=[EventType.DELIVERED]) as later:
            rest = list(itertools.islice(later, RECIPIENTS - 10))
        assert (events.reconnects, later.reconnects) == (0, 0)
    # Then they are the same story, filtered and resumed as asked
    assert_the_jobs_story(read, job_id)
    assert rest == [e for e in read if e.type is EventType.DELIVERED][10:]


def _cli_events(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str], *args: str
) -> list[dict[str, Any]]:
    """What ``mailers events ARGS --json`` prints, one document a line."""
    capsys.readouterr()
    code = main(
        ["events", *args, "--json", "--coordinators", ",".join(cluster.coordinator_addresses)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def test_the_cli_prints_json_lines_filters_and_resumes(
    cluster: LocalCluster, job_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # When the job's events are listed with --json
    docs: list[dict[str, Any]] = []

    def listed() -> bool:
        docs[:] = _cli_events(cluster, capsys, "--job", job_id)
        return len(docs) >= 2 * RECIPIENTS

    wait_until(listed, timeout_s=60, message="the job's 40 events listed")
    # Then each line is one event, in id order, with its recipient's metadata
    assert len(docs) == 2 * RECIPIENTS
    ids = [d["event_id"] for d in docs]
    assert ids == sorted(set(ids))
    assert sorted(d["type"] for d in docs) == ["accepted"] * 20 + ["delivered"] * 20
    assert all(d["metadata"] == {"crm": f"c{d['index']}"} for d in docs)
    assert all(d["job_id"] == job_id and d["tags"] == list(TAGS) for d in docs)
    # And --type keeps only the deliveries
    delivered = _cli_events(cluster, capsys, "--job", job_id, "--type", "delivered")
    assert [d["event_id"] for d in delivered] == [
        d["event_id"] for d in docs if d["type"] == "delivered"
    ]
    assert all(d["reply"]["code"] == 250 for d in delivered)
    # And --after gives only the events after it
    cursor = ids[14]
    later = _cli_events(cluster, capsys, "--job", job_id, "--after", str(cursor))
    assert [d["event_id"] for d in later] == ids[15:]


def test_an_80_column_terminal_shows_whole_event_ids_and_job_ids(
    cluster: LocalCluster, job_id: str
) -> None:
    addresses = ",".join(cluster.coordinator_addresses)
    shown = _in_terminal(["events", "--job", job_id, "--coordinators", addresses])
    lines = [line for line in shown.splitlines() if job_id in line]
    assert len(lines) == 2 * RECIPIENTS, shown
    assert "…" not in shown
    header = next(line for line in shown.splitlines() if line.strip())
    assert header.split() == ["id", "time", "type", "job", "#", "email", "code", "reason"]
    assert sum("delivered" in line and " 250 " in f"{line} " for line in lines) == RECIPIENTS


def test_follow_streams_json_lines_until_sigterm_and_exits_0(
    cluster: LocalCluster, job_id: str
) -> None:
    # Given `mailers events --follow --json` of the job, its output read as it comes
    addresses = ",".join(cluster.coordinator_addresses)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailers.cli", "events", "--follow", "--json",
         "--job", job_id, "--coordinators", addresses],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    out = proc.stdout
    assert out is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(out.readline, "")))
    reader.start()
    try:
        # When every event has come (each line flushed while the command still runs)
        wait_until(lambda: len(lines) >= 2 * RECIPIENTS, 60, "40 lines before the exit")
        assert proc.poll() is None
        # And it gets SIGTERM
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        proc.kill()
        reader.join(30)
    # Then it exits 0, having printed every event once
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    ids = [json.loads(line)["event_id"] for line in lines]
    assert len(ids) == 2 * RECIPIENTS and ids == sorted(set(ids))


def _failover_spec() -> ClusterSpec:
    return ClusterSpec(
        sink_args=("--delay-ms", "20"),
        coordinator_env={"MAILER_ELECTION_TTL_S": "3", "MAILER_BATCH_SIZE": "25"},
        node_env={"MAILER_LEASE_TTL_S": "3", "MAILER_SMTP_CONNECTIONS": "2"},
    )


def _delivered(events: list[DeliveryEvent]) -> int:
    return len({e.index for e in events if e.type is EventType.DELIVERED})


async def _collect(events: EventStream, into: list[DeliveryEvent]) -> None:
    async for event in events:
        into.append(event)


@pytest.mark.timeout(300)
async def test_the_stream_resumes_at_the_new_leader_without_gaps_or_repeats(
    tmp_path: Path, fresh_cluster_factory: list[LocalCluster]
) -> None:
    cluster = start_cluster(tmp_path / "c", _failover_spec())
    fresh_cluster_factory.append(cluster)
    total = 400
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        status = await client.cluster_status()
        assert status.leader is not None
        old_leader = status.leader.address
        job = await client.submit(CONTENT, recipients(total, "failover.example"))
        read: list[DeliveryEvent] = []
        async with client.events(job_ids=[job.job_id]) as events:
            reading = asyncio.create_task(_collect(events, read))
            try:
                # Given a stream that has read some deliveries
                await assert_eventually(lambda: _delivered(read) >= 50, 60, 0.05, "50 read")
                # When the leader is SIGKILLed mid-job
                cluster.coordinator_at(old_leader).signal(signal.SIGKILL)
                await wait_new_leader(client, old_leader, timeout_s=60)
                # Then the same stream goes on at the new leader to the last delivery
                await assert_eventually(lambda: _delivered(read) == total, 120, 0.05, "all")
            finally:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
            assert events.reconnects >= 1
        # And it skipped nothing and repeated nothing: a fresh read from the start, up to
        # the same cursor, yields exactly the same events
        ids = [e.event_id for e in read]
        assert ids == sorted(set(ids))
        async with client.events(job_ids=[job.job_id]) as fresh:
            again = await take(fresh, len(ids))
    assert [e.event_id for e in again] == ids
    assert {e.index for e in read if e.type is EventType.ACCEPTED} == set(range(total))
