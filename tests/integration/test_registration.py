"""The sender's registration against a real etcd (the session's single member).

Each test uses its own key prefix. TTLs are the smallest etcd accepts with the test
cluster's election timeout (2 s), so lease loss is seen within a couple of seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aetcd
import pytest

from mailers_runtime.etcd import Keys
from sender_node.registration import Registration
from tests.helpers import assert_eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def registration(etcd: aetcd.Client, etcd_prefix: str) -> AsyncIterator[Registration]:
    reg = Registration(
        etcd, Keys(etcd_prefix), "node-a", capacity=40, ttl_s=2, margin_s=0.5, retry_delay_s=0.1
    )
    yield reg
    await reg.stop()


async def record_of(etcd: aetcd.Client, key: bytes) -> tuple[dict[str, object], int] | None:
    got = await etcd.get(key)
    if got is None:
        return None
    return json.loads(got.value), int(got.lease)


async def test_registration_puts_leased_key(etcd: aetcd.Client, registration: Registration) -> None:
    # Given a node that is not registered
    assert not registration.healthy()
    assert registration.lease_id == 0
    assert registration.done.is_set()

    # When it registers
    registration.start("127.0.0.1:7001")
    await registration.wait_registered(10)

    # Then its key holds its record, bound to its lease, and it is healthy
    assert registration.healthy()
    assert not registration.done.is_set()
    got = await record_of(etcd, registration.key)
    assert got is not None
    record, lease = got
    assert lease == registration.lease_id != 0
    assert record["node_id"] == "node-a"
    assert record["address"] == "127.0.0.1:7001"
    assert record["lease_id"] == registration.lease_id
    assert record["capacity"] == 40
    assert isinstance(record["started_at"], float)


async def test_keepalive_outlives_the_ttl(etcd: aetcd.Client, registration: Registration) -> None:
    # Given a registered node
    registration.start("127.0.0.1:7001")
    await registration.wait_registered(10)
    lease_id = registration.lease_id

    # When more than the TTL passes (2 s), the lease must have been refreshed to exist
    granted_at = time.monotonic()

    async def outlived_ttl() -> bool:
        info = await etcd.get_lease_info(lease_id, keys=False)
        assert info.TTL > 0, "lease expired"
        return time.monotonic() - granted_at > 3.0

    await assert_eventually(outlived_ttl, timeout_s=10, interval_s=0.2, message="3 s elapsed")

    # Then the same lease still holds the key and the node stayed healthy
    assert registration.lease_id == lease_id
    assert registration.healthy()
    assert not registration.done.is_set()


async def test_lost_lease_fires_done_and_reregisters_under_a_new_lease(
    etcd: aetcd.Client, registration: Registration
) -> None:
    # Given a registered node
    registration.start("127.0.0.1:7001")
    await registration.wait_registered(10)
    first_lease = registration.lease_id
    first_done = registration.done

    # When its lease is revoked behind its back (as if it had expired)
    await etcd.revoke_lease(first_lease)

    # Then done fires at its next refresh
    await asyncio.wait_for(first_done.wait(), 5)

    # And the node registers again under a new lease, with a fresh done event
    await assert_eventually(
        lambda: registration.healthy() and registration.lease_id not in (0, first_lease),
        timeout_s=10,
        message="re-registration",
    )
    assert registration.done is not first_done
    assert not registration.done.is_set()
    got = await record_of(etcd, registration.key)
    assert got is not None
    assert got[1] == registration.lease_id
    assert got[0]["lease_id"] == registration.lease_id


async def test_stop_revokes_the_lease(etcd: aetcd.Client, registration: Registration) -> None:
    registration.start("127.0.0.1:7001")
    await registration.wait_registered(10)
    done = registration.done

    await registration.stop()

    assert await etcd.get(registration.key) is None
    assert done.is_set()
    assert not registration.healthy()


async def test_a_key_held_by_another_process_is_not_taken(
    etcd: aetcd.Client, registration: Registration
) -> None:
    # Given another process holding this node id's key
    await etcd.put(registration.key, b'{"node_id": "node-a", "address": "elsewhere"}')

    # When the node starts, it does not overwrite the key
    registration.start("127.0.0.1:7001")
    with pytest.raises(TimeoutError):
        await registration.wait_registered(0.5)
    got = await etcd.get(registration.key)
    assert got is not None and b"elsewhere" in got.value

    # Then once the other registration goes away, the node takes the key
    await etcd.delete(registration.key)
    await registration.wait_registered(10)
    assert registration.healthy()
