"""``mailers events``: the delivery events of your tenant (an admin names one with
``--tenant``), oldest first: those recorded so far, or followed as they come.

The coordinator sends every kept event above the cursor at once, in pages sent back to
back, then each new event as it is recorded, and nothing while there is none. So
without ``--follow`` the listing of the events that exist now ends at the first of:

* an event recorded after the command started (by this machine's clock; not printed),
  which is what ends it on a busy cluster;
* the stream being quiet: open at the leader for ``--idle-s`` seconds without an event
  in the last ``--idle-s`` seconds, the leader confirmed by a call it answers then
  (so a stream still looking for the leader, or connecting, never counts as quiet).

With ``--follow`` it prints each event as it is recorded until Ctrl-C or SIGTERM, and
exits 0. Either way a leader failover is survived: the stream resumes after the last
event printed, nothing skipped or repeated.

``-o json`` (``--json``) prints one JSON object a line (JSON Lines), each line flushed at
once, for ``| jq``; ``-o yaml`` one YAML document an event; ``table`` and ``wide`` a
table, or with ``--follow`` one aligned line an event under one header. As in every
listing no identifier is cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO

import yaml

from client_sdk import DeliveryEvent, EventStream, EventType, MailerClient, MailerError
from client_sdk.errors import TransientError
from mailers.campaign import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from mailers.config import ConfigError, Connection, add_connection_arguments, resolve
from mailers.output import (
    TEXT_MIN_WIDTH,
    Column,
    add_output_arguments,
    output_format,
    plain,
    print_table,
    stderr,
    table,
)

EVENT_COLUMNS = (
    Column("id", right=True), Column("time"), Column("type"), Column("job"),
    Column("#", right=True), Column("email"), Column("code", right=True),
    Column("attempt", right=True, wide=True), Column("node", wide=True),
    Column("relay", wide=True), Column("message-id", wide=True),
    Column("next attempt", wide=True), Column("reason", text=True),
    Column("metadata", text=True, wide=True), Column("tags", text=True, wide=True),
)  # fmt: skip
FOLLOW_WIDTHS = {"id": 7, "time": 19, "type": 12, "job": 21, "email": 24, "node": 8,
                 "relay": 21, "message-id": 30, "next attempt": 19}  # fmt: skip
"""Widths of the ``--follow`` lines, which cannot be measured beforehand: a longer cell
pushes the rest of its line along instead of being cut."""
DEFAULT_IDLE_S = 1.0
PROBE_TIMEOUT = timedelta(seconds=5)
"""Deadline of the call that confirms the leader before a quiet stream ends a listing."""


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def event_row(e: DeliveryEvent) -> list[str]:
    """The cells of an event, in the order of :data:`EVENT_COLUMNS`."""
    code = str(e.reply.code) if e.reply is not None and e.reply.code else ""
    reason = e.reason or (e.reply.text if e.reply is not None else "")
    return [str(e.event_id), _time(e.time), e.type.value, e.job_id, str(e.index), e.email,
            code, str(e.attempt), e.node_id, e.relay, e.message_id, _time(e.next_attempt_at),
            reason, " ".join(f"{k}={v}" for k, v in sorted(e.metadata.items())),
            ", ".join(e.tags)]  # fmt: skip


def follow_line(cells: Sequence[str], wide: bool) -> str:
    """One aligned line of ``--follow``'s table (the header's too); never cuts a cell."""
    parts = []
    for column, cell in zip(EVENT_COLUMNS, cells, strict=True):
        if column.wide and not wide:
            continue
        width = max(len(column.header), FOLLOW_WIDTHS.get(column.header, 0))
        if column.text:
            width = TEXT_MIN_WIDTH
        parts.append(cell.rjust(width) if column.right else cell.ljust(width))
    return "  ".join(parts).rstrip()


class EventPrinter:
    """Prints events on ``out`` in the format chosen, each as soon as it comes, except
    a table without ``--follow``, which is measured and printed by :meth:`finish`."""

    def __init__(self, fmt: str, follow: bool, out: TextIO) -> None:
        self._fmt, self._follow, self._out = fmt, follow, out
        self._wide = fmt == "wide"
        self._rows: list[list[str]] = []

    @property
    def _streamed_table(self) -> bool:
        return self._follow and self._fmt in ("table", "wide")

    def start(self) -> None:
        if self._streamed_table:
            self._write(follow_line([c.header for c in EVENT_COLUMNS], self._wide) + "\n")

    def event(self, event: DeliveryEvent) -> None:
        if self._fmt == "json":
            self._write(json.dumps(plain(event), ensure_ascii=False) + "\n")
        elif self._fmt == "yaml":
            document = yaml.safe_dump(plain(event), sort_keys=False, allow_unicode=True)
            self._write("---\n" + str(document))
        elif self._streamed_table:
            self._write(follow_line(event_row(event), self._wide) + "\n")
        else:
            self._rows.append(event_row(event))

    def finish(self) -> None:
        if self._fmt in ("table", "wide") and not self._follow:
            print_table(table(EVENT_COLUMNS, self._rows, self._wide))

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


async def _caught_up(
    client: MailerClient, events: EventStream, last_s: float, idle_s: float
) -> bool:
    """Whether a quiet stream means every event was sent: it has been open for
    ``idle_s``, nothing came since ``last_s``, and its address answers as the leader."""
    now_s = time.monotonic()
    opened_s, address = events.open_since_s, events.address
    if opened_s is None or now_s - max(opened_s, last_s) < idle_s:
        return False
    try:
        await client.list_jobs_page(page_size=1, timeout=PROBE_TIMEOUT)
    except TransientError:
        return False  # the stream fails over too; the next quiet spell asks again
    return client.leader == address and events.address == address


async def print_existing(
    client: MailerClient,
    events: EventStream,
    emit: Callable[[DeliveryEvent], None],
    started: datetime,
    idle_s: float,
) -> None:
    """Emit the events recorded before ``started``, ending by the rule of the module's
    docstring. The stream's errors pass through; it is left to the caller to close."""
    pending: asyncio.Task[DeliveryEvent] | None = None
    last_s = time.monotonic()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=idle_s)
            if not done:
                if await _caught_up(client, events, last_s, idle_s):
                    return
                continue
            event, pending = pending.result(), None
            last_s = time.monotonic()
            if event.time is not None and event.time > started:
                return
            emit(event)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending


