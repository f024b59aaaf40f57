"""End to end on real processes: etcd, two coordinators, three sender nodes, an SMTP sink.

Submissions go through the SDK, the ground truth is the sink's log of every accepted
recipient with the Message-ID it carried.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from client_sdk import (
    Address,
    JobOptions,
    JobState,
    MailerClient,
    MessageContent,
    Recipient,
    RecipientStatus,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from mailers_dev.cluster import LocalCluster
from mailers_runtime.etcd import connect
from tests.helpers import wait_nodes_active

pytestmark = pytest.mark.integration

CONTENT = MessageContent(
    sender=Address("news@example.com", "Example News"),
    subject="Hello {{ name }}",
    text_body="Hi {{ name }}, your code is {{ code }}.",
    html_body="<p>Hi <b>{{ name }}</b>, your code is {{ code }}.</p>",
)


def recipients(n: int, domain: str = "example.org") -> list[Recipient]:
    return [Recipient(f"user{i}@{domain}", f"User {i}", {"code": f"C{i:05d}"}) for i in range(n)]


def message_ids(cluster: LocalCluster, job_id: str) -> collections.Counter[str]:
    return collections.Counter(
        str(line["message_id"])
        for line in cluster.delivered()
        if str(line["message_id"]).startswith(f"<{job_id}.")
    )


async def test_thousand_recipients_arrive_exactly_once(cluster: LocalCluster) -> None:
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        # When 1,000 recipients are submitted through the SDK
        job = await client.submit(CONTENT, recipients(1000))
        final = await client.wait(job.job_id)
        # Then the job completes with every recipient delivered
        assert final.state is JobState.COMPLETED
        assert (final.delivered, final.failed, final.queued, final.deferred) == (1000, 0, 0, 0)
        # And the sink holds each Message-ID exactly once
        ids = message_ids(cluster, job.job_id)
        assert len(ids) == 1000
        assert max(ids.values()) == 1
        assert set(ids) == {f"<{job.job_id}.{i}@example.com>" for i in range(1000)}
        # And the per-recipient results say which node sent each; all nodes got work
        shares: collections.Counter[str] = collections.Counter()
        async for result in client.results(job.job_id):
            assert result.status is RecipientStatus.DELIVERED
            assert result.reply is not None and result.reply.code == 250
            shares[result.node_id] += 1
        assert sum(shares.values()) == 1000
        assert len(shares) == 3, shares


async def test_messages_are_personalised(cluster: LocalCluster) -> None:
    async with MailerClient(cluster.coordinator_addresses) as client:
        job = await client.submit(CONTENT, recipients(3, "personal.example"))
        final = await client.wait(job.job_id)
        assert final.delivered == 3
    files = [p for p in (cluster.maildir / "new").iterdir() if job.job_id in p.read_text()]
    assert len(files) == 3
    bodies = "\n".join(p.read_text() for p in files)
    assert "Subject: Hello User 1" in bodies
    assert "C00002" in bodies


async def test_idempotent_resubmit_creates_no_second_job(cluster: LocalCluster) -> None:
    async with MailerClient(cluster.coordinator_addresses) as client:
        first = await client.submit(CONTENT, recipients(5, "idem.example"), idempotency_key="k-1")
        again = await client.submit(CONTENT, recipients(5, "idem.example"), idempotency_key="k-1")
        assert first.created is True and again.created is False
        assert again.job_id == first.job_id
        await client.wait(first.job_id)
    assert len(message_ids(cluster, first.job_id)) == 5


async def test_deferred_recipients_fail_with_last_reply_when_the_job_expires(
    cluster: LocalCluster,
) -> None:
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 1)
        # Given a job whose relay defers two recipients and which expires in 4 s
        expires = datetime.now(UTC) + timedelta(seconds=4)
        job = await client.submit(
            CONTENT,
            [*recipients(3, "ok.example"), *recipients(2, "tempfail.example")],
            options=JobOptions(expires_at=expires),
        )
        final = await client.wait(job.job_id)
        # Then the others are delivered and the deferred ones fail after expiry
        assert final.state is JobState.COMPLETED
        assert (final.delivered, final.failed) == (3, 2)
        assert final.finished_at is not None and final.finished_at >= expires
        failed = [r async for r in client.results(job.job_id, statuses=[RecipientStatus.FAILED])]
    assert {r.email for r in failed} == {"user0@tempfail.example", "user1@tempfail.example"}
    for r in failed:
        assert r.reply is not None and r.reply.code == 451, r
        assert "expired" in r.reason
        assert r.attempts >= 2


def _no_recipients(r: coordinator_pb2.SubmitJobRequest) -> None:
    r.ClearField("recipients")


def _bad_address(r: coordinator_pb2.SubmitJobRequest) -> None:
    r.recipients.add(email="not-an-address")


def _no_subject_no_text(r: coordinator_pb2.SubmitJobRequest) -> None:
    r.content.subject = ""
    r.content.text_body = ""


def _no_body(r: coordinator_pb2.SubmitJobRequest) -> None:
    r.content.text_body = ""
    r.content.html_body = ""


def _big_metadata(r: coordinator_pb2.SubmitJobRequest) -> None:
    r.recipients[1].metadata.update({f"k{i}": "v" * 100 for i in range(12)})


def _control_in_a_tag(r: coordinator_pb2.SubmitJobRequest) -> None:
    r.options.tags.extend(["ok", "bad\ntag"])


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_no_recipients, "recipients"),
        (_bad_address, "recipients[2].email"),
        (_no_subject_no_text, "content.subject"),
        (_no_body, "content.text_body"),
        (_big_metadata, "recipients[1].metadata"),
        (_control_in_a_tag, "options.tags[1]"),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_stored(
    cluster: LocalCluster,
    mutate: Callable[[coordinator_pb2.SubmitJobRequest], None],
    field: str,
) -> None:
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 1)
        leader = client.leader
    etcd = connect(cluster.etcd.endpoints)
    before = len(await etcd.get_prefix(b"/mailers/"))
    request = coordinator_pb2.SubmitJobRequest(
        idempotency_key=f"bad-{field}",
        recipients=[
            common_pb2.Recipient(email="a@example.com"),
            common_pb2.Recipient(email="b@example.com"),
        ],
    )
    getattr(request.content, "from").email = "news@example.com"
    request.content.subject = "s"
    request.content.text_body = "t"
    request.content.html_body = "<p>h</p>"
    mutate(request)
    async with grpc.aio.insecure_channel(leader) as channel:
        stub = coordinator_pb2_grpc.MailerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitJob(request, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    after = len(await etcd.get_prefix(b"/mailers/"))
    assert await etcd.get(f"/mailers/idem/bad-{field}".encode()) is None
    assert after == before
    await etcd.close()


# A leader or a node SIGKILLed mid-job: tests/chaos/test_process_kills.py and
# test_takeover.py, which also count every message at the sink against ambiguous accepts.


async def test_attachment_reaches_every_recipient(cluster: LocalCluster) -> None:
    import email
    import email.policy

    from client_sdk import Attachment

    pdf = b"%PDF-1.4\n% a tiny test document\n%%EOF\n"
    content = MessageContent(
        sender=Address("news@example.com"),
        subject="Your invoice, {{ name }}",
        text_body="Attached.",
        attachments=[Attachment("facture-été.pdf", "application/pdf", pdf)],
    )
    async with MailerClient(cluster.coordinator_addresses) as client:
        job = await client.submit(content, recipients(2, "attach.example"))
        final = await client.wait(job.job_id)
        assert final.delivered == 2
    files = [p for p in (cluster.maildir / "new").iterdir() if job.job_id in p.read_text()]
    assert len(files) == 2
    for path in files:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        parts = [p for p in message.walk() if p.get_content_disposition() == "attachment"]
        assert len(parts) == 1
        assert parts[0].get_filename() == "facture-été.pdf"
        assert parts[0].get_content_type() == "application/pdf"
        assert parts[0].get_content() == pdf


@pytest.mark.parametrize("per_message", [1, 25])
async def test_metadata_and_tags_come_back_with_results_and_the_job(
    cluster: LocalCluster, per_message: int
) -> None:
    # Given recipients carrying the caller's own ids (every third none), a tagged job,
    # personalised or sharing messages (stored in send order: the metadata follows)
    content = dataclasses.replace(CONTENT, recipients_per_message=per_message)
    if per_message > 1:
        content = dataclasses.replace(content, subject="Notice", text_body="Hi all",
                                      html_body="")  # fmt: skip
    people = [
        Recipient(f"m{i}@{'zb' if i % 2 else 'ya'}.example", metadata={} if i % 3 == 0
                  else {"customer": f"C-{i:04d}", "list.id": "spring"})
        for i in range(40)
    ]  # fmt: skip
    options = JobOptions(name="spring", tags=("newsletter", "2026-12"))
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 1)
        job = await client.submit(content, people, options=options)
        await client.wait(job.job_id)
        # Then the job keeps its tags, and each result its recipient's metadata and the
        # Message-ID the sink saw
        assert tuple((await client.get(job.job_id)).options.tags) == ("newsletter", "2026-12")
        results = [r async for r in client.results(job.job_id)]
    assert sorted(r.index for r in results) == list(range(40))
    sent = {str(line["message_id"]) for line in cluster.delivered()}
    for r in results:
        assert dict(r.metadata) == dict(people[r.index].metadata), r
        assert r.email == people[r.index].email
        assert r.message_id in sent, r


async def test_a_shared_message_goes_to_many_recipients_per_transaction(
    cluster: LocalCluster,
) -> None:
    # Given a notice that is the same for everyone, 25 recipients per message allowed
    notice = MessageContent(
        sender=Address("ops@example.com", "Ops"),
        subject="Maintenance tonight",
        text_body="The service is down from 22:00 to 23:00 UTC.",
        recipients_per_message=25,
    )
    people = [Recipient(f"a{i}@a.example") for i in range(60)]
    people += [Recipient(f"b{i}@b.example") for i in range(60)]
    async with MailerClient(cluster.coordinator_addresses) as client:
        await wait_nodes_active(client, 3)
        job = await client.submit(notice, people)
        final = await client.wait(job.job_id)
    # Then everyone got it, exactly once
    assert final.state is JobState.COMPLETED and final.delivered == 120
    lines = [
        line
        for line in cluster.delivered()
        if str(line["message_id"]).startswith(f"<{job.job_id}.g")
    ]
    assert sorted(str(line["rcpt"]) for line in lines) == sorted(p.email for p in people)
    # And messages were shared: at most 25 recipients each, one domain each
    by_message: dict[str, set[str]] = collections.defaultdict(set)
    for line in lines:
        by_message[str(line["message_id"])].add(str(line["rcpt"]))
    assert len(by_message) < 120
    for rcpts in by_message.values():
        assert len(rcpts) <= 25
        assert len({r.rpartition("@")[2] for r in rcpts}) == 1
