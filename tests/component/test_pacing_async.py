"""DomainPacer on the real event loop and clock: the concurrency limit holds across many
tasks, and cancellation never leaks a slot.

Nothing here depends on timing: tasks hold their slots until an event is set, and the
only waits are for conditions (``assert_eventually``) or for the tasks themselves,
under generous timeouts. The exact waits are checked on a fake clock in
``tests/unit/test_pacing.py``.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from sender_node.pacing import DomainPacer, PacingTimeout
from sender_node.throttle import Limits
from tests.helpers import assert_eventually

DOMAIN = "two.example"


def _pacer() -> DomainPacer:
    return DomainPacer(overrides={DOMAIN: Limits(max_concurrency=2)})


async def test_never_more_than_two_in_flight_across_20_tasks() -> None:
    # Given a domain allowing 2 at once, and 20 tasks sending to it
    pacer = _pacer()
    inside = 0
    most = 0
    finished = 0

    async def send() -> None:
        nonlocal inside, most, finished
        async with pacer.slot(DOMAIN, deadline_s=time.monotonic() + 60):
            inside += 1
            most = max(most, inside)
            for _ in range(5):  # let the other tasks run while this one holds its slot
                await asyncio.sleep(0)
            inside -= 1
        finished += 1

    # When they all run
    async with asyncio.timeout(60):
        await asyncio.gather(*(send() for _ in range(20)))
    # Then all finished, never more than 2 at once, and nothing is left held
    assert finished == 20
    assert most == 2
    status = pacer.snapshot()[DOMAIN]
    assert (status.in_flight, status.waiting) == (0, 0)


async def test_cancelling_waiters_and_holders_leaks_no_slot() -> None:
    # Given 20 tasks to a domain allowing 2 at once: 2 hold a slot, 18 wait
    pacer = _pacer()
    gate = asyncio.Event()
    completed: list[int] = []

    async def send(name: int) -> None:
        async with pacer.slot(DOMAIN):
            await gate.wait()
        completed.append(name)

    tasks = [asyncio.create_task(send(i)) for i in range(20)]

    def queued() -> bool:
        status = pacer.snapshot().get(DOMAIN)
        return status is not None and (status.in_flight, status.waiting) == (2, 18)

    await assert_eventually(queued, timeout_s=60, message="2 holding, 18 waiting")
    # When one holder and every other waiter are cancelled, then the rest let go
    tasks[0].cancel()
    for task in tasks[2::2]:
        task.cancel()
    gate.set()
    async with asyncio.timeout(60):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    # Then the ones not cancelled all completed
    cancelled = [i for i, r in enumerate(results) if isinstance(r, asyncio.CancelledError)]
    assert cancelled == [0, *range(2, 20, 2)]
    assert sorted(completed) == [1, *range(3, 20, 2)]
    # And both slots are free: two can be taken at once, with a deadline already past
    status = pacer.snapshot()[DOMAIN]
    assert (status.in_flight, status.waiting) == (0, 0)
    now = time.monotonic()
    async with pacer.slot(DOMAIN, deadline_s=now), pacer.slot(DOMAIN, deadline_s=now):
        # And a third gives up at once rather than waiting
        with pytest.raises(PacingTimeout):
            async with pacer.slot(DOMAIN, deadline_s=now):
                pytest.fail("a third slot")
