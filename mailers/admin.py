"""Operator commands of ``mailers``: cluster, nodes and jobs, as tables or ``--json``.

Every command talks to the leader through the SDK (any coordinator address will do;
the client follows redirects). ``--json`` prints one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
from mailers.campaign import (
    DEFAULT_COORDINATORS,
    CampaignInputError,
    add_tls_arguments,
    resolve_tls,
)

Handler = Callable[[MailerClient, argparse.Namespace, Console], Awaitable[Any]]


def plain(value: Any) -> Any:
    """A JSON-ready copy of SDK values (dataclasses, enums, datetimes, sequences)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def coordinators(ns: argparse.Namespace) -> list[str]:
    value = ns.coordinators or os.environ.get("MAILER_COORDINATORS") or DEFAULT_COORDINATORS
    return [a.strip() for a in value.split(",") if a.strip()]


# ---- tables -----------------------------------------------------------------------------


def nodes_table(nodes: Sequence[NodeInfo]) -> Table:
    table = Table("node", "address", "state", "in flight", "capacity", "batches", "done",
                  "err %", "lease ttl", "breaker", "relays")  # fmt: skip
    for n in nodes:
        relays = ", ".join(f"{r.address} ({r.breaker_state.value})" for r in n.relays)
        table.add_row(
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
            relays,
        )
    return table


def _progress_cells(p: JobProgress) -> list[str]:
    return [p.state.value, str(p.total), str(p.delivered), str(p.failed), str(p.deferred),
            str(p.cancelled), str(p.suppressed), str(p.queued)]  # fmt: skip


def jobs_table(jobs: Sequence[Job]) -> Table:
    table = Table("job", "name", "state", "total", "delivered", "failed", "deferred",
                  "cancelled", "suppressed", "queued", "created")  # fmt: skip
    for j in jobs:
        cells = _progress_cells(j.progress)
        created = (
            j.progress.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.progress.created_at else ""
        )
        table.add_row(j.job_id, j.options.name, *cells, created)
    return table


# ---- handlers ---------------------------------------------------------------------------


async def cmd_status(client: MailerClient, ns: argparse.Namespace, console: Console) -> Any:
    status = await client.cluster_status()
    if ns.json:
        return plain(status)
    table = Table("role", "coordinator", "address", "epoch")
    if status.leader is not None:
        leader = status.leader
        table.add_row("leader", leader.coordinator_id, leader.address, str(leader.epoch))
    for s in status.standbys:
        table.add_row("standby", s.coordinator_id, s.address, str(s.epoch))
    console.print(table)
    etcd = Table("etcd endpoint", "health", "raft leader", "db size", "revision")
    for m in status.etcd_members:
        health = "[green]healthy[/]" if m.healthy else f"[red]unhealthy[/] {m.error}"
        etcd.add_row(m.endpoint, health, "yes" if m.is_leader else "",
                     f"{m.db_size_bytes / 1e6:.1f} MB" if m.healthy else "",
                     str(m.revision) if m.healthy else "")  # fmt: skip
    if status.etcd_members:
        console.print(etcd)
    else:
        console.print(f"etcd: {', '.join(status.etcd_endpoints)}")
    console.print(f"active jobs: {status.active_jobs}")
    return None


async def cmd_nodes(client: MailerClient, ns: argparse.Namespace, console: Console) -> Any:
    nodes = await client.list_nodes()
    if ns.json:
        return plain(nodes)
    console.print(nodes_table(nodes))
    return None


async def cmd_node_action(client: MailerClient, ns: argparse.Namespace, console: Console) -> Any:
    if ns.action == "drain":
        node = await _drain_with_progress(client, ns.node_id, ns.timeout, console, ns.json)
    else:
        action = {
            "cordon": client.cordon,
            "uncordon": client.uncordon,
            "reset-breaker": client.reset_breaker,
        }[ns.action]
        node = await action(ns.node_id)
    if ns.json:
        return plain(node)
    console.print(nodes_table([node]))
    return None


async def _drain_with_progress(
    client: MailerClient, node_id: str, timeout_s: float, console: Console, quiet: bool
) -> NodeInfo:
    """Drain node_id, showing its batches still in flight go down to zero."""
    drain = asyncio.ensure_future(client.drain(node_id, timeout=timedelta(seconds=timeout_s)))
    if quiet:
        return await drain
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


