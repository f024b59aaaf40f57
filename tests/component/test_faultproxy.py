"""The TCP fault proxy against a real echo server on loopback, in-process and as a CLI."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator

import pytest

from mailers_dev.faultproxy import Direction, Fault, FaultKind, FaultProxy, take_budget
from tests.helpers import assert_eventually

# Long enough for loopback to deliver anything that is going to arrive.
QUIET_S = 0.3


class EchoServer:
    """Echoes every byte back; remembers what it got and how many connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_accept, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.create_task(self._echo(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(f"127.0.0.1:{echo.port}") as p:
        yield p


async def dial(
    proxy: FaultProxy,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(5):
        return await asyncio.open_connection("127.0.0.1", proxy.port)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout_s: float = 5) -> bytes:
    async with asyncio.timeout(timeout_s):
        return await reader.readexactly(n)


async def assert_nothing_arrives(reader: asyncio.StreamReader) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(QUIET_S):
            await reader.read(1)


async def assert_reset(reader: asyncio.StreamReader) -> bytes:
    """The connection was reset: reading fails with ECONNRESET or ends. Returns the
    bytes that came before (echoes that were already on their way)."""
    got = bytearray()
    async with asyncio.timeout(5):
        try:
            while data := await reader.read(65536):
                got += data
        except ConnectionResetError:
            pass
    return bytes(got)


# -- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("pass", Fault()),
        ("latency 0.25", Fault.latency(0.25)),
        ("blackhole", Fault.blackhole()),
        ("RESET\n", Fault.reset()),
        ("cut 100", Fault.cut_after(100)),
        ("cut 7 up", Fault.cut_after(7, Direction.UP)),
    ],
)
def test_faults_parse_from_text_and_print_back(text: str, fault: Fault) -> None:
    assert Fault.parse(text) == fault
    assert Fault.parse(str(fault)) == fault


@pytest.mark.parametrize(
    "text", ["", "latency", "cut", "cut x", "blackhole 3", "drop", "cut 1 left"]
)
def test_bad_fault_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Fault.parse(text)


def test_cut_budget_lets_exactly_n_bytes_through() -> None:
    assert take_budget(10, 4) == (4, False)
    assert take_budget(4, 4) == (4, True)
    assert take_budget(3, 10) == (3, True)
    assert take_budget(0, 10) == (0, True)
    assert Fault.cut_after(5, Direction.UP).counts(Direction.UP)
    assert not Fault.cut_after(5, Direction.UP).counts(Direction.DOWN)
    assert not Fault.latency(1).counts(Direction.UP)


# -- against the echo server ---------------------------------------------------------


async def test_pass_through_forwards_both_ways(echo: EchoServer, proxy: FaultProxy) -> None:
    reader, writer = await dial(proxy)
    payload = bytes(range(256)) * 1000
    writer.write(payload)
    assert await read_exactly(reader, len(payload)) == payload
    assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)
    # A half-close travels through: the echo server closes, and so does the proxy.
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    await assert_eventually(lambda: proxy.connections == 0, timeout_s=5)


async def test_latency_delays_each_way_and_keeps_order(proxy: FaultProxy) -> None:
    reader, writer = await dial(proxy)
    # Given 0.15 s of added latency each way
    proxy.add_latency(0.15)
    started = time.monotonic()
    for i in range(20):
        writer.write(b"%02d" % i)
    # Then the echo comes back in order, at least two latencies later, but not 20 times
    # the latency (chunks do not wait for each other)
    got = await read_exactly(reader, 40)
    elapsed = time.monotonic() - started
    assert got == b"".join(b"%02d" % i for i in range(20))
    assert 0.3 <= elapsed < 2.0, elapsed
    writer.close()


