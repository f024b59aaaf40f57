"""A whole Mailers cluster on this machine: etcd, coordinators, sender nodes, a sink.

Each part is a real process (``python -m coordinator``, ``python -m sender_node``,
``python -m mailers.sink``, Debian's ``etcd``) on loopback ports, so killing one is a
real failure. Used by ``mailers cluster``/``mailers demo`` and by the integration tests;
:meth:`LocalCluster.stop` stops every process it started, by PID.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from mailers.procs import EtcdCluster, Proc, free_port, spawn_python, wait_for_port


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
    etcd_prefix: str = "/mailers"


class LocalCluster:
    def __init__(self, base_dir: Path, spec: ClusterSpec | None = None) -> None:
        self.base_dir = base_dir
        self.spec = spec or ClusterSpec()
        self.log_dir = base_dir / "logs"
        self.maildir = base_dir / "maildir"
        self.sink_log = base_dir / "sink.jsonl"
        self.etcd = EtcdCluster(base_dir / "etcd", size=self.spec.etcd_members)
        self.sink_port = free_port()
        ports = list(self.spec.coordinator_ports) or [
            free_port() for _ in range(self.spec.coordinators)
        ]
        self.coordinator_ports = ports
        self.coordinators: dict[str, Proc] = {}
        self.nodes: dict[str, Proc] = {}
        self.sink: Proc | None = None

    @property
    def coordinator_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.coordinator_ports]

    @property
    def relay(self) -> str:
        return f"127.0.0.1:{self.sink_port}"

    def _base_env(self) -> dict[str, str]:
        return {
            "MAILER_ETCD_ENDPOINTS": ",".join(self.etcd.endpoints),
            "MAILER_ETCD_PREFIX": self.spec.etcd_prefix,
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, timeout_s: float = 60.0) -> None:
        """Start everything and wait until each process listens. Stops all on failure."""
        try:
            self.etcd.start(timeout_s)
            self.start_sink()
            for i, port in enumerate(self.coordinator_ports):
                self.start_coordinator(i, port)
            for i in range(self.spec.nodes):
                self.start_node(i)
            for i, port in enumerate(self.coordinator_ports):
                wait_for_port(port, timeout_s, self.coordinators[f"coordinator{i}"].popen)
        except BaseException:
            self.stop()
            raise

    def start_sink(self) -> None:
        self.sink = spawn_python(
            "sink",
            "mailers.sink",
            self.log_dir,
            {"PYTHONUNBUFFERED": "1"},
            [
                "--host", "127.0.0.1",
                "--port", str(self.sink_port),
                "--maildir", str(self.maildir),
                "--log", str(self.sink_log),
                *self.spec.sink_args,
            ],
        )  # fmt: skip
        wait_for_port(self.sink_port, 30, self.sink.popen)

    def start_coordinator(self, i: int, port: int) -> Proc:
        name = f"coordinator{i}"
        env = self._base_env()
        env.update(
            {
                "MAILER_LISTEN": f"127.0.0.1:{port}",
                "MAILER_COORDINATOR_ID": name,
            }
        )
        env.update(self.spec.coordinator_env)
        proc = spawn_python(name, "coordinator", self.log_dir, env)
        self.coordinators[name] = proc
        return proc

    def start_node(self, i: int) -> Proc:
        name = f"node{i}"
        env = self._base_env()
        env.update(
            {
                "MAILER_NODE_ID": name,
                "MAILER_LISTEN": "127.0.0.1:0",
                "MAILER_RELAYS": self.relay,
            }
        )
        env.update(self.spec.node_env)
        env.update(self.spec.per_node_env.get(i, {}))
        proc = spawn_python(name, "sender_node", self.log_dir, env)
        self.nodes[name] = proc
        return proc

    def coordinator_at(self, address: str) -> Proc:
        port = int(address.rpartition(":")[2])
        return self.coordinators[f"coordinator{self.coordinator_ports.index(port)}"]

    def delivered(self) -> list[dict[str, object]]:
        """Every line of the sink's log: one per accepted recipient."""
        if not self.sink_log.exists():
            return []
        lines = self.sink_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        for proc in [*self.nodes.values(), *self.coordinators.values()]:
            proc.stop()
        if self.sink is not None:
            self.sink.stop()
        self.etcd.stop()

    def logs(self) -> str:
        """Tail of every process log, for failure messages."""
        out = []
        for proc in [*self.coordinators.values(), *self.nodes.values()]:
            out.append(f"----- {proc.name} -----\n{proc.log()[-3000:]}")
        return "\n".join(out)
