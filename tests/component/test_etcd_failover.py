"""The etcd client against a real 3-member etcd: it leaves a member that is dead, frozen
or without a leader for the next one, and endpoints may be host names."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence

import aetcd
import pytest

from mailers_dev.procs import EtcdCluster, free_port
from mailers_runtime.etcd import EtcdClient, Session, connect
from tests.helpers import assert_eventually

CALL_S = 2.0
"""Each test call's own deadline, as the servers give theirs."""


@contextlib.asynccontextmanager
async def client_of(endpoints: Sequence[str]) -> AsyncIterator[EtcdClient]:
    client = connect(endpoints)
    try:
        yield client
    finally:
        await client.close()


async def put_soon(client: EtcdClient, key: bytes, value: bytes, within_s: float) -> float:
    """Put, retrying each failed call, until one succeeds; the seconds it took. Each
    call has :data:`CALL_S` to answer."""
    started = time.monotonic()
    while True:
        try:
            async with asyncio.timeout(CALL_S):
                await client.put(key, value)
            return time.monotonic() - started
        except (aetcd.ClientError, TimeoutError):
            if time.monotonic() - started > within_s:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def etcd3(etcd_cluster3: EtcdCluster) -> EtcdCluster:
    """The 3-member cluster once it has elected a leader and answers writes (a call
    made while it is still electing may wait, and move a client on)."""
    async with client_of(etcd_cluster3.endpoints) as client:
        await put_soon(client, b"/failover/ready", b"1", within_s=30)
    return etcd_cluster3


async def test_a_dead_first_endpoint_is_left_for_the_next(etcd3: EtcdCluster) -> None:
    # Given endpoints whose first names a port where nothing listens
    dead = f"127.0.0.1:{free_port()}"
    async with client_of([dead, *etcd3.endpoints]) as client:
        # When the client is used
        took = await put_soon(client, b"/failover/dead", b"1", within_s=10)
        # Then the first refused call moved it on, and the next call succeeded
        assert client.member != dead and client.failovers >= 1
        assert took < 5
        assert (await client.get(b"/failover/dead")).value == b"1"


async def test_a_frozen_member_is_left_within_a_call_deadline(etcd3: EtcdCluster) -> None:
    first = etcd3.members[0]
    async with client_of(etcd3.endpoints) as client:
        await put_soon(client, b"/failover/frozen", b"0", within_s=10)
        assert client.member == first.endpoint
        # Given the member the client talks to stops answering (SIGSTOP)
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            # When the client keeps writing, each call with a 2 s deadline
            took = await put_soon(client, b"/failover/frozen", b"1", within_s=20)
            # Then the first call that got no answer moved it to another member, and
            # writes went on within a couple of call deadlines
            assert client.member != first.endpoint and client.failovers >= 1
            assert took < 3 * CALL_S
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)


async def test_a_member_without_a_leader_refuses_at_once(etcd3: EtcdCluster) -> None:
    lone, *others = etcd3.members
    async with client_of([lone.endpoint]) as client:
        await put_soon(client, b"/failover/lone", b"0", within_s=10)
        # Given the member's two peers are gone, so it has no leader
        for member in others:
            assert member.proc is not None
            member.proc.stop()

        # When it is called
        async def refused() -> bool:
            started = time.monotonic()
            try:
                async with asyncio.timeout(CALL_S):
                    await client.get(b"/failover/lone")
            except aetcd.ClientError as exc:
                # Then it answers "no leader" at once instead of letting calls time out
                return "no leader" in str(exc.__cause__ or exc) and (
                    time.monotonic() - started < 1.0
                )
            except TimeoutError:
                return False
            return False

        await assert_eventually(refused, timeout_s=15, message="a no-leader refusal")
        assert client.refusals >= 1


async def test_endpoints_may_be_host_names(etcd3: EtcdCluster) -> None:
    # Given endpoints written as names (resolved locally), the first one dead
    ports = [m.client_port for m in etcd3.members]
    names = [f"localhost:{free_port()}", *(f"localhost:{port}" for port in ports)]
    async with client_of(names) as client:
        # When the client is used, Then it works through the names and fails over
        await put_soon(client, b"/failover/names", b"1", within_s=10)
        assert (await client.get(b"/failover/names")).value == b"1"
        assert client.member in names[1:]


async def test_a_lease_survives_its_member_freezing(etcd3: EtcdCluster) -> None:
    first = etcd3.members[0]
    async with client_of(etcd3.endpoints) as client:
        # Given a 4 s lease kept alive through the first member
        session = Session(client, ttl_s=4, margin_s=1.0, call_timeout_s=1.0, retry_s=0.2)
        await session.open()
        try:
            assert first.proc is not None
            # When that member freezes for longer than the lease's TTL
            os.kill(first.proc.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    # Then the lease stays trusted throughout: its refreshes moved to
                    # another member before the trust margin ran out
                    assert session.trusted(), session.why
                    await asyncio.sleep(0.2)
            finally:
                os.kill(first.proc.pid, signal.SIGCONT)
            assert client.member != first.endpoint
        finally:
            await session.close()


@pytest.mark.parametrize("method", ["put", "get"])
async def test_a_healthy_member_is_kept(etcd3: EtcdCluster, method: str) -> None:
    # Given a healthy cluster, When many calls succeed, Then the client never moves
    async with client_of(etcd3.endpoints) as client:
        for i in range(50):
            if method == "put":
                await client.put(b"/failover/keep", str(i).encode())
            else:
                await client.get(b"/failover/keep")
        assert client.failovers == 0 and client.member == etcd3.endpoints[0]