async def test_blackhole_holds_open_and_new_connections_until_lifted(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    reader, writer = await dial(proxy)
    writer.write(b"before")
    assert await read_exactly(reader, 6) == b"before"
    # When the proxy blackholes
    proxy.blackhole()
    # Then nothing crosses an open connection
    writer.write(b"during")
    await assert_nothing_arrives(reader)
    assert bytes(echo.received) == b"before"
    # And a new connection is accepted but not dialled onwards
    reader2, writer2 = await dial(proxy)
    writer2.write(b"new")
    await assert_nothing_arrives(reader2)
    assert echo.accepted == 1
    # When the fault is lifted, the held bytes flow, nothing lost, connections intact
    proxy.pass_through()
    assert await read_exactly(reader, 6) == b"during"
    assert await read_exactly(reader2, 3) == b"new"
    assert echo.accepted == 2
    writer.close()
    writer2.close()


async def test_reset_resets_open_and_new_connections(echo: EchoServer, proxy: FaultProxy) -> None:
    reader, writer = await dial(proxy)
    writer.write(b"ping")
    assert await read_exactly(reader, 4) == b"ping"
    # When the proxy resets
    proxy.reset()
    # Then the open connection is reset
    assert await assert_reset(reader) == b""
    # And so is every new one, without reaching the target
    reader2, writer2 = await dial(proxy)
    assert await assert_reset(reader2) == b""
    assert echo.accepted == 1
    assert proxy.stats.resets == 2
    writer.close()
    writer2.close()
    # When passing again, new connections work
    proxy.pass_through()
    reader3, writer3 = await dial(proxy)
    writer3.write(b"ok")
    assert await read_exactly(reader3, 2) == b"ok"
    writer3.close()


async def test_cut_lets_exactly_n_bytes_through_then_resets(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    reader, writer = await dial(proxy)
    # Given a cut after 10 bytes going up
    proxy.cut_after(10, Direction.UP)
    # When 100 bytes are sent
    writer.write(b"x" * 100)
    # Then the target gets exactly 10 and the client's connection is reset
    assert len(await assert_reset(reader)) <= 10
    await assert_eventually(lambda: len(echo.received) == 10, timeout_s=5)
    assert proxy.stats.resets == 1
    writer.close()


async def test_stop_closes_connections_and_cancels_every_task(proxy: FaultProxy) -> None:
    conns = [await dial(proxy) for _ in range(3)]
    proxy.blackhole()
    for _, writer in conns:
        writer.write(b"held")
    await assert_eventually(lambda: proxy.connections == 3, timeout_s=5)
    # When the proxy stops
    await proxy.stop()
    # Then no task of it is left and every client sees its connection end
    leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith("faultproxy")]
    assert leftover == []
    assert proxy.connections == 0
    for reader, writer in conns:
        assert await assert_reset(reader) == b""
        writer.close()
    assert proxy.fault.kind is FaultKind.BLACKHOLE


async def test_cli_forwards_and_switches_faults_from_stdin(echo: EchoServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailers_dev.faultproxy",
        "--target",
        f"127.0.0.1:{echo.port}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        async with asyncio.timeout(10):
            banner = (await proc.stdout.readline()).decode()
        assert banner.startswith("listening on 127.0.0.1:"), banner
        port = int(banner.split()[2].rpartition(":")[2])
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hi")
        assert await read_exactly(reader, 2) == b"hi"
        # When "reset" is written to its stdin, the open connection is reset
        proc.stdin.write(b"reset\n")
        await proc.stdin.drain()
        async with asyncio.timeout(5):
            assert (await proc.stdout.readline()).decode().strip() == "fault: reset"
        assert await assert_reset(reader) == b""
        writer.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(10):
            assert await proc.wait() == 0


async def test_armed_pattern_switches_fault_before_the_reply_passes(
    echo: EchoServer, proxy: FaultProxy
) -> None:
    reader, writer = await dial(proxy)
    # Given a blackhole armed on "STOP" going up (the pattern split across two writes)
    fired = proxy.on_pattern(b"STOP", Fault.blackhole())
    writer.write(b"hello ST")
    assert await read_exactly(reader, 8) == b"hello ST"
    assert not fired.is_set()
    # When the rest of the pattern is sent
    writer.write(b"OP now")
    # Then it reaches the target, but the reply to it is held
    await assert_eventually(lambda: bytes(echo.received).endswith(b"OP now"), timeout_s=5)
    assert fired.is_set() and proxy.fault.kind is FaultKind.BLACKHOLE
    await assert_nothing_arrives(reader)
    # And it is released when the fault is lifted
    proxy.pass_through()
    assert await read_exactly(reader, 6) == b"OP now"
    writer.close()
    with pytest.raises(ValueError):
        proxy.on_pattern(b"x", Fault.reset(), Direction.BOTH)
