"""Webhook deliveries from the store to a real HTTPS receiver: signed per Standard
Webhooks (verified by the ``standardwebhooks`` package), retried with the same
``webhook-id``, disabled after the retry horizon with the backlog kept, replayed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from coordinator.backoff import BackoffPolicy
from coordinator.db.store import Database, QuotaRequest, Store
from coordinator.model import EventType, Recipient, RecipientOutcome, Result, Status
from coordinator.webhook_sender import WebhookSender
from coordinator.webhooks import Webhook, WebhookConfig, WebhookState, new_secret
from tests.helpers import assert_eventually
from tests.integration.test_store import NOW, leader, spec
from tests.webhook_receiver import Receiver, serving

RECIPIENTS = 250
"""With 250 accepted and 250 delivered events, and batches of 100: five deliveries."""


async def recipients(n: int) -> AsyncIterator[list[Recipient]]:
    yield [Recipient(f"u{i}@example.org", "", {}, {"crm": str(i)}) for i in range(n)]


async def send_job(store: Store) -> list[int]:
    """A job sent in full: its recipients accepted, then delivered. Returns the event ids."""
    record = await store.submit(
        spec("j1", "k1", batch_size=50), recipients(RECIPIENTS), QuotaRequest(), NOW
    )
    n = record.job_no
    await store.assign([(n, seq, "n1", 1) for seq in range(5)], [], {n: 5}, NOW)
    result = Result(Status.DELIVERED, 250, "2.0.0", "ok", attempts=1, node_id="n1")
    outcomes = [RecipientOutcome("j1", i, result) for i in range(RECIPIENTS)]
    await store.write(outcomes, (), (), (), lambda r, d: NOW, NOW)
    return [e.event_id for e in await store.events("acme", 0, 10_000)]


def config(ca: Path, **kw: object) -> WebhookConfig:
    fast = BackoffPolicy(initial=timedelta(seconds=0.05), maximum=timedelta(seconds=0.2))
    return dataclasses.replace(WebhookConfig(retry=fast, ca_file=str(ca)), **kw)  # type: ignore[arg-type]


async def endpoint(store: Store, receiver: Receiver, *types: EventType) -> Webhook:
    receiver.secret = new_secret()
    hook = Webhook("wh_test", "acme", receiver.url, tuple(types), NOW, cursor=0)
    return await store.create_webhook(hook, receiver.secret, limit=5)


@contextlib.asynccontextmanager
async def sending(store: Store, cfg: WebhookConfig) -> AsyncIterator[None]:
    task = asyncio.create_task(WebhookSender(store, cfg, rng=random.Random(7)).run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def state(store: Store) -> Webhook:
    (hook,) = await store.webhooks("acme")
    return hook


async def test_refused_deliveries_come_again_with_their_id(
    database: Database, tmp_path: Path
) -> None:
    store = await leader(database, 1)
    async with serving(tmp_path) as (receiver, ca):
        await endpoint(store, receiver)
        ids = await send_job(store)
        # Given a receiver that refuses the first 3 deliveries
        receiver.refuse = 3
        # When the sender runs
        async with sending(store, config(ca)):
            await assert_eventually(
                lambda: len(receiver.accepted_events) >= len(ids), timeout_s=60,
                message="every event delivered",
            )  # fmt: skip
            # The receiver holds the last events before its answer reaches the sender,
            # which moves the cursor only then.
            await assert_eventually(
                lambda: _caught_up(store), timeout_s=30, message="cursor at the last event"
            )
            hook = await state(store)
    # Then every event arrived once, in order, each delivery signed
    assert [e["event_id"] for e in receiver.accepted_events] == ids
    assert receiver.bad_signatures == 0
    # And the refused delivery came again under the same webhook-id
    refused = [d for d in receiver.deliveries if not d.accepted]
    assert len(refused) == 3
    assert len({d.webhook_id for d in refused}) == 1
    retried = next(d for d in receiver.deliveries if d.accepted)
    assert retried.webhook_id == refused[0].webhook_id
    assert retried.events == refused[0].events
    # And events carry what the caller attached; the endpoint is caught up
    assert receiver.accepted_events[-1]["metadata"] == {"crm": str(RECIPIENTS - 1)}
    assert (hook.cursor, hook.state, hook.attempts) == (ids[-1], WebhookState.ACTIVE, 0)


async def test_an_endpoint_down_past_the_horizon_keeps_its_backlog(
    database: Database, tmp_path: Path
) -> None:
    store = await leader(database, 1)
    async with serving(tmp_path) as (receiver, ca):
        await endpoint(store, receiver)
        ids = await send_job(store)
        # Given a receiver down for longer than the retry horizon
        receiver.down = True
        async with sending(store, config(ca, horizon_s=1.0)):
            await assert_eventually(
                lambda: _disabled(store), timeout_s=60, message="the endpoint disabled"
            )
            # Then the endpoint is disabled with nothing acknowledged
            hook = await state(store)
            assert hook.cursor == 0 and hook.last_error == "HTTP 503"
            assert receiver.accepted_events == []
            # When it is back and replayed
            receiver.down = False
            await store.replay_webhook("acme", hook.webhook_id, 0)
            await assert_eventually(
                lambda: len(receiver.accepted_events) >= len(ids), timeout_s=60,
                message="the backlog delivered",
            )  # fmt: skip
    # Then the whole backlog arrives, in order
    assert [e["event_id"] for e in receiver.accepted_events] == ids


async def test_an_endpoint_gets_only_its_types(database: Database, tmp_path: Path) -> None:
    store = await leader(database, 1)
    async with serving(tmp_path) as (receiver, ca):
        await endpoint(store, receiver, EventType.DELIVERED)
        await send_job(store)
        async with sending(store, config(ca)):
            await assert_eventually(
                lambda: len(receiver.accepted_events) >= RECIPIENTS, timeout_s=60,
                message="the delivered events",
            )  # fmt: skip
            await assert_eventually(
                lambda: _caught_up(store), timeout_s=30, message="cursor at the last event"
            )
    assert {e["type"] for e in receiver.accepted_events} == {"delivered"}
    assert len(receiver.accepted_events) == RECIPIENTS


async def _disabled(store: Store) -> bool:
    return (await state(store)).state is WebhookState.DISABLED


async def _caught_up(store: Store) -> bool:
    return (await state(store)).cursor == await store.last_event()
