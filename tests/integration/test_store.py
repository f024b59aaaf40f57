"""The PostgreSQL store against a real server: fencing, atomic submits, idempotent
results, batch settlement, keyset listings and quotas."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from coordinator.db import store as store_module
from coordinator.db.settings import DatabaseConfig
from coordinator.db.store import (
    BatchRelease,
    Database,
    Duplicate,
    Feedback,
    LostLeadership,
    QuotaRefused,
    QuotaRequest,
    Reported,
    ResultRow,
    StatusChange,
    Store,
)
from coordinator.model import (
    Address,
    Content,
    EventType,
    JobOptions,
    JobSpec,
    JobState,
    Recipient,
    RecipientOutcome,
    Result,
    Status,
)
from coordinator.suppression import Reason
from tests.helpers import assert_eventually

CONTENT = Content(
    sender=Address("news@example.com"), reply_to=None, subject="Hi", text_body="Hello", html_body=""
)
NOW = 1_800_000_000.0


def spec(job_id: str, key: str, tenant: str = "acme", batch_size: int = 10) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        idempotency_key=key,
        content=CONTENT,
        options=JobOptions(),
        total=0,
        batch_size=batch_size,
        created_at=NOW,
        tenant=tenant,
    )


async def chunks_of(
    n: int, size: int = 1000, fail_at: int | None = None
) -> AsyncIterator[Sequence[Recipient]]:
    for start in range(0, n, size):
        if fail_at is not None and start >= fail_at:
            raise ValueError("bad recipient")
        yield [
            Recipient(f"user{i}@example.org", f"User {i}", {"code": str(i)})
            for i in range(start, min(n, start + size))
        ]


async def leader(database: Database, epoch: int) -> Store:
    store = Store(database, epoch)
    await store.raise_fence(f"coordinator-{epoch}")
    return store


def delivered(job_id: str, index: int, node: str = "n1", attempts: int = 1) -> RecipientOutcome:
    result = Result(Status.DELIVERED, 250, "2.0.0", "ok", attempts=attempts, node_id=node)
    return RecipientOutcome(job_id, index, result)


async def write(store: Store, outcomes: Sequence[RecipientOutcome] = (), **kw: object) -> object:
    return await store.write(
        outcomes,
        kw.get("changes", ()),  # type: ignore[arg-type]
        kw.get("suppressed", ()),  # type: ignore[arg-type]
        kw.get("releases", ()),  # type: ignore[arg-type]
        lambda release, deferred: NOW + 60,
        NOW,
    )


async def test_a_deposed_leaders_writes_fail(database: Database) -> None:
    # Given a leader at epoch 5 that stored a job
    old = await leader(database, 5)
    await old.submit(spec("j1", "k1"), chunks_of(20), QuotaRequest(), NOW)
    # When a newer leader (epoch 7) raises the fence
    new = await leader(database, 7)
    # Then every write of the old one is refused, and nothing of it lands
    with pytest.raises(LostLeadership):
        await write(old, [delivered("j1", 0)])
    with pytest.raises(LostLeadership):
        await old.submit(spec("j2", "k2"), chunks_of(5), QuotaRequest(), NOW)
    assert not await new.job_exists("j2")
    after = await new.job("j1")
    assert after is not None and after.status.counts.delivered == 0
    # And an older epoch cannot take the fence back
    with pytest.raises(LostLeadership):
        await leader(database, 6)
    await write(new, [delivered("j1", 0)])
    assert (await new.job("j1")).status.counts.delivered == 1  # type: ignore[union-attr]


async def test_the_fence_raise_waits_for_a_write_in_flight(database: Database) -> None:
    # Given a long upload of the old leader in progress
    old = await leader(database, 5)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> AsyncIterator[Sequence[Recipient]]:
        async for chunk in chunks_of(100, size=50):
            started.set()
            await release.wait()
            yield chunk

    upload = asyncio.create_task(old.submit(spec("slow", "k"), slow(), QuotaRequest(), NOW))
    await started.wait()
    # When a new leader raises the fence meanwhile, and then the upload finishes
    new_store = Store(database, 9)
    raising = asyncio.create_task(new_store.raise_fence("new"))
    await asyncio.sleep(0.2)
    release.set()
    # Then the upload fails (its final fence check comes after the raise) and nothing is
    # left of it, and the raise succeeds
    with pytest.raises(LostLeadership):
        await upload
    await raising
    assert not await new_store.job_exists("slow")


@contextlib.asynccontextmanager
async def stalled_transaction(config: DatabaseConfig, *statements: str) -> AsyncIterator[object]:
    """A session of a deposed leader whose process stopped inside a transaction: it ran
    ``statements`` and then waits for a client that never speaks again."""
    other = await Database.open(config, migrate_schema=False)
    try:
        async with other.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            for statement in statements:
                await conn.execute(statement)
            yield conn
    finally:
        other.pool.terminate()


async def test_a_leader_stopped_holding_the_fence_is_ended(
    database: Database, database_config: DatabaseConfig
) -> None:
    # Given the old leader stopped between its fence check and its commit
    old = await leader(database, 5)
    await old.submit(spec("j1", "k1"), chunks_of(20), QuotaRequest(), NOW)
    async with stalled_transaction(
        database_config,
        "UPDATE jobs SET priority = 9 WHERE job_id = 'j1'",
        "SELECT mailers_check_fence(5)",
    ) as stalled:
        # When a new leader raises the fence
        new_store = Store(database, 9)
        async with asyncio.timeout(15):  # statement_timeout (30 s) would be a hang
            await new_store.raise_fence("new", stalled_after_s=0.2)
        # Then the stalled session was ended and its write rolled back
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
            await stalled.fetchval("SELECT 1")  # type: ignore[attr-defined]
    async with database.pool.acquire() as conn:
        assert await conn.fetchval("SELECT priority FROM jobs WHERE job_id = 'j1'") == 0
    await write(new_store, [delivered("j1", 0)])


async def test_rows_held_by_a_stopped_leader_are_freed_by_the_raise(
    database: Database, database_config: DatabaseConfig
) -> None:
    # Given the old leader stopped in the middle of a write (before its fence check)
    old = await leader(database, 5)
    await old.submit(spec("j1", "k1"), chunks_of(20), QuotaRequest(), NOW)
    async with stalled_transaction(
        database_config, "UPDATE recipients SET attempts = 7 WHERE idx = 0"
    ):
        # When a new leader raises the fence and writes the same rows
        new_store = Store(database, 9)
        async with asyncio.timeout(15):
            await new_store.raise_fence("new", stalled_after_s=0)
            await write(new_store, [delivered("j1", 0)])
    # Then its write landed, the stalled one did not
    job = await new_store.job("j1")
    assert job is not None and job.status.counts.delivered == 1


async def test_a_submit_is_whole_or_absent(database: Database) -> None:
    store = await leader(database, 1)
    # Given a job stored with its idempotency key
    first = await store.submit(spec("a", "same"), chunks_of(2500), QuotaRequest(), NOW)
    assert first.spec.total == 2500
    # When the same key comes again
    with pytest.raises(Duplicate):
        await store.submit(spec("b", "same"), chunks_of(30), QuotaRequest(), NOW)
    # Or a submit fails half-way through its recipients
    with pytest.raises(ValueError):
        await store.submit(spec("c", "other"), chunks_of(3000, fail_at=2000), QuotaRequest(), NOW)
    # Then neither left a job or a recipient row behind
    assert not await store.job_exists("b") and not await store.job_exists("c")
    async with database.pool.acquire() as conn:
        rows = await conn.fetchval("SELECT count(*) FROM recipients")
    assert rows == 2500
    found = await store.find_by_key("acme", "same")
    assert found is not None and found.spec.job_id == "a"
    # And keys are per tenant
    other = await store.submit(spec("d", "same", tenant="beta"), chunks_of(1), QuotaRequest(), NOW)
    assert other.spec.job_id == "d"


async def test_a_shared_message_job_is_stored_in_domain_order(database: Database) -> None:
    store = await leader(database, 1)
    # Given a job whose recipients share messages, its domains interleaved (and one
    # written in capitals, as callers do)
    shared = dataclasses.replace(
        spec("shared", "shared", batch_size=4),
        content=dataclasses.replace(CONTENT, recipients_per_message=10),
    )
    domains = ["b.example", "A.example", "c.example", "a.example", "b.example", "c.example"]
    emails = [f"u{i}@{domains[i % 6]}" for i in range(12)]

    async def upload() -> AsyncIterator[Sequence[Recipient]]:
        yield [Recipient(e, "", {}) for e in emails[:5]]
        yield [Recipient(e, "", {}) for e in emails[5:]]

    record = await store.submit(shared, upload(), QuotaRequest(), NOW)
    assert record.spec.total == 12
    # When its results are listed, two at a time
    rows: list[ResultRow] = []
    after = -1
    while page := await store.results(record.job_no, after, (), 2):
        rows += page
        after = page[-1].cursor
    # Then send order runs by domain (case-insensitively), then by submitted place:
    # each batch of 4 holds one domain
    assert [r.cursor for r in rows] == list(range(12))
    assert [r.email for r in rows] == sorted(
        emails, key=lambda e: (e.rpartition("@")[2].lower(), emails.index(e))
    )
    pending = await store.pending([(record.job_no, lo, lo + 4, "acme") for lo in (0, 4, 8)])
    for lo in (0, 4, 8):
        batch = [p.recipient.email for p in pending[record.job_no] if lo <= p.index < lo + 4]
        assert len({e.rpartition("@")[2].lower() for e in batch}) == 1
    # And every recipient keeps its submitted index, each exactly once
    assert sorted((r.index, r.email) for r in rows) == list(enumerate(emails))


async def test_an_upload_longer_than_the_statement_timeout_is_stored_whole(
    database_config: DatabaseConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store whose statements may run 1 s, and COPY statements of 500 rows
    config = dataclasses.replace(database_config, statement_timeout_s=1.0)
    database = await Database.open(config, migrate_schema=False)
    monkeypatch.setattr(store_module, "COPY_ROWS", 500)
    store = await leader(database, 1)

    async def slow_client() -> AsyncIterator[Sequence[Recipient]]:
        # A caller streaming 5,000 recipients over about 2.5 s (a slow network)
        async for chunk in chunks_of(5000, size=500):
            await asyncio.sleep(0.25)
            yield chunk

    try:
        # When the upload takes longer than any one statement may
        record = await store.submit(spec("slow", "slow"), slow_client(), QuotaRequest(), NOW)
        # Then it is stored whole, every recipient at its own index
        assert record.spec.total == 5000
        async with database.pool.acquire() as conn:
            count, top = await conn.fetchrow("SELECT count(*), max(idx) FROM recipients")
        assert (count, top) == (5000, 4999)
    finally:
        await database.close()


async def test_results_apply_once_and_deliveries_win(database: Database) -> None:
    store = await leader(database, 1)
    job = await store.submit(spec("r", "k"), chunks_of(10), QuotaRequest(), NOW)
    n = job.job_no
    deferred = RecipientOutcome("r", 1, Result(Status.DEFERRED, 451, "4.3.0", "busy", attempts=1))
    failed = RecipientOutcome(
        "r", 2, Result(Status.FAILED, 550, "5.1.1", "no such user", attempts=1), hard_bounce=True
    )
    async with database.pool.acquire() as conn:  # an address as a user may upload it
        await conn.execute(
            "UPDATE recipients SET email = 'User2@Example.org' WHERE job_no = $1 AND idx = 2", n
        )
    # Given results applied, then the same results replayed
    for _ in range(2):
        await write(store, [delivered("r", 0), deferred, failed])
    counts = (await store.job("r")).status.counts  # type: ignore[union-attr]
    # Then they count once
    assert (counts.delivered, counts.deferred, counts.failed, counts.queued) == (1, 1, 1, 7)
    # When an older attempt's deferral arrives after a later delivery of recipient 1
    await write(store, [delivered("r", 1, attempts=2)])
    await write(store, [deferred])
    # Then the delivery stands
    results = {r.index: r.result for r in await store.results(n, -1, (), 100)}
    assert results[1].status is Status.DELIVERED and results[1].attempts == 2
    # When a recipient cancelled by the leader is reported delivered later
    await write(
        store,
        changes=[StatusChange(n, 3, 4, (Status.QUEUED,), Status.CANCELLED, "job cancelled", 10)],
    )
    await write(store, [delivered("r", 3)])
    # Then it is delivered (what happened), and counts follow
    record = await store.job("r")
    assert record is not None
    c = record.status.counts
    assert (c.delivered, c.cancelled, c.deferred) == (3, 0, 0)
    # And another node's delivery of a delivered recipient is counted as a duplicate
    await write(store, [delivered("r", 0, node="n2")])
    assert (await store.job("r")).duplicates == 1  # type: ignore[union-attr]
    # And the hard-bounced recipient's address is on the tenant's list, normalised
    listed = await store.suppressions("acme", "", 10)
    assert [(s.email, s.code) for s in listed] == [("user2@example.org", 550)]
    # And results for a job that does not exist are ignored
    await write(store, [delivered("no-such-job", 0)])


async def _batch_0_handed_out(database: Database, job_id: str, size: int) -> tuple[Store, int]:
    """A leader's store and a new job (batches of 5) whose first batch is handed out."""
    store = await leader(database, 1)
    job = await store.submit(spec(job_id, "k", batch_size=5), chunks_of(size), QuotaRequest(), NOW)
    await store.assign([(job.job_no, 0, "n1", 1)], [], {job.job_no: 1}, NOW)
    return store, job.job_no


