"""Per-node circuit breakers: pybreaker for the counting, plus a one-trial gate.

Each batch handed to a node is one guarded call: :meth:`NodeBreaker.guard` awaits the
batch's outcome inside ``with breaker.calling():`` (``breaker.call(async_fn)`` would
record success without awaiting). The node's ack is a success; losing the batch to a
disconnect, a missed deadline or a refusal is a failure. ``asyncio.CancelledError`` and
:class:`Released` (the batch went away for reasons that say nothing about the node, e.g.
a pause) are excluded from the count.

pybreaker lets every concurrent caller through once an open breaker's timeout has
passed; ``mailers_runtime.breaker.admits`` is the gate that lets exactly one trial batch
through half-open. The state enum and the pybreaker adapter are shared with the sender
node's relay breakers (``mailers_runtime.breaker``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pybreaker

from mailers_runtime.breaker import Breaker, BreakerState, admits

State = BreakerState
"""The coordinator's name for the shared breaker state."""


class NodeFault(Exception):
    """A batch was lost through the node's fault (disconnect, no progress, refusal)."""


class Released(Exception):
    """A batch left the node for a reason that is not the node's fault."""


def _excluded(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError | Released)


class NodeBreaker:
    """One node's breaker. Not thread-safe; used from the dispatcher's event loop.

    Args:
        name: The node's id.
        fail_max: Consecutive lost batches that open the breaker.
        reset_timeout_s: How long an open breaker refuses before one trial batch.
        wall_clock: Unix seconds (pybreaker stamps an opening with the wall clock).
    """

    def __init__(
        self,
        name: str,
        fail_max: int,
        reset_timeout_s: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._breaker = Breaker(
            name, fail_max=fail_max, reset_timeout_s=reset_timeout_s, exclude=[_excluded]
        )
        self._wall_clock = wall_clock
        self._trial_in_flight = False

    def state(self) -> State:
        """The state as of now: open past its reset timeout reads half-open."""
        return self._breaker.effective_state(self._wall_clock())

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
            with self._breaker.circuit.calling():
                await outcome
        except (NodeFault, Released, pybreaker.CircuitBreakerError):
            pass
        finally:
            if trial:
                self._trial_in_flight = False

    def reset(self) -> None:
        """An operator's reset: closed, counters cleared."""
        self._breaker.circuit.close()
        self._trial_in_flight = False
