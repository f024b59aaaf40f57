"""Circuit breakers as both servers keep them: one state enum, and pybreaker read through it.

The coordinator keeps a breaker per sender node (``coordinator/breaker.py``), a sender
node one per SMTP relay (``sender_node/relay_breaker.py``). Both let pybreaker count
consecutive faults and move closed → open → half-open → closed, and both need the same
three things from it, which this module gives them:

- :class:`BreakerState`: the state, as reported on the wire, in metrics and in logs.
- :class:`Breaker`: a ``pybreaker.CircuitBreaker`` with a storage object of our own, so
  its state and the time it opened are read through a public API (pybreaker only
  exposes its own storage as a private attribute).
- :func:`effective_state` and :func:`admits`: pybreaker moves an open breaker to
  half-open only on the next call, and then lets *every* concurrent caller through (it
  has no notion of an asyncio call in progress). So an open breaker whose reset timeout
  has passed already *reads* half-open, and half-open admits exactly one trial at a time.

Pure apart from pybreaker, which reads the wall clock itself: times here are Unix
seconds, the clock pybreaker stamps an opening with.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

import pybreaker

Exclusion = type[BaseException] | Callable[[BaseException], bool]
"""An exception pybreaker does not count (a class, or a predicate on the exception)."""


class BreakerState(enum.StrEnum):
    """State of one breaker: a node's (coordinator) or a relay's (sender node)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @classmethod
    def parse(cls, name: str) -> BreakerState:
        """Map a pybreaker state name (``closed``, ``open``, ``half-open``) to the enum.

        Raises:
            ValueError: an unknown name.
        """
        # Asked for every SMTP transaction: a dict lookup, not an Enum call.
        state = _BY_PYBREAKER_NAME.get(name)
        return state if state is not None else cls(name.replace("-", "_"))


_BY_PYBREAKER_NAME = {
    pybreaker.STATE_CLOSED: BreakerState.CLOSED,
    pybreaker.STATE_OPEN: BreakerState.OPEN,
    pybreaker.STATE_HALF_OPEN: BreakerState.HALF_OPEN,
}


def effective_state(
    state: BreakerState, opened_at_s: float | None, reset_timeout_s: float, now_s: float
) -> BreakerState:
    """The state as of ``now_s``: an open breaker whose reset timeout has passed (or
    whose opening time is unknown) is half-open; pybreaker itself moves it there only
    on the next call. Pure.

    Args:
        state: pybreaker's state.
        opened_at_s: When the breaker last opened (same clock as ``now_s``), or None.
        reset_timeout_s: How long an open breaker refuses.
        now_s: The current time.
    """
    if state is not BreakerState.OPEN:
        return state
    if opened_at_s is None or now_s >= opened_at_s + reset_timeout_s:
        return BreakerState.HALF_OPEN
    return BreakerState.OPEN


def admits(state: BreakerState, trial_in_flight: bool) -> bool:
    """Whether a new call may go through a breaker in ``state`` (an effective state):
    closed, or half-open with no trial under way. Pure."""
    return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not trial_in_flight)


class Breaker:
    """A ``pybreaker.CircuitBreaker`` whose state is read through its own storage.

    Not thread-safe; used from one event loop. Count a call with
    ``with breaker.circuit.calling():`` around the awaited work
    (``circuit.call(async_fn)`` would record success on creating the coroutine).

    Args:
        name: Who the breaker guards (in pybreaker's listener calls).
        fail_max: Consecutive counted failures that open it.
        reset_timeout_s: How long it stays open before a trial.
        exclude: Exceptions that are not counted (pybreaker counts them as successes).
        listeners: pybreaker listeners (e.g. to log transitions).
        throw_new_error_on_trip: False re-raises the failure that opened the breaker
            instead of pybreaker's ``CircuitBreakerError``.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        exclude: Sequence[Exclusion] = (),
        listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
        throw_new_error_on_trip: bool = True,
    ) -> None:
        self.reset_timeout_s = reset_timeout_s
        self.storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        """pybreaker's state, read (and in tests, aged) through its public API."""
        self.circuit = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            exclude=list(exclude),
            state_storage=self.storage,
            listeners=list(listeners),
            name=name,
            throw_new_error_on_trip=throw_new_error_on_trip,
        )
        """The pybreaker breaker: ``calling()``, ``half_open()``, ``close()``, ``fail_counter``."""

    def state(self) -> BreakerState:
        """pybreaker's own state (an open breaker stays open until its next call)."""
        return BreakerState.parse(self.storage.state)

    def opened_at_s(self) -> float | None:
        """When the breaker last opened (Unix seconds), or None."""
        opened_at = self.storage.opened_at
        return opened_at.timestamp() if opened_at is not None else None

    def effective_state(self, now_s: float) -> BreakerState:
        """The state as of ``now_s`` (Unix seconds; see :func:`effective_state`)."""
        return effective_state(self.state(), self.opened_at_s(), self.reset_timeout_s, now_s)
