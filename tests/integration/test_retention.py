"""Retention on a real cluster: the recipient rows of a job that ended long enough ago are
dropped in small transactions while another job is sending, without stalling it; the
finished job's summary stays."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest

from client_sdk import JobState, MailerClient
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.chaos.cluster_helpers import CONTENT, recipients
from tests.helpers import assert_eventually, wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.integration


async def test_retention_drops_old_rows_while_a_job_sends(
    tmp_path: Path, fresh_cluster_factory: list[LocalCluster]
) -> None:
    # Given recipient rows kept for 2 seconds after their job ended, looked at every second
    spec = ClusterSpec(
        durable_database=False,
        coordinator_env={
            "MAILER_RETENTION_DAYS": str(2 / 86400),
            "MAILER_RETENTION_CHECK_S": "1",
        },
    )
    cluster = start_cluster(tmp_path / "c", spec)
    fresh_cluster_factory.append(cluster)
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        # And a job of 30,000 recipients that ended (cancelled before it got far)
        old = await client.submit(CONTENT, recipients(30_000, "old.example"))
        await client.cancel(old.job_id, timeout=timedelta(seconds=60))
        # When another job sends meanwhile
        new = await client.submit(CONTENT, recipients(10_000, "new.example"))
        progress: list[tuple[float, int]] = []

        async def old_rows_gone() -> bool:
            job = await client.get(new.job_id)
            progress.append((time.monotonic(), job.progress.delivered))
            page = await client.results_page(old.job_id, page_size=10)
            return not page.items

        await assert_eventually(old_rows_gone, timeout_s=60, interval_s=0.2, message="purged")
        async with asyncio.timeout(120):
            final = await client.wait(new.job_id)
        summary = await client.get(old.job_id)
    # Then the old job's rows are gone but its summary stays, with its counts
    assert summary.state is JobState.CANCELLED
    assert summary.progress.total == 30_000
    assert summary.progress.delivered + summary.progress.cancelled == 30_000
    # And the sending job completed, and never stood still while the rows went
    assert final.delivered == 10_000
    pairs = [(a, b) for a, b in zip(progress, progress[1:], strict=False) if a[1] < 10_000]
    assert any(b[1] > a[1] for a, b in pairs), progress
    longest_still = max((b[0] - a[0] for a, b in pairs if b[1] == a[1]), default=0.0)
    assert longest_still < 5, progress
