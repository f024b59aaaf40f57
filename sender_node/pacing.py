"""Per-destination-domain pacing of SMTP transactions: the asyncio shell of
:class:`~sender_node.throttle.Throttles`.

A sender node groups its transactions by recipient domain. :meth:`DomainPacer.slot`
waits until the domain has a free concurrency slot and a token, holds the slot for the
block, and lets the block feed the SMTP reply back, so that a 421/451 slows the domain
down (see :mod:`sender_node.throttle` for the policy and its defaults: 20 at once per
domain and no rate limit until a slow-down reply).

Waiting never polls. Waiters of one domain queue in arrival order and only the first
(the head) asks the throttles: at the concurrency limit it waits for a release, which
wakes it; when a token is due in t seconds it sleeps t. Once admitted it hands the head
position on at once, so a release or a bucket refilled during a sleep admits the next
waiters in order. Waiters of different domains never wait for each other.

Single event loop, no threads: every decision is taken between two awaits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta

from sender_node.errors import TransientError
from sender_node.throttle import Limits, Throttles


class PacingTimeout(TransientError, TimeoutError):
    """No slot for the domain before the deadline; nothing was taken.

    ``retry_after`` is when a token is due, if that was what was missing; None when
    the domain was at its concurrency limit (or other waiters were ahead).
    """


@dataclasses.dataclass(frozen=True)
class DomainStatus:
    """One domain in :meth:`DomainPacer.snapshot`."""

    in_flight: int
    """Slots held."""
    waiting: int
    """Callers waiting for a slot."""
    max_concurrency: int
    """The domain's concurrency limit."""
    rate_per_s: float | None
    """The rate allowed now; None: not rate-limited."""
    measured_rate_per_s: float
    """Transactions per second started lately."""
    slowed_down: bool
    """A slow-down reply holds the domain's rate down."""


class Slot:
    """A held slot of one domain (see :meth:`DomainPacer.slot`)."""

    def __init__(self, pacer: DomainPacer, domain: str, waited_s: float) -> None:
        self._pacer = pacer
        self.domain = domain
        """The domain, lower-cased."""
        self.waited_s = waited_s
        """How long the slot took to get (pacer clock)."""

    def reply(self, code: int) -> bool:
        """Feed the SMTP reply code of the transaction: 421/451 slow the domain down;
        other codes change nothing. May also be called after the block.

        Returns:
            Whether the domain's rate was cut.
        """
        return self._pacer.on_reply(self.domain, code)


@dataclasses.dataclass(eq=False)
class _Waiter:
    wake: asyncio.Future[None]
    """Set when this waiter becomes the head, and when it is the head and a slot is
    released; replaced with a new future before each wait."""


