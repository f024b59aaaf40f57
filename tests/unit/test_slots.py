"""Transaction slots go to the highest priority waiting, then the earliest batch, then
first come."""

from __future__ import annotations

import asyncio

import pytest

from sender_node.slots import PrioritySlots


async def order_of_grants(waiting: list[tuple[str, int, int]]) -> list[str]:
    """Names of the waiters (name, priority, order), in the order a slot of one, held
    while they all queue, reached them."""
    slots = PrioritySlots(1)
    granted: list[str] = []
    gate = asyncio.Event()

    async def hold() -> None:
        async with slots.slot(0):
            await gate.wait()

    async def take(name: str, priority: int, order: int) -> None:
        async with slots.slot(priority, order):
            granted.append(name)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(take(*w)) for w in waiting]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(holder, *waiters)
    return granted


async def test_freed_slot_goes_to_the_highest_priority_waiter() -> None:
    granted = await order_of_grants([("campaign-1", 0, 0), ("campaign-2", 0, 0), ("urgent", 10, 0)])
    assert granted == ["urgent", "campaign-1", "campaign-2"]


async def test_among_equal_priorities_the_earlier_batch_goes_first() -> None:
    granted = await order_of_grants(
        [
            ("second batch", 0, 2),
            ("first batch", 0, 1),
            ("urgent, later batch", 10, 3),
            ("first batch again", 0, 1),
        ]
    )
    assert granted == ["urgent, later batch", "first batch", "first batch again", "second batch"]


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    slots = PrioritySlots(1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with slots.slot(0):
            await gate.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)

    async def wait_for_slot() -> None:
        async with slots.slot(5):
            pass

    waiter = asyncio.create_task(wait_for_slot())
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # The one slot is free again: two sequential users both get it at once.
    for _ in range(2):
        async with asyncio.timeout(1):
            async with slots.slot(0):
                pass


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrioritySlots(0)
