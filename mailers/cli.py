"""The ``mailers`` command: a local cluster, a demo campaign, sending, and cluster status.

mailers demo                 start a local cluster and send a 1,000-recipient campaign
mailers cluster              run a local cluster until Ctrl-C
mailers send --csv ...       send a CSV of recipients as one job, with a progress bar
mailers status | nodes       what the leader coordinator says about the cluster
mailers jobs | job | results jobs, one job's control, its per-recipient outcomes
mailers events [--follow]    delivery events, as recorded so far or as they come
mailers webhooks ...         endpoints that receive the events as signed POSTs
mailers config               named contexts: which cluster, with which certificates
mailers completion SHELL     the shell completion script
mailers certs DIR            make a development CA and the certificates of a cluster
mailers etcd-auth NODE_ID... create etcd's users and roles and enable auth (as root)
mailers coordinator | node   run a coordinator or a sender node (MAILER_* variables)

The local clusters of ``demo`` and ``cluster`` run mutual TLS between every process
with a development CA made in their work directory, and etcd over TLS with a user per
certificate (``--plaintext`` turns both off).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import sys
from collections.abc import Sequence
from pathlib import Path

import aetcd
import argcomplete
from argcomplete.shell_integration import shellcode
from rich.console import Console

from mailers.admin import add_admin_parsers
from mailers.campaign import add_send_parser, main_send
from mailers.config import add_config_parser, add_connection_arguments
from mailers.etcd_auth import ROOT as ETCD_ROOT_USER
from mailers.etcd_auth import ROOT_CERT as ETCD_ROOT
from mailers.etcd_auth import (
    Grant,
    add_node,
    bootstrap,
    node_user,
    remove_node,
    role_table,
)
from mailers.events import add_events_parser
from mailers.output import add_output_arguments, stderr
from mailers.webhooks import add_webhooks_parser
from mailers_runtime.etcd import EtcdTls, connect, parse_endpoints, permission_denied


class _UsageError(ValueError):
    """An ``etcd-auth`` argument is unusable; the message says which."""


def _root_tls(ns: argparse.Namespace) -> EtcdTls:
    """Root's identity from ``--pki`` or ``--ca/--cert/--key``, its files checked.

    Raises:
        _UsageError: neither or both ways given, a file missing.
    """
    files = {"--ca": ns.ca, "--cert": ns.cert, "--key": ns.key}
    given = [flag for flag, value in files.items() if value]
    if ns.pki and given:
        raise _UsageError(f"give --pki or --ca/--cert/--key, not both ({', '.join(given)})")
    if ns.pki:
        tls = EtcdTls.from_dir(Path(ns.pki), ETCD_ROOT)
        labels = ("--pki: ca.crt", f"--pki: {ETCD_ROOT}.crt", f"--pki: {ETCD_ROOT}.key")
    elif len(given) == len(files):
        tls = EtcdTls(Path(ns.ca), Path(ns.cert), Path(ns.key))
        labels = ("--ca", "--cert", "--key")
    else:
        missing = [flag for flag in files if flag not in given]
        raise _UsageError(
            "root's certificate is needed: --pki DIR (with ca.crt and etcd-root.crt/.key) "
            f"or --ca, --cert and --key (missing: {', '.join(missing)})"
        )
    for label, path in zip(labels, (tls.ca_file, tls.cert_file, tls.key_file), strict=True):
        if not path.is_file():
            raise _UsageError(f"{label}: no file at {path}")
    if ns.server_name:
        tls = dataclasses.replace(tls, server_name=ns.server_name)
    return tls


_UNREACHABLE = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)


def _describe(grant: Grant) -> str:
    """``readwrite /mailers/...`` (a prefix) or ``readwrite /mailers/nodes/n1`` (a key)."""
    key = grant.key.decode(errors="replace")
    return f"{grant.access.name.lower()} {key}{'...' if grant.range_end else ''}"


async def _etcd_auth(
    ns: argparse.Namespace, endpoints: list[str], tls: EtcdTls, console: Console
) -> None:
    """Run the chosen mode. Raises what bootstrap, add_node and remove_node raise."""
    where = f"etcd at {','.join(endpoints)}"
    if not (ns.add_node or ns.remove_node):
        await bootstrap(endpoints, tls, ns.prefix, ns.node_ids, ready_timeout_s=ns.timeout_s)
        console.print(f"{where}: auth enabled; users (certificate CN) and their keys:")
        console.print(f"  {ETCD_ROOT_USER:<28} all (etcd's superuser)")
        for user, grants in role_table(ns.prefix, ns.node_ids).items():
            console.print(f"  {user:<28} {', '.join(_describe(g) for g in sorted(grants))}")
        if not ns.node_ids:
            console.print("no node users yet: add each node with --add-node ID")
        return
    client = connect(endpoints, tls=tls)
    try:
        for node_id in ns.add_node or []:
            await add_node(client, ns.prefix, node_id)
            console.print(
                f"{where}: user {node_user(node_id)} may read and write "
                f"{ns.prefix}/nodes/{node_id} only"
            )
        for node_id in ns.remove_node or []:
            await remove_node(client, node_id)
            console.print(f"{where}: user and role {node_user(node_id)} removed")
    finally:
        await client.close()


def cmd_etcd_auth(ns: argparse.Namespace) -> int:
    """Set up or change etcd's users and roles as root; 0 done, 1 etcd failed or
    refused, 2 unusable arguments."""
    console = Console(highlight=False, soft_wrap=True)
    errors = stderr()
    try:
        endpoints = parse_endpoints(ns.endpoints)
        if ns.node_ids and (ns.add_node or ns.remove_node):
            raise _UsageError(
                "NODE_ID arguments set up a whole cluster; with --add-node or "
                "--remove-node give none"
            )
        if not ns.prefix.startswith("/"):
            raise _UsageError(f"--prefix {ns.prefix!r} must start with '/'")
        if ns.timeout_s <= 0:
            raise _UsageError("--timeout-s must be positive")
        # Validates every node id before anything is sent.
        role_table(ns.prefix, [*ns.node_ids, *(ns.add_node or []), *(ns.remove_node or [])])
        tls = _root_tls(ns)
        asyncio.run(_etcd_auth(ns, endpoints, tls, console))
    except ValueError as exc:  # _UsageError, bad endpoints or node ids
        errors.print(f"[red]error:[/] {exc}")
        return 2
    except OSError as exc:
        errors.print(f"[red]error:[/] cannot read a TLS file: {exc}")
        return 2
    except aetcd.ClientError as exc:
        if permission_denied(exc):
            errors.print(
                f"[red]error:[/] etcd refused: {exc}. Only etcd's root user may change "
                "users and roles once auth is on: use the etcd-root certificate (CN root)"
            )
        elif isinstance(exc, _UNREACHABLE):
            errors.print(
                f"[red]error:[/] etcd at {ns.endpoints} did not answer: {exc}. Is it up, "
                "serving TLS with --client-cert-auth, and signed by this CA?"
            )
        else:
            errors.print(f"[red]error:[/] etcd failed: {type(exc).__name__}: {exc}")
        return 1
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("mailers-cli")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def cmd_coordinator(ns: argparse.Namespace) -> int:
    from coordinator.__main__ import main as coordinator_main

    return coordinator_main()


def run_node() -> int:
    from sender_node.__main__ import main as node_main

    return node_main()


PLUGIN_GROUP = "mailers.cli"
"""Entry points that add subcommands: ``mailers-dev`` adds demo, cluster and certs. The
CLI never imports the development tools; they register themselves when installed."""


def _add_plugin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands of installed plugins; without mailers-dev its commands explain."""
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        entry.load()(sub)
    for name in ("demo", "cluster", "certs"):
        if name not in sub.choices:
            sub.add_parser(name, help="(needs mailers-dev)").set_defaults(func=_needs_dev)


