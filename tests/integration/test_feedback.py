"""What comes back, on a cluster of real processes with TLS: bounces and complaints
sent over SMTP to a coordinator's inbound endpoint, one-click unsubscribes POSTed to
its HTTPS endpoint. Each lands as an event and a suppression that later jobs honour;
forged tokens and foreign domains change nothing."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from client_sdk import (
    Address,
    DeliveryEvent,
    EventType,
    MailerClient,
    MessageContent,
    Recipient,
    RecipientStatus,
)
from coordinator.auth import hash_token
from mailers_dev.cluster import BOUNCE_DOMAIN, ClusterSpec, LocalCluster
from mailers_dev.feedback import arf, dsn, one_click, send_back, stored, unsubscribe_link
from tests.bounce_samples import Samples
from tests.helpers import wait_nodes_active
from tests.integration.conftest import start_cluster
from tests.unit.test_bounces import DATA, REAL_WORLD

pytestmark = pytest.mark.integration

CONTENT = MessageContent(Address("news@example.com"), subject="Hi", text_body="Hello")
PEOPLE = [f"p{i}@feedback.example" for i in range(6)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("feedback"), ClusterSpec(tls=True, nodes=1))
    yield c
    c.stop()


def sent(cluster: LocalCluster) -> dict[str, tuple[str, EmailMessage]]:
    return stored(cluster.sink_log, cluster.maildir)


async def deliver(cluster: LocalCluster, rcpt: str, raw: bytes) -> None:
    await send_back(cluster.inbound_ports[1], rcpt, raw)


async def events_of(client: MailerClient, job_id: str, n: int) -> list[DeliveryEvent]:
    got: list[DeliveryEvent] = []
    async with asyncio.timeout(60):
        async with client.events(job_ids=[job_id]) as stream:
            async for event in stream:
                got.append(event)
                if len(got) >= n:
                    return got
    return got


async def test_bounces_complaints_and_unsubscribes_come_back(cluster: LocalCluster) -> None:
    async with cluster.client() as client:
        await wait_nodes_active(client, 1)
        job = await client.submit(CONTENT, [Recipient(p) for p in PEOPLE])
        await client.wait(job.job_id)
        out = sent(cluster)
        # Each message went out with a VERP envelope sender and a one-click link
        verp = {p: out[p][0] for p in PEOPLE}
        assert all(v.startswith("bounces+") for v in verp.values())
        assert all(v.endswith(f"@{BOUNCE_DOMAIN}") for v in verp.values())
        unsubscribe = {p: unsubscribe_link(out[p][1]) for p in PEOPLE}
        assert out[PEOPLE[0]][1]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        # When p0 bounces (to its VERP address), p1 complains (to a feedback address,
        # by Message-ID), p2's bounce comes with an altered token, p3 unsubscribes twice
        ids = {p: str(out[p][1]["Message-ID"]) for p in PEOPLE}
        await deliver(cluster, verp[PEOPLE[0]], dsn(PEOPLE[0], "5.1.1", ids[PEOPLE[0]]))
        await deliver(cluster, f"fbl@{BOUNCE_DOMAIN}", arf(PEOPLE[1], ids[PEOPLE[1]]))
        local, _, domain = verp[PEOPLE[2]].partition("@")
        forged = f"{local[:-1]}{'b' if local[-1] == 'a' else 'a'}@{domain}"  # one letter of the tag
        await deliver(cluster, forged, dsn(PEOPLE[2], "5.1.1", ids[PEOPLE[2]]))
        ca = cluster.pki_dir / "ca.crt"
        status, page = await one_click(unsubscribe[PEOPLE[3]], ca, method="GET")
        assert status == 200 and "<form" in page
        for _ in range(2):
            assert (await one_click(unsubscribe[PEOPLE[3]], ca))[0] == 200
        assert (await one_click(unsubscribe[PEOPLE[4]][:-3] + "aaa", ca))[0] == 404
        # And mail for another domain is refused
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await deliver(cluster, "someone@elsewhere.example", b"Subject: x\r\n\r\nx\r\n")
        # And last, p5's soft bounce: once its event is there, all before it were applied
        await deliver(cluster, verp[PEOPLE[5]], dsn(PEOPLE[5], "4.2.2", ids[PEOPLE[5]]))
        events = await events_of(client, job.job_id, 2 * len(PEOPLE) + 4)
        # Then one event per real report, none for the forgery or the repeated unsubscribe
        first = (EventType.ACCEPTED, EventType.DELIVERED)
        later = [(e.email, e.type) for e in events if e.type not in first]
        assert later == [
            (PEOPLE[0], EventType.BOUNCED), (PEOPLE[1], EventType.COMPLAINED),
            (PEOPLE[3], EventType.UNSUBSCRIBED), (PEOPLE[5], EventType.BOUNCED),
        ]  # fmt: skip
        bounced = next(e for e in events if e.type is EventType.BOUNCED)
        assert bounced.reply is not None and bounced.reply.enhanced_code == "5.1.1"
        # And the recipients' results say what came back
        marks = {r.email: r.feedback async for r in client.results(job.job_id)}
        assert marks == {
            PEOPLE[0]: "hard_bounce", PEOPLE[1]: "complaint", PEOPLE[2]: "",
            PEOPLE[3]: "unsubscribe", PEOPLE[4]: "", PEOPLE[5]: "soft_bounce",
        }  # fmt: skip
        # And a later job of the tenant skips exactly those three addresses
        again = await client.submit(CONTENT, [Recipient(p) for p in PEOPLE])
        await client.wait(again.job_id)
        statuses = {r.email: r.status async for r in client.results(again.job_id)}
    suppressed = {p for p, s in statuses.items() if s is RecipientStatus.SUPPRESSED}
    assert suppressed == {PEOPLE[0], PEOPLE[1], PEOPLE[3]}


async def test_real_world_reports_over_smtp_mark_and_suppress_their_recipients(
    cluster: LocalCluster, flufl_samples: Samples
) -> None:
    # Given real bounces from many MTAs (up to three per MTA naming one address), the
    # hand-written DSNs and ARF reports, and a job sent to the addresses they report
    chosen = _real_world_choice(flufl_samples)
    assert len(chosen) >= 20 and len({group for group, *_ in chosen}) >= 10
    chosen += [
        ("hand-written", DATA / name, address, verdict) for name, address, verdict in HAND_WRITTEN
    ]
    addresses = sorted({address for _, _, address, _ in chosen})
    async with cluster.client() as client:
        await wait_nodes_active(client, 1)
        job = await client.submit(CONTENT, [Recipient(a) for a in [*addresses, MARKER]])
        await client.wait(job.job_id)
        verp = {rcpt: sender for rcpt, (sender, _) in sent(cluster).items()}
        # When each report comes back to its recipient's VERP address over SMTP
        for _, path, address, _ in chosen:
            await deliver(cluster, verp[address], path.read_bytes())
        await deliver(cluster, verp[MARKER], dsn(MARKER, "4.2.2", "<marker@example.com>"))
        await events_of(client, job.job_id, 2 * (len(addresses) + 1) + len(chosen) + 1)
        # Then each marks its recipient with its verdict (flufl.bounce's, for its samples)
        marks = {r.email: r.feedback async for r in client.results(job.job_id)}
        for group, path, address, verdict in chosen:
            assert marks[address] == verdict, (group, path.name, address)
        # And a later job of the tenant skips exactly the hard bounces and complaints
        again = await client.submit(CONTENT, [Recipient(a) for a in addresses])
        await client.wait(again.job_id)
        statuses = {r.email: r.status async for r in client.results(again.job_id)}
    listed = {address for _, _, address, verdict in chosen if verdict != "soft_bounce"}
    assert {a for a, s in statuses.items() if s is RecipientStatus.SUPPRESSED} == listed
    print(f"reports over SMTP: {len(chosen)} ({len(listed)} suppressing)")


MARKER = "marker@feedback.example"
_PLAIN_ADDRESS = re.compile(r"\A[a-z0-9._%+-]+@[a-z0-9-]+(\.[a-z0-9-]+)+\Z")
HAND_WRITTEN = [
    ("dsn_permanent.eml", "louisl@example.net", "hard_bounce"),
    ("dsn_delayed.eml", "thomas@example.org", "soft_bounce"),
    ("dsn_multi_recipient.eml", "arathib@example.com", "hard_bounce"),
    ("arf_rfc5965.eml", "user@example.com", "complaint"),
    ("arf_abuse_rcpt_to.eml", "marie.curie@isp.example.net", "complaint"),
    ("arf_abuse_original_to.eml", "ada@mail.example.org", "complaint"),
    ("arf_fraud.eml", "customer@bank.example", "complaint"),
    ("arf_yahoo_style.eml", "grace.hopper@yahoo.com", "complaint"),
]
"""Hand-written reports (tests/data/bounces), the address each names and its verdict."""


def _real_world_choice(samples: Samples) -> list[tuple[str, Path, str, str]]:
    """(MTA group, sample, its one address, verdict) for up to three samples per group."""
    chosen: list[tuple[str, Path, str, str]] = []
    seen: set[str] = set()
    for group, names in REAL_WORLD.items():
        picked = 0
        for name in names:
            expected = samples.expected[name]
            (address, *more) = sorted(expected.addresses) or [""]
            if more or not _PLAIN_ADDRESS.match(address) or address in seen or picked == 3:
                continue
            seen.add(address)
            verdict = "hard_bounce" if expected.hard else "soft_bounce"
            chosen.append((group, samples.data / name, address, verdict))
            picked += 1
    return chosen


async def test_a_tenants_own_bounce_domain(tmp_path: Path) -> None:
    # Given a tenant whose auth entry names its own bounce domain
    token, admin = "mlr_" + "b" * 43, "mlr_" + "a" * 43
    auth_file = tmp_path / "auth.json"
    tenant = {"tokens": [hash_token(token)], "bounce_domain": "bounces.beta.example"}
    auth_file.write_text(json.dumps({"tenants": {"beta": tenant}, "admins": [hash_token(admin)]}))
    spec = ClusterSpec(nodes=1, coordinator_env={"MAILER_AUTH_FILE": str(auth_file)})
    cluster = start_cluster(tmp_path / "c", spec)
    try:
        async with MailerClient(cluster.coordinator_addresses, token=admin) as operator:
            await wait_nodes_active(operator, 1)
        async with MailerClient(cluster.coordinator_addresses, token=token) as client:
            # When it sends, and a message bounces to the envelope sender it had
            job = await client.submit(CONTENT, [Recipient(PEOPLE[0])])
            await client.wait(job.job_id)
            envelope_from, message = sent(cluster)[PEOPLE[0]]
            await deliver(
                cluster, envelope_from, dsn(PEOPLE[0], "5.1.1", str(message["Message-ID"]))
            )
            events = await events_of(client, job.job_id, 3)
            listed = [s.email async for s in client.suppressions()]
    finally:
        cluster.stop()
    # Then its VERP addresses are on its domain, the endpoint took the bounce, and the
    # address is on its list
    assert envelope_from.startswith("bounces+") and envelope_from.endswith("@bounces.beta.example")
    assert [e.type for e in events][-1] is EventType.BOUNCED
    assert listed == [PEOPLE[0]]