class DomainPacer:
    """Concurrency and rate per recipient domain, with waiting.

    Args:
        default: Limits of domains without an override (default :class:`Limits`:
            20 at once, no rate).
        overrides: Limits by domain (lower-cased here), e.g. from
            :func:`~sender_node.throttle.parse_domain_limits`.
        clock: Monotonic seconds; the same clock as deadlines passed to :meth:`slot`.
        sleep: Sleeps that many seconds of ``clock`` (injected with ``clock`` in tests).
        idle_s: See :class:`~sender_node.throttle.Throttles`: idle domains are
            forgotten after this long, automatically.
        min_sleep_s: The shortest wait for a token; keeps a rounding error from
            turning into a zero-length sleep loop (asyncio's timers are about this
            coarse anyway).
    """

    def __init__(
        self,
        default: Limits | None = None,
        overrides: Mapping[str, Limits] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        idle_s: float = 30.0,
        min_sleep_s: float = 0.001,
    ) -> None:
        lowered = {domain.lower(): limits for domain, limits in (overrides or {}).items()}
        self._throttles = Throttles(default, lowered, idle_s=idle_s)
        self._clock = clock
        self._sleep = sleep
        self._min_sleep_s = min_sleep_s
        self._queues: dict[str, collections.deque[_Waiter]] = {}

    def limits(self, domain: str) -> Limits:
        """The limits of ``domain``."""
        return self._throttles.limits(domain.lower())

    @contextlib.asynccontextmanager
    async def slot(self, domain: str, *, deadline_s: float | None = None) -> AsyncIterator[Slot]:
        """Hold one transaction slot of ``domain`` for the block.

        Args:
            domain: The recipient domain (any case).
            deadline_s: Give up waiting at this time of the pacer's clock; None waits
                as long as it takes (until cancelled). A slot free at once is taken
                even past the deadline. When the next token is due only after the
                deadline, this gives up at once instead of sleeping first.

        Raises:
            PacingTimeout: no slot by the deadline. Nothing is held.

        Cancellation while waiting gives up the place in the queue and takes nothing;
        cancellation (or any exception) inside the block releases the slot.
        """
        key = domain.lower()
        waited_s = await self._acquire(key, deadline_s)
        try:
            yield Slot(self, key, waited_s)
        finally:
            self._release(key)

    def try_take(self, domain: str) -> Slot | None:
        """Take a slot of ``domain`` now if one is free and nobody waits for it; None
        otherwise. No await: the hot path of an unthrottled domain. The caller must
        :meth:`give_back` the slot it got, exactly once.
        """
        key = domain.lower()
        return Slot(self, key, 0.0) if self._take_now(key, self._clock()) else None

    def give_back(self, slot: Slot) -> None:
        """Release a slot :meth:`try_take` returned."""
        self._release(slot.domain)

    def on_reply(self, domain: str, code: int) -> bool:
        """Feed an SMTP reply of a transaction to ``domain`` (see :meth:`Slot.reply`)."""
        return self._throttles.on_reply(domain.lower(), code, self._clock())

    def snapshot(self) -> dict[str, DomainStatus]:
        """Every domain tracked (used lately, in flight, waited for, or slowed down)."""
        now = self._clock()
        statuses = self._throttles.snapshot(now)
        for key in self._queues:
            if key not in statuses:
                statuses[key] = self._throttles.status(key, now)
        return {
            key: DomainStatus(
                in_flight=s.in_flight,
                waiting=len(self._queues.get(key, ())),
                max_concurrency=s.max_concurrency,
                rate_per_s=s.rate_per_s,
                measured_rate_per_s=s.measured_rate_per_s,
                slowed_down=s.slowed_down,
            )
            for key, s in statuses.items()
        }

    def prune(self) -> int:
        """Forget idle domains now (this also happens on use, once per ``idle_s``)."""
        return self._throttles.prune(self._clock())

    def __len__(self) -> int:
        """Domains tracked."""
        return len(self._throttles)

    # -- waiting -------------------------------------------------------------------------

    async def _acquire(self, key: str, deadline_s: float | None) -> float:
        started = self._clock()
        if self._take_now(key, started):
            return 0.0
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(key, collections.deque())
        me = _Waiter(loop.create_future())
        queue.append(me)
        try:
            if queue[0] is not me:
                await self._wait(key, me.wake, deadline_s)
            while True:
                now = self._clock()
                admission = self._throttles.try_acquire(key, now)
                if admission.ok:
                    # No await from here to the caller's block: the slot cannot leak.
                    return now - started
                if admission.retry_after_s is None:
                    me.wake = loop.create_future()
                    await self._wait(key, me.wake, deadline_s)
                    continue
                delay = max(admission.retry_after_s, self._min_sleep_s)
                if deadline_s is not None and now + delay > deadline_s:
                    raise PacingTimeout(
                        f"no token for {key} before the deadline",
                        retry_after=timedelta(seconds=delay),
                    )
                await self._sleep(delay)
        finally:
            was_head = queue[0] is me
            queue.remove(me)
            if not queue:
                del self._queues[key]
            elif was_head:
                self._wake_head(queue)

    def _take_now(self, key: str, now_s: float) -> bool:
        """Take a slot of ``key`` unless callers already wait for one (no queue-jumping)."""
        return key not in self._queues and self._throttles.try_acquire(key, now_s).ok

    async def _wait(self, key: str, wake: asyncio.Future[None], deadline_s: float | None) -> None:
        """Wait for ``wake``; PacingTimeout at the deadline."""
        if deadline_s is None:
            await wake
            return
        remaining = deadline_s - self._clock()
        if remaining > 0 and not wake.done():
            timer = asyncio.ensure_future(self._sleep(remaining))
            try:
                await asyncio.wait((wake, timer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
        if not wake.done():
            raise PacingTimeout(f"no slot for {key} before the deadline")

    def _release(self, key: str) -> None:
        self._throttles.release(key)
        queue = self._queues.get(key)
        if queue:
            self._wake_head(queue)

    @staticmethod
    def _wake_head(queue: collections.deque[_Waiter]) -> None:
        wake = queue[0].wake
        if not wake.done():
            wake.set_result(None)
