"""Suppression lists on a real cluster: hard bounces are added and later skipped,
manual entries through the SDK and the CLI, and etcd health in the cluster status.

The relay refuses @reject.example with ``550 5.1.1``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from client_sdk import (
    Address,
    JobState,
    MailerClient,
    MessageContent,
    Recipient,
    RecipientStatus,
    SuppressionReason,
)
from mailers.cli import main
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.integration

CONTENT = MessageContent(sender=Address("ops@example.com"), subject="Hi", text_body="Hello")


@pytest.fixture(scope="module")
def reject_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("suppress"),
        ClusterSpec(sink_args=("--reject-pattern", r"@reject\.example$")),
    )
    yield c
    c.stop()


def _delivered_of(cluster: LocalCluster, job_id: str) -> int:
    return sum(1 for m in cluster.delivered() if str(m["message_id"]).startswith(f"<{job_id}."))


async def test_hard_bounces_are_suppressed_in_later_jobs(reject_cluster: LocalCluster) -> None:
    async with MailerClient(reject_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        rejected = [f"r{i}@reject.example" for i in range(3)]
        fine = [f"f{i}@ok.example" for i in range(3)]
        # Given a job whose @reject.example recipients are refused with 550 5.1.1
        first = await client.submit(CONTENT, [Recipient(e) for e in rejected + fine])
        done = await client.wait(first.job_id)
        assert done.state is JobState.COMPLETED
        assert (done.delivered, done.failed, done.suppressed) == (3, 3, 0)
        # Then they failed, and are on the tenant's list as hard bounces with the reply
        listed = {s.email: s async for s in client.suppressions()}
        for email in rejected:
            reply = listed[email].reply
            assert listed[email].reason is SuppressionReason.HARD_BOUNCE
            assert reply is not None and (reply.code, reply.enhanced_code) == (550, "5.1.1")
        assert not set(fine) & set(listed)
        # When a second job goes to the same addresses (in another case)
        second = await client.submit(
            CONTENT, [Recipient(e.upper()) for e in rejected] + [Recipient(e) for e in fine]
        )
        again = await client.wait(second.job_id)
        results = [r async for r in client.results(second.job_id)]
    # Then the listed ones end SUPPRESSED without an SMTP transaction; the rest deliver
    assert again.state is JobState.COMPLETED
    assert (again.delivered, again.failed, again.suppressed) == (3, 0, 3)
    by_email = {r.email.lower(): r for r in results}
    for email in rejected:
        r = by_email[email]
        assert r.status is RecipientStatus.SUPPRESSED, r
        assert r.attempts == 0 and r.node_id == "" and r.reason == "suppressed: hard_bounce"
    assert all(by_email[e].status is RecipientStatus.DELIVERED for e in fine)
    assert _delivered_of(reject_cluster, second.job_id) == 3


async def test_manual_suppressions_through_the_sdk(reject_cluster: LocalCluster) -> None:
    async with MailerClient(reject_cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        # Given an unsubscribe added through the SDK (addresses are lower-cased)
        added = await client.suppress("Gone@Manual.example", SuppressionReason.UNSUBSCRIBE)
        assert added.email == "gone@manual.example"
        assert added.reason is SuppressionReason.UNSUBSCRIBE
        # Then a job to it skips it
        job = await client.submit(CONTENT, [Recipient("gone@manual.example")])
        final = await client.wait(job.job_id)
        [result] = [r async for r in client.results(job.job_id)]
        assert final.suppressed == 1 and result.reason == "suppressed: unsubscribe"
        # When it is removed, the next job delivers to it
        assert await client.unsuppress("gone@manual.example") is True
        assert await client.unsuppress("gone@manual.example") is False
        job = await client.submit(CONTENT, [Recipient("gone@manual.example")])
        final = await client.wait(job.job_id)
    assert final.delivered == 1 and final.suppressed == 0


def test_suppression_and_status_through_the_cli(
    reject_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    coordinators = ",".join(reject_cluster.coordinator_addresses)

    def cli(*args: str) -> object:
        capsys.readouterr()
        code = main([*args, "--coordinators", coordinators, "--json"])
        out = capsys.readouterr().out
        assert code == 0, out
        return json.loads(out)

    added = cli("suppression", "add", "cli@manual.example", "--reason", "unsubscribe")
    assert isinstance(added, dict) and added["reason"] == "unsubscribe"
    listed = cli("suppression", "list")
    assert isinstance(listed, list)
    assert any(s["email"] == "cli@manual.example" for s in listed)
    removed = cli("suppression", "remove", "cli@manual.example")
    assert removed == {"email": "cli@manual.example", "removed": True}
    listed = cli("suppression", "list")
    assert isinstance(listed, list)
    assert all(s["email"] != "cli@manual.example" for s in listed)
    # And the status shows every etcd endpoint healthy, one of them the raft leader
    status = cli("status")
    assert isinstance(status, dict)
    members = status["etcd_members"]
    assert len(members) == len(status["etcd_endpoints"]) >= 1
    assert all(m["healthy"] and m["revision"] > 0 and m["db_size_bytes"] > 0 for m in members)
    assert sum(m["is_leader"] for m in members) == 1
