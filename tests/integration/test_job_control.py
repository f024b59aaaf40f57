"""Job control against a running cluster: pause/resume, cancel, retry_failed.

The relay here takes 20 ms per message so jobs are still running when we act on them;
it refuses @reject.example with 550 and @tempfail.example with 451.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from client_sdk import (
    Address,
    FailedPreconditionError,
    JobState,
    MailerClient,
    MessageContent,
    Recipient,
    RecipientStatus,
)
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import assert_eventually, assert_stays, wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.integration

CONTENT = MessageContent(sender=Address("ops@example.com"), subject="Hi", text_body="Hello")


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("jobctl"),
        ClusterSpec(
            sink_args=(
                "--delay-ms", "20",
                "--reject-pattern", r"@reject\.example$",
                "--tempfail-pattern", r"@tempfail\.example$",
            ),
            coordinator_env={"MAILER_MAX_ATTEMPTS": "2", "MAILER_RETRY_INITIAL_S": "0.3"},
            node_env={"MAILER_SMTP_CONNECTIONS": "2"},
        ),
    )  # fmt: skip
    yield c
    c.stop()


def _ids(cluster: LocalCluster, job_id: str) -> collections.Counter[str]:
    return collections.Counter(
        str(line["message_id"])
        for line in cluster.delivered()
        if str(line["message_id"]).startswith(f"<{job_id}.")
    )


async def test_pause_stops_sending_on_every_node_and_resume_continues(
    slow_cluster: LocalCluster,
) -> None:
    async with MailerClient(slow_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        job = await client.submit(CONTENT, [Recipient(f"p{i}@pause.example") for i in range(1200)])

        async def started() -> bool:
            return (await client.get(job.job_id)).progress.delivered >= 100

        await assert_eventually(started, timeout_s=60, message="100 delivered")
        # When the job is paused
        t0 = time.monotonic()
        paused = await client.pause(job.job_id)
        pause_s = time.monotonic() - t0
        assert paused.state is JobState.PAUSED
        # Then every node has stopped it when the call returns (within 2 s) ...
        assert pause_s < 2.0, pause_s
        nodes = await client.list_nodes()
        assert all(n.batches_in_flight == 0 for n in nodes), nodes
        # ... and nothing more of it reaches the relay
        at_pause = sum(_ids(slow_cluster, job.job_id).values())
        await assert_stays(
            lambda: sum(_ids(slow_cluster, job.job_id).values()) == at_pause,
            for_s=2.0,
            message="no message of a paused job reaches the relay",
        )
        assert at_pause < 1200
        # When it is resumed, it completes with each recipient delivered once
        resumed = await client.resume(job.job_id)
        assert resumed.state in (JobState.RUNNING, JobState.QUEUED)
        final = await client.wait(job.job_id)
    assert final.state is JobState.COMPLETED and final.delivered == 1200
    ids = _ids(slow_cluster, job.job_id)
    assert len(ids) == 1200 and max(ids.values()) == 1
    print(f"pause acknowledged by every node in {pause_s:.2f}s")


async def test_cancel_ends_unsent_recipients_as_cancelled(slow_cluster: LocalCluster) -> None:
    async with MailerClient(slow_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        job = await client.submit(CONTENT, [Recipient(f"c{i}@cancel.example") for i in range(1200)])

        async def started() -> bool:
            return (await client.get(job.job_id)).progress.delivered >= 50

        await assert_eventually(started, timeout_s=60, message="50 delivered")
        await client.cancel(job.job_id)
        final = await client.wait(job.job_id)
        statuses = collections.Counter([r.status async for r in client.results(job.job_id)])
    assert final.state is JobState.CANCELLED
    assert final.delivered + final.cancelled + final.failed == 1200
    assert final.cancelled > 0
    assert statuses[RecipientStatus.DELIVERED] == final.delivered
    assert statuses[RecipientStatus.CANCELLED] == final.cancelled
    # Every delivered recipient reached the relay; nothing cancelled did afterwards
    assert len(_ids(slow_cluster, job.job_id)) == final.delivered
    with pytest.raises(FailedPreconditionError):
        await client.retry_failed(job.job_id)


async def test_retry_failed_resends_only_transient_failures(slow_cluster: LocalCluster) -> None:
    async with MailerClient(slow_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        recipients = [
            *(Recipient(f"ok{i}@fine.example") for i in range(20)),
            *(Recipient(f"gone{i}@reject.example") for i in range(3)),
            *(Recipient(f"later{i}@tempfail.example") for i in range(4)),
        ]
        job = await client.submit(CONTENT, recipients)
        first = await client.wait(job.job_id)
        assert (first.delivered, first.failed) == (20, 7)
        before = {r.email: r async for r in client.results(job.job_id)}
        assert all(
            before[f"later{i}@tempfail.example"].reply.code == 451  # type: ignore[union-attr]
            for i in range(4)
        )
        # When the failures are retried
        retried_at = datetime.now(UTC)
        again, queued = await client.retry_failed(job.job_id)
        # Then only the four 451 failures are queued; the 550s are not
        assert queued == 4
        assert again.state is JobState.RUNNING
        second = await client.wait(job.job_id)
        after = {r.email: r async for r in client.results(job.job_id)}
    assert (second.delivered, second.failed) == (20, 7)
    for email, result in after.items():
        if email.endswith("@tempfail.example"):
            assert result.updated_at is not None and result.updated_at > retried_at, result
            assert result.attempts == 2 and result.reply is not None and result.reply.code == 451
        else:
            assert result == before[email], f"{email} must not be sent again"
    ids = _ids(slow_cluster, job.job_id)
    assert len(ids) == 20 and max(ids.values()) == 1


async def test_retry_failed_of_unknown_job_is_not_found(slow_cluster: LocalCluster) -> None:
    from client_sdk import NotFoundError

    async with MailerClient(slow_cluster.coordinator_addresses) as client:
        with pytest.raises(NotFoundError):
            await client.retry_failed("0000-nope")


async def test_drain_of_a_busy_node_loses_nothing(slow_cluster: LocalCluster) -> None:
    async with MailerClient(slow_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        job = await client.submit(CONTENT, [Recipient(f"d{i}@drain.example") for i in range(900)])

        async def node2_busy() -> bool:
            nodes = {n.node_id: n for n in await client.list_nodes()}
            return nodes["node2"].batches_in_flight > 0

        await assert_eventually(node2_busy, timeout_s=60, message="node2 holds batches")
        # When the busy node is drained
        drained = await client.drain("node2")
        # Then it holds nothing when the call returns and gets nothing new
        assert drained.batches_in_flight == 0
        done_at_drain = drained.recipients_done
        final = await client.wait(job.job_id)
        nodes = {n.node_id: n for n in await client.list_nodes()}
        await client.uncordon("node2")
    assert final.delivered == 900 and final.failed == 0
    assert nodes["node2"].recipients_done == done_at_drain
    ids = _ids(slow_cluster, job.job_id)
    assert len(ids) == 900 and max(ids.values()) == 1


async def test_high_priority_job_overtakes_a_campaign(slow_cluster: LocalCluster) -> None:
    from client_sdk import JobOptions

    async with MailerClient(slow_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        campaign = await client.submit(
            CONTENT, [Recipient(f"bulk{i}@campaign.example") for i in range(2000)]
        )

        async def running() -> bool:
            return (await client.get(campaign.job_id)).progress.delivered >= 50

        await assert_eventually(running, timeout_s=60, message="campaign running")
        urgent = await client.submit(
            CONTENT,
            [Recipient(f"otp{i}@urgent.example") for i in range(40)],
            options=JobOptions(priority=10),
        )
        urgent_final = await client.wait(urgent.job_id)
        campaign_now = (await client.get(campaign.job_id)).progress
        await client.cancel(campaign.job_id)
    # The transactional job finished while most of the campaign was still waiting
    assert urgent_final.delivered == 40
    assert campaign_now.done < 2000 * 0.75, campaign_now


async def test_scheduled_job_waits_for_send_at(slow_cluster: LocalCluster) -> None:
    from client_sdk import JobOptions

    async with MailerClient(slow_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        send_at = datetime.now(UTC) + timedelta(seconds=3)
        job = await client.submit(
            CONTENT,
            [Recipient(f"s{i}@scheduled.example") for i in range(10)],
            options=JobOptions(send_at=send_at),
        )
        await assert_stays(
            lambda: not _ids(slow_cluster, job.job_id),
            for_s=2.0,
            message="nothing is sent before send_at",
        )
        final = await client.wait(job.job_id)
    assert final.delivered == 10
    assert final.finished_at is not None and final.finished_at >= send_at
