"""Scale benchmark: a job of a million recipients (or ten) on a whole local cluster.

Prints, in one run, against Postfix's ``smtp-sink`` as the relay (``smtp-source ->
smtp-sink`` measured first as the ceiling):

1. the store seeded with ``--history-jobs`` finished jobs of ``--history-size``
   recipients (through the coordinator's own store; default 100 x 100,000), so every
   figure below is taken with a large store;
2. a baseline job of ``--baseline`` recipients: msg/s end to end (the figure of
   ``bench.e2e`` on the same cluster), and the leader's peak RSS after a job of
   ``--small`` recipients;
3. the big job (``--recipients``, default 1,000,000): upload rate (streamed through the
   SDK, committed in one transaction), then, once 80% are delivered, ``kill -9`` of the
   leader and the time until the new leader took over and handed out its first batch,
   then msg/s end to end, and the old leader's peak RSS just before the kill against its
   peak after the small job;
4. PostgreSQL bytes per recipient (table, indexes and TOAST over rows), etcd's database
   size before and after, and the latency of ListJobs' first page and of a page of a
   finished job's results (medians of 20 calls).

Not a test: nothing is asserted; the exit status is 1 only when the run could not
complete. Every process it starts is stopped by PID, every wait is bounded by
``--timeout-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

from bench import campaign
from bench.e2e import ceiling, find_tool, in_run_directory, proc_usage, smtp_sink
from client_sdk import MailerClient, Recipient
from mailers_dev.cluster import LocalCluster
from mailers_dev.procs import free_port


def read_seconds(path: Path, needle: str, after: float) -> float:
    """The ``in X.XXXs`` figure of the first line with ``needle`` after ``after``."""
    import re

    when = log_time(path, needle, after)
    for line in path.read_text(errors="replace").splitlines():
        if needle in line and when is not None and line.startswith(_stamp(when)):
            match = re.search(r"in ([0-9.]+)s", line)
            if match:
                return float(match.group(1))
    return -1.0


def _stamp(unix_s: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S")


def log_time(path: Path, needle: str, after: float) -> float | None:
    """Unix time of the first line of a process log with ``needle`` logged after
    ``after`` (lines start with ``YYYY-MM-DD HH:MM:SS,mmm``)."""
    from datetime import datetime

    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if needle in line:
            try:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if stamp >= after:
                return stamp
    return None


async def seed_history(database_env: dict[str, str], jobs: int, size: int) -> float:
    """Store ``jobs`` finished jobs of ``size`` recipients, as the coordinator's store
    does, before any coordinator runs (the fence is still at epoch 0)."""
    from coordinator.db.settings import DatabaseConfig
    from coordinator.db.store import Database, QuotaRequest, StatusChange, Store
    from coordinator.model import (
        Address,
        Content,
        JobOptions,
        JobSpec,
        JobState,
        Recipient,
        Status,
    )

    config = DatabaseConfig(
        url=database_env["MAILER_DATABASE_URL"],
        password_file=database_env["MAILER_DATABASE_PASSWORD_FILE"],
    )
    db = await Database.open(config)
    store = Store(db, 0)
    content = Content(Address(campaign.SENDER), subject=campaign.SUBJECT, text_body=campaign.TEXT)
    started = time.perf_counter()
    try:
        for j in range(jobs):

            async def chunks(j: int = j) -> AsyncIterator[Sequence[Recipient]]:
                for lo in range(0, size, 10_000):
                    yield [
                        Recipient(f"old{j}-{i}@history.example", f"Old {i}", {"code": str(i)})
                        for i in range(lo, min(size, lo + 10_000))
                    ]

            now = time.time()
            spec = JobSpec(
                f"000000000000-hist{j:04d}", f"history-{j}", content, JobOptions(), 0, 200, now
            )
            record = await store.submit(spec, chunks(), QuotaRequest(), now)
            change = StatusChange(
                record.job_no, 0, size, (Status.QUEUED,), Status.DELIVERED, "", 200
            )
            await store.write((), [change], (), (), lambda r, d: 0.0, now)
            await store.set_job_state(record.job_no, JobState.COMPLETED, now, now)
    finally:
        await db.close()
    return time.perf_counter() - started


async def postgres_sizes(database_env: dict[str, str]) -> tuple[dict[str, int], int]:
    """(bytes per table, recipient rows) of the cluster's database."""
    import asyncpg

    password_file = Path(database_env["MAILER_DATABASE_PASSWORD_FILE"])
    password = (await asyncio.to_thread(password_file.read_text)).strip()
    conn = await asyncpg.connect(database_env["MAILER_DATABASE_URL"], password=password)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM recipients")
        sizes = {
            r["relname"]: int(r["bytes"])
            for r in await conn.fetch(
                "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r'"
            )
        }
    finally:
        await conn.close()
    return sizes, int(rows)