def _needs_dev(ns: argparse.Namespace) -> int:
    print(f"mailers {ns.command}: install the mailers-dev distribution", file=sys.stderr)
    return 2


EXIT_CODES = """exit status:
  0    done (for send: the job ended, or was submitted with --no-wait, or checked)
  1    the cluster refused, failed or could not be reached
  2    unusable arguments, configuration or input (nothing was sent)
  3    send: the job was cancelled
  130  interrupted (a submitted job keeps running on the cluster)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailers",
        description=__doc__.split("\n\n")[0],
        epilog="Connection options (--context, --coordinators, --tls-*) and -o may come "
        "before or after the subcommand; see `mailers config --help` for contexts.\n\n"
        + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    add_connection_arguments(parser, on_subcommand=False)
    add_output_arguments(parser, on_subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser(
        "coordinator",
        help="run a coordinator (as python -m coordinator)",
        description="Run a coordinator, configured by MAILER_* environment variables "
        "(deploy/CONFIG.md). Exit status 2 means the configuration is unusable. "
        "`mailers node` with no action runs a sender node the same way.",
    )
    server.set_defaults(func=cmd_coordinator)
    _add_plugin_parsers(sub)
    add_etcd_auth_parser(sub)
    add_send_parser(sub)
    add_admin_parsers(sub, run_node)
    add_events_parser(sub)
    add_webhooks_parser(sub)
    add_config_parser(sub)
    add_completion_parser(sub)
    return parser


def add_completion_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mailers completion bash|zsh|fish``: the shell's completion script."""
    parser = sub.add_parser(
        "completion",
        help="print the shell completion script",
        description="Print the completion script of a shell, e.g. add\n"
        '  eval "$(mailers completion bash)"\n'
        "to ~/.bashrc (zsh: ~/.zshrc; fish: mailers completion fish | source).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("shell", choices=["bash", "zsh", "fish"])
    parser.set_defaults(func=cmd_completion)


def cmd_completion(ns: argparse.Namespace) -> int:
    sys.stdout.write(shellcode(["mailers"], shell=ns.shell))
    return 0


def add_etcd_auth_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mailers etcd-auth``: see :func:`cmd_etcd_auth`."""
    parser = sub.add_parser(
        "etcd-auth",
        help="create etcd's users and roles and enable auth (as root)",
        description="Against etcd serving TLS with --client-cert-auth, as its root user "
        "(a certificate with CN root, etcd-root.crt from `mailers certs`): create the user "
        "and role of the coordinators (mailers-coordinator: read and write PREFIX/...) "
        "and of each NODE_ID (mailers-node-ID: its own PREFIX/nodes/ID only), then enable "
        "auth. Idempotent: run it again with more node ids. --add-node and --remove-node "
        "change one node's user once auth is on. Exit status: 0 done, 1 etcd failed or "
        "refused, 2 unusable arguments.",
    )
    parser.add_argument("node_ids", nargs="*", metavar="NODE_ID", help="a sender node's id")
    parser.add_argument(
        "--endpoints", required=True, metavar="HOST:PORT,...", help="the etcd members"
    )
    parser.add_argument("--pki", metavar="DIR", help="ca.crt and etcd-root.crt/.key in DIR")
    parser.add_argument("--ca", metavar="FILE", help="CA of the etcd members' certificates")
    parser.add_argument("--cert", metavar="FILE", help="root's certificate (CN root)")
    parser.add_argument("--key", metavar="FILE", help="its private key")
    parser.add_argument(
        "--server-name", help="name in the members' certificates, when not their host"
    )
    parser.add_argument("--prefix", default="/mailers", help="the cluster's key prefix")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        help="how long to wait for etcd to answer and have a leader (default 30)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--add-node", action="append", metavar="ID", help="add one node's user (repeatable)"
    )
    mode.add_argument(
        "--remove-node",
        action="append",
        metavar="ID",
        help="delete one node's user and role (repeatable)",
    )
    parser.set_defaults(func=cmd_etcd_auth)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Completes the command line and exits when the shell's completion function runs
    # us (it sets _ARGCOMPLETE); does nothing otherwise.
    argcomplete.autocomplete(parser)
    ns = parser.parse_args(argv)
    if ns.command == "send":
        return main_send(ns)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
