"""``mailers webhooks``: the HTTPS endpoints that receive your tenant's delivery events as
signed POSTs (Standard Webhooks); an admin names the tenant with ``--tenant``.

  create URL [--type TYPE]...   register an endpoint and print its signing secret, once
  list                          the endpoints and where their deliveries stand
  delete ID                     remove one; events not yet delivered to it are not sent
  replay ID [--from EVENT_ID]   enable one again (e.g. disabled after failing too long)
                                and send its backlog; with --from, every event after
                                EVENT_ID, again

An endpoint receives the events recorded after it is created, oldest first, at least
once. The secret verifies each delivery's webhook-signature header; the coordinator
keeps it but never shows it again, so ``create`` prints it once (``-o json``:
{"webhook": {...}, "secret": "whsec_..."}) with a reminder on stderr. As in every
listing no id or URL is cut.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime

from rich.console import Console
from rich.markup import escape

from client_sdk import EventType, MailerClient, Webhook, WebhookState
from mailers.admin import Handler, Shown, _run
from mailers.config import add_connection_arguments
from mailers.events import _cursor
from mailers.output import Column, add_output_arguments, plain

WEBHOOK_COLUMNS = (
    Column("webhook"), Column("url"), Column("types"), Column("state"),
    Column("delivered id", right=True), Column("failures", right=True),
    Column("failing since"), Column("next attempt"), Column("last error", text=True),
    Column("tenant", wide=True), Column("created", wide=True),
)  # fmt: skip
_STATE_STYLES = {WebhookState.FAILING: "yellow", WebhookState.DISABLED: "red"}
SECRET_NOTE = (
    "[yellow]note:[/] the signing secret is shown only now: keep it to verify deliveries "
    "(the cluster never shows it again)"
)


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def webhook_row(hook: Webhook) -> list[str]:
    """The cells of an endpoint, in the order of :data:`WEBHOOK_COLUMNS` (rich markup:
    the server's text is escaped, so a URL or an error with brackets shows whole)."""
    state = hook.state.value
    if hook.state in _STATE_STYLES:
        state = f"[{_STATE_STYLES[hook.state]}]{state}[/]"
    return [
        hook.webhook_id,
        escape(hook.url),
        ", ".join(t.value for t in hook.types) or "all",
        state,
        str(hook.delivered_event_id),
        str(hook.failed_attempts),
        _time(hook.failing_since),
        _time(hook.next_attempt_at),
        escape(hook.last_error),
        escape(hook.tenant),
        _time(hook.created_at),
    ]


def webhooks_shown(hooks: Sequence[Webhook], data: object = None) -> Shown:
    """The endpoints as a table, or ``data`` (their plain values by default) as a document."""
    rows = [webhook_row(h) for h in hooks]
    return Shown(plain(list(hooks)) if data is None else data, [(WEBHOOK_COLUMNS, rows)])


async def cmd_create(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    types = [EventType(t) for t in ns.type or []]
    created = await client.create_webhook(ns.url, types=types, tenant=ns.tenant)
    console.print(SECRET_NOTE)
    shown = webhooks_shown([created.webhook], plain(created))
    shown.lines.append(f"secret: {created.secret}")
    return shown


async def cmd_list(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    return webhooks_shown(await client.webhooks(tenant=ns.tenant))


async def cmd_delete(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    await client.delete_webhook(ns.webhook_id, tenant=ns.tenant)
    return Shown(
        {"webhook_id": ns.webhook_id, "deleted": True},
        lines=[f"webhook {escape(ns.webhook_id)} deleted"],
    )


async def cmd_replay(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    hook = await client.replay_webhook(
        ns.webhook_id, from_event_id=ns.from_event_id, tenant=ns.tenant
    )
    shown = webhooks_shown([hook], plain(hook))
    shown.lines.append(
        f"webhook {hook.webhook_id}: {hook.state.value}, sending the events after "
        f"event {hook.delivered_event_id}"
    )
    return shown


def add_webhooks_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mailers webhooks create|list|delete|replay``: see the module's docstring."""
    parser = sub.add_parser(
        "webhooks",
        help="endpoints that receive delivery events: create, list, delete, replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(
        name: str, handler: Handler, text: str, *, with_id: bool = False
    ) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=text, description=text)
        add_connection_arguments(p, on_subcommand=True)
        add_output_arguments(p, on_subcommand=True)
        p.add_argument("--tenant", default="", help="whose endpoints (admin tokens only)")
        if with_id:
            p.add_argument("webhook_id", metavar="ID", help="the endpoint (wh_...)")
        p.set_defaults(func=lambda ns: _run(handler, ns))
        return p

    create = action(
        "create",
        cmd_create,
        "register an HTTPS endpoint for the events recorded from now on; prints its "
        "signing secret, which is never shown again",
    )
    create.add_argument("url", metavar="URL", help="https://... (where the events are POSTed)")
    types = [t.value for t in EventType][1:]
    create.add_argument(
        "--type",
        action="append",
        choices=types,
        metavar="TYPE",
        help=f"send only events of this type (repeatable; default every type): {', '.join(types)}",
    )
    action("list", cmd_list, "the endpoints and where their deliveries stand")
    action(
        "delete",
        cmd_delete,
        "remove an endpoint; events not yet delivered to it are not sent (an unknown ID "
        "is not an error)",
        with_id=True,
    )
    replay = action(
        "replay",
        cmd_replay,
        "enable an endpoint again and send its backlog, or with --from every event after "
        "EVENT_ID again",
        with_id=True,
    )
    replay.add_argument(
        "--from", dest="from_event_id", type=_cursor, default=0, metavar="EVENT_ID",
        help="send every event after this id (again); default: only the undelivered ones",
    )  # fmt: skip
