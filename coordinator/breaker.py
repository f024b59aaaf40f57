"""Per-node circuit breakers: pybreaker for the counting, plus a one-trial gate.

Each batch handed to a node is one guarded call: :meth:`NodeBreaker.guard` awaits the
batch's outcome inside ``with breaker.calling():`` (``breaker.call(async_fn)`` would
record success without awaiting). The node's ack is a success; losing the batch to a
disconnect, a missed deadline or a refusal is a failure. ``asyncio.CancelledError`` and
:class:`Released` (the batch went away for reasons that say nothing about the node, e.g.
a pause) are excluded from the count.

pybreaker lets every concurrent caller through once an open breaker's timeout has
passed; :func:`admits` is the gate that lets exactly one trial batch through half-open.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

import pybreaker


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class NodeFault(Exception):
    """A batch was lost through the node's fault (disconnect, no progress, refusal)."""


class Released(Exception):
    """A batch left the node for a reason that is not the node's fault."""


def admits(state: State, trial_in_flight: bool) -> bool:
    """Whether a new batch may go to a node whose breaker is in state. Pure."""
    return state is State.CLOSED or (state is State.HALF_OPEN and not trial_in_flight)


def effective_state(
    raw: str, opened_at: datetime | None, reset_timeout_s: float, now: datetime
) -> State:
    """pybreaker's state name as of now: an open breaker whose timeout has passed is
    half-open (pybreaker only moves it there on the next call). Pure."""
    if raw == pybreaker.STATE_CLOSED:
        return State.CLOSED
    if raw == pybreaker.STATE_HALF_OPEN:
        return State.HALF_OPEN
    if opened_at is None or now >= opened_at + timedelta(seconds=reset_timeout_s):
        return State.HALF_OPEN
    return State.OPEN


def _excluded(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError | Released)


class NodeBreaker:
    """One node's breaker. Not thread-safe; used from the dispatcher's event loop."""

    def __init__(self, name: str, fail_max: int, reset_timeout_s: float) -> None:
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            exclude=[_excluded],
            name=name,
        )
        self._reset_timeout_s = reset_timeout_s
        self._trial_in_flight = False

    def state(self) -> State:
        storage = self._breaker._state_storage
        return effective_state(
            self._breaker.current_state,
            storage.opened_at,
            self._reset_timeout_s,
            datetime.now(UTC),
        )

    def admits(self) -> bool:
        return admits(self.state(), self._trial_in_flight)

    async def guard(self, outcome: Awaitable[None]) -> None:
        """Count outcome (the batch's ack, or NodeFault/Released) against the breaker.

        Never raises for the outcome itself: the dispatcher has already acted on it.
        Cancellation: cancelling the task is not counted as a failure.
        """
        trial = self.state() is State.HALF_OPEN
        if trial:
            self._trial_in_flight = True
        try:
            with self._breaker.calling():
                await outcome
        except (NodeFault, Released, pybreaker.CircuitBreakerError):
            pass
        finally:
            if trial:
                self._trial_in_flight = False

    def reset(self) -> None:
        """An operator's reset: closed, counters cleared."""
        self._breaker.close()
        self._trial_in_flight = False
