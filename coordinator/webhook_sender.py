"""The leader's webhook deliveries: events after each endpoint's cursor, POSTed over
HTTP(S) with aiohttp, the outcome written back fenced (see :mod:`coordinator.webhooks`
for the payload, the signature and the retry rules).

Every :data:`POLL_S` the sender reads the enabled endpoints and starts one delivery
for each that is due and has none in flight. A delivery fixes its events before the
first attempt, so a retry (here or on the next leader) sends the same events under the
same ``webhook-id``: at least once, in order per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import ssl
import time
from collections.abc import Callable

import aiohttp

from coordinator.db.store import LostLeadership, Store, StoreUnavailable
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Event
from coordinator.webhooks import Webhook, WebhookConfig, WebhookState, body, failed, headers
from coordinator.webhooks import message_id as webhook_message_id

log = logging.getLogger(__name__)

POLL_S = 0.5
"""How often endpoints are checked for due deliveries."""
MAX_IN_FLIGHT = 32
"""Deliveries at once, over all endpoints."""
_STATE_VALUE = {WebhookState.ACTIVE: 0, WebhookState.FAILING: 1, WebhookState.DISABLED: 2}


class WebhookSender:
    def __init__(
        self,
        store: Store,
        config: WebhookConfig,
        metrics: CoordinatorMetrics | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Deliver until cancelled. A lost fence ends the reign (it propagates)."""
        connector = aiohttp.TCPConnector(ssl=self._ssl_context(), limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                while True:
                    await self._start_due(session)
                    await asyncio.sleep(POLL_S)
            finally:
                for task in self._in_flight.values():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self._config.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def _start_due(self, session: aiohttp.ClientSession) -> None:
        for webhook_id, task in list(self._in_flight.items()):
            if task.done():
                del self._in_flight[webhook_id]
                task.result()  # a lost fence ends the reign here
        try:
            hooks = await self._store.webhooks()
        except StoreUnavailable as exc:
            log.warning("webhooks: %s; trying again shortly", exc)
            return
        now = self._clock()
        for hook in hooks:
            if self._metrics is not None:
                self._metrics.webhook_failing.labels(hook.webhook_id).set(_STATE_VALUE[hook.state])
            busy = hook.webhook_id in self._in_flight
            if hook.due(now) and not busy and len(self._in_flight) < MAX_IN_FLIGHT:
                self._in_flight[hook.webhook_id] = asyncio.create_task(
                    self._deliver(session, hook), name=f"webhook-{hook.webhook_id}"
                )

    async def _deliver(self, session: aiohttp.ClientSession, hook: Webhook) -> None:
        """Deliver ``hook``'s backlog, a batch after another, until it is caught up or
        an attempt fails."""
        try:
            while True:
                batch = await self._batch(hook)
                if batch is None:
                    return
                events, last = batch
                error = await self._post(session, hook, events, last)
                if error is not None:
                    break
                if not await self._store.webhook_delivered(hook, last):
                    return
                self._count(hook, "ok", len(events))
                hook = dataclasses.replace(
                    hook, cursor=last, pending_last=None, attempts=0, failing_since=None,
                    next_attempt_at=None, last_error="",
                )  # fmt: skip
            failure = failed(hook, error, self._clock(), self._config, self._rng)
            await self._store.webhook_failed(hook, failure)
            self._count(hook, "failed", 0)
            if failure.disabled_at is not None:
                log.error(
                    "webhook %s disabled: failing since %.0f s ago (%s); its events are kept, "
                    "replay it to send them", hook.webhook_id,
                    failure.disabled_at - failure.failing_since, error,
                )  # fmt: skip
            else:
                log.warning("webhook %s: %s (attempt %d)", hook.webhook_id, error, failure.attempts)
        except LostLeadership:
            raise
        except StoreUnavailable as exc:
            log.warning("webhook %s: %s; trying again shortly", hook.webhook_id, exc)

    async def _batch(self, hook: Webhook) -> tuple[list[Event], int] | None:
        """The events of the next delivery and its last event id; None when there is
        nothing to send (the cursor then moves past events the endpoint does not take)."""
        if hook.pending_last is not None:
            events = await self._store.events(
                hook.tenant, hook.cursor, self._config.batch, types=hook.types,
                through=hook.pending_last,
            )  # fmt: skip
            if not events:  # dropped by retention meanwhile
                await self._store.webhook_delivered(hook, hook.pending_last)
                return None
            return events, hook.pending_last
        top = await self._store.last_event()
        events = await self._store.events(
            hook.tenant, hook.cursor, self._config.batch, types=hook.types
        )
        if not events:
            if top > hook.cursor:
                await self._store.webhook_delivered(hook, top)
            self._lag(hook, None)
            return None
        last = events[-1].event_id
        if not await self._store.webhook_pending(hook, last):
            return None  # replayed or deleted meanwhile: read it again next round
        return events, last

    async def _post(
        self, session: aiohttp.ClientSession, hook: Webhook, events: list[Event], last: int
    ) -> str | None:
        """POST the events; None when the endpoint answered 2xx, else why not."""
        now = self._clock()
        self._lag(hook, events[0].at)
        payload = body(hook, events, now)
        sent_headers = headers(hook.secret, webhook_message_id(hook, last), now, payload)
        try:
            async with session.post(
                hook.url, data=payload, headers=sent_headers, allow_redirects=False
            ) as response:
                await response.content.read(64 * 1024)
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}".strip().rstrip(":")[:300]

    def _count(self, hook: Webhook, outcome: str, events: int) -> None:
        if self._metrics is None:
            return
        self._metrics.webhook_deliveries.labels(hook.webhook_id, outcome).inc()
        if events:
            self._metrics.webhook_events.labels(hook.webhook_id).inc(events)

    def _lag(self, hook: Webhook, oldest: float | None) -> None:
        if self._metrics is not None:
            lag = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
            self._metrics.webhook_lag.labels(hook.webhook_id).set(lag)
