"""The ``mailers`` command: a local cluster, a demo campaign, sending, and cluster status.

mailers demo                 start a local cluster and send a 1,000-recipient campaign
mailers cluster              run a local cluster until Ctrl-C
mailers send --csv ...       send a CSV of recipients as one job, with a progress bar
mailers status | nodes       what the leader coordinator says about the cluster
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client_sdk import Address, MailerClient, MailerError, MessageContent
from mailers.campaign import (
    DEFAULT_COORDINATORS,
    SendArgs,
    add_send_parser,
    main_send,
    run_send,
)
from mailers.cluster import ClusterSpec, LocalCluster
from mailers.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO_TEMPLATES = ROOT / "deploy" / "demo"
DEFAULT_PORTS = (7701, 7702)
_CITIES = ("Lisbon", "Zürich", "Kraków", "Osaka", "Montréal", "Nairobi", "Reykjavík")


def write_demo_csv(path: Path, count: int, seed: int = 7) -> None:
    """A CSV of count fictitious recipients (example.org addresses) with variables."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "code", "city"])
        for i in range(count):
            writer.writerow(
                [f"reader{i}@example.org", f"Reader {i}", f"M-{i:06d}", rng.choice(_CITIES)]
            )


def _start_cluster(workdir: Path, ports: Sequence[int], console: Console) -> LocalCluster:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    cluster = LocalCluster(workdir, ClusterSpec(coordinator_ports=tuple(ports)))
    with console.status("starting etcd, 2 coordinators, 3 sender nodes and an SMTP sink"):
        cluster.start()
        asyncio.run(_wait_nodes(cluster.coordinator_addresses, 3))
    console.print(
        f"[green]cluster up[/]: coordinators {', '.join(cluster.coordinator_addresses)}; "
        f"etcd {', '.join(cluster.etcd.endpoints)}; SMTP sink {cluster.relay}"
    )
    console.print(f"messages are stored as files in {cluster.maildir / 'new'}")
    return cluster


async def _wait_nodes(addresses: Sequence[str], count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with MailerClient(addresses) as client:
        while True:
            try:
                nodes = await client.list_nodes(timeout=timedelta(seconds=5))
                if sum(1 for n in nodes if n.state.name == "ACTIVE") >= count:
                    return
            except MailerError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} sender nodes did not connect within {timeout_s}s")
            await asyncio.sleep(0.2)


def cmd_demo(ns: argparse.Namespace) -> int:
    console = Console()
    workdir = Path(ns.workdir).resolve()
    cluster = _start_cluster(workdir, _free_or_default(DEFAULT_PORTS), console)
    try:
        csv_path = workdir / "recipients.csv"
        write_demo_csv(csv_path, ns.recipients)
        console.print(f"sending a campaign to {ns.recipients} recipients from {csv_path}")
        args = SendArgs(
            csv_path=csv_path,
            content=MessageContent(
                sender=Address("news@example.com", "Example News"),
                subject="Your digest, {{ name }}",
                text_body=(DEMO_TEMPLATES / "campaign.txt").read_text(),
                html_body=(DEMO_TEMPLATES / "campaign.html").read_text(),
                unsubscribe_url="https://example.com/unsubscribe",
            ),
            coordinators=tuple(cluster.coordinator_addresses),
        )
        summary = asyncio.run(run_send(args, console))
        stored = len(list((cluster.maildir / "new").iterdir()))
        console.print(f"the sink stored {stored} messages in {cluster.maildir / 'new'}")
        if summary is None or summary.delivered != ns.recipients:
            return 1
        return 0
    finally:
        with console.status("stopping the cluster"):
            cluster.stop()


def cmd_cluster(ns: argparse.Namespace) -> int:
    console = Console()
    cluster = _start_cluster(Path(ns.workdir).resolve(), DEFAULT_PORTS, console)
    console.print(
        "send a campaign from another terminal, e.g.\n"
        "  .venv/bin/mailers send --csv recipients.csv --from news@example.com "
        "--subject 'Hi {{ name }}' --html deploy/demo/campaign.html\n"
        "Ctrl-C stops the cluster."
    )
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


def _free_or_default(ports: Sequence[int]) -> list[int]:
    """The default ports when free (so `mailers status` finds the demo), else any."""
    result = []
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                result.append(port)
            except OSError:
                result.append(free_port())
    return result


async def _status(addresses: Sequence[str], console: Console) -> None:
    async with MailerClient(addresses) as client:
        status = await client.cluster_status()
    table = Table("role", "coordinator", "address", "epoch")
    if status.leader is not None:
        table.add_row(
            "leader", status.leader.coordinator_id, status.leader.address, str(status.leader.epoch)
        )
    for s in status.standbys:
        table.add_row("standby", s.coordinator_id, s.address, str(s.epoch))
    console.print(table)
    console.print(f"etcd: {', '.join(status.etcd_endpoints)}; active jobs: {status.active_jobs}")


async def _nodes(addresses: Sequence[str], console: Console) -> None:
    async with MailerClient(addresses) as client:
        nodes = await client.list_nodes()
    table = Table("node", "address", "state", "in flight", "capacity", "batches", "done",
                  "lease ttl", "breaker")  # fmt: skip
    for n in nodes:
        table.add_row(
            n.node_id,
            n.address,
            n.state.value,
            str(n.load.in_flight),
            str(n.load.capacity),
            str(n.batches_in_flight),
            str(n.recipients_done),
            f"{n.lease_ttl_remaining_s}s",
            n.breaker_state.value,
        )
    console.print(table)


def _coordinators(ns: argparse.Namespace) -> list[str]:
    value = ns.coordinators or os.environ.get("MAILER_COORDINATORS") or DEFAULT_COORDINATORS
    return [a.strip() for a in value.split(",") if a.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailers", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="start a local cluster and send a demo campaign")
    demo.add_argument("--recipients", type=int, default=1000)
    demo.add_argument("--workdir", default="var/demo", help="cluster data, logs and maildir")
    demo.set_defaults(func=cmd_demo)
    cluster = sub.add_parser("cluster", help="run a local cluster until Ctrl-C")
    cluster.add_argument("--workdir", default="var/cluster")
    cluster.set_defaults(func=cmd_cluster)
    add_send_parser(sub)
    for name, fn, text in (
        ("status", _status, "leader, standbys and etcd endpoints"),
        ("nodes", _nodes, "sender nodes with load, lease and breaker"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--coordinators", help="host:port,... (env MAILER_COORDINATORS)")
        p.set_defaults(func=lambda ns, fn=fn: _run_admin(fn, ns))
    return parser


def _run_admin(fn: object, ns: argparse.Namespace) -> int:
    console = Console()
    try:
        asyncio.run(fn(_coordinators(ns), console))  # type: ignore[operator]
    except MailerError as exc:
        console.print(f"[red]error:[/] {type(exc).__name__}: {exc}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "send":
        return main_send(ns)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
