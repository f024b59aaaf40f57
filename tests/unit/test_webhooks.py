"""Webhook rules: Standard Webhooks signatures, retries and the horizon, endpoint URLs,
the JSON of an event."""

from __future__ import annotations

import json
import random
import time
from datetime import timedelta

import pytest
from standardwebhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from coordinator.backoff import BackoffPolicy
from coordinator.model import Event, EventType
from coordinator.webhooks import (
    Webhook,
    WebhookConfig,
    WebhookState,
    body,
    event_json,
    failed,
    headers,
    message_id,
    new_secret,
    url_problem,
)

NOW = 1_800_000_000.0
HOOK = Webhook("wh_1", "acme", "https://hooks.example.com/in", (), NOW - 3600, cursor=40)
EVENT = Event(
    event_id=41, type=EventType.DEFERRED, at=NOW - 5, tenant="acme", job_id="j1", index=3,
    email="a@example.org", attempt=1, code=451, enhanced_code="4.3.0", text="later",
    next_attempt_at=NOW + 60, metadata={"crm": "7"}, tags=("news",),
)  # fmt: skip


def test_a_delivery_verifies_with_the_standard_library() -> None:
    secret = new_secret()
    now = time.time()  # the verifier allows five minutes of clock skew
    payload = body(HOOK, [EVENT], now)
    sent = headers(secret, message_id(HOOK, 41), now, payload)
    verifier = Verifier(secret)
    # The standard verifier accepts it within its timestamp tolerance
    verifier.verify(payload, sent)
    # And refuses an altered body, another secret, or another id
    with pytest.raises(WebhookVerificationError):
        verifier.verify(payload.replace(b"451", b"250"), sent)
    with pytest.raises(WebhookVerificationError):
        Verifier(new_secret()).verify(payload, sent)
    with pytest.raises(WebhookVerificationError):
        verifier.verify(payload, sent | {"webhook-id": message_id(HOOK, 42)})


def test_the_payload_names_the_endpoint_and_carries_each_event() -> None:
    payload = json.loads(body(HOOK, [EVENT], NOW))
    assert payload["type"] == "mailers.events"
    assert payload["data"]["webhook_id"] == "wh_1"
    assert payload["data"]["events"] == [event_json(EVENT)]
    e = event_json(EVENT)
    assert e["type"] == "deferred" and e["reply"] == {
        "code": 451, "enhanced_code": "4.3.0", "text": "later",
    }  # fmt: skip
    assert e["metadata"] == {"crm": "7"} and e["tags"] == ["news"]
    assert e["next_attempt_time"].endswith("Z")


def test_retries_back_off_and_stop_at_the_horizon() -> None:
    policy = BackoffPolicy(initial=timedelta(seconds=5), maximum=timedelta(minutes=10))
    config = WebhookConfig(retry=policy, horizon_s=3600)
    rng = random.Random(1)
    hook = HOOK
    waits = []
    for _ in range(6):
        f = failed(hook, "HTTP 500", NOW, config, rng)
        assert f.disabled_at is None and f.next_attempt_at is not None
        waits.append(f.next_attempt_at - NOW)
        hook = Webhook(
            **{**hook.__dict__, "attempts": f.attempts, "failing_since": f.failing_since}
        )
    # Delays grow (with jitter, each within [base/2, base]) up to the maximum
    for attempt, wait in enumerate(waits, start=1):
        base = min(5 * 2 ** (attempt - 1), 600)
        assert base / 2 <= wait <= base
    assert hook.state is WebhookState.FAILING
    # And failing for the horizon disables the endpoint
    f = failed(hook, "HTTP 500", NOW + 3600, config, rng)
    assert f.disabled_at == NOW + 3600 and f.next_attempt_at is None


@pytest.mark.parametrize(
    ("url", "allow_http", "problem"),
    [
        ("https://hooks.example.com/in?x=1", False, None),
        ("http://127.0.0.1:8080/in", True, None),
        ("http://hooks.example.com/in", False, "must be an https:// URL"),
        ("ftp://hooks.example.com/in", True, "must be an http(s):// URL"),
        ("https://user:pw@hooks.example.com/", False, "must not hold credentials"),
        ("https:///in", False, "must name a host"),
        ("https://hooks.example.com/a b", False, "must not contain whitespace"),
        ("", False, "must be 1 to"),
    ],
)
def test_endpoint_urls(url: str, allow_http: bool, problem: str | None) -> None:
    found = url_problem(url, allow_http)
    assert (found is None) if problem is None else (found is not None and problem in found)
