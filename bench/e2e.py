"""End-to-end benchmark: the whole cluster on loopback sending into Postfix's smtp-sink.

1. Starts ``smtp-sink`` (Debian package ``postfix``) on a free loopback port and measures
   the machine's C ceiling with ``smtp-source -> smtp-sink`` (reused connections,
   ~2 KB messages).
2. Starts etcd, PostgreSQL, one coordinator and two sender nodes
   (``mailers_dev.cluster.LocalCluster``) as ``mailers cluster`` runs them: mutual TLS
   between every process and the project's default settings (``--plaintext``,
   ``--connections``, ``--capacity`` and ``--batch-size`` change that), their relay that
   smtp-sink. Submits a personalised HTML+text campaign (``bench.campaign``, ~2 KB per
   message) through the SDK (streamed upload) and waits until every recipient has an
   outcome. With ``--recipients-per-message``, an identical-body notice instead, its
   recipients at one domain or (``--domains``) 40% at one and the rest spread over many.
3. Prints msg/s (recipients/s for the notice) end to end (submit start to the last
   outcome) and for the sending phase alone, CPU seconds, CPU per message and peak RSS
   (VmHWM) of every process, and the ratio against the ceiling measured in the same run.
4. With ``--runs N``, does all of that N times (each run with its own sink, ceiling and
   cluster) and ends with the median and range of each figure: a machine whose speed
   drifts from minute to minute is judged by the median, not by one run.

Installs nothing: it exits with a hint when smtp-sink/smtp-source or etcd are missing
(``DEBIAN_FRONTEND=noninteractive apt-get install -y postfix etcd-server``). Every
process it starts is stopped by PID at the end (``LocalCluster.stop()``, smtp-sink by
its PID), and every wait is bounded by ``--timeout-s``. Run as root, smtp-sink drops
to user ``postfix``. Not a test: nothing is asserted; the exit status is 1 only when
the run could not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

from bench import campaign
from client_sdk import ClientTls
from mailers_dev.procs import free_port, wait_for_port

SOURCE_MESSAGE_BYTES = 2048
TARGET_MSG_S = 4000
"""What two cores should reach end to end with the defaults and mutual TLS."""
TARGET_RCPT_S = 20_000
"""The same for an identical-body job, 100 recipients per message."""
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Usage:
    """CPU seconds and peak RSS of one process."""

    cpu_s: float
    peak_rss_kib: int


@dataclasses.dataclass(frozen=True)
class Figures:
    """What one run measured; ``rate`` is msg/s (recipients/s for the notice)."""

    ceiling: float
    rate: float
    send_rate: float
    node_cpu_ms: float
    coordinator_cpu_ms: float
    leader_rss_mib: float
    node_rss_mib: float
    """The larger of the nodes' peaks."""


