"""Webhooks through the SDK clients and ``mailers webhooks``, against a real cluster with
auth on and a real HTTPS receiver that verifies every delivery with ``standardwebhooks``:
the secret create returns signs a job's events, refused deliveries come again under
their ``webhook-id``, a failing endpoint shows why, replay sends events again, the CLI
prints the secret once, and a tenant sees only its own endpoints.

Each test acts as a tenant of its own, so an endpoint receives only that test's events;
the receiver (one for the module: the coordinators trust its CA from their start) takes
one secret at a time, so each test deletes its endpoint when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from client_sdk import (
    Address,
    AuthError,
    CreatedWebhook,
    EventType,
    MailerClient,
    MessageContent,
    NotFoundError,
    Recipient,
    SyncMailerClient,
    Webhook,
    WebhookState,
)
from coordinator.auth import hash_token, new_token
from mailers.cli import main
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import assert_eventually, wait_nodes_active, wait_until
from tests.integration.conftest import start_cluster
from tests.integration.test_admin_cli import _in_terminal
from tests.integration.test_event_clients import take
from tests.webhook_receiver import Delivery, Receiver, serving

pytestmark = pytest.mark.integration

TOKENS = {tenant: new_token() for tenant in ("acme", "beta", "retry", "failing", "cli")}
ADMIN = new_token()
CONTENT = MessageContent(Address("ops@example.com"), subject="Hi {{ name }}", text_body="Hello")
RECIPIENTS = 10
DEADLINE_S = 90.0
"""How long a job's events may take to reach the receiver (retries included)."""


@pytest.fixture(scope="module")
def receiving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Receiver, Path]]:
    """The HTTPS receiver and its CA file, served for the whole module by an event loop
    of its own in a thread (the tests' loops come and go with each test)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="webhook-receiver", daemon=True)
    thread.start()
    serve = serving(tmp_path_factory.mktemp("receiver"))
    try:
        yield asyncio.run_coroutine_threadsafe(serve.__aenter__(), loop).result(30)
        asyncio.run_coroutine_threadsafe(serve.__aexit__(None, None, None), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, receiving: tuple[Receiver, Path]
) -> Iterator[LocalCluster]:
    """Two coordinators that trust the receiver's CA and retry deliveries within a
    second; auth on, a tenant a test, one admin."""
    auth_file = tmp_path_factory.mktemp("auth") / "auth.json"
    tenants = {tenant: {"tokens": [hash_token(token)]} for tenant, token in TOKENS.items()}
    auth_file.write_text(json.dumps({"tenants": tenants, "admins": [hash_token(ADMIN)]}))
    _, ca_file = receiving
    env = {
        "MAILER_AUTH_FILE": str(auth_file),
        "MAILER_WEBHOOK_CA_FILE": str(ca_file),
        "MAILER_WEBHOOK_RETRY_INITIAL_S": "0.2",
        "MAILER_WEBHOOK_RETRY_MAX_S": "1",
    }
    c = start_cluster(tmp_path_factory.mktemp("webhooks"), ClusterSpec(coordinator_env=env))
    try:
        # A leader that has just won answers UNAVAILABLE until it serves, which a
        # create (not idempotent) would not retry: the tests start once it serves.
        asyncio.run(_serving(c))
        yield c
    finally:
        c.stop()


async def _serving(cluster: LocalCluster) -> None:
    async with MailerClient(cluster.coordinator_addresses, token=ADMIN) as admin:
        await wait_nodes_active(admin, cluster.spec.nodes)


@pytest.fixture
def receiver(receiving: tuple[Receiver, Path]) -> Receiver:
    """The module's receiver with no fault set and its signature count at 0."""
    receiver, _ = receiving
    receiver.refuse, receiver.down, receiver.bad_signatures = 0, False, 0
    return receiver


@contextlib.asynccontextmanager
async def client_of(cluster: LocalCluster, tenant: str) -> AsyncIterator[MailerClient]:
    async with MailerClient(cluster.coordinator_addresses, token=TOKENS[tenant]) as client:
        yield client