async def _stream(ns: argparse.Namespace, connection: Connection, printer: EventPrinter) -> None:
    """Connect and print, as ``ns`` says; SIGTERM ends a ``--follow`` as Ctrl-C does."""
    started = datetime.now(UTC)
    if ns.follow:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with MailerClient(
        list(connection.coordinators), token=connection.token, tls=connection.tls
    ) as client:
        types = [EventType(t) for t in ns.type or []]
        stream = client.events(ns.after, job_ids=ns.job or (), types=types, tenant=ns.tenant)
        async with stream as events:
            printer.start()
            if not ns.follow:
                await print_existing(client, events, printer.event, started, ns.idle_s)
            else:
                async for event in events:
                    printer.event(event)
    printer.finish()


def cmd_events(ns: argparse.Namespace) -> int:
    """Print the events; exit status as :data:`mailers.cli.EXIT_CODES` (a ``--follow``
    ended by Ctrl-C or SIGTERM is done: 0)."""
    errors = stderr()
    if ns.idle_s <= 0:
        errors.print("[red]error:[/] --idle-s must be positive")
        return EXIT_USAGE
    try:
        connection = resolve(ns, os.environ)
    except ConfigError as exc:
        errors.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    printer = EventPrinter(output_format(ns), ns.follow, sys.stdout)
    try:
        asyncio.run(_stream(ns, connection, printer))
    except MailerError as exc:
        errors.print(f"[red]error:[/] {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    except (KeyboardInterrupt, asyncio.CancelledError):
        if ns.follow:
            return EXIT_OK
        errors.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _drop_stdout()
    return EXIT_OK


def _drop_stdout() -> None:
    """The reader of stdout went away (``| head``): send what is left nowhere, so that
    flushing at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _cursor(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def add_events_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mailers events``: see :func:`cmd_events` and the module's docstring."""
    parser = sub.add_parser(
        "events",
        help="delivery events: those recorded so far, or --follow new ones",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_arguments(parser, on_subcommand=True)
    add_output_arguments(parser, on_subcommand=True)
    parser.add_argument(
        "--after", type=_cursor, default=0, metavar="ID",
        help="only events with a larger id: the id of the last event you handled (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--job", action="append", metavar="JOB_ID", help="only this job's events (repeatable)"
    )
    types = [t.value for t in EventType][1:]
    parser.add_argument(
        "--type",
        action="append",
        choices=types,
        metavar="TYPE",
        help=f"only events of this type (repeatable): {', '.join(types)}",
    )
    parser.add_argument("--tenant", default="", help="whose events (admin tokens only)")
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new events until interrupted"
    )
    parser.add_argument(
        "--idle-s", type=float, default=DEFAULT_IDLE_S, metavar="SECONDS",
        help=f"without --follow: how long a quiet stream means every event was sent "
        f"(default {DEFAULT_IDLE_S:g})",
    )  # fmt: skip
    parser.set_defaults(func=cmd_events)
