"""Operator commands of ``mailers``: cluster, nodes, jobs, results and suppressions.

Every command talks to the leader through the SDK (any coordinator address will do;
the client follows redirects) and prints in the format ``-o`` chooses
(:mod:`mailers.output`): tables, or one JSON or YAML document for scripts, on stdout;
progress and errors on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from client_sdk import (
    Job,
    JobProgress,
    JobState,
    MailerClient,
    MailerError,
    NodeInfo,
    RecipientStatus,
    Suppression,
    SuppressionReason,
)
from mailers.campaign import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from mailers.config import ConfigError, add_connection_arguments, resolve
from mailers.output import (
    Column,
    add_output_arguments,
    dump,
    output_format,
    plain,
    print_table,
    stderr,
    stdout,
    table,
)

Handler = Callable[[MailerClient, argparse.Namespace, Console], Awaitable["Shown | None"]]


@dataclasses.dataclass
class Shown:
    """What a command prints: ``data`` for ``-o json|yaml``; for ``-o table|wide``, its
    tables and then lines of text, on stdout."""

    data: Any
    tables: list[tuple[Sequence[Column], list[list[str]]]] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)

    def print(self, fmt: str) -> None:
        if fmt in ("json", "yaml"):
            sys.stdout.write(dump(self.data, fmt))
            return
        for columns, rows in self.tables:
            print_table(table(columns, rows, fmt == "wide"))
        for line in self.lines:
            stdout().print(line)


# ---- tables -----------------------------------------------------------------------------

NODE_COLUMNS = (
    Column("node"), Column("address"), Column("state"), Column("in flight", right=True),
    Column("capacity", right=True), Column("batches", right=True),
    Column("done", right=True, wide=True), Column("err %", right=True, wide=True),
    Column("lease ttl", right=True), Column("breaker"), Column("relays", text=True, wide=True),
)  # fmt: skip


def node_rows(nodes: Sequence[NodeInfo]) -> list[list[str]]:
    return [
        [
            n.node_id,
            n.address,
            n.state.value,
            str(n.load.in_flight),
            str(n.load.capacity),
            str(n.batches_in_flight),
            str(n.recipients_done),
            f"{100 * n.load.recent_error_rate:.0f}",
            f"{n.lease_ttl_remaining_s}s",
            n.breaker_state.value,
            ", ".join(f"{r.address} ({r.breaker_state.value})" for r in n.relays),
        ]
        for n in nodes
    ]


def nodes_shown(nodes: Sequence[NodeInfo]) -> Shown:
    return Shown(plain(list(nodes)), [(NODE_COLUMNS, node_rows(nodes))])


JOB_COLUMNS = (
    Column("job"), Column("name", text=True), Column("state"), Column("total", right=True),
    Column("delivered", right=True), Column("failed", right=True),
    Column("deferred", right=True, wide=True), Column("cancelled", right=True, wide=True),
    Column("suppressed", right=True, wide=True), Column("queued", right=True),
    Column("created", wide=True), Column("tags", text=True, wide=True),
)  # fmt: skip


def job_rows(jobs: Sequence[Job]) -> list[list[str]]:
    rows = []
    for j in jobs:
        p = j.progress
        created = p.created_at.strftime("%Y-%m-%d %H:%M:%S") if p.created_at else ""
        rows.append([j.job_id, j.options.name, p.state.value, str(p.total), str(p.delivered),
                     str(p.failed), str(p.deferred), str(p.cancelled), str(p.suppressed),
                     str(p.queued), created, ", ".join(j.options.tags)])  # fmt: skip
    return rows


def jobs_shown(jobs: Sequence[Job], data: Any = None) -> Shown:
    return Shown(plain(list(jobs)) if data is None else data, [(JOB_COLUMNS, job_rows(jobs))])


SUPPRESSION_COLUMNS = (
    Column("email"),
    Column("reason"),
    Column("added"),
    Column("reply", text=True, wide=True),
)


def suppressions_shown(items: Sequence[Suppression], data: Any = None) -> Shown:
    rows = [
        [
            s.email,
            s.reason.value,
            s.created_at.strftime("%Y-%m-%d %H:%M:%S") if s.created_at else "",
            str(s.reply or ""),
        ]
        for s in items
    ]
    return Shown(plain(list(items)) if data is None else data, [(SUPPRESSION_COLUMNS, rows)])


# ---- handlers ---------------------------------------------------------------------------

COORDINATOR_COLUMNS = (
    Column("role"), Column("coordinator"), Column("address"), Column("epoch", right=True),
    Column("in line since", right=True),
)  # fmt: skip
ETCD_COLUMNS = (
    Column("etcd endpoint"), Column("health"), Column("raft leader"),
    Column("db size", right=True), Column("revision", right=True),
    Column("error", text=True, wide=True),
)  # fmt: skip


async def cmd_status(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    status = await client.cluster_status()
    # The leader leads in its epoch (the revision of its election key); a standby's key
    # is newer, so its revision only says where it waits in line, not a newer epoch.
    roles = []
    if status.leader is not None:
        leader = status.leader
        roles.append(["leader", leader.coordinator_id, leader.address, str(leader.epoch), ""])
    for s in status.standbys:
        roles.append(["standby", s.coordinator_id, s.address, "", f"rev {s.epoch}"])
    members = [
        [
            m.endpoint,
            "[green]healthy[/]" if m.healthy else "[red]unhealthy[/]",
            "yes" if m.is_leader else "",
            f"{m.db_size_bytes / 1e6:.1f} MB" if m.healthy else "",
            str(m.revision) if m.healthy else "",
            m.error,
        ]
        for m in status.etcd_members
    ]
    shown = Shown(plain(status), [(COORDINATOR_COLUMNS, roles)])
    if members:
        shown.tables.append((ETCD_COLUMNS, members))
    else:
        shown.lines.append(f"etcd: {', '.join(status.etcd_endpoints)}")
    shown.lines.append(f"active jobs: {status.active_jobs}")
    return shown


async def cmd_nodes(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    return nodes_shown(await client.list_nodes())


async def cmd_node_action(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    if ns.action == "drain":
        node = await _drain_with_progress(client, ns.node_id, ns.timeout, console)
    else:
        action = {
            "cordon": client.cordon,
            "uncordon": client.uncordon,
            "reset-breaker": client.reset_breaker,
        }[ns.action]
        node = await action(ns.node_id)
    return Shown(plain(node), [(NODE_COLUMNS, node_rows([node]))])


async def _drain_with_progress(
    client: MailerClient, node_id: str, timeout_s: float, console: Console
) -> NodeInfo:
    """Drain node_id, showing (on stderr) its batches in flight go down to zero."""
    drain = asyncio.ensure_future(client.drain(node_id, timeout=timedelta(seconds=timeout_s)))
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[left]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"draining {node_id}", total=None, left="")
        start: int | None = None
        while not drain.done():
            try:
                nodes = {n.node_id: n for n in await client.list_nodes()}
            except MailerError:
                nodes = {}
            held = nodes[node_id].batches_in_flight if node_id in nodes else 0
            start = held if start is None else max(start, held)
            progress.update(task, total=start or 1, completed=(start or 1) - held,
                            left=f"{held} batches left")  # fmt: skip
            await asyncio.wait({drain}, timeout=0.5)
        node = await drain
        progress.update(task, total=1, completed=1, left="0 batches left")
    return node


async def cmd_jobs(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    states = [JobState(s) for s in ns.state or []]
    jobs: list[Job] = []
    async for job in client.list_jobs(states=states):
        jobs.append(job)
        if len(jobs) >= ns.limit:
            break
    return jobs_shown(jobs)


async def cmd_job_action(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    if ns.action == "watch":
        last = await _watch(client, ns.job_id, console)
        return Shown(plain(last), lines=[f"job {ns.job_id}: {last.state.value}"] if last else [])
    if ns.action == "retry-failed":
        job, queued = await client.retry_failed(ns.job_id)
        shown = jobs_shown([job], {"job": plain(job), "requeued": queued})
        shown.lines.append(f"queued {queued} recipients again")
        return shown
    action = {
        "show": client.get,
        "pause": client.pause,
        "resume": client.resume,
        "cancel": client.cancel,
    }[ns.action]
    job = await action(ns.job_id)
    return jobs_shown([job], plain(job))


async def _watch(client: MailerClient, job_id: str, console: Console) -> JobProgress | None:
    """Follow the job to its end with a progress bar on stderr; its last progress."""
    last: JobProgress | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(job_id, total=None, counts="")
        async for p in client.watch(job_id):
            last = p
            counts = f"{p.delivered} delivered, {p.failed} failed, {p.deferred} deferred"
            progress.update(task, total=p.total or None, completed=p.done, counts=counts)
    return last


RESULT_COLUMNS = (
    Column("#", right=True), Column("email"), Column("status"), Column("reply", text=True),
    Column("reason", text=True, wide=True), Column("attempts", right=True, wide=True),
    Column("node", wide=True), Column("message-id", wide=True),
    Column("came back", wide=True), Column("metadata", text=True, wide=True),
)  # fmt: skip


async def cmd_results(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    statuses = [RecipientStatus(s) for s in ns.status or []]
    results = []
    async for r in client.results(ns.job_id, statuses=statuses):
        results.append(r)
        if len(results) >= ns.limit:
            break
    rows = [
        [
            str(r.index),
            r.email,
            r.status.value,
            str(r.reply or ""),
            r.reason,
            str(r.attempts),
            r.node_id,
            r.message_id,
            r.feedback,
            " ".join(f"{k}={v}" for k, v in sorted(r.metadata.items())),
        ]
        for r in results
    ]
    return Shown(plain(results), [(RESULT_COLUMNS, rows)])


async def cmd_suppression(client: MailerClient, ns: argparse.Namespace, console: Console) -> Shown:
    if ns.action == "list":
        items: list[Suppression] = []
        async for s in client.suppressions(tenant=ns.tenant):
            items.append(s)
            if len(items) >= ns.limit:
                break
        return suppressions_shown(items)
    if not ns.email:
        raise UsageError(f"mailers suppression {ns.action}: an EMAIL is required")
    if ns.action == "add":
        added = await client.suppress(ns.email, SuppressionReason(ns.reason), tenant=ns.tenant)
        return suppressions_shown([added], plain(added))
    removed = await client.unsuppress(ns.email, tenant=ns.tenant)
    return Shown(
        {"email": ns.email, "removed": removed},
        lines=[f"{ns.email}: {'removed' if removed else 'was not on the list'}"],
    )


# ---- wiring -----------------------------------------------------------------------------


class UsageError(ValueError):
    """Arguments the command cannot use; exit status 2."""


def _run(handler: Handler, ns: argparse.Namespace) -> int:
    """Connect, run the handler, print what it shows; the exit status (see
    :data:`mailers.cli.EXIT_CODES`)."""
    errors = stderr()
    try:
        connection = resolve(ns, os.environ)
    except ConfigError as exc:
        errors.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE

    async def go() -> Shown | None:
        async with MailerClient(
            list(connection.coordinators), token=connection.token, tls=connection.tls
        ) as client:
            return await handler(client, ns, errors)

    try:
        shown = asyncio.run(go())
    except UsageError as exc:
        errors.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    except MailerError as exc:
        errors.print(f"[red]error:[/] {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
    if shown is not None:
        shown.print(output_format(ns))
    return EXIT_OK


def add_admin_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], run_node: Callable[[], int]
) -> None:
    """Register status, nodes, node, jobs, job, results and suppression on a subparsers
    object. ``mailers node`` with no action calls run_node (it runs a sender node)."""

    def parser(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        add_connection_arguments(p, on_subcommand=True)
        add_output_arguments(p, on_subcommand=True)
        p.set_defaults(func=lambda ns: _run(handler, ns))
        return p

    parser("status", cmd_status, "leader, standbys, etcd endpoints and active jobs")
    parser("nodes", cmd_nodes, "sender nodes: load, lease, breakers, relays")
    node = parser(
        "node",
        cmd_node_action,
        "cordon, uncordon, drain or reset a node's breaker; with no action, run a sender "
        "node (as python -m sender_node, configured by MAILER_* variables)",
    )
    node.add_argument("action", nargs="?", choices=["cordon", "uncordon", "drain", "reset-breaker"])
    node.add_argument("node_id", nargs="?")
    admin_func = node.get_default("func")

    def node_command(ns: argparse.Namespace) -> int:
        if ns.action is None:
            return run_node()
        if ns.node_id is None:
            node.error(f"{ns.action} needs a NODE_ID")
        return int(admin_func(ns))

    node.set_defaults(func=node_command)
    node.add_argument("--timeout", type=float, default=600, help="drain deadline, seconds")
    jobs = parser("jobs", cmd_jobs, "list jobs, newest first")
    jobs.add_argument("--state", action="append", choices=[s.value for s in JobState][1:])
    jobs.add_argument("--limit", type=int, default=50)
    job = parser("job", cmd_job_action, "show, watch, pause, resume, cancel or retry a job")
    job.add_argument(
        "action", choices=["show", "watch", "pause", "resume", "cancel", "retry-failed"]
    )
    job.add_argument("job_id")
    results = parser("results", cmd_results, "per-recipient outcomes of a job")
    results.add_argument("job_id")
    results.add_argument(
        "--status", action="append", choices=[s.value for s in RecipientStatus][1:]
    )
    results.add_argument("--limit", type=int, default=1000)
    supp = parser("suppression", cmd_suppression, "list, add or remove suppressed addresses")
    supp.add_argument("action", choices=["list", "add", "remove"])
    supp.add_argument("email", nargs="?", help="the address (add, remove)")
    supp.add_argument("--tenant", default="", help="whose list (admin tokens only)")
    supp.add_argument(
        "--reason",
        default=SuppressionReason.MANUAL.value,
        choices=[r.value for r in SuppressionReason][1:],
        help="why it is added (add)",
    )
    supp.add_argument("--limit", type=int, default=10000)