def _pause_after_applying(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the store's writes stop after applying their outcomes (first event set)
    until the second event is."""
    applied, resume = asyncio.Event(), asyncio.Event()
    apply = store._apply_outcomes

    async def apply_then_pause(*args: Any) -> Any:
        moved = await apply(*args)
        applied.set()
        await resume.wait()
        return moved

    monkeypatch.setattr(store, "_apply_outcomes", apply_then_pause)
    return applied, resume


async def test_batches_are_handed_out_while_results_are_being_applied(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, n = await _batch_0_handed_out(database, "w", 10)
    applied, resume = _pause_after_applying(store, monkeypatch)
    # Given batch 0's results applied to its recipients, in a write not yet committed
    writing = asyncio.create_task(write(store, [delivered("w", i) for i in range(5)]))
    try:
        async with asyncio.timeout(60):
            await applied.wait()
        # When batch 1 is handed out meanwhile, with its accepted events
        async with asyncio.timeout(20):
            await store.assign([(n, 1, "n1", 1)], [], {n: 2}, NOW)
    finally:
        resume.set()
    # Then it did not wait for the write, and the write completes after it
    async with asyncio.timeout(60):
        await writing
    # And events are visible in the order they were recorded: batch 1's accepted events
    # before batch 0's deliveries, which took their ids when the write recorded them
    events = await store.events("acme", 0, 100)
    assert [(e.type.name, e.index) for e in events] == (
        [("ACCEPTED", i) for i in range(10)] + [("DELIVERED", i) for i in range(5)]
    )
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)
    assert (await store.job("w")).status.counts.delivered == 5  # type: ignore[union-attr]


async def test_a_bounce_for_a_recipient_being_written_waits_for_the_write(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, n = await _batch_0_handed_out(database, "b", 5)
    (row,) = await store.intake("mail", "", ["bounces@example.com"], b"bounce", NOW)
    bounce = Feedback(
        Reported(n, "acme", 0, "user0@example.org"), EventType.BOUNCED, "hard_bounce",
        Reason.HARD_BOUNCE, 550, "5.1.1", "no such user",
    )  # fmt: skip
    applied, resume = _pause_after_applying(store, monkeypatch)
    # Given recipient 0's delivery applied, in a write not yet committed
    writing = asyncio.create_task(write(store, [delivered("b", 0)]))
    inbound: asyncio.Task[int] | None = None
    try:
        async with asyncio.timeout(60):
            await applied.wait()
        # When a bounce for recipient 0 comes in meanwhile
        inbound = asyncio.create_task(store.apply_inbound(row, "bounce", "", [bounce], NOW))

        async def inbound_waits() -> bool:
            async with database.pool.acquire() as conn:
                waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                return bool(await conn.fetchval(waiting))

        # Then it waits for the write
        await assert_eventually(inbound_waits, timeout_s=30, message="the bounce waiting")
    finally:
        resume.set()
    # And both finish, neither chosen as a deadlock's victim
    async with asyncio.timeout(60):
        await writing
        assert inbound is not None and await inbound == 1
    events = await store.events("acme", 0, 100)
    assert [(e.type.name, e.index) for e in events if e.index == 0] == [
        ("ACCEPTED", 0), ("DELIVERED", 0), ("BOUNCED", 0),
    ]  # fmt: skip
    listed = await store.suppressions("acme", "", 10)
    assert [s.email for s in listed] == ["user0@example.org"]


async def test_released_batches_settle_from_their_recipients(database: Database) -> None:
    store = await leader(database, 1)
    job = await store.submit(spec("s", "k", batch_size=5), chunks_of(15), QuotaRequest(), NOW)
    n = job.job_no
    await store.assign([(n, 0, "n1", 1), (n, 1, "n1", 1), (n, 2, "n2", 1)], [], {n: 3}, NOW)
    # Given batch 0 fully delivered, batch 1 with a deferral, batch 2 untouched
    outcomes = [delivered("s", i) for i in range(5)]
    outcomes.append(RecipientOutcome("s", 5, Result(Status.DEFERRED, 451, attempts=1)))
    outcomes += [delivered("s", i) for i in range(6, 10)]
    releases = [
        BatchRelease(n, 0, "n1", 1, 0, 5),
        BatchRelease(n, 1, "n1", 1, 5, 10),
        BatchRelease(n, 2, "n2", 1, 10, 15),
        BatchRelease(n, 2, "n9", 1, 10, 15),  # not the holder: ignored
    ]
    out = await store.write(outcomes, (), (), releases, lambda r, d: NOW + 42, NOW)
    settled = {s.seq: s for s in out.settled}
    # Then each settles by what its recipients say, once
    assert settled[0].done and settled[0].retry_at is None
    assert not settled[1].done and settled[1].retry_at == NOW + 42 and settled[1].deferred == 1
    assert not settled[2].done and settled[2].retry_at is None and settled[2].queued == 5
    assert len(out.settled) == 3
    opened = [b.seq async for b in store.open_batches(n)]
    assert opened == [1, 2]
    record = await store.job("s")
    assert record is not None and record.cursor == 3 and record.status.state is JobState.RUNNING


async def test_listings_page_by_keyset(database: Database) -> None:
    store = await leader(database, 1)
    for i in range(7):
        await store.submit(spec(f"job{i:02d}", f"k{i}"), chunks_of(3), QuotaRequest(), NOW)
    first = await store.list_jobs("acme", (), "", 3)
    second = await store.list_jobs("acme", (), first[-1].spec.job_id, 3)
    assert [j.spec.job_id for j in first + second] == [f"job{i:02d}" for i in range(6, 0, -1)]
    assert await store.list_jobs("nobody", (), "", 3) == []
    job = await store.job("job00")
    assert job is not None
    page = await store.results(job.job_no, 0, (), 2)
    assert [r.index for r in page] == [1, 2]


async def test_quotas_are_checked_in_the_submit_transaction(database: Database) -> None:
    store = await leader(database, 1)
    quota = QuotaRequest(messages_per_hour=100, max_active_jobs=2)
    await store.submit(spec("q1", "k1"), chunks_of(60), quota, NOW)
    # A job that would pass the hourly limit is refused, with when to try again
    with pytest.raises(QuotaRefused) as refused:
        await store.submit(spec("q2", "k2"), chunks_of(50), quota, NOW + 10)
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 3000
    assert not await store.job_exists("q2")
    await store.submit(spec("q3", "k3"), chunks_of(40), quota, NOW + 20)
    # A third unfinished job is refused
    with pytest.raises(QuotaRefused):
        await store.submit(spec("q4", "k4"), chunks_of(1), QuotaRequest(max_active_jobs=2), NOW)


async def test_retrying_failures_queues_them_again_with_fresh_attempts(
    database: Database,
) -> None:
    store = await leader(database, 1)
    job = await store.submit(spec("rf", "k", batch_size=5), chunks_of(10), QuotaRequest(), NOW)
    n = job.job_no
    await store.assign([(n, 0, "n1", 1), (n, 1, "n1", 1)], [], {n: 2}, NOW)
    # Given recipients that failed on a 4xx (out of attempts) and one refused with a 5xx
    gave_up = Result(Status.FAILED, 451, "4.3.0", "busy", attempts=3, reason="gave up")
    refused = Result(Status.FAILED, 550, "5.1.1", "no such user", attempts=1)
    outcomes = [RecipientOutcome("rf", i, gave_up) for i in (1, 7)]
    outcomes.append(RecipientOutcome("rf", 2, refused))
    outcomes += [delivered("rf", i) for i in range(10) if i not in (1, 2, 7)]
    releases = [BatchRelease(n, 0, "n1", 1, 0, 5), BatchRelease(n, 1, "n1", 1, 5, 10)]
    out = await store.write(outcomes, (), (), releases, lambda r, d: NOW, NOW)
    assert all(s.done for s in out.settled)
    # When the failures are retried
    change = StatusChange(n, 0, 10, (Status.FAILED,), Status.QUEUED, "", 5, skip_permanent=True)
    out = await store.write((), [change], (), (), lambda r, d: NOW, NOW)
    # Then only the 4xx failures are queued, with no attempts yet, their batches reopened
    assert out.changed == [2]
    assert sorted(out.reopened[n]) == [0, 1]
    assert out.jobs[n].failed == 1
    results = {r.index: r.result for r in await store.results(n, -1, (Status.QUEUED,), 10)}
    assert sorted(results) == [1, 7] and all(r.attempts == 0 for r in results.values())
    assert [b.seq async for b in store.open_batches(n)] == [0, 1]


def _rows_filtered_out(plan: dict[str, Any]) -> int:
    """Rows a plan node and its children read and then threw away."""
    own = int(plan.get("Rows Removed by Filter", 0)) + int(
        plan.get("Rows Removed by Join Filter", 0)
    )
    return own + sum(_rows_filtered_out(child) for child in plan.get("Plans", []))


async def _job_after_stale_statistics(database: Database) -> tuple[Store, int]:
    """A leader's store and a 20,000-recipient job uploaded after statistics were taken
    of a nearly empty recipients table (as after a first large upload, before autovacuum
    runs); returns the job's number."""
    store = await leader(database, 1)
    await store.submit(spec("tiny", "k1", batch_size=100), chunks_of(10), QuotaRequest(), NOW)
    async with database.pool.acquire() as conn:
        await conn.execute("ANALYZE recipients")
    job = await store.submit(
        spec("big", "k2", batch_size=100), chunks_of(20_000), QuotaRequest(), NOW
    )
    return store, job.job_no


async def _plan(database: Database, query: str, *args: object) -> dict[str, Any]:
    """The executed plan of a dispatch or writer query, under index_ranges_only as the
    store runs it (the statement's effects are committed)."""
    queries = store_module.load_queries()
    async with database.pool.acquire() as conn, conn.transaction():
        await conn.execute(queries["index_ranges_only"])
        await conn.execute(queries["stage_events"])  # where apply_results puts its events
        explained = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + queries[query], *args)
    plan: dict[str, Any] = json.loads(explained)[0]["Plan"]
    return plan


