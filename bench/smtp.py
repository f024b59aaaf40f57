"""SMTP sending benchmark: our ``RelayPool`` against the machine's ceiling, in one run.

Everything sends the same ~2 KB message (pre-built bytes, one recipient per message,
a different recipient each time) into one Postfix ``smtp-sink`` on loopback, over the
same number of reused connections:

- ``smtp-source``: Postfix's C client (``-d``: reused sessions): the ceiling.
- ``aiosmtplib``: ``SMTP.sendmail`` with the pre-built bytes, on uvloop (what the
  library alone costs; it does not pipeline).
- ``pool``: ``sender_node.smtp_client.RelayPool.send`` on uvloop, with PIPELINING off
  (one reply per command) and on (RFC 2920: MAIL, RCPT, DATA in one write).

Each Python variant runs in a fresh child process (``python -m bench.smtp --child ...``)
so none inherits another's heap or connections. The variants are interleaved, ``--runs``
times, and each figure is the median: on a small shared machine absolute numbers drift
between minutes, so only ratios from one interleaved run compare. For each variant it
prints msg/s, the ratio to the ceiling of the same run, the client's CPU per message
(user + system), the sink's CPU share, and ``other%``: CPU the machine spent outside the
measured processes during the run (high values mean a noisy run).

Usage: ``python -m bench.smtp [--messages N] [--connections C] [--runs R]``. Needs
``smtp-sink``/``smtp-source`` (Debian package ``postfix``); started as root,
``smtp-sink`` drops to user ``postfix``. Every process it starts is stopped by PID.
Not a test: nothing is asserted; the exit status is 1 only when a variant fails to send.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import uvloop

from bench.e2e import find_tool, smtp_sink
from mailers_dev.procs import free_port
from sender_node.smtp_client import RelayPool

SOURCE_BODY_BYTES = 2048
FROM = "news@example.com"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
VARIANTS = ("smtp-source", "aiosmtplib", "pool-unpipelined", "pool-pipelined")


def build_message() -> bytes:
    """About 2 KB, CRLF, like ``smtp-source -l 2048`` plus ordinary headers; one body
    line starts with a dot, so dot-stuffing is exercised."""
    head = (
        f"From: Example News <{FROM}>\r\nTo: reader@example.org\r\n"
        "Subject: Your November digest\r\nMessage-ID: <bench@example.com>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"La de da de da, the quick brown fox jumps over the lazy dog; 0123456789\r\n"
    body = b".a line that starts with a dot\r\n" + line * (SOURCE_BODY_BYTES // len(line))
    return head + body


def recipient(n: int) -> str:
    return f"user{n}@example.org"


def _ticks(pid: int) -> int:
    """User + system clock ticks of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _busy_ticks() -> int:
    """Clock ticks all CPUs spent busy so far (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[0] + values[1] + values[2] + values[5] + values[6] + values[7]


# ---- children: one variant per process ----------------------------------------------


async def _raw_aiosmtplib(port: int, connections: int, messages: int) -> int:
    data = build_message()
    counter = iter(range(messages))
    sent = 0

    async def worker() -> None:
        nonlocal sent
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
        await smtp.connect()
        try:
            for n in counter:
                await smtp.sendmail(FROM, [recipient(n)], data)
                sent += 1
        finally:
            smtp.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return sent


async def _relay_pool(port: int, connections: int, messages: int, pipelining: bool) -> int:
    data = build_message()
    pool = RelayPool(
        [f"127.0.0.1:{port};tls=none"],
        connections_per_relay=connections,
        timeout_s=30.0,
        helo_name="bench.example",
        pipelining=pipelining,
    )
    counter = iter(range(messages))
    sent = 0

    async def worker() -> None:
        nonlocal sent
        for n in counter:
            outcome = await pool.send(FROM, recipient(n), data)
            if outcome.code != 250:
                raise RuntimeError(f"message {n}: {outcome}")
            sent += 1

    try:
        await asyncio.gather(*(worker() for _ in range(connections)))
    finally:
        await pool.close()
    return sent


def child(variant: str, port: int, connections: int, messages: int) -> None:
    """Run one variant in this process and print one JSON line."""
    runners: dict[str, Callable[[], Any]] = {
        "aiosmtplib": lambda: _raw_aiosmtplib(port, connections, messages),
        "pool-unpipelined": lambda: _relay_pool(port, connections, messages, False),
        "pool-pipelined": lambda: _relay_pool(port, connections, messages, True),
    }
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    sent = uvloop.run(runners[variant]())
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"sent": sent, "wall_s": wall_s, "cpu_s": cpu_s}), flush=True)


# ---- the driver ---------------------------------------------------------------------


def measure(
    variant: str, source: str, port: int, sink_pid: int, args: argparse.Namespace
) -> dict[str, float]:
    """One run of one variant: msg/s, client CPU per message, sink CPU %, other %."""
    if variant == "smtp-source":
        argv = [source, "-s", str(args.connections), "-m", str(args.messages)]
        argv += ["-l", str(SOURCE_BODY_BYTES), "-d", f"127.0.0.1:{port}"]
    else:
        argv = [sys.executable, "-m", "bench.smtp", "--child", variant, "--port", str(port)]
        argv += ["--connections", str(args.connections), "--messages", str(args.messages)]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sink_before, busy_before = _ticks(sink_pid), _busy_ticks()
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=args.timeout_s, check=False)
    wall_s = time.perf_counter() - start
    sink_s = (_ticks(sink_pid) - sink_before) / _CLK_TCK
    busy_s = (_busy_ticks() - busy_before) / _CLK_TCK
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_s = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    sent, send_s, send_cpu_s = args.messages, wall_s, client_s
    if variant != "smtp-source":
        # The child measures its own sending (interpreter start-up and imports excluded).
        report = json.loads(done.stdout.decode().strip().splitlines()[-1])
        sent, send_s, send_cpu_s = report["sent"], report["wall_s"], report["cpu_s"]
    return {
        "msg_s": sent / send_s,
        "cpu_ms": 1000 * send_cpu_s / sent,
        "sink_pct": 100 * sink_s / wall_s,
        "other_pct": 100 * max(0.0, busy_s - client_s - sink_s) / wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.smtp", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument("--connections", type=int, default=8, help="reused connections")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per variant")
    parser.add_argument("--timeout-s", type=float, default=300, help="bound of each run")
    parser.add_argument(
        "--only", action="append", choices=VARIANTS[1:], help="Python variant(s) to run"
    )
    parser.add_argument("--child", choices=VARIANTS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.port, args.connections, args.messages)
        return 0

    sink_bin, source_bin = find_tool("smtp-sink"), find_tool("smtp-source")
    if sink_bin is None or source_bin is None:
        print(
            "smtp-sink/smtp-source not found: DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y postfix",
            file=sys.stderr,
        )
        return 2
    port = free_port()
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    print(
        f"{os.cpu_count()} CPUs; {args.messages:,} messages of {len(build_message()):,} B "
        f"per run, {args.connections} reused connections, {args.runs} interleaved runs",
        flush=True,
    )
    with smtp_sink(sink_bin, port) as sink:
        variants = [v for v in VARIANTS if not args.only or v in args.only or v == VARIANTS[0]]
        for run in range(args.runs):
            for variant in variants:
                got = measure(variant, source_bin, port, sink.pid, args)
                results[variant].append(got)
                print(
                    f"  run {run + 1} {variant:17} {got['msg_s']:8,.0f} msg/s "
                    f"{got['cpu_ms']:6.3f} ms CPU/msg  other {got['other_pct']:3.0f}%",
                    flush=True,
                )

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    ceiling = median("smtp-source", "msg_s")
    print(
        f"\n{'variant':17} {'msg/s':>8} {'of ceiling':>10} {'CPU ms/msg':>10} "
        f"{'sink CPU%':>9} {'other%':>6}   msg/s per run"
    )
    for variant in variants:
        rate = median(variant, "msg_s")
        runs = ", ".join(f"{r['msg_s']:,.0f}" for r in results[variant])
        print(
            f"{variant:17} {rate:8,.0f} {rate / ceiling:10.1%} {median(variant, 'cpu_ms'):10.3f} "
            f"{median(variant, 'sink_pct'):9.0f} {median(variant, 'other_pct'):6.0f}   [{runs}]"
        )
    print(
        "(CPU ms/msg: the client process, user + system; smtp-source is C. CPU% = % of one core.)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