def summary(runs: Sequence[Figures], *, notice: bool) -> list[str]:
    """The median and range of each figure over ``runs`` (of the identical-body notice
    when ``notice``: recipients/s). The ratio to the ceiling is taken in each run
    (against the ceiling measured in it), then its median."""

    def spread(values: Sequence[float], fmt: str) -> str:
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{mid:{fmt}} ({low:{fmt}}-{high:{fmt}})"

    unit = "recipients/s" if notice else "msg/s"
    per = "recipient" if notice else "message"
    target = f"{TARGET_RCPT_S:,} recipients/s" if notice else f"{TARGET_MSG_S:,} msg/s"
    # A notice's recipients/s has no counterpart in smtp-source's msg/s.
    ratio = [] if notice else [
        f"  ratio to smtp-source -> smtp-sink: {spread([r.rate / r.ceiling for r in runs], '.1%')}"
    ]  # fmt: skip
    return [
        f"median (min-max) of {len(runs)} runs:",
        f"  end to end: {spread([r.rate for r in runs], ',.0f')} {unit}; target {target}",
        f"  sending phase alone: {spread([r.send_rate for r in runs], ',.0f')} {unit}",
        *ratio,
        f"  CPU per {per}: nodes {spread([r.node_cpu_ms for r in runs], '.3f')} ms, "
        f"coordinator {spread([r.coordinator_cpu_ms for r in runs], '.3f')} ms",
        f"  peak RSS: leader {spread([r.leader_rss_mib for r in runs], '.1f')} MiB, "
        f"largest node {spread([r.node_rss_mib for r in runs], '.1f')} MiB",
    ]


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the parenthesised command name (state,
    ppid, ...; utime and stime are [11] and [12]).

    Raises:
        OSError: the process is gone.
    """
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_usage(pid: int) -> Usage | None:
    """CPU (user + system) and VmHWM of ``pid`` from /proc; None when it is gone."""
    try:
        fields = _stat_fields(pid)
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    cpu_s = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    hwm = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return Usage(cpu_s, hwm)


def tree_usages(pids: dict[str, int]) -> dict[str, Usage | None]:
    """For each named pid, :func:`proc_usage` of it and every process under it, summed
    (peak RSS: the largest): PostgreSQL's work is done by the server's children. One
    scan of /proc for them all."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
    out: dict[str, Usage | None] = {}
    for name, pid in pids.items():
        tree, frontier = [pid], [pid]
        while frontier:
            below = children.get(frontier.pop(), [])
            tree += below
            frontier += below
        usages = [u for u in map(proc_usage, tree) if u is not None]
        out[name] = (
            Usage(sum(u.cpu_s for u in usages), max(u.peak_rss_kib for u in usages))
            if usages
            else None
        )
    return out


def self_usage() -> Usage:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def in_run_directory(given: Path | None, prefix: str, run: Callable[[Path], int]) -> int:
    """Call ``run`` with the directory of its logs and data and return its exit code.
    The directory is ``given``, left as it is; or a new temporary one, removed when
    ``run`` returns 0 (etcd's data alone is 62 MB) and kept for its logs, named on
    stderr, when it raises or returns another code."""
    if given is not None:
        return run(given)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    code = 1
    try:
        code = run(path)
    finally:
        if code == 0:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"the run failed; its logs and data are in {path}", file=sys.stderr)
    return code