def recipients(count: int, tag: str) -> Iterator[Recipient]:
    for email, name, variables in campaign.recipients(count):
        yield Recipient(email.replace("@", f"+{tag}@"), name, variables)


async def etcd_db_bytes(client: MailerClient) -> int:
    status = await client.cluster_status()
    return max((m.db_size_bytes for m in status.etcd_members), default=0)


async def median_ms(call: Callable[[], Awaitable[object]], times: int = 20) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def delivered_reaches(client: MailerClient, job_id: str, count: int) -> None:
    async for progress in client.watch(job_id):
        if progress.delivered >= count:
            return


async def run(args: argparse.Namespace, c: LocalCluster, deadline: float) -> dict[str, float]:
    from client_sdk import ClientConfig

    out: dict[str, float] = {}
    content = campaign.message_content()
    config = ClientConfig(submit_timeout=timedelta(seconds=args.timeout_s))
    async with (
        asyncio.timeout(deadline - time.monotonic()),
        MailerClient(c.coordinator_addresses, config) as client,
    ):
        for _ in range(300):
            if len(await client.list_nodes()) >= 2:
                break
            await asyncio.sleep(0.2)
        out["etcd_before"] = await etcd_db_bytes(client)
        status = await client.cluster_status()
        leader = status.leader
        assert leader is not None
        leader_proc = c.coordinator_at(leader.address)

        async def job(count: int, tag: str) -> tuple[str, float, float]:
            start = time.perf_counter()
            submitted = await client.submit(
                content, lambda: recipients(count, tag), idempotency_key=f"scale-{tag}"
            )
            upload = time.perf_counter() - start
            return submitted.job_id, start, upload

        job_id, start, _ = await job(args.baseline, "baseline")
        await client.wait(job_id)
        out["baseline_msg_s"] = args.baseline / (time.perf_counter() - start)
        job_id, start, _ = await job(args.small, "small")
        await client.wait(job_id)
        usage = proc_usage(leader_proc.pid)
        out["rss_small_kib"] = usage.peak_rss_kib if usage else 0

        job_id, start, upload = await job(args.recipients, "big")
        out["upload_s"] = upload
        await delivered_reaches(client, job_id, args.recipients * 8 // 10)
        usage = proc_usage(leader_proc.pid)
        out["rss_big_kib"] = usage.peak_rss_kib if usage else 0
        killed = time.time()
        leader_proc.signal(signal.SIGKILL)
        now_leader = None
        for _ in range(600):
            try:
                now_leader = (await client.cluster_status(timeout=timedelta(seconds=2))).leader
            except Exception:
                now_leader = None
            if now_leader is not None and now_leader.address != leader.address:
                break
            await asyncio.sleep(0.1)
        assert now_leader is not None
        await client.wait(job_id)
        total = time.perf_counter() - start
        out["big_msg_s"] = args.recipients / total
        out["big_total_s"] = total
        new_log = c.coordinator_at(now_leader.address).log_path
        took = log_time(new_log, "took over in", killed)
        first = log_time(new_log, "first batch of this reign", killed)
        out["takeover_s"] = (took - killed) if took else -1
        out["read_unfinished_s"] = read_seconds(new_log, "took over in", killed)
        out["first_dispatch_s"] = (first - killed) if first else -1
        out["etcd_after"] = await etcd_db_bytes(client)

        async def first_jobs_page() -> None:
            await client.list_jobs_page(page_size=100)

        async def results_page() -> None:
            await client.results_page(job_id, page_size=500, page_token=str(args.recipients // 2))

        out["list_jobs_ms"] = await median_ms(first_jobs_page)
        out["results_page_ms"] = await median_ms(results_page)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--recipients", type=int, default=1_000_000, help="the big job")
    parser.add_argument("--small", type=int, default=100_000, help="the job RSS is compared to")
    parser.add_argument("--baseline", type=int, default=20_000, help="the msg/s baseline job")
    parser.add_argument("--history-jobs", type=int, default=100, help="finished jobs seeded")
    parser.add_argument("--history-size", type=int, default=100_000, help="their recipients")
    parser.add_argument("--connections", type=int, default=16, help="MAILER_SMTP_CONNECTIONS")
    parser.add_argument("--capacity", type=int, default=4000, help="MAILER_CAPACITY")
    parser.add_argument("--batch-size", type=int, default=200, help="MAILER_BATCH_SIZE")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600, help="bound of the run")
    parser.add_argument("--workdir", type=Path,
                        help="logs and data (default: a temp dir, removed after a run that "
                        "succeeds)")  # fmt: skip
    args = parser.parse_args(argv)
    sink_bin, source_bin = find_tool("smtp-sink"), find_tool("smtp-source")
    if sink_bin is None or source_bin is None:
        print("smtp-sink/smtp-source not found: apt-get install -y postfix", file=sys.stderr)
        return 2
    return in_run_directory(
        args.workdir, "mailers-scale-", lambda workdir: _run(args, workdir, sink_bin, source_bin)
    )


def _run(args: argparse.Namespace, workdir: Path, sink_bin: str, source_bin: str) -> int:
    from mailers_dev.cluster import ClusterSpec

    deadline = time.monotonic() + args.timeout_s
    port = free_port()
    spec = ClusterSpec(
        coordinators=2,
        nodes=2,
        node_env={
            "MAILER_RELAYS": f"127.0.0.1:{port}",
            "MAILER_SMTP_CONNECTIONS": str(args.connections),
            "MAILER_CAPACITY": str(args.capacity),
            "MAILER_LOG_LEVEL": "WARNING",
        },
        coordinator_env={"MAILER_BATCH_SIZE": str(args.batch_size)},
    )
    print(f"workdir {workdir}; {os.cpu_count()} CPUs; job of {args.recipients:,} recipients")
    with smtp_sink(sink_bin, port):
        rate_c = ceiling(source_bin, port, 20_000, 20, args.timeout_s)
        print(f"ceiling: smtp-source -> smtp-sink: {rate_c:,.0f} msg/s")
        cluster = LocalCluster(workdir, spec)
        try:
            cluster.postgres.start()
            if args.history_jobs:
                seeded = asyncio.run(
                    seed_history(cluster.postgres.env, args.history_jobs, args.history_size)
                )
                print(f"store seeded: {args.history_jobs} finished jobs of "
                      f"{args.history_size:,} recipients in {seeded:.0f} s")  # fmt: skip
            cluster.start()
            out = asyncio.run(run(args, cluster, deadline))
            sizes, rows = asyncio.run(postgres_sizes(cluster.postgres.env))
        except BaseException:
            print(cluster.logs()[-4000:], file=sys.stderr)
            raise
        finally:
            cluster.stop()
    per_row = sizes.get("recipients", 0) / max(rows, 1)
    print(f"baseline job of {args.baseline:,}: {out['baseline_msg_s']:,.0f} msg/s end to end")
    print(f"upload of {args.recipients:,} recipients: {out['upload_s']:.1f} s "
          f"({args.recipients / out['upload_s']:,.0f} recipients/s; goal 50,000)")  # fmt: skip
    print(f"job of {args.recipients:,}: {out['big_msg_s']:,.0f} msg/s end to end "
          f"({out['big_total_s']:.0f} s, leader killed at 80% included; "
          f"{out['big_msg_s'] / out['baseline_msg_s']:.0%} of the baseline, "
          f"{out['big_msg_s'] / rate_c:.1%} of smtp-source -> smtp-sink)")  # fmt: skip
    print(f"leader kill -9 at 80%: new leader took over {out['takeover_s']:.2f} s and "
          f"handed out its first batch {out['first_dispatch_s']:.2f} s after the kill; "
          f"raising the fence and reading all unfinished work took it "
          f"{out['read_unfinished_s'] * 1000:.0f} ms")  # fmt: skip
    print(f"leader peak RSS: {out['rss_small_kib'] / 1024:.0f} MiB after {args.small:,}, "
          f"{out['rss_big_kib'] / 1024:.0f} MiB at 80% of {args.recipients:,} "
          f"({out['rss_big_kib'] / max(out['rss_small_kib'], 1) - 1:+.0%})")  # fmt: skip
    print(f"PostgreSQL: {rows:,} recipient rows, {per_row:.0f} B each (table and indexes); "
          f"database {sum(sizes.values()) / 2**20:,.0f} MiB")  # fmt: skip
    print(f"etcd database: {out['etcd_before'] / 2**10:,.0f} KiB before, "
          f"{out['etcd_after'] / 2**10:,.0f} KiB after (limit 16 MiB)")  # fmt: skip
    print(f"ListJobs first page: {out['list_jobs_ms']:.1f} ms; a page of 500 results: "
          f"{out['results_page_ms']:.1f} ms (medians of 20, with "
          f"{args.history_jobs} finished jobs in the store)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