@contextlib.asynccontextmanager
async def endpoint(client: MailerClient, receiver: Receiver) -> AsyncIterator[CreatedWebhook]:
    """An endpoint at the receiver, created through the SDK, whose secret the receiver
    verifies with; deleted when the block ends."""
    created = await client.create_webhook(receiver.url)
    receiver.secret = created.secret
    try:
        yield created
    finally:
        await client.delete_webhook(created.webhook.webhook_id)


async def send_job(client: MailerClient, tenant: str) -> str:
    """A job of the tenant's, sent to the end; its id."""
    people = [Recipient(f"u{i}@{tenant}.example", f"U {i}") for i in range(RECIPIENTS)]
    job = await client.submit(CONTENT, people)
    async with asyncio.timeout(DEADLINE_S):
        await client.wait(job.job_id)
    return job.job_id


def of_job(receiver: Receiver, job_id: str) -> list[Delivery]:
    """The deliveries that carried the job's events, accepted or not, in order."""
    return [d for d in list(receiver.deliveries) if any(e["job_id"] == job_id for e in d.events)]


def accepted_ids(receiver: Receiver, job_id: str) -> list[int]:
    """The ids of the job's events the receiver accepted, in the order they came."""
    return [
        e["event_id"]
        for d in of_job(receiver, job_id)
        if d.accepted
        for e in d.events
        if e["job_id"] == job_id
    ]


async def recorded_ids(client: MailerClient, job_id: str) -> list[int]:
    """The ids of the job's events as the event stream gives them: accepted then
    delivered for each recipient."""
    async with client.events(job_ids=[job_id]) as events:
        return [e.event_id for e in await take(events, 2 * RECIPIENTS)]


async def assert_every_event_arrives(
    client: MailerClient, receiver: Receiver, job_id: str
) -> list[int]:
    """Wait until the receiver has accepted each of the job's events, then check that
    it got them once each, in the order of their ids, every delivery signed right.
    Returns the ids."""
    ids = await recorded_ids(client, job_id)
    await assert_eventually(
        lambda: len(accepted_ids(receiver, job_id)) >= len(ids),
        timeout_s=DEADLINE_S, message="the job's events delivered",
    )  # fmt: skip
    assert accepted_ids(receiver, job_id) == ids
    assert receiver.bad_signatures == 0
    return ids


async def listed(client: MailerClient, webhook_id: str) -> Webhook:
    (hook,) = [h for h in await client.webhooks() if h.webhook_id == webhook_id]
    return hook