async def test_dispatching_a_batch_reads_its_recipients_not_the_whole_job(
    database: Database,
) -> None:
    # Given a job uploaded after the statistics were taken
    _, job_no = await _job_after_stale_statistics(database)
    # When ten batches near its end are handed out for the first time
    plan = await _plan(
        database, "assign_batches",
        [job_no] * 10, list(range(150, 160)), ["n1"] * 10, [1] * 10,
        datetime.fromtimestamp(NOW, UTC),
    )  # fmt: skip
    # Then each batch's accepted events are written from its own range of recipients:
    # without the settings the planner read the whole job per batch (199,000 rows thrown
    # away here, and it grows with the job)
    async with database.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM events WHERE type = 1") == 1000
    assert _rows_filtered_out(plan) < 1000


def _rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows a plan read from ``relation``, kept or thrown away."""
    own = 0
    if plan.get("Relation Name") == relation:
        kept = int(plan.get("Actual Rows", 0)) * int(plan.get("Actual Loops", 1))
        own = kept + int(plan.get("Rows Removed by Filter", 0))
    return own + sum(_rows_read(child, relation) for child in plan.get("Plans", []))


async def test_applying_results_finds_their_recipients_by_key_not_the_whole_job(
    database: Database,
) -> None:
    # Given a job uploaded after the statistics were taken
    _, job_no = await _job_after_stale_statistics(database)
    # When the results of 500 of its recipients are applied
    outcomes = [delivered("big", i) for i in range(15_000, 15_500)]
    plan = await _plan(database, "apply_results", *store_module.outcome_arguments(outcomes, NOW))
    # Then each recipient is found by its key: without the settings the planner read
    # and hashed all 20,000 of the job's recipients (and it grows with the job)
    async with database.pool.acquire() as conn:
        count = "SELECT count(*) FROM recipients WHERE job_no = $1 AND status = 1"
        assert await conn.fetchval(count, job_no) == 500
    assert _rows_read(plan, "recipients") < 2000


async def test_reading_a_batch_to_send_reads_its_range_not_the_whole_job(
    database: Database,
) -> None:
    # Given a job uploaded after the statistics were taken
    store, job_no = await _job_after_stale_statistics(database)
    # When ten of its batches are read for sending
    lows = [seq * 100 for seq in range(150, 160)]
    plan = await _plan(
        database, "pending_recipients",
        [job_no] * 10, lows, [lo + 100 for lo in lows], ["acme"] * 10,
    )  # fmt: skip
    pending = await store.pending([(job_no, lo, lo + 100, "acme") for lo in lows])
    # Then only those ranges are read (without the settings: 199,000 rows thrown away)
    assert [p.index for p in pending[job_no]] == list(range(15_000, 16_000))
    assert _rows_filtered_out(plan) < 1000
