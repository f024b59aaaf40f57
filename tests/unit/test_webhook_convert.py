"""Webhooks on the client side, without a server: the wire conversion, the requests the
operations build, that the signing secret never shows in a repr, and what
``mailers webhooks`` prints and completes."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from collections.abc import Iterable
from datetime import timedelta
from typing import cast

import pytest
from rich.console import Console

from client_sdk import (
    CreatedWebhook,
    EventType,
    MailerClient,
    Webhook,
    WebhookState,
    _convert,
)
from client_sdk import _operations as ops
from mailerpb.mailer.v1 import coordinator_pb2
from mailers.cli import build_parser
from mailers.output import print_table, table
from mailers.webhooks import WEBHOOK_COLUMNS, cmd_create, webhook_row
from tests.unit.test_cli_config import _complete
from tests.unit.test_event_convert import AT, _timestamp

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HOOK_ID = "wh_5f0c2a9e1b3d4c6a"
URL = "https://hooks.example.org/mailers/in?source=[prod]"


FAILING = Webhook(
    webhook_id=HOOK_ID,
    url=URL,
    tenant="acme",
    types=(EventType.DELIVERED, EventType.FAILED),
    state=WebhookState.FAILING,
    created_at=AT,
    delivered_event_id=41,
    failed_attempts=3,
    failing_since=AT + timedelta(minutes=1),
    next_attempt_at=AT + timedelta(minutes=2),
    last_error="[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
)


def test_a_webhook_converts_with_every_field() -> None:
    # Given a failing endpoint as the coordinator sends it
    msg = coordinator_pb2.Webhook(
        webhook_id=HOOK_ID,
        tenant="acme",
        url=URL,
        types=[coordinator_pb2.EVENT_TYPE_DELIVERED, coordinator_pb2.EVENT_TYPE_FAILED],
        created_at=_timestamp(AT),
        state=coordinator_pb2.WEBHOOK_STATE_FAILING,
        delivered_event_id=41,
        failed_attempts=3,
        failing_since=_timestamp(AT + timedelta(minutes=1)),
        next_attempt_time=_timestamp(AT + timedelta(minutes=2)),
        last_error=FAILING.last_error,
    )
    # Then every field comes through, times UTC-aware
    assert _convert.webhook_from_pb(msg) == FAILING


def test_unset_times_stay_none_and_unknown_numbers_are_unspecified() -> None:
    # Given a state and a type this SDK does not know (from a newer server)
    state = coordinator_pb2.WebhookState.ValueType(9)
    types = [coordinator_pb2.EventType.ValueType(99)]
    msg = coordinator_pb2.Webhook(webhook_id=HOOK_ID, url=URL, state=state, types=types)
    # When it is converted
    hook = _convert.webhook_from_pb(msg)
    # Then they are UNSPECIFIED rather than an error, and unset times None
    assert (hook.created_at, hook.failing_since, hook.next_attempt_at) == (None, None, None)
    assert hook.state is WebhookState.UNSPECIFIED
    assert tuple(hook.types) == (EventType.UNSPECIFIED,)


def test_every_wire_state_maps_to_its_own_member() -> None:
    values = coordinator_pb2.WebhookState.values()
    states = {_convert.webhook_from_pb(coordinator_pb2.Webhook(state=v)).state for v in values}
    assert states == set(WebhookState)


def test_the_secret_comes_with_the_created_endpoint_but_never_in_a_repr() -> None:
    # Given the answer to a create
    response = coordinator_pb2.CreateWebhookResponse(
        webhook=coordinator_pb2.Webhook(webhook_id=HOOK_ID, url=URL), secret=SECRET
    )
    # When it is converted
    created = ops.CREATE_WEBHOOK.convert(response)
    # Then the secret is there to read, and neither the repr nor the endpoint holds it
    assert isinstance(created, CreatedWebhook)
    assert (created.secret, created.webhook.webhook_id) == (SECRET, HOOK_ID)
    assert SECRET not in repr(created) and SECRET not in str(created)
    assert HOOK_ID in repr(created)
    assert "secret" not in {f.name for f in Webhook.__dataclass_fields__.values()}


def test_requests_carry_the_wire_values() -> None:
    create = ops.CREATE_WEBHOOK(url=URL, types=(EventType.DELIVERED,), tenant="acme").request
    assert create == coordinator_pb2.CreateWebhookRequest(
        tenant="acme", url=URL, types=[coordinator_pb2.EVENT_TYPE_DELIVERED]
    )
    replay = ops.REPLAY_WEBHOOK(webhook_id=HOOK_ID, from_event_id=7, tenant="").request
    assert replay == coordinator_pb2.ReplayWebhookRequest(webhook_id=HOOK_ID, from_event_id=7)
    assert ops.DELETE_WEBHOOK(tenant="acme", webhook_id=HOOK_ID).request == (
        coordinator_pb2.DeleteWebhookRequest(tenant="acme", webhook_id=HOOK_ID)
    )
    listed = ops.LIST_WEBHOOKS.convert(
        coordinator_pb2.ListWebhooksResponse(webhooks=[coordinator_pb2.Webhook(webhook_id="a")])
    )
    assert [h.webhook_id for h in listed] == ["a"]
    assert ops.DELETE_WEBHOOK.convert(coordinator_pb2.DeleteWebhookResponse()) is None


def test_a_negative_replay_cursor_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="from_event_id"):
        ops.REPLAY_WEBHOOK(webhook_id=HOOK_ID, from_event_id=-1, tenant="")


# ---- mailers webhooks ---------------------------------------------------------------


def test_a_row_has_every_cell_and_an_80_column_table_cuts_none() -> None:
    row = webhook_row(FAILING)
    assert row[:6] == [HOOK_ID, URL.replace("[", "\\["), "delivered, failed",
                       "[yellow]failing[/]", "41", "3"]  # fmt: skip
    assert webhook_row(Webhook(HOOK_ID, URL))[2] == "all"
    for wide in (False, True):
        out = io.StringIO()
        print_table(table(WEBHOOK_COLUMNS, [row], wide), Console(file=out, width=80))
        text = out.getvalue()
        # The id, the URL (brackets included) and the times stand whole; the error wraps
        for cell in (HOOK_ID, URL, "2026-12-06 09:31:15", "2026-12-06 09:32:15"):
            assert cell in text, text
        assert "…" not in text and "[SSL:" in text and "verify" in text
        assert ("acme" in text) is wide


class _Client:
    """Answers create_webhook as a coordinator would."""

    async def create_webhook(
        self, url: str, *, types: Iterable[EventType], tenant: str
    ) -> CreatedWebhook:
        return CreatedWebhook(Webhook(HOOK_ID, url, tenant or "acme", tuple(types)), SECRET)


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_create_prints_the_secret_once_and_says_so_on_stderr(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given `mailers webhooks create URL --type delivered`
    ns = build_parser().parse_args(["webhooks", "create", URL, "--type", "delivered"])
    errors = io.StringIO()
    # When it runs and prints in the format chosen
    client = cast(MailerClient, _Client())
    shown = asyncio.run(cmd_create(client, ns, Console(file=errors, width=200)))
    shown.print(fmt)
    out = capsys.readouterr().out
    # Then stdout holds the secret once, stderr the reminder and no secret
    assert out.count(SECRET) == 1
    assert "shown only now" in errors.getvalue() and SECRET not in errors.getvalue()
    if fmt == "json":
        document = json.loads(out)
        assert document["secret"] == SECRET
        assert document["webhook"]["webhook_id"] == HOOK_ID
        assert document["webhook"]["types"] == ["delivered"]
    else:
        assert HOOK_ID in out and f"secret: {SECRET}" in out


def _parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["webhooks", *args])


def test_the_actions_parse_their_arguments() -> None:
    ns = _parse("create", URL, "--type", "delivered", "--type", "failed", "--tenant", "acme")
    assert (ns.action, ns.url, ns.tenant) == ("create", URL, "acme")
    assert ns.type == ["delivered", "failed"]
    assert _parse("replay", HOOK_ID, "--from", "41").from_event_id == 41
    assert _parse("replay", HOOK_ID).from_event_id == 0
    assert _parse("list").tenant == ""
    assert _parse("delete", HOOK_ID, "-o", "json").webhook_id == HOOK_ID


@pytest.mark.parametrize(
    "args",
    [(), ("replay", HOOK_ID, "--from", "-1"), ("create", URL, "--type", "opened"), ("delete",)],
)
def test_unusable_arguments_exit_2(args: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exited:
        _parse(*args)
    assert exited.value.code == 2


def test_the_completion_script_completes_the_actions_and_their_options() -> None:
    assert _complete("mailers webh") == ["webhooks"]
    actions = [w for w in _complete("mailers webhooks ") if not w.startswith("-")]
    assert actions == ["create", "delete", "list", "replay"]
    assert _complete("mailers webhooks create --type del") == ["delivered"]
    assert _complete("mailers webhooks replay --fr") == ["--from"]
