"""Delivery events in the PostgreSQL store: one per state change, ids in the order
they become visible, joined with what the caller attached, purged with their job."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from coordinator.db.settings import DatabaseConfig
from coordinator.db.store import BatchRelease, Database, QuotaRequest, StatusChange, Store
from coordinator.model import (
    EventType,
    JobOptions,
    Recipient,
    RecipientOutcome,
    Result,
    Status,
)
from tests.integration.test_store import NOW, leader, spec, write

E = EventType


async def one_chunk(n: int, domain: str = "example.org") -> AsyncIterator[list[Recipient]]:
    yield [Recipient(f"u{i}@{domain}", f"U {i}", {}, {"crm": f"c{i}"}) for i in range(n)]


def outcome(job_id: str, index: int, status: Status, attempts: int, code: int) -> RecipientOutcome:
    result = Result(status, code, "", f"{code} reply", attempts=attempts, node_id="n1")
    return RecipientOutcome(job_id, index, result)


async def trail(store: Store, tenant: str = "acme") -> dict[int, list[EventType]]:
    """Each recipient's event types, in id order (which is asserted increasing)."""
    events = await store.events(tenant, 0, 10_000)
    ids = [e.event_id for e in events]
    assert ids == sorted(set(ids))
    by_index: dict[int, list[EventType]] = {}
    for e in events:
        by_index.setdefault(e.index, []).append(e.type)
    return by_index


async def test_each_state_change_is_one_event_with_the_callers_data(database: Database) -> None:
    store = await leader(database, 1)
    job = dataclasses.replace(spec("j1", "k1", batch_size=5), options=JobOptions(tags=("news",)))
    record = await store.submit(job, one_chunk(10), QuotaRequest(), NOW)
    n = record.job_no
    # Given both batches handed out (twice for the first: a re-dispatch is no new event)
    await store.assign([(n, 0, "n1", 1), (n, 1, "n1", 1)], [], {n: 2}, NOW)
    await store.assign([(n, 0, "n2", 2)], [], {n: 2}, NOW)
    # When results come: 0 deferred then delivered, 1 refused, 2 delivered (reported
    # twice, and by a second node), then the rest of the second batch cancelled
    await write(store, [outcome("j1", 0, Status.DEFERRED, 1, 451)])
    await write(store, [outcome("j1", 0, Status.DEFERRED, 1, 451)])  # the same, again
    await write(store, [outcome("j1", 0, Status.DELIVERED, 2, 250)])
    await write(store, [outcome("j1", 1, Status.FAILED, 1, 550)])
    for _ in range(2):
        await write(store, [outcome("j1", 2, Status.DELIVERED, 1, 250)])
    cancel = StatusChange(n, 5, 10, (Status.QUEUED,), Status.CANCELLED, "job cancelled", 5)
    await write(store, [], changes=[cancel], suppressed=[(n, 3, "hard_bounce")])
    # Then each recipient has exactly its own story
    by_index = await trail(store)
    assert by_index[0] == [E.ACCEPTED, E.DEFERRED, E.DELIVERED]
    assert by_index[1] == [E.ACCEPTED, E.FAILED]
    assert by_index[2] == [E.ACCEPTED, E.DELIVERED]
    assert by_index[3] == [E.ACCEPTED, E.SUPPRESSED]
    assert by_index[4] == [E.ACCEPTED]
    assert all(by_index[i] == [E.ACCEPTED, E.CANCELLED] for i in range(5, 10))
    # And events carry the reply, the recipient's address and metadata, the job's tags
    events = await store.events("acme", 0, 100, types=[E.FAILED, E.CANCELLED])
    assert [e.type for e in events] == [E.FAILED] + [E.CANCELLED] * 5
    failed = events[0]
    assert (failed.job_id, failed.email, failed.code, failed.text) == (
        "j1", "u1@example.org", 550, "550 reply",
    )  # fmt: skip
    assert failed.metadata == {"crm": "c1"} and failed.tags == ("news",)
    assert events[1].reason == "job cancelled"
    # And a cursor resumes after any event; other tenants see none of them
    everything = await store.events("acme", 0, 100)
    middle = everything[7].event_id
    assert await store.events("acme", middle, 100) == everything[8:]
    assert await store.events("beta", 0, 100) == []


async def test_a_deferral_tells_when_its_batch_goes_again(database: Database) -> None:
    store = await leader(database, 1)
    n = (
        await store.submit(spec("j1", "k1", batch_size=5), one_chunk(5), QuotaRequest(), NOW)
    ).job_no
    await store.assign([(n, 0, "n1", 1)], [], {n: 1}, NOW)
    release = BatchRelease(n, 0, "n1", 1, 0, 5)
    await write(store, [outcome("j1", 0, Status.DEFERRED, 1, 451)], releases=[release])
    (deferred,) = await store.events("acme", 0, 100, types=[E.DEFERRED])
    assert deferred.next_attempt_at == NOW + 60


async def test_event_ids_become_visible_in_increasing_order(
    database: Database, database_config: DatabaseConfig
) -> None:
    # Given a transaction that took event ids and has not committed yet
    store = await leader(database, 1)
    n = (
        await store.submit(spec("j1", "k1", batch_size=5), one_chunk(10), QuotaRequest(), NOW)
    ).job_no
    other = await Database.open(database_config, migrate_schema=False)
    try:
        async with other.pool.acquire() as conn, conn.transaction():
            await conn.execute(other.queries["events_lock"])
            insert = "INSERT INTO events (tenant, job_no, idx, type, at) VALUES ($1, $2, 9, 1, $3)"
            await conn.execute(insert, "acme", n, datetime.now(UTC))
            # When the leader writes events meanwhile
            writing = asyncio.create_task(store.assign([(n, 0, "n1", 1)], [], {n: 1}, NOW))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await asyncio.shield(writing)
            # Then its events wait: a reader never sees a later id before an earlier one
            assert not writing.done()
            assert await store.events("acme", 0, 100) == []
        await writing
    finally:
        await other.close()
    events = await store.events("acme", 0, 100)
    assert [e.index for e in events] == [9, 0, 1, 2, 3, 4]


async def test_events_go_with_their_jobs_recipients(database: Database) -> None:
    store = await leader(database, 1)
    n = (
        await store.submit(spec("j1", "k1", batch_size=5), one_chunk(10), QuotaRequest(), NOW)
    ).job_no
    await store.assign([(n, 0, "n1", 1), (n, 1, "n1", 1)], [], {n: 2}, NOW)
    await store.purge_slice(n, 0, 5)
    assert sorted(e.index for e in await store.events("acme", 0, 100)) == [5, 6, 7, 8, 9]
