"""Helpers of the chaos tests that drive a whole :class:`LocalCluster` of real processes.

A cluster is started and stopped in a worker thread (both block for seconds), so a
fault proxy on the test's event loop keeps serving meanwhile. :func:`running_cluster`
stops every process it started, also when the test fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aetcd

from client_sdk import Address, MailerClient, MessageContent, Recipient
from mailers_dev.cluster import LocalCluster
from mailers_runtime.etcd import Keys, connect
from tests.helpers import assert_eventually, require_etcd

CONTENT = MessageContent(
    sender=Address("news@example.com", "Example News"),
    subject="Hello {{ name }}",
    text_body="Hi {{ name }}, your code is {{ code }}.",
    html_body="<p>Hi <b>{{ name }}</b>, your code is {{ code }}.</p>",
)
KEYS = Keys()


def recipients(n: int, domain: str) -> list[Recipient]:
    return [Recipient(f"user{i}@{domain}", f"User {i}", {"code": f"C{i:05d}"}) for i in range(n)]


@contextlib.asynccontextmanager
async def running_cluster(cluster: LocalCluster) -> AsyncIterator[LocalCluster]:
    """Start ``cluster`` and stop all its processes on exit.

    When the body fails, the tail of every process log is printed first (pytest shows
    it with the failure).
    """
    require_etcd()
    await asyncio.to_thread(cluster.start)
    try:
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await asyncio.to_thread(cluster.stop)


@contextlib.asynccontextmanager
async def etcd_client(endpoints: Sequence[str]) -> AsyncIterator[aetcd.Client]:
    """The test's own etcd client (straight to etcd, never through a proxy)."""
    client = connect(list(endpoints))
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def batches_held(client: MailerClient, node_id: str) -> int | None:
    """Batches the leader has handed to node_id and not got back; 0 once the node left
    the registry, None when the leader did not answer."""
    try:
        listed = await client.list_nodes(timeout=timedelta(seconds=3))
    except Exception:
        return None
    return next((n.batches_in_flight for n in listed if n.node_id == node_id), 0)


async def node_lease(etcd: aetcd.Client, node_id: str) -> int | None:
    """The lease of node_id's registration key, None when the key is absent."""
    got = await asyncio.wait_for(etcd.get(KEYS.node(node_id)), 5)
    if got is None:
        return None
    return int(json.loads(got.value)["lease_id"])


def job_lines(cluster: LocalCluster, job_id: str) -> list[dict[str, Any]]:
    """The sink log lines (all sinks) of one job."""
    prefix = f"<{job_id}."
    return [line for line in cluster.delivered() if str(line["message_id"]).startswith(prefix)]


def index_of(message_id: str) -> int:
    """The recipient index in ``<job.index@domain>``."""
    return int(message_id.split("@")[0].rpartition(".")[2])


def duplicates_by_id(lines: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every Message-ID accepted more than once, with all its lines."""
    by_id: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for line in lines:
        by_id[str(line["message_id"])].append(line)
    return {k: v for k, v in by_id.items() if len(v) > 1}


class Stopwatch:
    """Seconds since the fault, on the monotonic clock, plus the wall time of the
    fault for comparing with the sink's ``ts``."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.wall = time.time()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


async def until(check: Callable[[], Any], timeout_s: float, message: str) -> None:
    """assert_eventually for async or sync checks, with a short poll interval."""
    await assert_eventually(check, timeout_s=timeout_s, interval_s=0.05, message=message)


# -- etcd membership (etcdctl) ----------------------------------------------------------


async def etcdctl(endpoints: Sequence[str], *args: str, timeout_s: float = 10) -> str:
    """Run ``etcdctl`` (API v3) against endpoints; returns stdout.

    Raises:
        RuntimeError: etcdctl failed or did not finish within timeout_s.
    """
    proc = await asyncio.create_subprocess_exec(
        "etcdctl",
        f"--endpoints={','.join(endpoints)}",
        "--dial-timeout=2s",
        "--command-timeout=3s",
        *args,
        env={**os.environ, "ETCDCTL_API": "3"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"etcdctl {args} timed out") from None
    if proc.returncode != 0:
        raise RuntimeError(f"etcdctl {args} failed: {err.decode(errors='replace')}")
    return out.decode()


async def etcd_member_status(endpoint: str) -> tuple[int, int]:
    """``(member id, leader id)`` as the member at endpoint reports them."""
    status = json.loads(await etcdctl([endpoint], "endpoint", "status", "-w", "json"))
    return int(status[0]["Status"]["header"]["member_id"]), int(
        status[0]["Status"].get("leader", 0)
    )


async def etcd_leader(endpoints: Sequence[str]) -> tuple[str, dict[str, int]]:
    """The leader's endpoint and every reachable member's id by endpoint.

    Raises:
        RuntimeError: the members do not agree on a leader among them.
    """
    ids: dict[str, int] = {}
    leaders = set()
    for endpoint in endpoints:
        member, leader = await etcd_member_status(endpoint)
        ids[endpoint] = member
        leaders.add(leader)
    by_id = {v: k for k, v in ids.items()}
    if len(leaders) != 1 or next(iter(leaders)) not in by_id:
        raise RuntimeError(f"no agreed leader: {leaders} among {ids}")
    return by_id[leaders.pop()], ids


async def etcd_move_leader(endpoints: Sequence[str], to_endpoint: str) -> None:
    """Make the member at to_endpoint the etcd leader (no-op when it already leads)."""
    leader, ids = await etcd_leader(endpoints)
    if leader == to_endpoint:
        return
    await etcdctl([leader], "move-leader", format(ids[to_endpoint], "x"))

    async def moved() -> bool:
        with contextlib.suppress(RuntimeError):
            return (await etcd_leader(endpoints))[0] == to_endpoint
        return False

    await until(moved, 10, f"etcd leader moved to {to_endpoint}")


def log_count(path: Path, needle: str) -> int:
    """Lines of a process log containing needle."""
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if needle in line)


async def wait_final(client: MailerClient, job_id: str, timeout_s: float = 60) -> float:
    """Poll until the job is final; returns when (monotonic). Polls ``get`` rather than
    using ``MailerClient.wait``, whose watch stream can hang when the leader serving it
    steps down (see test_etcd_faults.test_leader_cut_off_from_etcd...)."""

    async def final() -> bool:
        try:
            job = await client.get(job_id, timeout=timedelta(seconds=3))
        except Exception:
            return False
        return job.progress.is_final

    await until(final, timeout_s, f"job {job_id} final")
    return time.monotonic()


def log_times(path: Path, needle: str) -> list[float]:
    """Unix times of the log lines containing needle (our processes log local time as
    ``YYYY-MM-DD HH:MM:SS,mmm`` at the start of each line)."""
    if not path.exists():
        return []
    times = []
    for line in path.read_text(errors="replace").splitlines():
        if needle in line:
            with contextlib.suppress(ValueError):
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                times.append(stamp.timestamp())
    return times
