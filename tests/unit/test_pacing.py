"""DomainPacer on a fake clock: who waits, for what, how long, and in which order.

Time is a :class:`FakeTime`: the pacer's clock reads it and its sleeps wake only when
the test advances it, so every wait below is exact and nothing depends on how fast the
machine is. The same pacer on the real loop and clock is in
``tests/component/test_pacing_async.py``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest

from sender_node.pacing import DomainPacer, DomainStatus, PacingTimeout
from sender_node.throttle import Limits

START_S = 1000.0


class FakeTime:
    """A clock and a sleep that only move when the test calls :meth:`advance`."""

    def __init__(self) -> None:
        self.now = START_S
        self.sleeps: list[float] = []
        """Every sleep asked for, in order."""
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + delay_s, next(self._order), wake))
        await wake

    async def advance(self, delay_s: float) -> None:
        """Move the clock on by ``delay_s``, waking sleepers in time order and letting
        each run before the next is due."""
        target = self.now + delay_s
        while self._timers and self._timers[0][0] <= target:
            when, _, wake = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not wake.done():  # a cancelled sleeper
                wake.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle() -> None:
    """Let every task that can run, run. The loop runs ready tasks in a fixed order, so
    this is deterministic: no timing is involved, only enough turns of the loop for the
    longest hand-over chain in these tests."""
    for _ in range(200):
        await asyncio.sleep(0)


class Held:
    """Tasks that each take a slot of ``domain`` and hold it until released."""

    def __init__(self, pacer: DomainPacer, domain: str) -> None:
        self.pacer = pacer
        self.domain = domain
        self.entered: list[int] = []
        self._gates: dict[int, asyncio.Event] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, *names: int, deadline_s: float | None = None) -> None:
        for name in names:
            self._gates[name] = asyncio.Event()
            self.tasks[name] = asyncio.create_task(self._hold(name, deadline_s))

    async def _hold(self, name: int, deadline_s: float | None) -> None:
        async with self.pacer.slot(self.domain, deadline_s=deadline_s):
            self.entered.append(name)
            await self._gates[name].wait()

    def release(self, *names: int) -> None:
        for name in names:
            self._gates[name].set()

    async def finish(self) -> None:
        self.release(*self._gates)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def _status(pacer: DomainPacer, domain: str) -> DomainStatus:
    return pacer.snapshot()[domain]


async def test_default_pacer_admits_20_at_once_and_queues_the_rest_in_order() -> None:
    # Given the default limits (20 at once, no rate)
    time = FakeTime()
    pacer = DomainPacer(clock=time.clock, sleep=time.sleep)
    held = Held(pacer, "GMail.com")
    # When 25 transactions to one domain start at one instant
    held.start(*range(25))
    await settle()
    # Then 20 run and 5 wait, without any sleep
    assert held.entered == list(range(20))
    status = _status(pacer, "gmail.com")
    assert (status.in_flight, status.waiting, status.rate_per_s) == (20, 5, None)
    # When two finish, the next two in arrival order go
    held.release(3, 0)
    await settle()
    assert held.entered == list(range(22))
    # And when all finish, nothing is left held or waiting
    await held.finish()
    assert held.entered == list(range(25))
    assert time.sleeps == []
    assert _status(pacer, "gmail.com").in_flight == 0
    assert _status(pacer, "gmail.com").waiting == 0


async def test_waiting_for_a_token_sleeps_exactly_until_it_is_due() -> None:
    # Given a domain allowed 10/s with a burst of 1
    time = FakeTime()
    pacer = DomainPacer(
        overrides={"slow.example": Limits(rate_per_s=10, burst=1)},
        clock=time.clock,
        sleep=time.sleep,
    )
    starts: list[float] = []
    waits: list[float] = []

    async def send() -> None:
        async with pacer.slot("slow.example") as slot:
            starts.append(time.now)
            waits.append(slot.waited_s)

    # When three transactions start at once
    tasks = [asyncio.create_task(send()) for _ in range(3)]
    await settle()
    # Then the first goes, and the next sleeps once, exactly until its token is due
    assert starts == [START_S]
    assert time.sleeps == [pytest.approx(0.1)]
    assert _status(pacer, "slow.example").waiting == 2
    await time.advance(0.1)
    assert starts == pytest.approx([START_S, START_S + 0.1])
    await time.advance(0.1)
    await asyncio.gather(*tasks)
    assert starts == pytest.approx([START_S, START_S + 0.1, START_S + 0.2])
    assert waits == pytest.approx([0.0, 0.1, 0.2])
    assert time.sleeps == pytest.approx([0.1, 0.1])


async def test_other_domains_do_not_wait_behind_a_busy_or_slow_one() -> None:
    # Given one domain at its concurrency limit with a waiter, and one waiting for tokens
    time = FakeTime()
    pacer = DomainPacer(
        overrides={
            "busy.example": Limits(max_concurrency=1),
            "slow.example": Limits(rate_per_s=0.01, burst=1),
        },
        clock=time.clock,
        sleep=time.sleep,
    )
    busy = Held(pacer, "busy.example")
    busy.start(1, 2)
    slow = Held(pacer, "slow.example")
    slow.start(1, 2)
    await settle()
    assert (busy.entered, slow.entered) == ([1], [1])
    # When a third domain asks for a slot, it gets one at once
    async with pacer.slot("free.example") as slot:
        assert slot.waited_s == 0
        assert _status(pacer, "free.example").in_flight == 1
    # Then the others are still as they were
    assert _status(pacer, "busy.example").waiting == 1
    assert _status(pacer, "slow.example").waiting == 1
    await busy.finish()
    slow.tasks[2].cancel()
    await slow.finish()


async def test_a_slow_down_reply_paces_an_unlimited_domain_until_it_recovers() -> None:
    # Given an unlimited domain sent at 100/s for 5 s
    time = FakeTime()
    pacer = DomainPacer(clock=time.clock, sleep=time.sleep)
    for _ in range(500):
        async with pacer.slot("big.example"):
            pass
        await time.advance(0.01)
    measured = _status(pacer, "big.example").measured_rate_per_s
    assert measured == pytest.approx(100, rel=0.05)
    # When a transaction is answered 421
    async with pacer.slot("big.example") as slot:
        assert slot.reply(421)
    # Then the domain is paced at half the measured rate
    status = _status(pacer, "big.example")
    assert status.slowed_down
    assert status.rate_per_s == pytest.approx(measured / 2, rel=0.05)

    async def send(count: int) -> None:
        for _ in range(count):
            async with pacer.slot("big.example"):
                pass

    # And transactions one after another each sleep about 1 / rate (the cut drained
    # the burst down to one token)
    sender = asyncio.create_task(send(6))
    await settle()
    await time.advance(0.2)
    await sender
    assert len(time.sleeps) == 5
    assert time.sleeps == pytest.approx([2 / measured] * 5, rel=0.05)
    # When 30 s pass, the rate is back at the measured one and lifted
    await time.advance(30.0)
    status = _status(pacer, "big.example")
    assert status.rate_per_s is None and not status.slowed_down
    # And a 250 reply never slows anything down
    async with pacer.slot("big.example") as slot:
        assert not slot.reply(250)


async def test_a_deadline_at_the_concurrency_limit_gives_up_and_takes_nothing() -> None:
    # Given a domain allowing one at a time, held
    time = FakeTime()
    pacer = DomainPacer(
        overrides={"one.example": Limits(max_concurrency=1)}, clock=time.clock, sleep=time.sleep
    )
    held = Held(pacer, "one.example")
    held.start(1)
    await settle()
    # When another waits with a deadline 5 s ahead, and a third without one
    held.start(2, deadline_s=START_S + 5)
    held.start(3)
    await settle()
    await time.advance(4.9)
    assert not held.tasks[2].done()
    # Then at the deadline it gives up, saying nothing about when to retry
    await time.advance(0.1)
    with pytest.raises(PacingTimeout) as raised:
        await held.tasks[2]
    assert raised.value.retry_after is None
    assert "one.example" in str(raised.value)
    # And the waiter behind it gets the slot when it is released
    assert _status(pacer, "one.example").waiting == 1
    held.release(1)
    await settle()
    assert held.entered == [1, 3]
    await held.finish()
    assert _status(pacer, "one.example").in_flight == 0


async def test_a_token_due_after_the_deadline_gives_up_at_once() -> None:
    # Given a domain allowed 1/s whose token was just taken
    time = FakeTime()
    pacer = DomainPacer(
        overrides={"slow.example": Limits(rate_per_s=1, burst=1)},
        clock=time.clock,
        sleep=time.sleep,
    )
    async with pacer.slot("slow.example"):
        pass
    # When a transaction must start within 0.5 s
    with pytest.raises(PacingTimeout) as raised:
        async with pacer.slot("slow.example", deadline_s=START_S + 0.5):
            pytest.fail("admitted without a token")
    # Then it gives up without sleeping, saying when the token is due
    assert time.sleeps == []
    assert raised.value.retry_after is not None
    assert raised.value.retry_after.total_seconds() == pytest.approx(1.0)
    # And a slot free at once is taken even past the deadline
    await time.advance(1.0)
    async with pacer.slot("slow.example", deadline_s=START_S - 1):
        pass


async def test_cancelled_waiters_and_holders_leak_nothing_and_keep_the_order() -> None:
    # Given a domain allowing one at a time: 1 holds it, 2, 3 and 4 wait in that order
    time = FakeTime()
    pacer = DomainPacer(
        overrides={"one.example": Limits(max_concurrency=1)}, clock=time.clock, sleep=time.sleep
    )
    held = Held(pacer, "one.example")
    held.start(1, 2, 3, 4)
    await settle()
    # When the first waiter (the head) is cancelled, and then the holder
    held.tasks[2].cancel()
    await settle()
    assert _status(pacer, "one.example").waiting == 2
    held.tasks[1].cancel()
    await settle()
    # Then the slot goes to the next waiter in order
    assert held.entered == [1, 3]
    status = _status(pacer, "one.example")
    assert (status.in_flight, status.waiting) == (1, 1)
    # When a waiter behind the head is cancelled, the order is kept too
    held.start(5)
    await settle()
    held.tasks[4].cancel()
    held.release(3)
    await settle()
    assert held.entered == [1, 3, 5]
    await held.finish()
    status = _status(pacer, "one.example")
    assert (status.in_flight, status.waiting) == (0, 0)


async def test_an_error_in_the_block_releases_the_slot() -> None:
    time = FakeTime()
    pacer = DomainPacer(
        overrides={"one.example": Limits(max_concurrency=1)}, clock=time.clock, sleep=time.sleep
    )
    with pytest.raises(RuntimeError):
        async with pacer.slot("one.example"):
            raise RuntimeError("relay exploded")
    async with pacer.slot("one.example", deadline_s=START_S):
        pass


async def test_idle_domains_are_forgotten() -> None:
    # Given a pacer forgetting domains idle for 30 s, used for 1,000 domains
    time = FakeTime()
    pacer = DomainPacer(clock=time.clock, sleep=time.sleep, idle_s=30)
    for i in range(1000):
        async with pacer.slot(f"d{i}.example"):
            pass
    assert len(pacer) == 1000
    # When 30 s pass, an explicit prune forgets them
    await time.advance(30)
    assert pacer.prune() == 1000 and len(pacer) == 0
    # And use forgets them too, once per idle_s
    for i in range(1000):
        async with pacer.slot(f"e{i}.example"):
            pass
    await time.advance(30)
    async with pacer.slot("x.example"):
        pass
    assert len(pacer) == 1
    assert pacer.limits("GMAIL.com") == Limits()


async def test_try_take_is_the_no_wait_path_and_yields_to_waiters() -> None:
    # Given a domain allowed two at once
    time = FakeTime()
    pacer = DomainPacer(
        overrides={"two.example": Limits(max_concurrency=2)}, clock=time.clock, sleep=time.sleep
    )
    # When two slots are taken without waiting
    first, second = pacer.try_take("Two.Example"), pacer.try_take("two.example")
    assert first is not None and second is not None
    # Then a third is refused at once, and a waiter queues
    assert pacer.try_take("two.example") is None
    held = pacer.slot("two.example")  # kept: dropping it would run its release
    waiter = asyncio.ensure_future(held.__aenter__())
    await settle()
    assert not waiter.done() and _status(pacer, "two.example").waiting == 1
    # And a slot given back goes to the waiter, not to a later try_take
    pacer.give_back(first)
    assert pacer.try_take("two.example") is None
    await settle()
    assert waiter.done() and _status(pacer, "two.example").in_flight == 2
    await held.__aexit__(None, None, None)
    pacer.give_back(second)
    assert _status(pacer, "two.example").in_flight == 0