async def test_the_secret_from_create_verifies_every_event_of_a_job(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    async with client_of(cluster, "acme") as client:
        # Given an endpoint created through the SDK, the receiver verifying with its secret
        async with endpoint(client, receiver) as created:
            hook = created.webhook
            assert created.secret.startswith("whsec_")
            assert created.secret not in repr(created)
            assert (hook.tenant, hook.url, tuple(hook.types)) == ("acme", receiver.url, ())
            assert hook.state is WebhookState.ACTIVE and hook.created_at is not None
            # When a job is sent
            job_id = await send_job(client, "acme")
            # Then every accepted and delivered event arrives, once and in order, signed
            ids = await assert_every_event_arrives(client, receiver, job_id)
            events = [e for d in of_job(receiver, job_id) for e in d.events]
            assert sorted(e["type"] for e in events) == ["accepted"] * 10 + ["delivered"] * 10
            # And the listing shows the endpoint caught up, never failing
            await assert_eventually(
                lambda: _caught_up(client, hook.webhook_id, ids[-1]), timeout_s=DEADLINE_S,
                message="the endpoint's cursor at the job's last event",
            )  # fmt: skip
            shown = await listed(client, hook.webhook_id)
            assert (shown.state, shown.failed_attempts, shown.last_error) == (
                WebhookState.ACTIVE, 0, ""
            )  # fmt: skip
            assert shown.failing_since is None and shown.next_attempt_at is None
        # And once deleted it is listed no more; deleting again is no error
        assert hook.webhook_id not in [h.webhook_id for h in await client.webhooks()]
        await client.delete_webhook(hook.webhook_id)


async def _caught_up(client: MailerClient, webhook_id: str, event_id: int) -> bool:
    return (await listed(client, webhook_id)).delivered_event_id >= event_id


async def test_refused_deliveries_come_again_under_the_same_webhook_id(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    async with client_of(cluster, "retry") as client, endpoint(client, receiver):
        # Given a receiver that refuses the first 3 deliveries
        receiver.refuse = 3
        # When a job is sent
        job_id = await send_job(client, "retry")
        # Then every event still arrives, once and in order
        await assert_every_event_arrives(client, receiver, job_id)
        # And the refused delivery came again, the same events under the same webhook-id
        deliveries = of_job(receiver, job_id)
        refused = [d for d in deliveries if not d.accepted]
        assert len(refused) == 3
        assert len({(d.webhook_id, json.dumps(d.events)) for d in refused}) == 1
        first_accepted = next(d for d in deliveries if d.accepted)
        assert first_accepted.webhook_id == refused[0].webhook_id
        assert first_accepted.events == refused[0].events


async def test_a_failing_endpoint_shows_why_and_a_replay_sends_again(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    async with client_of(cluster, "failing") as client, endpoint(client, receiver) as created:
        hook = created.webhook
        # Given a receiver that answers 503 to everything
        receiver.down = True
        # When a job is sent
        job_id = await send_job(client, "failing")
        ids = await recorded_ids(client, job_id)

        async def failing() -> bool:
            shown = await listed(client, hook.webhook_id)
            return shown.state is WebhookState.FAILING and shown.failed_attempts >= 2

        # Then the listing shows the endpoint failing, since when, why and until when
        await assert_eventually(failing, timeout_s=DEADLINE_S, message="the endpoint failing")
        shown = await listed(client, hook.webhook_id)
        assert shown.last_error == "HTTP 503"
        assert shown.failing_since is not None and shown.next_attempt_at is not None
        assert shown.next_attempt_at >= shown.failing_since
        assert accepted_ids(receiver, job_id) == []
        # When the receiver is back, the backlog arrives and the endpoint is active again
        receiver.down = False
        await assert_eventually(
            lambda: accepted_ids(receiver, job_id) == ids, timeout_s=DEADLINE_S,
            message="the backlog delivered",
        )  # fmt: skip
        await assert_eventually(
            lambda: _caught_up(client, hook.webhook_id, ids[-1]), timeout_s=DEADLINE_S,
            message="the endpoint caught up",
        )  # fmt: skip
        # And a replay from the 10th event sends every later one again
        replayed = await client.replay_webhook(hook.webhook_id, from_event_id=ids[9])
        assert replayed.delivered_event_id == ids[9]
        assert replayed.state is WebhookState.ACTIVE and replayed.failed_attempts == 0
        await assert_eventually(
            lambda: accepted_ids(receiver, job_id) == ids + ids[10:], timeout_s=DEADLINE_S,
            message="the events after the 10th sent again",
        )  # fmt: skip
        assert receiver.bad_signatures == 0
        # And a replay of an unknown endpoint is refused, a negative cursor at once
        with pytest.raises(NotFoundError):
            await client.replay_webhook("wh_0000000000000000")
        with pytest.raises(ValueError):
            await client.replay_webhook(hook.webhook_id, from_event_id=-1)


async def test_a_tenant_sees_and_changes_only_its_own_endpoints(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    addresses = cluster.coordinator_addresses
    async with (
        client_of(cluster, "acme") as acme,
        client_of(cluster, "beta") as beta,
        MailerClient(addresses, token=ADMIN) as admin,
        endpoint(acme, receiver) as created,
    ):
        hook = created.webhook
        # Given an endpoint of acme's: beta's listing does not show it
        assert hook.webhook_id not in [h.webhook_id for h in await beta.webhooks()]
        # And beta may not name acme's tenant
        with pytest.raises(AuthError):
            await beta.webhooks(tenant="acme")
        with pytest.raises(AuthError):
            await beta.create_webhook(receiver.url, tenant="acme")
        # And beta's replay of it is a missing endpoint's, its delete does nothing
        with pytest.raises(NotFoundError):
            await beta.replay_webhook(hook.webhook_id)
        await beta.delete_webhook(hook.webhook_id)
        assert [h.webhook_id for h in await acme.webhooks()] == [hook.webhook_id]
        # While an admin sees it by naming the tenant
        assert [h.webhook_id for h in await admin.webhooks(tenant="acme")] == [hook.webhook_id]


def test_the_sync_client_lists_and_replays(cluster: LocalCluster, receiver: Receiver) -> None:
    with SyncMailerClient(cluster.coordinator_addresses, token=TOKENS["beta"]) as client:
        created = client.create_webhook(receiver.url, types=[EventType.DELIVERED])
        try:
            assert [h.webhook_id for h in client.webhooks()] == [created.webhook.webhook_id]
            assert tuple(client.webhooks()[0].types) == (EventType.DELIVERED,)
            replayed = client.replay_webhook(created.webhook.webhook_id)
            assert replayed.state is WebhookState.ACTIVE
        finally:
            client.delete_webhook(created.webhook.webhook_id)
        assert client.webhooks() == []


# ---- mailers webhooks ---------------------------------------------------------------


def _cli(cluster: LocalCluster, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[Any, str]:
    """What ``mailers webhooks ARGS --json`` prints on stdout, parsed, and on stderr."""
    capsys.readouterr()
    addresses = ",".join(cluster.coordinator_addresses)
    code = main(["webhooks", *args, "--json", "--coordinators", addresses])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_the_cli_creates_lists_replays_and_deletes(
    cluster: LocalCluster,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILER_TOKEN", TOKENS["cli"])
    addresses = ",".join(cluster.coordinator_addresses)
    # When an endpoint of delivered events is created with -o json
    created, err = _cli(cluster, capsys, "create", receiver.url, "--type", "delivered")
    # Then the document holds the endpoint and its secret, and stderr says it is shown once
    secret, hook = created["secret"], created["webhook"]
    assert secret.startswith("whsec_") and secret not in err
    assert "shown only now" in err
    assert (hook["url"], hook["types"], hook["state"]) == (receiver.url, ["delivered"], "active")
    webhook_id = hook["webhook_id"]
    receiver.secret = secret
    try:
        # When a job is sent, the receiver gets its deliveries only, signed with that secret
        with SyncMailerClient(cluster.coordinator_addresses, token=TOKENS["cli"]) as client:
            job = client.submit(CONTENT, [Recipient(f"c{i}@cli.example") for i in range(4)])
            client.wait(job.job_id)
        wait_until(lambda: len(accepted_ids(receiver, job.job_id)) >= 4, DEADLINE_S, "4 deliveries")
        delivered = accepted_ids(receiver, job.job_id)
        assert len(delivered) == 4 and receiver.bad_signatures == 0

        # Then the listing shows the endpoint, caught up to the last delivery
        def caught_up() -> bool:
            (shown,) = _cli(cluster, capsys, "list")[0]
            return bool(shown["delivered_event_id"] >= delivered[-1])

        wait_until(caught_up, DEADLINE_S, "the endpoint caught up")
        (shown,) = _cli(cluster, capsys, "list")[0]
        assert (shown["webhook_id"], shown["state"], shown["failed_attempts"]) == (
            webhook_id, "active", 0
        )  # fmt: skip
        assert "secret" not in shown and secret not in json.dumps(shown)
        # And an 80-column terminal shows the whole id and URL
        table = _in_terminal(["webhooks", "list", "--coordinators", addresses])
        assert webhook_id in table and receiver.url in table and "…" not in table
        assert secret not in table
        # When the deliveries are replayed from the first one
        replayed, _ = _cli(cluster, capsys, "replay", webhook_id, "--from", str(delivered[0]))
        assert (replayed["delivered_event_id"], replayed["state"]) == (delivered[0], "active")
        # Then the later ones come again
        wait_until(
            lambda: accepted_ids(receiver, job.job_id) == delivered + delivered[1:],
            DEADLINE_S, "3 deliveries again",
        )  # fmt: skip
    finally:
        # And delete removes it
        deleted, _ = _cli(cluster, capsys, "delete", webhook_id)
    assert deleted == {"webhook_id": webhook_id, "deleted": True}
    assert _cli(cluster, capsys, "list")[0] == []
    # And an unknown endpoint's replay fails with exit status 1, the error on stderr
    code = main(["webhooks", "replay", webhook_id, "--coordinators", addresses])
    captured = capsys.readouterr()
    assert code == 1 and "NotFoundError" in captured.err and captured.out == ""
