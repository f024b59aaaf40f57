"""Client memory while a large CSV is uploaded: it must stay flat.

Streams a generated CSV of N recipients (default 1,000,000) through
``MailerClient.submit`` (a re-readable factory, as ``mailers send`` passes) into a
coordinator stand-in that counts and discards what it receives, and prints the
process's resident memory as the upload passes 10% steps. Everything runs in this
process on loopback; nothing is stored.

``--reader plain`` reads the CSV with ``csv.reader`` (what the SDK itself costs);
``--reader campaign`` uses ``mailers send``'s reader, which also skips repeated
addresses and so remembers every address it has seen.

Usage: ``python -m bench.sdk_upload [--recipients N] [--reader plain|campaign]``.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from client_sdk import Address, MailerClient, MessageContent, Recipient
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from mailers.campaign import iter_recipients
from mailers_dev.commands import write_demo_csv


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def plain_recipients(path: Path) -> Iterator[Recipient]:
    with path.open(newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for email, name, code, city in rows:
            yield Recipient(email, name, {"code": code, "city": city})


class CountingCoordinator(coordinator_pb2_grpc.MailerServiceServicer):
    """Accepts an upload, counts its recipients and keeps none of them."""

    def __init__(self) -> None:
        self.received = 0

    async def UploadJob(
        self,
        request_iterator: AsyncIterator[coordinator_pb2.UploadJobRequest],
        context: Any,
    ) -> coordinator_pb2.UploadJobResponse:
        async for message in request_iterator:
            if message.WhichOneof("payload") == "recipients":
                self.received += len(message.recipients.recipients)
        progress = common_pb2.JobProgress(
            job_id="bench", state=common_pb2.JOB_STATE_QUEUED, total=self.received
        )
        return coordinator_pb2.UploadJobResponse(
            job=coordinator_pb2.Job(job_id="bench", progress=progress), created=True
        )


async def main(recipients: int, reader: str) -> None:
    read = plain_recipients if reader == "plain" else iter_recipients
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "recipients.csv"
        t0 = time.monotonic()
        write_demo_csv(csv_path, recipients)
        size_mib = csv_path.stat().st_size / 2**20
        print(f"CSV: {recipients:,} recipients, {size_mib:.0f} MiB, {time.monotonic() - t0:.1f}s")
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 * 2**20)])
        servicer = CountingCoordinator()  # type: ignore[abstract]  # only UploadJob is served
        coordinator_pb2_grpc.add_MailerServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        steps = {recipients * k // 10 for k in range(1, 11)}
        print(f"RSS before upload: {rss_mib():.1f} MiB")
        samples: list[tuple[int, float]] = []

        def progress(sent: int) -> None:
            while steps and sent >= min(steps):
                steps.remove(min(steps))
                samples.append((sent, rss_mib()))
                print(f"  sent {sent:>9,}  RSS {samples[-1][1]:6.1f} MiB")

        content = MessageContent(sender=Address("news@example.com"), text_body="Hi {{ name }}")
        t0 = time.monotonic()
        async with MailerClient([f"127.0.0.1:{port}"]) as client:
            job = await client.submit(content, lambda: read(csv_path), on_progress=progress)
        elapsed = time.monotonic() - t0
        await server.stop(0)
        first, last = samples[0][1], samples[-1][1]
        print(
            f"uploaded {job.progress.total:,} recipients in {elapsed:.1f}s "
            f"({job.progress.total / elapsed:,.0f}/s); RSS at 10% {first:.1f} MiB, "
            f"at 100% {last:.1f} MiB ({100 * (last - first) / first:+.1f}%)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--reader", choices=["plain", "campaign"], default="plain")
    args = parser.parse_args()
    asyncio.run(main(args.recipients, args.reader))