async def cmd_jobs(client: MailerClient, ns: argparse.Namespace, console: Console) -> Any:
    states = [JobState(s) for s in ns.state or []]
    jobs: list[Job] = []
    async for job in client.list_jobs(states=states):
        jobs.append(job)
        if len(jobs) >= ns.limit:
            break
    if ns.json:
        return plain(jobs)
    console.print(jobs_table(jobs))
    return None


async def cmd_job_action(client: MailerClient, ns: argparse.Namespace, console: Console) -> Any:
    if ns.action == "watch":
        return await _watch(client, ns.job_id, console, ns.json)
    if ns.action == "retry-failed":
        job, queued = await client.retry_failed(ns.job_id)
        if ns.json:
            return {"job": plain(job), "requeued": queued}
        console.print(f"queued {queued} recipients again")
    else:
        action = {
            "show": client.get,
            "pause": client.pause,
            "resume": client.resume,
            "cancel": client.cancel,
        }[ns.action]
        job = await action(ns.job_id)
        if ns.json:
            return plain(job)
    console.print(jobs_table([job]))
    return None


async def _watch(client: MailerClient, job_id: str, console: Console, as_json: bool) -> Any:
    last: JobProgress | None = None
    if as_json:
        async for p in client.watch(job_id):
            last = p
        return plain(last)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(job_id, total=None, counts="")
        async for p in client.watch(job_id):
            last = p
            counts = f"{p.delivered} delivered, {p.failed} failed, {p.deferred} deferred"
            progress.update(task, total=p.total or None, completed=p.done, counts=counts)
    if last is not None:
        console.print(f"job {job_id}: {last.state.value}")
    return None


async def cmd_results(client: MailerClient, ns: argparse.Namespace, console: Console) -> Any:
    statuses = [RecipientStatus(s) for s in ns.status or []]
    results = []
    async for r in client.results(ns.job_id, statuses=statuses):
        results.append(r)
        if len(results) >= ns.limit:
            break
    if ns.json:
        return plain(results)
    table = Table("#", "email", "status", "reply", "reason", "attempts", "node")
    for r in results:
        table.add_row(str(r.index), r.email, r.status.value, str(r.reply or ""), r.reason,
                      str(r.attempts), r.node_id)  # fmt: skip
    console.print(table)
    return None


def suppressions_table(items: Sequence[Suppression]) -> Table:
    table = Table("email", "reason", "reply", "added")
    for s in items:
        added = s.created_at.strftime("%Y-%m-%d %H:%M:%S") if s.created_at else ""
        table.add_row(s.email, s.reason.value, str(s.reply or ""), added)
    return table


async def cmd_suppression(client: MailerClient, ns: argparse.Namespace, console: Console) -> Any:
    if ns.action == "list":
        items: list[Suppression] = []
        async for s in client.suppressions(tenant=ns.tenant):
            items.append(s)
            if len(items) >= ns.limit:
                break
        if ns.json:
            return plain(items)
        console.print(suppressions_table(items))
        return None
    if not ns.email:
        raise SystemExit(f"mailers suppression {ns.action}: an EMAIL is required")
    if ns.action == "add":
        added = await client.suppress(ns.email, SuppressionReason(ns.reason), tenant=ns.tenant)
        if ns.json:
            return plain(added)
        console.print(suppressions_table([added]))
        return None
    removed = await client.unsuppress(ns.email, tenant=ns.tenant)
    if ns.json:
        return {"email": ns.email, "removed": removed}
    console.print(f"{ns.email}: {'removed' if removed else 'was not on the list'}")
    return None


# ---- wiring -----------------------------------------------------------------------------


def _run(handler: Handler, ns: argparse.Namespace) -> int:
    console = Console()

    try:
        tls = resolve_tls(ns, os.environ)
    except CampaignInputError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2

    async def go() -> Any:
        # The token comes from the environment only: flags show in ``ps``.
        token = os.environ.get("MAILER_TOKEN") or None
        async with MailerClient(coordinators(ns), token=token, tls=tls) as client:
            return await handler(client, ns, console)

    try:
        out = asyncio.run(go())
    except MailerError as exc:
        console.print(f"[red]error:[/] {type(exc).__name__}: {exc}")
        return 1
    if ns.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def add_admin_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], run_node: Callable[[], int]
) -> None:
    """Register status, nodes, node, jobs, job, results and suppression on a subparsers
    object. ``mailers node`` with no action calls run_node (it runs a sender node)."""

    def parser(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--coordinators", help="host:port,... (env MAILER_COORDINATORS)")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        add_tls_arguments(p)
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
