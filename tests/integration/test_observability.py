"""Metrics, health, reflection and JSON logs of real coordinator and node processes."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client_sdk import Address, MailerClient, MessageContent, NodeState, Recipient
from mailers_dev.procs import (
    EtcdCluster,
    PostgresServer,
    Proc,
    free_port,
    spawn_python,
    wait_for_port,
)
from tests.helpers import assert_eventually, require_etcd

pytestmark = pytest.mark.integration


class Setup:
    def __init__(self, base: Path) -> None:
        self.etcd = EtcdCluster(base / "etcd", 1)
        self.postgres = PostgresServer(base / "postgres", durable=False)
        self.procs: list[Proc] = []
        self.coord_ports = [free_port(), free_port()]
        self.coord_metrics = [free_port(), free_port()]
        self.node_metrics = free_port()
        self.sink_port = free_port()
        self.logs = base / "logs"
        self.base = base

    def start(self) -> None:
        self.etcd.start()
        self.postgres.start()
        env = {
            "MAILER_ETCD_ENDPOINTS": ",".join(self.etcd.endpoints),
            "MAILER_LOG_FORMAT": "json",
            # Plaintext, chosen explicitly: these tests read health and reflection raw.
            "MAILER_PLAINTEXT": "1",
        }
        sink = spawn_python(
            "sink", "mailers_dev.sink", self.logs, {},
            ["--host", "127.0.0.1", "--port", str(self.sink_port),
             "--maildir", str(self.base / "md"), "--log", str(self.base / "sink.jsonl")],
        )  # fmt: skip
        self.procs.append(sink)
        wait_for_port(self.sink_port, 30, sink.popen)
        for i, (port, metrics) in enumerate(zip(self.coord_ports, self.coord_metrics, strict=True)):
            self.procs.append(
                spawn_python(
                    f"coordinator{i}",
                    "coordinator",
                    self.logs,
                    {
                        **env,
                        "MAILER_LISTEN": f"127.0.0.1:{port}",
                        "MAILER_COORDINATOR_ID": f"c{i}",
                        "MAILER_METRICS_LISTEN": f"127.0.0.1:{metrics}",
                        # 120 recipients make 3 batches
                        "MAILER_BATCH_SIZE": "40",
                        **self.postgres.env,
                    },
                )  # fmt: skip
            )
        self.procs.append(
            spawn_python(
                "node0",
                "sender_node",
                self.logs,
                {
                    **env,
                    "MAILER_NODE_ID": "node0",
                    "MAILER_STATE_DIR": str((self.base / "state").resolve()),
                    "MAILER_RELAYS": f"127.0.0.1:{self.sink_port}",
                    "MAILER_METRICS_LISTEN": f"127.0.0.1:{self.node_metrics}",
                },
            )  # fmt: skip
        )
        for port in [*self.coord_ports, *self.coord_metrics, self.node_metrics]:
            wait_for_port(port, 30)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.postgres.stop()
        self.etcd.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_etcd()
    s = Setup(tmp_path_factory.mktemp("obs"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}, ignoring comments."""
    samples = {}
    for line in exposition(port).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def families(port: int) -> set[str]:
    """Metric family names announced by # HELP lines."""
    text = exposition(port)
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}
    # Counters are announced as <name>_total; compare by the name they were made with.
    return {n.removesuffix("_total") for n in names}


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def test_metrics_health_reflection_and_json_logs(setup: Setup) -> None:
    addresses = [f"127.0.0.1:{p}" for p in setup.coord_ports]
    async with MailerClient(addresses) as client:

        async def connected() -> bool:
            try:
                return any(n.state is NodeState.ACTIVE for n in await client.list_nodes())
            except Exception:
                return False

        await assert_eventually(connected, timeout_s=60, message="node connected")
        job = await client.submit(
            MessageContent(sender=Address("m@example.com"), subject="s", text_body="t"),
            [Recipient(f"u{i}@metrics.example") for i in range(120)],
        )
        final = await client.wait(job.job_id)
        assert final.delivered == 120
        leader = (await client.cluster_status()).leader
    assert leader is not None
    lead = setup.coord_ports.index(int(leader.address.rpartition(":")[2]))
    standby = 1 - lead

    # Health: SERVING only on the leader, for the client API and overall
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await _health(setup.coord_ports[lead], "mailer.v1.MailerService") == serving
    assert await _health(setup.coord_ports[standby], "mailer.v1.MailerService") != serving
    # ... while the process as a whole is live on both (a plain liveness probe passes)
    assert await _health(setup.coord_ports[standby], "") == serving

    # Metrics: the leader counts what it dispatched and what came back
    coord = scrape(setup.coord_metrics[lead])
    assert coord["mailers_coordinator_leader"] == 1
    assert scrape(setup.coord_metrics[standby])["mailers_coordinator_leader"] == 0
    assert total(coord, 'mailers_recipients_total{status="delivered"}') == 120
    assert total(coord, 'mailers_smtp_replies_total{code="250"}') == 120
    assert total(coord, "mailers_batches_dispatched_total") >= 3
    # A round records several batches of the lone job in one store transaction
    assert 1 <= total(coord, "mailers_dispatch_rounds_total") < 3
    assert total(coord, "mailers_batch_ack_seconds_count") >= 3
    node = scrape(setup.node_metrics)
    assert total(node, "mailers_node_messages_total{") == 120
    assert total(node, 'mailers_node_messages_total{domain="metrics.example"') == 120
    assert node["mailers_node_registrations_total"] >= 1
    assert total(node, "mailers_node_transaction_seconds_count") == 120
    assert total(node, 'mailers_node_batches_total{outcome="completed"}') >= 3
    assert total(node, "mailers_node_relay_breaker_state{") == 0  # closed
    assert node["mailers_node_in_flight"] == 0
    assert total(coord, 'mailers_leader_changes_total{change="elected"}') == 1
    assert coord["mailers_nodes_connected"] == 1
    assert total(coord, 'mailers_node_breaker_state{node="node0"}') == 0
    assert coord["mailers_duplicate_deliveries_total"] == 0
    # Each process says which etcd member it talks to (the only one here), and that it
    # never had to leave it
    etcd_member = f'mailers_etcd_member{{member="{setup.etcd.endpoints[0]}"}}'
    for sample in (coord, node):
        assert sample[etcd_member] == 1
        assert sample["mailers_etcd_failovers_total"] == 0
        assert sample["mailers_etcd_no_leader_refusals_total"] == 0
    # Every family is exported, including those no event has touched yet
    coord_families = families(setup.coord_metrics[lead])
    assert {
        "mailers_coordinator_leader", "mailers_leader_changes", "mailers_batches_dispatched",
        "mailers_dispatch_rounds",
        "mailers_batch_ack_seconds", "mailers_batches_reassigned", "mailers_recipients",
        "mailers_smtp_replies", "mailers_duplicate_deliveries", "mailers_queue_batches",
        "mailers_jobs_active", "mailers_node_breaker_state", "mailers_nodes_connected",
    } <= coord_families  # fmt: skip
    assert {
        "mailers_node_messages", "mailers_node_smtp_replies", "mailers_node_transaction_seconds",
        "mailers_node_in_flight", "mailers_node_batches", "mailers_node_lease_renewals",
        "mailers_node_registrations", "mailers_node_relay_breaker_state",
    } <= families(setup.node_metrics)  # fmt: skip

    # Reflection lists the services
    async with grpc.aio.insecure_channel(leader.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
            names |= {s.name for s in reply.list_services_response.service}
    assert {"mailer.v1.MailerService", "mailer.v1.AdminService", "grpc.health.v1.Health"} <= names

    # JSON logs: every line of the node's log is a JSON object naming the node
    lines = [ln for ln in (setup.logs / "node0.log").read_text().splitlines() if ln.strip()]
    entries = [json.loads(ln) for ln in lines]
    assert entries and all(e["component"] == "node" and e["instance"] == "node0" for e in entries)
