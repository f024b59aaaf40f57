"""A TCP fault proxy for tests: forwards 127.0.0.1:port to a target, with faults.

A test starts a :class:`FaultProxy` in its own event loop, points a process at
:attr:`FaultProxy.address` instead of the real server, and switches the fault at any
time; the switch applies to connections already open and to new ones:

- ``pass``: forward bytes both ways unchanged.
- ``latency S``: every chunk is delivered S seconds after it was read (order kept,
  throughput not limited: a chunk waits for its own due time, not for the previous one).
- ``blackhole``: forward nothing in either direction. Connections stay open and new
  ones are accepted (the kernel completes the handshake) but not dialled onwards.
  Nothing is dropped: bytes already read are held and, like a network partition
  that heals before TCP gives up, flow again once the fault is lifted.
- ``reset``: reset (RST) every open connection at once, and every new one on accept.
- ``cut N [up|down|both]``: each connection is reset once N more bytes (counted from
  when the fault was set, or from accept) have been forwarded in the given direction
  (``up`` is client to target); exactly N bytes get through.

A fault can also be armed to strike at a precise point of a protocol:
:meth:`FaultProxy.on_pattern` switches to it as soon as given bytes have been forwarded
(e.g. blackhole right after a client's ``DATA`` command, so the server's ``354`` reply
is held).

Run as ``python -m mailers_dev.faultproxy --target HOST:PORT [--listen HOST:PORT]
[--fault 'latency 0.2']``: it prints ``listening on HOST:PORT`` and reads faults from
stdin, one per line, until SIGINT or SIGTERM.

Ownership and deadlines: the proxy owns one task per connection, which owns that
connection's four pump tasks (a reader and a writer per direction);
:meth:`FaultProxy.stop` cancels them all and closes every socket. Dialling the target
has a deadline (``connect_timeout_s``); reads and writes deliberately have none, because
an idle or slow connection is what the proxied protocol decides about, not the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence

_READ_SIZE = 64 * 1024
# Chunks read but not yet written, per direction: bounded so a slow peer pushes back
# on the other side instead of filling our memory.
_QUEUE_CHUNKS = 64


class FaultKind(enum.Enum):
    PASS = "pass"
    LATENCY = "latency"
    BLACKHOLE = "blackhole"
    RESET = "reset"
    CUT = "cut"


class Direction(enum.Enum):
    UP = "up"
    """Client to target."""
    DOWN = "down"
    """Target to client."""
    BOTH = "both"


@dataclasses.dataclass(frozen=True)
class Fault:
    """What the proxy does to traffic; build one with the class methods."""

    kind: FaultKind = FaultKind.PASS
    latency_s: float = 0.0
    """For LATENCY: added to every chunk, each way."""
    cut_after_bytes: int = 0
    """For CUT: bytes let through before the connection is reset."""
    cut_direction: Direction = Direction.BOTH
    """For CUT: which direction's bytes count."""

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError("latency_s must not be negative")
        if self.cut_after_bytes < 0:
            raise ValueError("cut_after_bytes must not be negative")

    @classmethod
    def pass_through(cls) -> Fault:
        return cls()

    @classmethod
    def latency(cls, latency_s: float) -> Fault:
        return cls(FaultKind.LATENCY, latency_s=latency_s)

    @classmethod
    def blackhole(cls) -> Fault:
        return cls(FaultKind.BLACKHOLE)

    @classmethod
    def reset(cls) -> Fault:
        return cls(FaultKind.RESET)

    @classmethod
    def cut_after(cls, n_bytes: int, direction: Direction = Direction.BOTH) -> Fault:
        return cls(FaultKind.CUT, cut_after_bytes=n_bytes, cut_direction=direction)

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``pass``, ``latency 0.2``, ``blackhole``, ``reset`` or ``cut 100 [up|down|both]``.

        Raises:
            ValueError: not one of those.
        """
        words = text.split()
        if not words:
            raise ValueError("empty fault")
        kind = FaultKind(words[0].lower())
        args = words[1:]
        if kind is FaultKind.LATENCY and len(args) == 1:
            return cls.latency(float(args[0]))
        if kind is FaultKind.CUT and len(args) in (1, 2):
            direction = Direction(args[1].lower()) if len(args) == 2 else Direction.BOTH
            return cls.cut_after(int(args[0]), direction)
        if kind in (FaultKind.PASS, FaultKind.BLACKHOLE, FaultKind.RESET) and not args:
            return cls(kind)
        raise ValueError(f"bad fault {text!r}")

    def __str__(self) -> str:
        if self.kind is FaultKind.LATENCY:
            return f"latency {self.latency_s:g}"
        if self.kind is FaultKind.CUT:
            return f"cut {self.cut_after_bytes} {self.cut_direction.value}"
        return str(self.kind.value)

    def counts(self, direction: Direction) -> bool:
        """Whether bytes going ``direction`` (UP or DOWN) use up a CUT budget."""
        return self.kind is FaultKind.CUT and self.cut_direction in (direction, Direction.BOTH)


def take_budget(budget: int, chunk_len: int) -> tuple[int, bool]:
    """How many bytes of a chunk may pass under a CUT budget, and whether to cut after.

    Returns ``(bytes to forward, cut now)``: the whole chunk while the budget lasts;
    once it is used up, what is left of it, and the connection is cut.
    """
    if chunk_len < budget:
        return chunk_len, False
    return budget, True


@dataclasses.dataclass
class ProxyStats:
    """Counters since start."""

    accepted: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    resets: int = 0
    """Connections the proxy reset (RESET or CUT)."""


@dataclasses.dataclass
class _Trigger:
    pattern: bytes
    direction: Direction
    fault: Fault
    fired: asyncio.Event


class _Reset(Exception):
    """A pump decided to reset its connection."""


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close a socket with RST instead of FIN (SO_LINGER 0), dropping unsent data."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client_reader = reader
        self.client_writer = writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.budget = 0
        # The last bytes forwarded each way, to find a trigger pattern across chunks.
        self.tails: dict[Direction, bytes] = {Direction.UP: b"", Direction.DOWN: b""}

    def rst(self) -> None:
        _rst(self.client_writer)
        _rst(self.upstream_writer)

    def close(self) -> None:
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.close()


class FaultProxy:
    """Forwards ``host:port`` to ``target`` and applies the current :class:`Fault`.

    Use ``async with FaultProxy(target) as proxy:`` or :meth:`start` / :meth:`stop`.
    Fault switches (:meth:`set_fault` and its shorthands) are plain method calls, to be
    made from the proxy's event loop.

    Args:
        target: ``host:port`` to forward to.
        host: Listen address.
        port: Listen port; 0 picks a free one (read :attr:`port` after start).
        fault: The initial fault.
        connect_timeout_s: Deadline of dialling the target; on failure the client's
            connection is reset.
        clock: Monotonic seconds (latency due times).
    """

    def __init__(
        self,
        target: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        fault: Fault | None = None,
        connect_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        target_host, sep, target_port = target.rpartition(":")
        if not sep or not target_host or not target_port.isdigit():
            raise ValueError(f"target {target!r} is not host:port")
        self.target = (target_host, int(target_port))
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.stats = ProxyStats()
        self._clock = clock
        self._fault = fault or Fault()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._triggers: list[_Trigger] = []

    @property
    def address(self) -> str:
        """``host:port`` the proxy listens on (the bound port after :meth:`start`)."""
        return f"{self.host}:{self.port}"

    @property
    def fault(self) -> Fault:
        return self._fault

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._conns)

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError when the address is taken."""
        self._server = await asyncio.start_server(self._on_accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, reset every connection and wait for their tasks. Idempotent."""
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.rst()
            if conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- switching faults ------------------------------------------------------------

    def set_fault(self, fault: Fault) -> None:
        """Apply ``fault`` from now on, to open connections and new ones."""
        self._fault = fault
        if fault.kind is FaultKind.RESET:
            for conn in list(self._conns):
                self._reset(conn)
        elif fault.kind is FaultKind.CUT:
            for conn in self._conns:
                conn.budget = fault.cut_after_bytes
        # Wake every pump waiting on a blackhole or a due time, to re-read the fault.
        self._changed.set()
        self._changed = asyncio.Event()

    def pass_through(self) -> None:
        self.set_fault(Fault.pass_through())

    def add_latency(self, latency_s: float) -> None:
        self.set_fault(Fault.latency(latency_s))

    def blackhole(self) -> None:
        self.set_fault(Fault.blackhole())

    def reset(self) -> None:
        self.set_fault(Fault.reset())

    def cut_after(self, n_bytes: int, direction: Direction = Direction.BOTH) -> None:
        self.set_fault(Fault.cut_after(n_bytes, direction))

    def on_pattern(
        self, pattern: bytes, fault: Fault, direction: Direction = Direction.UP
    ) -> asyncio.Event:
        """Arm a one-shot switch to ``fault`` once ``pattern`` has been forwarded.

        The switch happens right after the chunk completing ``pattern`` is handed to
        the socket, before the proxy forwards anything else, on any connection; so
        arming a blackhole on a client's command holds the server's reply to it.

        Args:
            pattern: Bytes to look for (found across chunk boundaries too).
            fault: Applied as by :meth:`set_fault`.
            direction: UP (client to target) or DOWN.

        Returns:
            An event set when the switch happened.
        """
        if not pattern or direction is Direction.BOTH:
            raise ValueError("a trigger needs a pattern and one direction")
        trigger = _Trigger(pattern, direction, fault, asyncio.Event())
        self._triggers.append(trigger)
        return trigger.fired

    def _check_triggers(self, conn: _Conn, direction: Direction, data: bytes) -> None:
        window = conn.tails[direction] + data
        for trigger in list(self._triggers):
            if trigger.direction is direction and trigger.pattern in window:
                self._triggers.remove(trigger)
                self.set_fault(trigger.fault)
                trigger.fired.set()
        keep = max((len(t.pattern) for t in self._triggers), default=1) - 1
        conn.tails[direction] = window[len(window) - keep :] if keep else b""

    # -- connections -----------------------------------------------------------------

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so the connection task is ours (asyncio would otherwise
        # create, and not cancel, a task for a coroutine callback).
        conn = _Conn(reader, writer)
        conn.budget = self._fault.cut_after_bytes
        self.stats.accepted += 1
        self._conns.add(conn)
        conn.task = asyncio.create_task(self._serve(conn), name=f"faultproxy-{self.port}")

    def _reset(self, conn: _Conn) -> None:
        self.stats.resets += 1
        conn.rst()
        if conn.task is not None and conn.task is not asyncio.current_task():
            conn.task.cancel()

    def _resetting(self) -> bool:
        return self._fault.kind is FaultKind.RESET

    async def _wait_open(self) -> None:
        """Return once the fault is not a blackhole."""
        while self._fault.kind is FaultKind.BLACKHOLE:
            await self._changed.wait()

    async def _serve(self, conn: _Conn) -> None:
        try:
            if self._resetting():
                self._reset(conn)
                return
            await self._wait_open()
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    up_reader, conn.upstream_writer = await asyncio.open_connection(*self.target)
            except (OSError, TimeoutError):
                self._reset(conn)
                return
            if self._resetting():  # switched while we dialled
                self._reset(conn)
                return
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(
                        self._direction(
                            conn, conn.client_reader, conn.upstream_writer, Direction.UP
                        )
                    )
                    group.create_task(
                        self._direction(conn, up_reader, conn.client_writer, Direction.DOWN)
                    )
            except* _Reset:
                self._reset(conn)
            except* (ConnectionError, OSError):
                # One side reset or failed: pass the reset on to the other side.
                conn.rst()
            else:
                conn.close()
        finally:
            conn.close()
            self._conns.discard(conn)

    async def _direction(
        self,
        conn: _Conn,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._read(src, queue))
            group.create_task(self._write(conn, queue, dst, direction))

    async def _read(
        self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        while True:
            await self._wait_open()
            data = await src.read(_READ_SIZE)
            fault = self._fault
            due = self._clock() + (fault.latency_s if fault.kind is FaultKind.LATENCY else 0.0)
            await queue.put((due, data))  # b"" marks EOF
            if not data:
                return

    async def _write(
        self,
        conn: _Conn,
        queue: asyncio.Queue[tuple[float, bytes]],
        dst: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        while True:
            due, data = await queue.get()
            await self._wait_due(due)
            if not data:
                if dst.can_write_eof() and not dst.transport.is_closing():
                    dst.write_eof()
                return
            fault = self._fault
            cut = False
            if fault.counts(direction):
                n, cut = take_budget(conn.budget, len(data))
                conn.budget -= n
                data = data[:n]
            if data:
                dst.write(data)
                if self._triggers:
                    self._check_triggers(conn, direction, data)
                await dst.drain()
                if direction is Direction.UP:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
            if cut:
                raise _Reset

    async def _wait_due(self, due: float) -> None:
        """Wait until ``due`` and until no blackhole holds the traffic."""
        while True:
            await self._wait_open()
            delay = due - self._clock()
            if delay <= 0:
                return
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                # Woken early by a fault switch, to re-check for a blackhole.
                async with asyncio.timeout(delay):
                    await changed.wait()


async def _run_cli(proxy: FaultProxy) -> None:
    await proxy.start()
    print(f"listening on {proxy.address} -> {proxy.target[0]}:{proxy.target[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while line := await reader.readline():
            try:
                proxy.set_fault(Fault.parse(line.decode()))
            except ValueError as exc:
                print(f"error: {exc}", flush=True)
                continue
            print(f"fault: {proxy.fault}", flush=True)
        # stdin closed: keep running with the current fault until signalled.

    task = asyncio.create_task(commands())
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailers_dev.faultproxy", description="TCP fault proxy for tests."
    )
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    parser.add_argument("--fault", default="pass", help="initial fault, e.g. 'latency 0.2'")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        proxy = FaultProxy(args.target, host=host, port=int(port), fault=Fault.parse(args.fault))
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_run_cli(proxy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
