"""``mailers demo``, ``mailers cluster`` and ``mailers certs``: development commands.

They start a local cluster (etcd, PostgreSQL, coordinators, sender nodes and an SMTP
sink, all on loopback) or write a development PKI. The ``mailers`` command adds them
when this package is installed (the mailers-dev distribution).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import shutil
import signal
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from rich.console import Console

from client_sdk import Address, EventType, MailerError, MessageContent
from mailers.campaign import SendArgs, run_send
from mailers.output import stderr
from mailers_dev.certs import DEFAULT_HOSTS, make_dev_pki
from mailers_dev.cluster import ETCD_ROOT, ClusterSpec, LocalCluster
from mailers_dev.feedback import dsn, one_click, send_back, stored, unsubscribe_link
from mailers_dev.procs import free_port
from mailers_dev.runstate import RUN_FILE, StillRunning, find_stale, record_run

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


def _start_cluster(cluster: LocalCluster, console: Console) -> None:
    """Start the cluster in a fresh work directory and wait for its nodes."""
    if cluster.base_dir.exists():
        shutil.rmtree(cluster.base_dir)
    cluster.base_dir.mkdir(parents=True)
    with console.status("starting etcd, 2 coordinators, 3 sender nodes and an SMTP sink"):
        cluster.start()
        asyncio.run(_wait_nodes(cluster, 3))
    security = (
        f"mutual TLS and etcd with client-certificate users (dev CA in {cluster.pki_dir})"
        if cluster.spec.tls
        else "[yellow]plaintext[/] (MAILER_PLAINTEXT=1)"
    )
    console.print(
        f"[green]cluster up[/]: coordinators {', '.join(cluster.coordinator_addresses)}; "
        f"etcd {', '.join(cluster.etcd.endpoints)}; SMTP sink {cluster.relay}; {security}"
    )
    console.print(f"messages are stored as files in {cluster.maildir / 'new'}")
    # This cluster has no tenant tokens (no auth file): the console takes any text as one.
    console.print(f"web console: {cluster.console_url(0)} (no tenant tokens: any text logs in)")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each stops ``cluster`` and ``demo`` the same way: Ctrl-C, ``kill``/``timeout``/systemd/a
container runtime, and a closed terminal."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_cluster(
    ns: argparse.Namespace,
    ports: Sequence[int],
    console: Console,
    body: Callable[[LocalCluster], int],
) -> int:
    """Start a local cluster in ``ns.workdir``, run ``body`` with it, and stop every
    process it started however this ends: ``body`` returning or failing, or any of
    :data:`STOP_SIGNALS` (which return 130 unless ``body`` is merely waiting for one).

    Before starting, an earlier run in the same directory is found
    (:func:`mailers_dev.runstate.find_stale`): one still running is reported (exit 1);
    processes an earlier, killed run left behind are stopped and listed.
    """
    errors = stderr()
    workdir = Path(ns.workdir).resolve()
    try:
        left = find_stale(workdir)
    except StillRunning as exc:
        errors.print(f"[red]error:[/] {exc}")
        return 1
    if left:
        errors.print(
            f"stopped {len(left)} processes an earlier run in {workdir} left running: "
            + ", ".join(f"{p.name} (pid {p.pid})" for p in left)
        )
    taken = [port for port in ports if not _port_free(port)]
    if taken:
        errors.print(
            f"[red]error:[/] 127.0.0.1:{taken[0]} is in use by another program (not a "
            f"cluster of {workdir}); stop it first"
        )
        return 1
    cluster = LocalCluster(
        workdir, ClusterSpec(coordinator_ports=tuple(ports), tls=not ns.plaintext)
    )
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        _start_cluster(cluster, console)
        _record(cluster, workdir, ns.command)
        return body(cluster)
    except KeyboardInterrupt as exc:
        errors.print(f"[yellow]stopping[/] ({exc or 'SIGINT'})")
        return 0 if ns.command == "cluster" else 130
    finally:
        # A second signal must not cut the clean-up short and leave processes behind.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            with console.status("stopping the cluster"):
                cluster.stop()
            (workdir / RUN_FILE).unlink(missing_ok=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def _wait_nodes(cluster: LocalCluster, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with cluster.client() as client:
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


def _record(cluster: LocalCluster, workdir: Path, command: str) -> None:
    """Write the run's record (see :mod:`mailers_dev.runstate`): its processes, its
    coordinators, and PostgreSQL's directory when that lives outside ``workdir``."""
    record_run(
        workdir,
        command,
        [(p.name, p.pid) for p in cluster.processes()],
        cluster.coordinator_addresses,
        [d for d in (cluster.postgres.outside,) if d is not None],
    )


