"""Webhooks: what an endpoint is, what a delivery carries, how it is signed, and when
a failing endpoint is tried again or given up. Pure; the clock and the random source
are injected (the HTTP shell is :mod:`coordinator.webhook_sender`).

Deliveries follow the Standard Webhooks specification: a JSON POST with the headers
``webhook-id`` (the same on every retry of the same events), ``webhook-timestamp``
(Unix seconds of this attempt) and ``webhook-signature`` (``v1,`` and the base64
HMAC-SHA256 of ``id.timestamp.body`` under the endpoint's secret). One delivery holds
up to :attr:`WebhookConfig.batch` events of one tenant, oldest first::

    {"type": "mailers.events", "timestamp": "2026-12-06T10:00:00Z",
     "data": {"webhook_id": "wh_...", "events": [{"event_id": 41, "type": "delivered", ...}]}}
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import json
import random
import secrets
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator.backoff import BackoffPolicy, delay
from coordinator.model import Event, EventType
from mailers_runtime import settings
from mailers_runtime.errors import ConfigError

SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2000
MAX_WEBHOOKS_PER_TENANT = 20


@settings.config
class WebhookConfig:
    retry: BackoffPolicy = settings.nested(
        BackoffPolicy,
        default=BackoffPolicy(initial=timedelta(seconds=5), maximum=timedelta(hours=1)),
        initial=settings.Variable("MAILER_WEBHOOK_RETRY_INITIAL_S", settings.duration),
        maximum=settings.Variable("MAILER_WEBHOOK_RETRY_MAX_S", settings.duration),
    )
    """Delay before a failed delivery is tried again (exponential, with jitter)."""
    horizon_s: float = settings.setting(
        "MAILER_WEBHOOK_RETRY_HORIZON_S", default=24 * 3600.0, parse=settings.number
    )
    """An endpoint failing for this long is disabled; its backlog is kept for a replay."""
    timeout_s: float = settings.setting(
        "MAILER_WEBHOOK_TIMEOUT_S", default=10.0, parse=settings.number
    )
    """Deadline of one POST, connection included."""
    batch: int = settings.setting("MAILER_WEBHOOK_BATCH", default=100, parse=settings.integer)
    """Events per delivery at most."""
    allow_http: bool = settings.setting(
        "MAILER_WEBHOOK_ALLOW_HTTP", default=False, parse=settings.boolean
    )
    """Accept http:// endpoints (a local cluster); otherwise only https://."""
    ca_file: str = settings.setting("MAILER_WEBHOOK_CA_FILE", default="")
    """CA bundle that verifies endpoints' certificates; empty: the system's."""

    def __post_init__(self) -> None:
        if self.horizon_s <= 0 or self.timeout_s <= 0:
            raise ConfigError("MAILER_WEBHOOK_RETRY_HORIZON_S and _TIMEOUT_S must be positive")
        if not 1 <= self.batch <= 1000:
            raise ConfigError("MAILER_WEBHOOK_BATCH must be within 1..1000")


class WebhookState(enum.Enum):
    ACTIVE = "active"
    FAILING = "failing"
    DISABLED = "disabled"


@dataclasses.dataclass(frozen=True)
class Webhook:
    """An endpoint and where its delivery stands (a row of the webhooks table)."""

    webhook_id: str
    tenant: str
    url: str
    types: tuple[EventType, ...]
    created_at: float
    cursor: int
    """The last event delivered."""
    pending_last: int | None = None
    """The last event of the delivery in progress, fixed at its first attempt."""
    attempts: int = 0
    failing_since: float | None = None
    next_attempt_at: float | None = None
    disabled_at: float | None = None
    last_error: str = ""
    secret: str = dataclasses.field(default="", repr=False)
    """Only where deliveries are signed; never printed."""

    @property
    def state(self) -> WebhookState:
        if self.disabled_at is not None:
            return WebhookState.DISABLED
        return WebhookState.FAILING if self.failing_since is not None else WebhookState.ACTIVE

    def due(self, now: float) -> bool:
        return self.disabled_at is None and (
            self.next_attempt_at is None or self.next_attempt_at <= now
        )


@dataclasses.dataclass(frozen=True)
class Failure:
    """What a failed delivery changes: the next attempt, or the endpoint disabled."""

    attempts: int
    failing_since: float
    next_attempt_at: float | None
    disabled_at: float | None
    error: str


def new_webhook_id() -> str:
    return "wh_" + secrets.token_hex(8)


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def url_problem(url: str, allow_http: bool) -> str | None:
    """Why ``url`` cannot be an endpoint, or None."""
    if not url or len(url) > MAX_URL_CHARS:
        return f"must be 1 to {MAX_URL_CHARS} characters"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "must not contain whitespace or control characters"
    parts = urllib.parse.urlsplit(url)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        return "must be an https:// URL" if not allow_http else "must be an http(s):// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username or parts.password:
        return "must not hold credentials"
    return None


def failed(
    hook: Webhook, error: str, now: float, config: WebhookConfig, rng: random.Random
) -> Failure:
    """The state after one more failed attempt of the delivery in progress."""
    attempts = hook.attempts + 1
    since = hook.failing_since if hook.failing_since is not None else now
    if now - since >= config.horizon_s:
        return Failure(attempts, since, None, now, error)
    wait = delay(config.retry, attempts, rng).total_seconds()
    return Failure(attempts, since, now + wait, None, error)


def message_id(hook: Webhook, last_event: int) -> str:
    """The ``webhook-id`` of the delivery ending at ``last_event``: the same on every
    retry, different for every delivery of the endpoint."""
    return f"msg_{hook.webhook_id}_{last_event}"


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header (scheme ``v1``)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(secret: str, msg_id: str, now: float, body: bytes) -> dict[str, str]:
    timestamp = int(now)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, msg_id, timestamp, body),
    }


def body(hook: Webhook, events: Sequence[Event], now: float) -> bytes:
    payload = {
        "type": "mailers.events",
        "timestamp": _iso(now),
        "data": {"webhook_id": hook.webhook_id, "events": [event_json(e) for e in events]},
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def event_json(e: Event) -> dict[str, Any]:
    """An event as webhooks (and JSON output) carry it."""
    out: dict[str, Any] = {
        "event_id": e.event_id,
        "type": e.type.name.lower(),
        "time": _iso(e.at),
        "tenant": e.tenant,
        "job_id": e.job_id,
        "index": e.index,
        "email": e.email,
        "attempt": e.attempt,
    }
    optional: dict[str, Any] = {
        "message_id": e.message_id,
        "node_id": e.node_id,
        "relay": e.relay,
        "reason": e.reason,
        "metadata": dict(e.metadata),
        "tags": list(e.tags),
    }
    out.update({k: v for k, v in optional.items() if v})
    if e.code or e.text:
        out["reply"] = {"code": e.code, "enhanced_code": e.enhanced_code, "text": e.text}
    if e.next_attempt_at is not None:
        out["next_attempt_time"] = _iso(e.next_attempt_at)
    return out


def _iso(unix_s: float) -> str:
    return (
        datetime.fromtimestamp(unix_s, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
