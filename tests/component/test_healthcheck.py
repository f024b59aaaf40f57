"""``mailers_runtime.healthcheck`` against real gRPC servers on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mailers_dev.certs import DevCA, cluster_specs
from mailers_dev.procs import free_port
from mailers_runtime import settings
from mailers_runtime.healthcheck import main, probe
from mailers_runtime.tls import COORDINATOR_NAME, TlsConfig, Transport

SERVICE = "mailer.v1.MailerService"


@pytest.fixture
async def standby() -> AsyncIterator[tuple[str, health.aio.HealthServicer]]:
    """A server like a standby coordinator: every service NOT_SERVING."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in (SERVICE, ""):
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(None)


async def test_standby_is_alive_but_not_ready(
    standby: tuple[str, health.aio.HealthServicer],
) -> None:
    address, servicer = standby
    # Given a standby: alive, not ready
    assert (await asyncio.to_thread(probe, address, None, 2.0)).ok
    assert not (await asyncio.to_thread(probe, address, SERVICE, 2.0)).ok
    # When it becomes leader
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    # Then the readiness probe passes, through the command-line entry point too
    assert await asyncio.to_thread(main, [address, "--service", SERVICE]) == 0


async def test_server_without_health_service_is_alive() -> None:
    # Given a server with no health service (nodes before they served one)
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        # Then liveness passes (UNIMPLEMENTED is an answer) and readiness does not
        assert await asyncio.to_thread(main, [f"127.0.0.1:{port}"]) == 0
        assert await asyncio.to_thread(main, [f"127.0.0.1:{port}", "--service", SERVICE]) == 1
    finally:
        await server.stop(None)


async def test_nothing_listening_fails_within_the_deadline() -> None:
    verdict = await asyncio.to_thread(probe, f"127.0.0.1:{free_port()}", None, 0.5)
    assert not verdict.ok
    assert "UNAVAILABLE" in verdict.reason or "DEADLINE" in verdict.reason


async def test_container_probe_of_a_standby_coordinator(
    standby: tuple[str, health.aio.HealthServicer],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    address, servicer = standby
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # Given a coordinator container whose health-only port is the standby's, and PID 1
    # started as `mailers coordinator`
    port = address.rsplit(":", 1)[1]
    monkeypatch.setenv("MAILER_HEALTH_LISTEN", f"0.0.0.0:{port}")
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/opt/mailers/bin/python\0/opt/mailers/bin/mailers\0coordinator\0")
    # Then the probe passes (alive), and with --ready fails until it leads
    assert await asyncio.to_thread(main, [], pid1_cmdline=cmdline) == 0
    assert await asyncio.to_thread(main, ["--ready"], pid1_cmdline=cmdline) == 1
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert await asyncio.to_thread(main, ["--ready"], pid1_cmdline=cmdline) == 0


async def test_container_probe_without_a_role_fails(tmp_path: Path) -> None:
    # Given PID 1 that runs no Mailers server
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/bin/sh\0")
    # Then the probe refuses to guess
    assert await asyncio.to_thread(main, [], pid1_cmdline=cmdline) == 1


async def test_container_probe_of_a_node_over_mutual_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a node-like server on the node's TLS transport: client certificates required,
    # only mailers-coordinator may call anything but health
    ca = DevCA.create(tmp_path)
    (spec,) = [s for s in cluster_specs(["n1"]) if s.name == "node-n1"]
    cert = ca.issue(spec)
    env = {
        "MAILER_TLS_CA": str(ca.cert_path),
        "MAILER_TLS_CERT": str(cert.cert),
        "MAILER_TLS_KEY": str(cert.key),
    }
    transport = Transport.load(
        settings.load(TlsConfig, env, {"allowed_clients": (COORDINATOR_NAME,)})
    )
    server = grpc.aio.server(interceptors=transport.interceptors())
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = transport.add_port(server, "127.0.0.1:0")
    await server.start()
    try:
        # And the probe's environment is the node's own (its certificate names
        # mailers-node-n1, not mailers-coordinator)
        for name, value in {**env, "MAILER_LISTEN": f"0.0.0.0:{port}"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("MAILER_PLAINTEXT", raising=False)
        # When the node is not (or no longer) registered, the probe fails
        assert await asyncio.to_thread(main, ["--role", "node"]) == 1
        # When it is registered and not draining, the probe passes
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert await asyncio.to_thread(main, ["--role", "node"]) == 0
    finally:
        await server.stop(None)