def cmd_demo(ns: argparse.Namespace) -> int:
    console = Console()
    return _run_cluster(
        ns, _free_or_default(DEFAULT_PORTS), console, lambda c: _demo(c, ns.recipients, console)
    )


def _demo(cluster: LocalCluster, recipients: int, console: Console) -> int:
    csv_path = cluster.base_dir / "recipients.csv"
    write_demo_csv(csv_path, recipients)
    console.print(f"sending a campaign to {recipients} recipients from {csv_path}")
    args = SendArgs(
        csv_path=csv_path,
        content=MessageContent(
            sender=Address("news@example.com", "Example News"),
            subject="Your digest, {{ name }}",
            text_body=(DEMO_TEMPLATES / "campaign.txt").read_text(),
            html_body=(DEMO_TEMPLATES / "campaign.html").read_text(),
        ),
        coordinators=tuple(cluster.coordinator_addresses),
        tls=cluster.client_tls,
    )
    summary = asyncio.run(run_send(args, console))
    count = len(list((cluster.maildir / "new").iterdir()))
    console.print(f"the sink stored {count} messages in {cluster.maildir / 'new'}")
    if summary is None or summary.delivered != recipients:
        return 1
    return 0 if asyncio.run(_what_comes_back(cluster, summary.job_id, console)) else 1


async def _what_comes_back(cluster: LocalCluster, job_id: str, console: Console) -> bool:
    """Play a mailbox provider: bounce one message back to its VERP address, click
    another's one-click unsubscribe (TLS clusters serve it); show the events and the
    suppressions the cluster records."""
    sent = stored(cluster.sink_log, cluster.maildir)
    bounced, unsubscribed = sorted(sent)[:2]
    envelope_from, message = sent[bounced]
    console.print(f"\na provider bounces the message to {bounced} (5.1.1) to {envelope_from}")
    await send_back(
        cluster.inbound_ports[0], envelope_from, dsn(bounced, "5.1.1", str(message["Message-ID"]))
    )
    link = unsubscribe_link(sent[unsubscribed][1])
    if link:
        status, _ = await one_click(link, cluster.pki_dir / "ca.crt")
        console.print(f"{unsubscribed} clicks unsubscribe: POST {link} -> {status}")
    wanted = [EventType.BOUNCED] + ([EventType.UNSUBSCRIBED] if link else [])
    async with cluster.client() as client:
        try:
            async with asyncio.timeout(60), client.events(job_ids=[job_id], types=wanted) as events:
                async for event in events:
                    what = f"{event.type.value} {event.email} ({event.reason})"
                    console.print(f"event #{event.event_id}: {what}")
                    wanted.remove(event.type)
                    if not wanted:
                        break
        except TimeoutError:
            console.print(f"[red]no {', '.join(t.value for t in wanted)} event within 60 s[/]")
            return False
        listed = [f"{s.email} ({s.reason.value})" async for s in client.suppressions()]
    console.print("suppressed from now on: " + ", ".join(listed))
    return True


def cmd_cluster(ns: argparse.Namespace) -> int:
    console = Console()
    return _run_cluster(ns, ns.ports, console, lambda c: _serve(c, console))


def _serve(cluster: LocalCluster, console: Console) -> int:
    """Say how to use the cluster, then wait for a signal (see :data:`STOP_SIGNALS`)."""
    exports = ""
    root = cluster.etcd_tls(ETCD_ROOT)
    if root is not None:
        exports = "".join(f"  export {k}={v}\n" for k, v in cluster.tls_env("client").items())
        console.print(
            "etcd as root: etcdctl --endpoints "
            f"{','.join(cluster.etcd.client_urls)} --cacert {root.ca_file} "
            f"--cert {root.cert_file} --key {root.key_file} get / --prefix --keys-only",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        "send a campaign from another terminal, e.g.\n"
        f"{exports}"
        "  .venv/bin/mailers send --csv recipients.csv --from news@example.com "
        "--subject 'Hi {{ name }}' --html deploy/demo/campaign.html\n"
        "Ctrl-C (or SIGTERM, SIGHUP) stops the cluster.",
        highlight=False,
        soft_wrap=True,
    )
    while True:
        signal.pause()