@contextlib.contextmanager
def smtp_sink(binary: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Postfix's smtp-sink on 127.0.0.1:port, stopped by PID on exit."""
    argv = [binary]
    if os.geteuid() == 0:
        argv += ["-u", "postfix"]
    argv += [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_port(port, 10)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def ceiling(binary: str, port: int, messages: int, sessions: int, timeout_s: float) -> float:
    """msg/s of smtp-source -> smtp-sink with reused connections."""
    argv = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(SOURCE_MESSAGE_BYTES)]
    argv += ["-d", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, timeout=timeout_s)
    return messages / (time.perf_counter() - start)


def default_connections() -> int:
    """MAILER_SMTP_CONNECTIONS' default, as the node declares it."""
    from sender_node.config import SmtpConfig

    field = next(f for f in dataclasses.fields(SmtpConfig) if f.name == "connections_per_relay")
    assert isinstance(field.default, int)
    return field.default


def raw_aiosmtplib(port: int, connections: int, messages: int, timeout_s: float) -> float:
    """msg/s of aiosmtplib alone sending pre-built bytes on uvloop (``bench.smtp``'s
    child, in its own process)."""
    argv = [sys.executable, "-m", "bench.smtp", "--child", "aiosmtplib", "--port", str(port)]
    argv += ["--connections", str(connections), "--messages", str(messages)]
    done = subprocess.run(argv, capture_output=True, check=True, timeout=timeout_s)
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return float(report["sent"]) / float(report["wall_s"])


async def run_campaign(
    addresses: Sequence[str],
    count: int,
    nodes: int,
    timeout_s: float,
    tls: ClientTls | None = None,
    shared: int = 0,
    domains: int = 0,
) -> tuple[float, float, int, int]:
    """Submit the campaign and wait for it; (submit seconds, total seconds, delivered,
    failed). ``shared`` > 0: the identical-body notice instead, that many recipients per
    message, addressed as ``campaign.mixed_recipient`` with ``domains``."""
    from client_sdk import ClientConfig, MailerClient

    content, recipients = campaign.sdk_job(count, shared, domains)
    config = ClientConfig(submit_timeout=timedelta(seconds=timeout_s))
    async with (
        asyncio.timeout(timeout_s),
        MailerClient(list(addresses), config, tls=tls) as client,
    ):
        # Both nodes must be registered, or the first batches all go to one.
        for _ in range(int(timeout_s / 0.2)):
            if len(await client.list_nodes()) >= nodes:
                break
            await asyncio.sleep(0.2)
        start = time.perf_counter()
        job = await client.submit(
            content,
            # A factory, not an iterator: the SDK re-reads it on a retry instead of
            # keeping every recipient in memory.
            recipients,
            idempotency_key=f"bench-{os.getpid()}-{time.time_ns()}",
        )
        submitted = time.perf_counter() - start
        final = await client.wait(job.job_id)
        total = time.perf_counter() - start
    return submitted, total, final.delivered, final.failed


def row(name: str, pid: int, cpu_s: float, wall_s: float, rss_kib: int, ms: float) -> str:
    """One line of the per-process table."""
    share = 100 * cpu_s / wall_s
    return f"{name:14} {pid:7d} {cpu_s:7.1f} {share:6.0f} {rss_kib / 1024:13.1f} {ms:11.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__.split("\n\n")[0],
        epilog="Needs smtp-sink/smtp-source (apt-get install postfix) and etcd.",
    )
    parser.add_argument("--recipients", type=int, default=50_000, help="campaign size")
    parser.add_argument("--source-messages", type=int, default=20_000,
                        help="messages for the smtp-source ceiling")  # fmt: skip
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    parser.add_argument("--connections", type=int,
                        help="SMTP connections per node (MAILER_SMTP_CONNECTIONS; "
                        "default: the project's)")  # fmt: skip
    parser.add_argument("--capacity", type=int,
                        help="recipients a node holds (MAILER_CAPACITY; default: the "
                        "project's)")  # fmt: skip
    parser.add_argument("--batch-size", type=int,
                        help="MAILER_BATCH_SIZE (default: the project's)")  # fmt: skip
    parser.add_argument("--node-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the nodes (repeatable)")  # fmt: skip
    parser.add_argument("--plaintext", action="store_true",
                        help="no TLS between the processes (mailers cluster uses mutual "
                        "TLS)")  # fmt: skip
    parser.add_argument("--recipients-per-message", type=int, default=0, metavar="N",
                        help="send the identical-body notice, N recipients per message "
                        "(prints recipients/s)")  # fmt: skip
    parser.add_argument("--domains", type=int, default=0, metavar="N",
                        help="with --recipients-per-message: 40%% of recipients at one "
                        "domain, the rest over N others (default: all at one)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="measure N times and end with the medians")  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=900,
                        help="bound of the whole call (all runs)")  # fmt: skip
    parser.add_argument("--workdir", type=Path,
                        help="logs and etcd data (default: a temp dir, removed after a run that "
                        "succeeds)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    sink_bin, source_bin = find_tool("smtp-sink"), find_tool("smtp-source")
    if sink_bin is None or source_bin is None:
        print("smtp-sink/smtp-source not found: DEBIAN_FRONTEND=noninteractive "
              "apt-get install -y postfix", file=sys.stderr)  # fmt: skip
        return 2
    if shutil.which("etcd") is None:
        print("etcd not found: apt-get install -y etcd-server", file=sys.stderr)
        return 2
    return in_run_directory(
        args.workdir, "mailers-bench-", lambda workdir: _run(args, workdir, sink_bin, source_bin)
    )


def _run(args: argparse.Namespace, workdir: Path, sink_bin: str, source_bin: str) -> int:
    deadline = time.monotonic() + args.timeout_s
    runs: list[Figures] = []
    for i in range(args.runs):
        if args.runs > 1:
            print(f"== run {i + 1} of {args.runs}")
        run_dir = workdir / f"run{i + 1}" if args.runs > 1 else workdir
        figures = _once(args, run_dir, sink_bin, source_bin, deadline)
        if figures is None:
            return 1
        runs.append(figures)
    if args.runs > 1:
        print("\n".join(["==", *summary(runs, notice=bool(args.recipients_per_message))]))
    return 0


def _left_s(deadline: float) -> float:
    """Seconds left until ``deadline`` (``time.monotonic``), at least one."""
    return max(1.0, deadline - time.monotonic())


def _once(
    args: argparse.Namespace, workdir: Path, sink_bin: str, source_bin: str, deadline: float
) -> Figures | None:
    """One run: sink, ceiling, aiosmtplib alone, the cluster; its report printed.
    None when some recipient got no outcome."""
    from mailers_dev.cluster import ClusterSpec, LocalCluster

    port = free_port()
    node_env = {"MAILER_RELAYS": f"127.0.0.1:{port}", "MAILER_LOG_LEVEL": "WARNING"}
    coordinator_env = {"MAILER_LOG_LEVEL": "WARNING"}
    if args.connections is not None:
        node_env["MAILER_SMTP_CONNECTIONS"] = str(args.connections)
    if args.capacity is not None:
        node_env["MAILER_CAPACITY"] = str(args.capacity)
    if args.batch_size is not None:
        coordinator_env["MAILER_BATCH_SIZE"] = str(args.batch_size)
    for item in args.node_env:
        key, _, value = item.partition("=")
        node_env[key] = value
    spec = ClusterSpec(
        coordinators=1,
        nodes=2,
        node_env=node_env,
        coordinator_env=coordinator_env,
        tls=not args.plaintext,
    )
    if args.recipients_per_message:
        mix = f"40% at one domain, 60% over {args.domains:,}" if args.domains else "one domain"
        what = (f"identical-body notice to {args.recipients:,} recipients, "
                f"{args.recipients_per_message} per message, {mix}")  # fmt: skip
    else:
        what = f"campaign of {args.recipients:,} personalised HTML+text messages"
    print(f"workdir {workdir}; {os.cpu_count()} CPUs; {what}")
    with smtp_sink(sink_bin, port) as sink:
        rate_c = ceiling(source_bin, port, args.source_messages, args.sessions, _left_s(deadline))
        print(f"ceiling: smtp-source -> smtp-sink, {args.sessions} reused sessions, "
              f"{SOURCE_MESSAGE_BYTES} B: {rate_c:,.0f} msg/s")  # fmt: skip
        connections = 2 * (args.connections or default_connections())
        rate_a = raw_aiosmtplib(port, connections, args.source_messages, _left_s(deadline))
        print(f"aiosmtplib alone (pre-built bytes, uvloop, one process, {connections} "
              f"connections as the two nodes hold): {rate_a:,.0f} msg/s, "
              f"{rate_a / rate_c:.1%} of the ceiling")  # fmt: skip
        cluster = LocalCluster(workdir, spec)
        try:
            cluster.start()
            pids: dict[str, int] = {name: p.pid for name, p in cluster.coordinators.items()}
            pids.update({name: p.pid for name, p in cluster.nodes.items()})
            for member in cluster.etcd.members:
                if member.proc is not None:
                    pids[member.name] = member.proc.pid
            pids["smtp-sink"] = sink.pid
            if cluster.postgres.proc is not None:
                pids["postgresql"] = cluster.postgres.proc.pid
            before = tree_usages(pids)
            client_before = self_usage()
            submit_s, total_s, delivered, failed = asyncio.run(
                run_campaign(
                    cluster.coordinator_addresses,
                    args.recipients,
                    2,
                    _left_s(deadline),
                    cluster.client_tls,
                    args.recipients_per_message,
                    args.domains,
                )  # fmt: skip
            )
            after = tree_usages(pids)
            client_after = self_usage()
        except BaseException:
            print(cluster.logs()[-4000:], file=sys.stderr)
            raise
        finally:
            cluster.stop()

    rate = args.recipients / total_s
    send_rate = args.recipients / max(total_s - submit_s, 1e-9)
    print(f"delivered {delivered:,}, failed {failed:,} of {args.recipients:,}")
    print(f"submit (streamed upload, one PostgreSQL transaction): {submit_s:.1f} s "
          f"({args.recipients / submit_s:,.0f} recipients/s)")  # fmt: skip
    if args.recipients_per_message:
        print(f"end to end: {total_s:.1f} s -> {rate:,.0f} recipients/s "
              f"(sending phase alone: {send_rate:,.0f} recipients/s); "
              f"target {TARGET_RCPT_S:,} recipients/s")  # fmt: skip
    else:
        print(f"end to end: {total_s:.1f} s -> {rate:,.0f} msg/s "
              f"(sending phase alone: {send_rate:,.0f} msg/s)")  # fmt: skip
        print(f"ratio to smtp-source -> smtp-sink: {rate / rate_c:.1%} end to end, "
              f"{send_rate / rate_c:.1%} sending phase; to aiosmtplib alone: "
              f"{rate / rate_a:.1%} end to end; target {TARGET_MSG_S:,} msg/s")  # fmt: skip
    print(f"{'process':14} {'pid':>7} {'cpu s':>7} {'cpu %':>6} {'peak RSS MiB':>13} "
          f"{'ms/recipient':>11}")  # fmt: skip
    rows = [(name, pids[name], before[name], after[name]) for name in pids]
    total_cpu = node_cpu = coordinator_cpu = 0.0
    leader_rss = node_rss = 0.0
    for name, pid, b, a in rows:
        if a is None or b is None:
            print(f"{name:14} {pid:7d}  (exited)")
            continue
        cpu = a.cpu_s - b.cpu_s
        total_cpu += cpu
        if name in cluster.nodes:
            node_cpu += cpu
            node_rss = max(node_rss, a.peak_rss_kib / 1024)
        if name in cluster.coordinators:
            coordinator_cpu += cpu
            leader_rss = max(leader_rss, a.peak_rss_kib / 1024)
        print(row(name, pid, cpu, total_s, a.peak_rss_kib, 1000 * cpu / args.recipients))
    client_cpu = client_after.cpu_s - client_before.cpu_s
    total_cpu += client_cpu
    print(row("client (SDK)", os.getpid(), client_cpu, total_s, client_after.peak_rss_kib,
              1000 * client_cpu / args.recipients))  # fmt: skip
    print(f"{'all':14} {'':7} {total_cpu:7.1f} {100 * total_cpu / total_s:6.0f}   "
          f"(cpu % of one core over the {total_s:.1f} s run)")  # fmt: skip
    unit = "recipient" if args.recipients_per_message else "message"
    print(f"CPU per {unit}: nodes {1000 * node_cpu / args.recipients:.3f} ms, coordinator "
          f"{1000 * coordinator_cpu / args.recipients:.3f} ms")  # fmt: skip
    if delivered + failed != args.recipients:
        return None
    return Figures(
        ceiling=rate_c,
        rate=rate,
        send_rate=send_rate,
        node_cpu_ms=1000 * node_cpu / args.recipients,
        coordinator_cpu_ms=1000 * coordinator_cpu / args.recipients,
        leader_rss_mib=leader_rss,
        node_rss_mib=node_rss,
    )


if __name__ == "__main__":
    sys.exit(main())
