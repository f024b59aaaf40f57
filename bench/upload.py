"""Upload benchmark: what a submit costs each process, against COPY alone.

Starts a local cluster of one coordinator and no nodes (so nothing is sent), with
mutual TLS as ``mailers cluster`` runs it unless ``--plaintext``, and submits the
bench campaign through the SDK ``--repeat`` times: the personalised campaign of
``bench.campaign`` (two variables per recipient), or with ``--recipients-per-message``
the identical-body notice, which is stored in send order (by domain, over
``--domains``). For each submit it measures the wall time and the CPU of the client
(this process), the leader and PostgreSQL (the server and its children).

Then the ceiling, on the same server: the same rows, already built, written by asyncpg's
COPY into a table like ``recipients`` (its indexes included), ``COPY_ROWS`` rows per
statement as submit writes them, in a transaction that is rolled back.

Prints the medians: recipients/s, the ratio to COPY alone, and microseconds of CPU per
recipient for each process. Usage: ``python -m bench.upload [--recipients N]
[--repeat R] [--recipients-per-message N [--domains N]] [--plaintext]``. Not a test:
nothing is asserted. Every process it starts is stopped by PID (``LocalCluster.stop()``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import campaign
from bench.e2e import in_run_directory, self_usage, tree_usages
from client_sdk import ClientTls
from coordinator.db.store import COPY_ROWS, RECIPIENT_COLUMNS, json_object


def rows(count: int, shared: int, domains: int) -> list[tuple[Any, ...]]:
    """The job's recipients as the store's COPY rows (``RECIPIENT_COLUMNS``), built
    before the clock starts."""
    if shared:
        emails = (campaign.mixed_recipient(i, domains) for i in range(count))
        return [(1, i, email, "", None, None) for i, email in enumerate(emails)]
    return [
        (1, i, email, name, json_object(variables), None)
        for i, (email, name, variables) in enumerate(campaign.recipients(count))
    ]


async def copy_alone(url: str, password: str, table_rows: list[tuple[Any, ...]]) -> float:
    """Seconds to COPY ``table_rows`` into a table like ``recipients``, rolled back."""
    import asyncpg

    conn = await asyncpg.connect(url, password=password)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("CREATE TABLE copy_ceiling (LIKE recipients INCLUDING ALL)")
        start = time.perf_counter()
        for lo in range(0, len(table_rows), COPY_ROWS):
            await conn.copy_records_to_table(
                "copy_ceiling", records=table_rows[lo : lo + COPY_ROWS], columns=RECIPIENT_COLUMNS
            )
        elapsed = time.perf_counter() - start
        await transaction.rollback()
        return elapsed
    finally:
        await conn.close()


async def submit(
    addresses: list[str], tls: ClientTls | None, count: int, shared: int, domains: int
) -> float:
    """Seconds of one submit of the campaign through the SDK."""
    from client_sdk import ClientConfig, MailerClient

    content, recipients = campaign.sdk_job(count, shared, domains)
    config = ClientConfig(submit_timeout=timedelta(seconds=600))
    async with MailerClient(addresses, config, tls=tls) as client:
        start = time.perf_counter()
        await client.submit(content, recipients, idempotency_key=f"upload-{time.time_ns()}")
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__)
    parser.add_argument("--recipients", type=int, default=200_000, help="job size")
    parser.add_argument("--repeat", type=int, default=3, help="submits (medians printed)")
    parser.add_argument("--recipients-per-message", type=int, default=0, metavar="N",
                        help="the identical-body notice, N recipients per message")  # fmt: skip
    parser.add_argument("--domains", type=int, default=1000,
                        help="with --recipients-per-message: 60%% over N domains")  # fmt: skip
    parser.add_argument("--plaintext", action="store_true", help="no TLS between processes")
    args = parser.parse_args(argv)
    return in_run_directory(None, "mailers-upload-", lambda workdir: _run(args, workdir))


def _run(args: argparse.Namespace, workdir: Path) -> int:
    from mailers_dev.cluster import ClusterSpec, LocalCluster

    count, shared = args.recipients, args.recipients_per_message
    spec = ClusterSpec(
        coordinators=1,
        nodes=0,
        coordinator_env={"MAILER_LOG_LEVEL": "WARNING"},
        tls=not args.plaintext,
    )
    kind = f"identical-body, {shared} per message" if shared else "personalised"
    print(f"workdir {workdir}; upload of {count:,} recipients ({kind}), {args.repeat} times")
    table_rows = rows(count, shared, args.domains)
    cluster = LocalCluster(workdir, spec)
    walls: list[float] = []
    cpu: dict[str, list[float]] = {"client": [], "leader": [], "postgresql": []}
    try:
        cluster.start()
        postgres = cluster.postgres
        assert postgres.proc is not None
        pids = {"leader": next(iter(cluster.coordinators.values())).pid}
        pids["postgresql"] = postgres.proc.pid
        for _ in range(args.repeat):
            before, client_before = tree_usages(pids), self_usage()
            walls.append(
                asyncio.run(
                    submit(
                        cluster.coordinator_addresses,
                        cluster.client_tls,
                        count,
                        shared,
                        args.domains,
                    )
                )  # fmt: skip
            )
            after, client_after = tree_usages(pids), self_usage()
            cpu["client"].append(client_after.cpu_s - client_before.cpu_s)
            for name in pids:
                start_usage, end_usage = before[name], after[name]
                assert start_usage is not None and end_usage is not None
                cpu[name].append(end_usage.cpu_s - start_usage.cpu_s)
        password = postgres.password_file.read_text().strip()
        copy_s = asyncio.run(copy_alone(postgres.url, password, table_rows))
    except BaseException:
        print(cluster.logs()[-4000:], file=sys.stderr)
        raise
    finally:
        cluster.stop()
    wall = statistics.median(walls)
    print(
        f"submit (streamed upload, one transaction): median {wall:.2f} s, "
        f"{count / wall:,.0f} recipients/s; runs {', '.join(f'{w:.2f}' for w in walls)} s"
    )
    print(
        f"COPY alone of the same rows (asyncpg, a table like recipients): {copy_s:.2f} s, "
        f"{count / copy_s:,.0f} recipients/s; submit is {copy_s / wall:.1%} of it"
    )
    for name, seconds in cpu.items():
        median = statistics.median(seconds)
        print(f"  {name:<11} CPU {median:6.2f} s, {median / count * 1e6:5.1f} us per recipient")
    return 0


if __name__ == "__main__":
    sys.exit(main())
