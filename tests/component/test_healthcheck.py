"""``mailers.healthcheck`` against real gRPC servers on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mailers.healthcheck import main, probe
from mailers.procs import free_port

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
    # Given a server with no health service (a sender node)
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