def cmd_certs(ns: argparse.Namespace) -> int:
    """Write a development CA and a cluster's certificates, and say how to use them."""
    console = Console(highlight=False, soft_wrap=True)
    directory = Path(ns.directory).resolve()
    if (directory / "ca.key").exists() and not ns.force:
        console.print(f"[red]error:[/] {directory} already holds a CA (--force replaces it)")
        return 2
    written = make_dev_pki(directory, ns.node or [], ns.host or DEFAULT_HOSTS)
    for name, paths in written.items():
        console.print(f"{name:>16}  {paths.cert}  {paths.key} (mode 0600)")
    ca = written["ca"].cert

    def env(name: str, kind: str = "TLS") -> str:
        p = written[name]
        return f"MAILER_{kind}_CA={ca} MAILER_{kind}_CERT={p.cert} MAILER_{kind}_KEY={p.key}"

    indent = " " * 18
    console.print("\nenvironment of each process (see deploy/README.md, TLS):")
    console.print(f"  coordinators:   {env('coordinator')}")
    console.print(f"{indent}{env('coordinator', 'ETCD')}")
    for node in ns.node or []:
        console.print(f"  node {node}:{' ' * max(1, 10 - len(node))}{env(f'node-{node}')}")
        console.print(f"{indent}{env(f'node-{node}', 'ETCD')}")
    console.print(f"  mailers CLI:    {env('client')}")
    console.print(
        "  SDK:            ClientTls.from_files("
        f"'{ca}', '{written['client'].cert}', '{written['client'].key}')"
    )
    etcd, root = written["etcd"], written[ETCD_ROOT]
    console.print(
        f"  etcd members:   --trusted-ca-file {ca} --cert-file {etcd.cert} "
        f"--key-file {etcd.key} --client-cert-auth,"
        f"\n{indent}the same files as --peer-trusted-ca-file, --peer-cert-file, "
        "--peer-key-file, and --peer-client-cert-auth"
    )
    nodes = " ".join(ns.node or [])
    console.print(
        f"  then, once:     mailers etcd-auth --endpoints HOST:PORT --pki {directory} {nodes}"
    )
    console.print(f"  etcdctl (root): --cacert {ca} --cert {root.cert} --key {root.key}")
    console.print(
        "development only: ca.key can issue certificates every process trusts; "
        "keep production keys in your own PKI"
    )
    return 0


def _ports(text: str) -> tuple[int, ...]:
    """``--ports``: two distinct TCP ports."""
    try:
        ports = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of ports: {text!r}") from None
    if len(ports) != 2 or len(set(ports)) != 2 or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"two distinct ports from 1 to 65535: {text!r}")
    return ports


def _port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port. SO_REUSEADDR, as the servers bind: the
    closed connections of a run just stopped (TIME_WAIT) do not hold the port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_or_default(ports: Sequence[int]) -> list[int]:
    """The default ports when free (so `mailers status` finds the demo), else any."""
    return [port if _port_free(port) else free_port() for port in ports]


def add_dev_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``, ``cluster`` and ``certs`` to the ``mailers`` command."""
    demo = sub.add_parser("demo", help="start a local cluster and send a demo campaign")
    demo.add_argument("--recipients", type=int, default=1000)
    demo.add_argument("--workdir", default="var/demo", help="cluster data, logs and maildir")
    demo.add_argument("--plaintext", action="store_true", help="no TLS between processes")
    demo.set_defaults(func=cmd_demo)
    cluster = sub.add_parser(
        "cluster",
        help="run a local cluster until Ctrl-C",
        description="Run etcd, PostgreSQL, 2 coordinators (127.0.0.1:7701 and 7702), 3 "
        "sender nodes and an SMTP sink until Ctrl-C, SIGTERM or SIGHUP, which stop every "
        "one of them. A run finds an earlier one in the same --workdir: it refuses while "
        "that one runs, and stops what a killed one left behind.",
    )
    cluster.add_argument("--workdir", default="var/cluster")
    cluster.add_argument(
        "--ports",
        type=_ports,
        default=DEFAULT_PORTS,
        metavar="PORT,PORT",
        help="the coordinators' ports on 127.0.0.1 (default 7701,7702)",
    )
    cluster.add_argument("--plaintext", action="store_true", help="no TLS between processes")
    cluster.set_defaults(func=cmd_cluster)
    certs = sub.add_parser(
        "certs",
        help="make a development CA and the certificates of a cluster",
        description="Write ca.crt/ca.key and coordinator, client, etcd, etcd-root and "
        "node-<ID> certificates (ECDSA P-256, keys mode 0600) into DIR.",
    )
    certs.add_argument("directory", metavar="DIR")
    certs.add_argument(
        "--node", action="append", metavar="ID", help="a node certificate (repeatable)"
    )
    certs.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="DNS name or IP of server certificates (repeatable; default: "
        f"{', '.join(DEFAULT_HOSTS)})",
    )
    certs.add_argument("--force", action="store_true", help="replace a CA already in DIR")
    certs.set_defaults(func=cmd_certs)
