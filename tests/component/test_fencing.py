"""Election against a real etcd and fencing in a real PostgreSQL: one leader, and a
deposed one cannot write."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aetcd
import pytest

from coordinator.db.store import Database, LostLeadership, QuotaRequest, Store
from coordinator.election import Election, LeadershipUnavailable
from coordinator.model import (
    Address,
    Content,
    JobOptions,
    JobSpec,
    Recipient,
    RecipientOutcome,
    Result,
    Status,
)
from mailers_runtime.etcd import Keys, Session

SPEC = JobSpec(
    job_id="j1",
    idempotency_key="k1",
    content=Content(Address("a@example.com"), subject="s", text_body="t"),
    options=JobOptions(),
    total=0,
    batch_size=10,
    created_at=1.0,
)


async def _one(n: int) -> AsyncIterator[list[Recipient]]:
    yield [Recipient(f"r{i}@example.com") for i in range(n)]


async def _deliver(store: Store, job_id: str, index: int) -> None:
    outcome = RecipientOutcome(job_id, index, Result(Status.DELIVERED, 250, attempts=1))
    await store.write([outcome], (), (), (), lambda r, d: 0.0, 1.0)


async def _candidate(client: aetcd.Client, keys: Keys, name: str) -> tuple[Session, Election]:
    session = Session(client, ttl_s=3)
    await session.open()
    election = Election(client, keys, session, name, f"{name}:7701", poll_s=0.2)
    await election.enter()
    return session, election


async def test_lowest_create_revision_leads_and_successor_takes_over(
    etcd: aetcd.Client, etcd_prefix: str
) -> None:
    keys = Keys(etcd_prefix)
    # Given two candidates, a entering first
    session_a, a = await _candidate(etcd, keys, "a")
    session_b, b = await _candidate(etcd, keys, "b")
    try:
        fence_a = await asyncio.wait_for(a.campaign(), 5)
        assert fence_a.revision == a.revision
        waiting = asyncio.ensure_future(b.campaign())
        await asyncio.sleep(0.3)
        assert not waiting.done(), "b must not lead while a does"
        assert [c.coordinator_id for c in await b.candidates()] == ["a", "b"]
        # When a's session ends (its lease is revoked, as after a crash and TTL expiry)
        await session_a.close(revoke=True)
        # Then b leads, with a higher epoch
        fence_b = await asyncio.wait_for(waiting, 10)
        assert fence_b.revision > fence_a.revision
    finally:
        await session_a.close()
        await session_b.close()


async def test_deposed_leader_cannot_write(
    etcd: aetcd.Client, etcd_prefix: str, database: Database
) -> None:
    keys = Keys(etcd_prefix)
    session_a, a = await _candidate(etcd, keys, "a")
    fence_a = await a.campaign()
    store_a = Store(database, fence_a.revision)
    await store_a.raise_fence("a")
    # While a leads, its fenced writes land
    await store_a.submit(SPEC, _one(2), QuotaRequest(), 1.0)
    await _deliver(store_a, "j1", 0)
    # When a loses its lease and b wins (and takes the fence)
    await session_a.close(revoke=True)
    session_b, b = await _candidate(etcd, keys, "b")
    fence_b = await b.campaign()
    store_b = Store(database, fence_b.revision)
    await store_b.raise_fence("b")
    try:
        # Then every write a attempts is refused, and nothing of it lands
        with pytest.raises(LostLeadership):
            await _deliver(store_a, "j1", 1)
        second = dataclasses.replace(SPEC, job_id="j2", idempotency_key="k2")
        with pytest.raises(LostLeadership):
            await store_a.submit(second, _one(1), QuotaRequest(), 1.0)
        job = await store_b.job("j1")
        assert job is not None and job.status.counts.delivered == 1
        assert await store_b.job("j2") is None
        # And b's writes land
        await _deliver(store_b, "j1", 1)
        job = await store_b.job("j1")
        assert job is not None and job.status.counts.delivered == 2
    finally:
        await session_b.close()


async def test_campaign_ends_when_the_session_does(etcd: aetcd.Client, etcd_prefix: str) -> None:
    keys = Keys(etcd_prefix)
    session_a, a = await _candidate(etcd, keys, "a")
    session_b, b = await _candidate(etcd, keys, "b")
    try:
        await a.campaign()
        waiting = asyncio.ensure_future(b.campaign())
        await session_b.close(revoke=True)
        with pytest.raises(LeadershipUnavailable):
            await asyncio.wait_for(waiting, 10)
    finally:
        await session_a.close()
