"""Chaos: the delivery event stream on a cluster of real processes, read by the SDK.

A job of 10,000 recipients, 5% greylisted (451 once, then delivered), 5% refused with
550: each recipient's events are exactly its story, in order, each with the metadata and
tags given at submit. (A consumer reading through a leader SIGKILL:
``tests/integration/test_event_clients.py``.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from pathlib import Path

import pytest

from client_sdk import DeliveryEvent, EventType, JobOptions, MailerClient, Recipient
from mailers_dev.cluster import LocalCluster
from mailers_dev.sink import FaultPlan, write_control
from tests.chaos.cluster_helpers import CONTENT
from tests.chaos.test_exactly_once import COORDINATOR_ENV, NODE_ENV, finish, spec, started

pytestmark = pytest.mark.chaos

E = EventType
FINAL = (E.DELIVERED, E.FAILED)


@pytest.fixture
def clusters() -> collections.abc.Iterator[list[LocalCluster]]:
    made: list[LocalCluster] = []
    yield made
    for c in made:
        c.stop()


def people(n: int, domain: str) -> list[Recipient]:
    """Every 20th recipient is refused for good (hard…), the next one once (soft…, over
    20 domains of their own: a node slows a domain down that answers 451), the others
    are delivered at once."""

    def address(i: int) -> str:
        if i % 20 == 0:
            return f"hard{i}@{domain}"
        if i % 20 == 1:
            return f"soft{i}@later{i // 20 % 20}.{domain}"
        return f"user{i}@{domain}"

    return [
        Recipient(address(i), f"U {i}", {"code": str(i)}, metadata={"row": str(i)})
        for i in range(n)
    ]


class Trails:
    """Events read from a stream, by recipient, with the order and duplicates checked."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.by_index: dict[int, list[DeliveryEvent]] = collections.defaultdict(list)
        self.seen: set[int] = set()
        self.duplicates = 0
        self.last_id = 0
        self.finished = 0

    def add(self, event: DeliveryEvent) -> None:
        if event.event_id in self.seen:
            self.duplicates += 1
            return
        assert event.event_id > self.last_id, (event.event_id, self.last_id)
        self.seen.add(event.event_id)
        self.last_id = event.event_id
        self.by_index[event.index].append(event)
        if event.type in FINAL:
            self.finished += 1

    @property
    def complete(self) -> bool:
        return self.finished >= self.total

    def types(self, index: int) -> list[EventType]:
        return [e.type for e in self.by_index[index]]


async def read_until_complete(
    client: MailerClient, job_id: str, trails: Trails, timeout_s: float = 240
) -> int:
    """Read the job's events into ``trails`` until every recipient has a final one,
    then 2 s more (nothing may follow); returns the stream's reconnects."""
    stream = client.events(job_ids=[job_id])
    async with stream:
        async with asyncio.timeout(timeout_s):
            async for event in stream:
                trails.add(event)
                if trails.complete:
                    break
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for event in stream:
                    trails.add(event)
        return stream.reconnects


# ---- 1. every recipient's story, exactly --------------------------------------------


@pytest.mark.timeout(360)
async def test_events_of_10k_recipients_tell_each_story(
    tmp_path: Path, clusters: list[LocalCluster]
) -> None:
    total = 10_000
    control = tmp_path / "sink-control.json"
    write_control(control, FaultPlan(reject_pattern="^hard", greylist_pattern="^soft"))
    env = {**COORDINATOR_ENV, "MAILER_BATCH_SIZE": "100", "MAILER_RETRY_INITIAL_S": "0.5",
           "MAILER_RETRY_MAX_S": "2"}  # fmt: skip
    nodes = {**NODE_ENV, "MAILER_SMTP_CONNECTIONS": "6"}
    cluster = LocalCluster(
        tmp_path / "c",
        spec(
            sink_args=("--control", str(control), "--no-store"), coordinator_env=env, node_env=nodes
        ),
    )
    client = await started(clusters, cluster)
    async with client:
        # Given a job whose soft recipients are greylisted and hard ones refused
        job = await client.submit(
            CONTENT, people(total, "events.example"), options=JobOptions(tags=("events",))
        )
        # When the stream is read after the job ended
        await finish(client, cluster, job.job_id, "events of 10k recipients")
        trails = Trails(total)
        await read_until_complete(client, job.job_id, trails)

    # Then each recipient has exactly its story, in order
    assert trails.duplicates == 0
    deferrals = 0
    for i in range(total):
        types = trails.types(i)
        if i % 20 == 0:
            assert types == [E.ACCEPTED, E.FAILED], (i, types)
            reply = trails.by_index[i][-1].reply
            assert reply is not None and reply.code == 550, (i, reply)
        elif i % 20 == 1:
            middle = types[1:-1]
            assert types[0] == E.ACCEPTED and types[-1] == E.DELIVERED, (i, types)
            assert middle and set(middle) == {E.DEFERRED}, (i, types)
            assert all(e.reply and e.reply.code == 451 for e in trails.by_index[i][1:-1]), i
            deferrals += len(middle)
        else:
            assert types == [E.ACCEPTED, E.DELIVERED], (i, types)
        # And every event carries the metadata and tags given at submit
        for e in trails.by_index[i]:
            assert e.metadata == {"row": str(i)} and tuple(e.tags) == ("events",), e
    delivered = [t[-1] for t in trails.by_index.values() if t[-1].type is E.DELIVERED]
    assert all(e.message_id for e in delivered)
    print(f"events of 10k recipients: {len(trails.seen)} events, {deferrals} deferrals")
