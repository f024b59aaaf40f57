"""Election and fencing against a real etcd: one leader, and a deposed one cannot write."""

from __future__ import annotations

import asyncio

import aetcd
import pytest

from coordinator.election import Election, LeadershipUnavailable
from coordinator.model import BatchState, Counts, JobState, JobStatus, Recipient, Result, Status
from coordinator.store import JobStore, LostLeadership
from mailers.etcd import Keys, Session


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


async def test_deposed_leader_cannot_write_and_steps_down(
    etcd: aetcd.Client, etcd_prefix: str
) -> None:
    keys = Keys(etcd_prefix)
    session_a, a = await _candidate(etcd, keys, "a")
    fence_a = await a.campaign()
    store_a = JobStore(etcd, keys, fence_a)
    status = JobStatus(JobState.RUNNING, Counts(total=1), updated_at=1.0)
    # While a leads, its fenced writes land
    await store_a.write_batches("j1", [(0, 0, [Recipient("x@example.com")])])
    await store_a.save(
        {("j1", 0): BatchState(1, {0: Result(Status.DELIVERED, 250)})}, {"j1": status}
    )
    assert await store_a.load_state("j1", 0) is not None
    # When a loses its lease and b wins
    await session_a.close(revoke=True)
    session_b, b = await _candidate(etcd, keys, "b")
    fence_b = await b.campaign()
    try:
        # Then every write a attempts is refused, and nothing of it lands
        stale = {("j1", 0): BatchState(2, {0: Result(Status.FAILED, 550)})}
        with pytest.raises(LostLeadership):
            await store_a.save(stale, {"j1": status})
        with pytest.raises(LostLeadership):
            await store_a.write_batches("j2", [(0, 0, [Recipient("y@example.com")])])
        kept = await store_a.load_state("j1", 0)
        assert kept is not None and kept.results[0].status is Status.DELIVERED
        assert await etcd.get(keys.batch("j2", 0)) is None
        # And b's writes land
        await JobStore(etcd, keys, fence_b).save(stale, {"j1": status})
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
