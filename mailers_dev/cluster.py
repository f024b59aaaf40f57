"""A whole Mailers cluster on this machine: etcd, PostgreSQL, coordinators, sender
nodes, a sink.

Each part is a real process (``python -m coordinator``, ``python -m sender_node``,
``python -m mailers_dev.sink``, Debian's ``etcd`` and ``postgres``) on loopback ports, so
killing one is a real failure. Each node keeps its result journal in
``<base>/state/node<i>``. Used by ``mailers cluster``/``mailers demo`` and by the integration and
chaos tests; :meth:`LocalCluster.stop` stops every process it started, by PID.

For fault injection a test can give chosen nodes an SMTP sink of their own (so the sink
logs tell which node sent what), route a node's or a coordinator's etcd traffic, or a
node's SMTP traffic, elsewhere (e.g. through ``mailers_dev.faultproxy``) with
:attr:`LocalCluster.node_etcd_endpoints`, :attr:`LocalCluster.coordinator_etcd_endpoints`
and :attr:`LocalCluster.node_relays`, and restart a node or the shared sink.

With ``ClusterSpec(tls=True)`` the cluster makes a development PKI in ``<base>/pki``
(``mailers_dev.certs.make_dev_pki``) and runs every gRPC hop over mutual TLS: coordinators
with ``coordinator.crt``, node i with ``node-node<i>.crt``, and :meth:`LocalCluster.client`
with ``client.crt``. etcd is secured as well: its members serve clients and peers over
TLS only with ``etcd.crt`` and require client certificates, and right after etcd starts
:func:`mailers.etcd_auth.bootstrap` (as ``root``, ``etcd-root.crt``) creates the users
and roles of the coordinators and nodes and enables auth. Each process then reaches etcd
with the same certificate it uses for gRPC (``MAILER_ETCD_CA``, ``_CERT``, ``_KEY``), so
node i may touch only its own registration key. :meth:`LocalCluster.etcd_client` gives a
test a client of its own (``root`` unless told otherwise).

Otherwise every process gets ``MAILER_PLAINTEXT=1``, explicitly, and etcd runs plaintext
without auth.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aetcd

from client_sdk import ClientTls, MailerClient
from coordinator.db import migrate
from coordinator.db.settings import DatabaseConfig
from coordinator.db.store import connect as connect_database
from mailers.etcd_auth import ROOT_CERT, bootstrap
from mailers_dev.certs import DEFAULT_HOSTS, CertSpec, DevCA, make_dev_pki
from mailers_dev.procs import (
    EtcdCluster,
    PgTls,
    PostgresServer,
    Proc,
    free_port,
    spawn_python,
    stop_together,
    wait_for_port,
)
from mailers_dev.sink import read_ambiguous
from mailers_runtime.etcd import SERVER_NAME_ENV, TLS_ENV, EtcdTls, connect

# Every transport variable, so none leaks in from the environment of whoever starts
# the cluster (spawn() copies os.environ): an empty value means unset.
_TRANSPORT_VARIABLES = (
    "MAILER_PLAINTEXT",
    "MAILER_TLS_CA",
    "MAILER_TLS_CERT",
    "MAILER_TLS_KEY",
    "MAILER_TLS_CLIENT_AUTH",
    "MAILER_TLS_ALLOWED_CLIENTS",
    "MAILER_TLS_SERVER_NAME",
    *TLS_ENV,
    SERVER_NAME_ENV,
)

ETCD_ROOT = ROOT_CERT
"""The certificate (CN ``root``) of etcd's superuser in the cluster's PKI."""
BOUNCE_DOMAIN = "bounces.mailers.test"
"""The bounce domain of a local cluster's VERP envelope senders."""


@dataclasses.dataclass
class ClusterSpec:
    coordinators: int = 2
    nodes: int = 3
    etcd_members: int = 1
    coordinator_ports: tuple[int, ...] = ()
    """Fixed client ports for the coordinators; free ports when empty."""
    coordinator_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    node_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    per_node_env: Mapping[int, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    """Extra variables for node i (e.g. a different capacity)."""
    sink_args: tuple[str, ...] = ()
    """Extra arguments of every sink (e.g. ``("--delay-ms", "5")``)."""
    relay_options: str = ""
    """``;key=value`` options appended to each node's relay address (e.g.
    ``tls=starttls;ca=/path;user=u;password_env=VAR``, see ``sender_node.config``)."""
    own_sink_nodes: tuple[int, ...] = ()
    """Nodes that relay to a sink of their own (``LocalCluster.node_sinks[i]``) instead
    of the shared one, so the sink logs tell which node sent a message."""
    etcd_prefix: str = "/mailers"
    tls: bool = False
    """Mutual TLS between every process, with a development CA made in ``<base>/pki``,
    etcd over TLS with client-certificate users (auth on), and PostgreSQL over TLS
    (``sslmode=verify-full``); False runs plaintext (``MAILER_PLAINTEXT=1``) and etcd
    without TLS or auth."""
    durable_database: bool = True
    """PostgreSQL with its default durability; False turns fsync off (commits still
    reach the OS, so a killed process loses nothing) for tests on slow disks."""
    migrate_first: bool = True
    """Bring the schema to head before the coordinators start, as a deploy's migration
    step would: Alembic is imported once, here, instead of in every coordinator (1.3 s
    of CPU each). False leaves it to the coordinators, which migrate at start under an
    advisory lock, as they do on an empty database in production."""
    feedback: bool = True
    """VERP envelope senders on the bounce domain :data:`BOUNCE_DOMAIN`, each
    coordinator's inbound SMTP endpoint (:attr:`LocalCluster.inbound_ports`) and its
    HTTP(S) endpoint (:attr:`LocalCluster.http_ports`: one-click unsubscribe and the
    console)."""


@dataclasses.dataclass
class Sink:
    """One SMTP sink process: where it listens, stores and logs."""

    name: str
    port: int
    maildir: Path
    log_path: Path
    proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ambiguous(self) -> list[dict[str, object]]:
        """Accepts whose ``250`` the client may not have read (``mailers_dev.sink``)."""
        return [{**line, "sink": self.name} for line in read_ambiguous(self.log_path)]

    def delivered(self) -> list[dict[str, object]]:
        """Every line of the sink's log (one per accepted recipient), tagged ``sink``."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text().splitlines()
        return [{**json.loads(line), "sink": self.name} for line in lines if line.strip()]


class LocalCluster:
    def __init__(self, base_dir: Path, spec: ClusterSpec | None = None) -> None:
        self.base_dir = base_dir
        self.spec = spec or ClusterSpec()
        self.log_dir = base_dir / "logs"
        self.maildir = base_dir / "maildir"
        self.sink_log = base_dir / "sink.jsonl"
        # The PKI is made in start(); EtcdTls only names the files until etcd starts.
        self.etcd = EtcdCluster(
            base_dir / "etcd",
            size=self.spec.etcd_members,
            tls=EtcdTls.from_dir(self.pki_dir, "etcd") if self.spec.tls else None,
        )
        self.postgres = PostgresServer(
            base_dir / "postgres",
            durable=self.spec.durable_database,
            tls=PgTls(
                self.pki_dir / "postgres.crt",
                self.pki_dir / "postgres.key",
                self.pki_dir / "ca.crt",
            )
            if self.spec.tls
            else None,
        )
        self.sink_port = free_port()
        ports = list(self.spec.coordinator_ports) or [
            free_port() for _ in range(self.spec.coordinators)
        ]
        self.coordinator_ports = ports
        self.inbound_ports = [free_port() for _ in ports]
        """Each coordinator's inbound SMTP endpoint (bounces, complaints)."""
        self.http_ports = [free_port() for _ in ports]
        """Each coordinator's HTTPS endpoint (one-click unsubscribe, the console); plain
        HTTP in a plaintext cluster."""
        self.coordinators: dict[str, Proc] = {}
        self.nodes: dict[str, Proc] = {}
        self.sink: Proc | None = None
        self.node_sinks: dict[int, Sink] = {
            i: Sink(
                name=f"sink-node{i}",
                port=free_port(),
                maildir=base_dir / f"maildir-node{i}",
                log_path=base_dir / f"sink-node{i}.jsonl",
            )
            for i in self.spec.own_sink_nodes
        }
        self.node_etcd_endpoints: dict[int, Sequence[str]] = {}
        """etcd endpoints for node i instead of the cluster's (e.g. a fault proxy in
        front of etcd); set before :meth:`start` or :meth:`restart_node`."""
        self.coordinator_etcd_endpoints: dict[int, Sequence[str]] = {}
        """etcd endpoints for coordinator i instead of the cluster's; set before
        :meth:`start`."""
        self.node_relays: dict[int, Sequence[str]] = {}
        """SMTP relays for node i instead of its sink (e.g. a fault proxy in front of
        it); set before :meth:`start` or :meth:`restart_node`."""

    @property
    def coordinator_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.coordinator_ports]

    def console_url(self, i: int = 0) -> str:
        """The operators' console on coordinator i (with ``feedback``, the default)."""
        scheme = "https" if self.spec.tls else "http"
        return f"{scheme}://127.0.0.1:{self.http_ports[i]}/console/"

    @property
    def relay(self) -> str:
        return f"127.0.0.1:{self.sink_port}"

    @property
    def pki_dir(self) -> Path:
        """The development CA and certificates of a TLS cluster."""
        return self.base_dir / "pki"

    @property
    def node_ids(self) -> list[str]:
        """The ids of the spec's nodes (``node0``...): node i is ``node<i>``."""
        return [f"node{i}" for i in range(self.spec.nodes)]

    def _pki(self, name: str, common_name: str) -> tuple[Path, Path]:
        """``<name>.crt`` and ``.key`` in the PKI, made first (with the CA) if missing."""
        if not (self.pki_dir / "ca.crt").exists():
            make_dev_pki(self.pki_dir, self.node_ids)
        cert, key = self.pki_dir / f"{name}.crt", self.pki_dir / f"{name}.key"
        if not cert.exists():
            DevCA.load(self.pki_dir).issue(CertSpec(name, common_name, DEFAULT_HOSTS))
        return cert, key

    def tls_env(self, name: str = "client") -> dict[str, str]:
        """``MAILER_TLS_CA``, ``_CERT`` and ``_KEY`` naming the CA and the certificate
        ``name`` (``client``, ``coordinator``, ``node-node0``...) of a TLS cluster, for a
        process or the CLI.

        Raises:
            RuntimeError: the cluster runs plaintext.
        """
        if not self.spec.tls:
            raise RuntimeError("this cluster runs plaintext (ClusterSpec.tls is False)")
        cert, key = self._pki(name, f"mailers-{name}")
        return {
            "MAILER_TLS_CA": str(self.pki_dir / "ca.crt"),
            "MAILER_TLS_CERT": str(cert),
            "MAILER_TLS_KEY": str(key),
        }

    @property
    def client_tls(self) -> ClientTls | None:
        """The SDK's TLS for this cluster (the ``client`` certificate); None: plaintext."""
        if not self.spec.tls:
            return None
        env = self.tls_env("client")
        return ClientTls.from_files(
            env["MAILER_TLS_CA"], env["MAILER_TLS_CERT"], env["MAILER_TLS_KEY"]
        )

    def client(self, **kwargs: Any) -> MailerClient:
        """An SDK client of every coordinator, over TLS with the client certificate
        when the cluster runs TLS; ``kwargs`` go to :class:`MailerClient`."""
        return MailerClient(self.coordinator_addresses, tls=self.client_tls, **kwargs)

    def etcd_tls(self, name: str = ETCD_ROOT) -> EtcdTls | None:
        """The etcd identity of certificate ``name`` (``etcd-root``, ``coordinator``,
        ``node-node0``...) in a TLS cluster; None when etcd runs plaintext."""
        if not self.spec.tls:
            return None
        if name == ETCD_ROOT:
            self._pki(name, "root")
        else:
            self._pki(name, f"mailers-{name}")
        return EtcdTls.from_dir(self.pki_dir, name)

    def etcd_env(self, name: str) -> dict[str, str]:
        """``MAILER_ETCD_CA``, ``_CERT`` and ``_KEY`` of :meth:`etcd_tls` for a process;
        empty when etcd runs plaintext."""
        tls = self.etcd_tls(name)
        return tls.env() if tls is not None else {}

    def etcd_client(self, name: str = ETCD_ROOT, timeout_s: int = 5) -> aetcd.Client:
        """A client of the cluster's etcd members (not yet connected; the caller closes
        it). In a TLS cluster it presents certificate ``name``: ``etcd-root`` (etcd's
        root user, the default) or e.g. ``node-node0``; in a plaintext cluster it speaks
        plaintext and ``name`` is ignored. Each call through it gives up after
        ``timeout_s``."""
        return connect(self.etcd.endpoints, timeout_s=timeout_s, tls=self.etcd_tls(name))

    def _base_env(self, certificate: str | None = None) -> dict[str, str]:
        env = {
            "MAILER_ETCD_ENDPOINTS": ",".join(self.etcd.endpoints),
            "MAILER_ETCD_PREFIX": self.spec.etcd_prefix,
            "PYTHONUNBUFFERED": "1",
        }
        env.update(dict.fromkeys(_TRANSPORT_VARIABLES, ""))
        if not self.spec.tls:
            env["MAILER_PLAINTEXT"] = "1"
        elif certificate is not None:
            # One certificate per process, for gRPC and etcd alike: its CN is the etcd
            # user bootstrap() made (mailers-coordinator, mailers-node-<id>).
            env.update(self.tls_env(certificate))
            env.update(self.etcd_env(certificate))
        return env

    def secure_etcd(self, timeout_s: float = 60.0) -> None:
        """In a TLS cluster, create the users and roles of the coordinators and of
        :attr:`node_ids` and enable auth, as ``root``; nothing when etcd runs plaintext.
        Idempotent; waits (up to ``timeout_s``) while etcd is still electing a leader.

        Raises:
            aetcd.ClientError: etcd refused the set-up, or had no leader in time.
        """
        root = self.etcd_tls(ETCD_ROOT)
        if root is not None:
            asyncio.run(
                bootstrap(
                    self.etcd.endpoints,
                    root,
                    self.spec.etcd_prefix,
                    self.node_ids,
                    ready_timeout_s=timeout_s,
                )
            )

    def migrate(self) -> None:
        """Bring the database's schema to head, on a thread of its own: unlike etcd's
        set-up this runs for plaintext clusters too, which tests start from a coroutine."""
        config = DatabaseConfig(
            url=self.postgres.url, password_file=str(self.postgres.password_file)
        )
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, migrate.upgrade(lambda: connect_database(config))).result()

    def start(self, timeout_s: float = 60.0) -> None:
        """Start everything and wait until each process listens. Stops all on failure.

        In a TLS cluster etcd's users are set up (:meth:`secure_etcd`) before any
        process of ours connects to it. That calls ``asyncio.run``, so call this from a
        thread without a running event loop (e.g. ``asyncio.to_thread``).
        """
        try:
            self.etcd_tls(ETCD_ROOT)  # makes the PKI, etcd's own certificate included
            if self.spec.tls:
                self._pki("postgres", "mailers-postgres")
            self.etcd.start(timeout_s)
            self.postgres.start(timeout_s)
            # The sink needs no etcd; starting it first lets etcd elect its leader
            # meanwhile, which secure_etcd would otherwise wait for.
            self.start_sink()
            if self.spec.migrate_first:
                self.migrate()
            self.secure_etcd(timeout_s)
            for i, port in enumerate(self.coordinator_ports):
                self.start_coordinator(i, port)
            # Nodes bind port 0 only once the coordinators hold theirs: the kernel could
            # otherwise hand a node a port reserved (free_port) but not yet bound.
            for i, port in enumerate(self.coordinator_ports):
                popen = self.coordinators[f"coordinator{i}"].popen
                wait_for_port(port, timeout_s, popen)
                if self.spec.feedback:
                    # Opened after gRPC (once PostgreSQL answered): a test that logs in
                    # to the console first was refused.
                    wait_for_port(self.http_ports[i], timeout_s, popen)
            for i in range(self.spec.nodes):
                self.start_node(i)
        except BaseException:
            self.stop()
            raise

    def start_sink(self) -> None:
        """Start the shared sink and every node's own sink (see ``own_sink_nodes``)."""
        self.sink = self._spawn_sink("sink", self.sink_port, self.maildir, self.sink_log)
        for sink in self.node_sinks.values():
            if sink.proc is None or not sink.proc.alive():
                sink.proc = self._spawn_sink(sink.name, sink.port, sink.maildir, sink.log_path)

    def restart_sink(self) -> None:
        """Stop the shared sink (SIGTERM, then SIGKILL) and start it again on the same
        port, appending to the same log. Nodes reconnect on their own."""
        if self.sink is not None:
            self.sink.stop()
        self.sink = self._spawn_sink("sink", self.sink_port, self.maildir, self.sink_log)

    def _spawn_sink(self, name: str, port: int, maildir: Path, log: Path) -> Proc:
        proc = spawn_python(
            name,
            "mailers_dev.sink",
            self.log_dir,
            {"PYTHONUNBUFFERED": "1"},
            [
                "--host", "127.0.0.1",
                "--port", str(port),
                "--maildir", str(maildir),
                "--log", str(log),
                *self.spec.sink_args,
            ],
        )  # fmt: skip
        wait_for_port(port, 30, proc.popen)
        return proc

    def start_coordinator(self, i: int, port: int) -> Proc:
        name = f"coordinator{i}"
        env = self._base_env("coordinator")
        env.update(
            {
                "MAILER_LISTEN": f"127.0.0.1:{port}",
                "MAILER_COORDINATOR_ID": name,
                # A local cluster's webhooks may go to a plain HTTP receiver on the
                # developer's machine.
                "MAILER_WEBHOOK_ALLOW_HTTP": "1",
                **self.postgres.env,
            }
        )
        if self.spec.feedback:
            env.update(
                {
                    "MAILER_INBOUND_LISTEN": f"127.0.0.1:{self.inbound_ports[i]}",
                    "MAILER_BOUNCE_DOMAINS": BOUNCE_DOMAIN,
                    "MAILER_TOKEN_KEY_FILE": str(self.token_key_file()),
                }
            )
            # One-click unsubscribe and the operators' console (console_url); plain HTTP
            # in a plaintext cluster.
            env["MAILER_HTTP_LISTEN"] = f"127.0.0.1:{self.http_ports[i]}"
            env["MAILER_CONSOLE"] = "1"
        env.update(self.spec.coordinator_env)
        if i in self.coordinator_etcd_endpoints:
            env["MAILER_ETCD_ENDPOINTS"] = ",".join(self.coordinator_etcd_endpoints[i])
        proc = spawn_python(name, "coordinator", self.log_dir, env)
        self.coordinators[name] = proc
        return proc

    def start_node(self, i: int) -> Proc:
        """Start node i as ``node<i>``.

        Raises:
            ValueError: the cluster secures etcd and i is not one of the spec's nodes,
                so etcd has no user for it (``mailers.etcd_auth.add_node`` makes one).
        """
        name = f"node{i}"
        if self.spec.tls and name not in self.node_ids:
            raise ValueError(f"etcd has no user for {name}: the spec has {self.spec.nodes} nodes")
        env = self._base_env(f"node-{name}")
        env.update(
            {
                "MAILER_NODE_ID": name,
                "MAILER_LISTEN": "127.0.0.1:0",
                "MAILER_STATE_DIR": str(self.state_dir(i)),
                "MAILER_RELAYS": (
                    self.node_sinks[i].address if i in self.node_sinks else self.relay
                )
                + (f";{self.spec.relay_options}" if self.spec.relay_options else ""),
            }
        )
        if self.spec.feedback:
            env["MAILER_BOUNCE_DOMAIN"] = BOUNCE_DOMAIN
            env["MAILER_TOKEN_KEY_FILE"] = str(self.token_key_file())
            if self.spec.tls:
                env["MAILER_UNSUBSCRIBE_URL"] = (
                    f"https://127.0.0.1:{self.http_ports[0]}/unsubscribe/"
                )
        env.update(self.spec.node_env)
        env.update(self.spec.per_node_env.get(i, {}))
        if i in self.node_etcd_endpoints:
            env["MAILER_ETCD_ENDPOINTS"] = ",".join(self.node_etcd_endpoints[i])
        if i in self.node_relays:
            env["MAILER_RELAYS"] = ",".join(self.node_relays[i])
        proc = spawn_python(name, "sender_node", self.log_dir, env)
        self.nodes[name] = proc
        return proc

    def token_key_file(self) -> Path:
        """The key of VERP and unsubscribe tokens, shared by every process (made once)."""
        path = self.base_dir / "token.key"
        if not path.exists():
            self.base_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32).hex().encode())
        return path

    def state_dir(self, i: int) -> Path:
        """Where node i keeps its result journal (kept across its restarts)."""
        return (self.base_dir / "state" / f"node{i}").resolve()

    def restart_node(self, i: int, grace_s: float = 5.0) -> Proc:
        """Stop node i if it runs (SIGTERM, so it drains and revokes its lease; SIGKILL
        after ``grace_s``) and start it again with the same id and environment."""
        old = self.nodes.get(f"node{i}")
        if old is not None:
            old.stop(grace_s)
        return self.start_node(i)

    def restart_coordinator(self, i: int, grace_s: float = 5.0) -> Proc:
        """Stop coordinator i if it runs (SIGTERM: it resigns; SIGKILL after ``grace_s``)
        and start it again on the same port."""
        old = self.coordinators.get(f"coordinator{i}")
        if old is not None:
            old.stop(grace_s)
        return self.start_coordinator(i, self.coordinator_ports[i])

    def coordinator_at(self, address: str) -> Proc:
        port = int(address.rpartition(":")[2])
        return self.coordinators[f"coordinator{self.coordinator_ports.index(port)}"]

    def delivered(self) -> list[dict[str, object]]:
        """Every line of every sink's log: one per accepted recipient, each tagged with
        its sink's name under ``sink`` (``"sink"`` for the shared one)."""
        shared = Sink("sink", self.sink_port, self.maildir, self.sink_log)
        lines = shared.delivered()
        for sink in self.node_sinks.values():
            lines.extend(sink.delivered())
        return lines

    def ambiguous(self) -> list[dict[str, object]]:
        """Every accept, in every sink, whose ``250`` the client may not have read."""
        shared = Sink("sink", self.sink_port, self.maildir, self.sink_log)
        lines = shared.ambiguous()
        for sink in self.node_sinks.values():
            lines.extend(sink.ambiguous())
        return lines

    def processes(self) -> list[Proc]:
        """Every process started and not yet stopped: etcd members, PostgreSQL, sinks,
        coordinators and nodes (each by the PID :meth:`stop` stops)."""
        procs = [m.proc for m in self.etcd.members]
        procs += [self.postgres.proc, self.sink, *(s.proc for s in self.node_sinks.values())]
        procs += [*self.coordinators.values(), *self.nodes.values()]
        return [p for p in procs if p is not None and p.alive()]

    def stop(self) -> None:
        """Stop the nodes (together), then the coordinators, the sinks, PostgreSQL and
        etcd: nodes hand back through coordinators and etcd, coordinators resign in etcd."""
        stop_together(list(self.nodes.values()))
        stop_together(list(self.coordinators.values()))
        sinks = [self.sink, *(s.proc for s in self.node_sinks.values())]
        stop_together([p for p in sinks if p is not None])
        self.postgres.stop()
        self.etcd.stop()

    def logs(self) -> str:
        """Tail of every process log, for failure messages."""
        out = []
        for proc in [*self.coordinators.values(), *self.nodes.values()]:
            out.append(f"----- {proc.name} -----\n{proc.log()[-3000:]}")
        return "\n".join(out)
