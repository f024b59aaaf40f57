"""A relay's circuit breaker: which relay a transaction may use now, and how long it may take.

Each relay has one :class:`RelayBreaker`: a pybreaker breaker (read through
``mailers_runtime.breaker.Breaker``, whose :class:`~mailers_runtime.breaker.BreakerState`
the coordinator's node breakers share) paired with one :class:`TrialGate`. pybreaker
counts consecutive relay faults and moves closed → open → half-open → closed; it reads
the wall clock itself and, in half-open, lets *every* concurrent caller through (it has
no notion of an asyncio call in progress). The gate supplies what is missing, as a small
state machine that takes ``now_s`` and reads no clock:

- closed: every transaction passes.
- open, reset timeout not elapsed: the relay is skipped without calling pybreaker, so
  the next relay in the configured order takes the transaction (failover).
- open with the timeout elapsed, or half-open: exactly one transaction becomes the
  *trial*; every other caller skips the relay until the trial ends. pybreaker then
  closes the breaker (the relay answered) or re-opens it (another relay fault).

Which outcomes are relay faults is decided in one place, ``classify.classify``
(``relay_fault``): connection errors, timeouts, 421, auth failures (530/534/535/538).
A per-recipient refusal such as 550 is not one. Every state change is logged
(``relay <address>: circuit breaker closed -> open``).

:class:`TrialGate` and :func:`data_timeout_s` (which scales the deadline of the message
transfer with its size) are pure.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

import pybreaker

from mailers_runtime.breaker import Breaker, BreakerState, Exclusion, admits, effective_state

log = logging.getLogger(__name__)


class Admission(enum.Enum):
    """What a transaction may do with one relay."""

    PASS = "pass"
    """The breaker is closed: an ordinary call."""
    TRIAL = "trial"
    """The single call that decides whether the relay is back; the caller must
    :meth:`TrialGate.release` it when the call ends, however it ends."""
    SKIP = "skip"
    """Open, or a trial is under way: use the next relay."""


class TrialGate:
    """Admission to one relay around its pybreaker breaker; at most one trial at a time.

    Single-threaded by design (one event loop): :meth:`admit` takes the trial slot in
    the same step as it decides, so no two callers can both be told TRIAL.

    Args:
        reset_timeout_s: How long an open breaker refuses before a trial is allowed;
            the same value as the pybreaker breaker's ``reset_timeout``.
    """

    def __init__(self, reset_timeout_s: float) -> None:
        if reset_timeout_s < 0:
            raise ValueError("reset_timeout_s must not be negative")
        self._reset_timeout_s = reset_timeout_s
        self._trial_since_s: float | None = None

    @property
    def trial_in_flight(self) -> bool:
        """True between a TRIAL admission and its :meth:`release`."""
        return self._trial_since_s is not None

    @property
    def trial_since_s(self) -> float | None:
        """When the trial under way was admitted, or None."""
        return self._trial_since_s

    def admits(self, state: BreakerState, opened_at_s: float | None, now_s: float) -> bool:
        """Whether :meth:`admit` would let a transaction in now (without taking a trial).

        Args:
            state: The breaker's current state.
            opened_at_s: When the breaker last opened (same clock as ``now_s``), or None.
            now_s: The current time.
        """
        effective = effective_state(state, opened_at_s, self._reset_timeout_s, now_s)
        return admits(effective, self.trial_in_flight)

    def admit(self, state: BreakerState, opened_at_s: float | None, now_s: float) -> Admission:
        """Decide for one transaction, and take the trial slot when answering TRIAL.

        Args:
            state: The breaker's current state.
            opened_at_s: When the breaker last opened (same clock as ``now_s``), or None.
            now_s: The current time.
        """
        if state is BreakerState.CLOSED:
            return Admission.PASS
        if not self.admits(state, opened_at_s, now_s):
            return Admission.SKIP
        self._trial_since_s = now_s
        return Admission.TRIAL

    def release(self) -> None:
        """End the trial under way (no-op when there is none)."""
        self._trial_since_s = None


class _LogTransitions(pybreaker.CircuitBreakerListener):
    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = old_state.name if old_state is not None else "none"
        if old != new_state.name:
            log.warning("relay %s: circuit breaker %s -> %s", cb.name, old, new_state.name)


class RelayBreaker:
    """One relay's breaker: pybreaker counts its faults, a :class:`TrialGate` admits.

    Count a transaction with ``with breaker.circuit.calling():`` around it, after
    :meth:`admit`; a TRIAL admission is ended with :meth:`release_trial`.

    Args:
        address: The relay (in logs).
        fail_max: Consecutive relay faults that open the breaker.
        reset_timeout_s: How long an open breaker skips its relay before one trial.
        exclude: Exceptions that say nothing about the relay (not counted).
    """

    def __init__(
        self,
        address: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        exclude: Sequence[Exclusion],
    ) -> None:
        self._counter = Breaker(
            address,
            fail_max=fail_max,
            reset_timeout_s=reset_timeout_s,
            exclude=exclude,
            listeners=[_LogTransitions()],
            # Re-raise the fault that tripped the breaker, so its outcome is reported.
            throw_new_error_on_trip=False,
        )
        self._storage = self._counter.storage
        self.circuit = self._counter.circuit
        """The pybreaker breaker (``calling()``, ``half_open()``, ``fail_counter``)."""
        self.gate = TrialGate(reset_timeout_s)

    def state(self) -> BreakerState:
        """pybreaker's state (as reported in ``RelayStatus.breaker_state``)."""
        return BreakerState.parse(self._storage.state)

    def admissible(self, now_s: float) -> bool:
        """Whether :meth:`admit` would let a transaction in at ``now_s`` (Unix seconds),
        without taking a trial."""
        state = BreakerState.parse(self._storage.state)  # not self.state(): per transaction
        if state is BreakerState.CLOSED:
            return True
        return self.gate.admits(state, self._counter.opened_at_s(), now_s)

    def admit(self, now_s: float) -> Admission:
        """Admit one transaction at ``now_s`` (Unix seconds); see :meth:`TrialGate.admit`."""
        state = BreakerState.parse(self._storage.state)
        if state is BreakerState.CLOSED:
            return Admission.PASS  # the common case, without reading the opening time
        return self.gate.admit(state, self._counter.opened_at_s(), now_s)

    def release_trial(self) -> None:
        """End the trial under way (see :meth:`TrialGate.release`)."""
        self.gate.release()


def data_timeout_s(base_s: float, size_bytes: int, min_throughput_bytes_per_s: float) -> float:
    """Deadline for sending a message and reading the reply to its final dot.

    A fixed deadline either cuts large messages on slow links (each cut an AMBIGUOUS
    outcome, a possible duplicate) or waits far too long on small ones. So the deadline
    is the final-reply deadline plus the time the message takes at the slowest
    throughput still considered healthy.

    Args:
        base_s: The deadline of the reply to the final dot
            (``MAILER_SMTP_FINAL_REPLY_TIMEOUT_S``).
        size_bytes: Bytes written after ``354`` (dot-stuffed, with the final dot).
        min_throughput_bytes_per_s: Slowest acceptable transfer rate.

    Raises:
        ValueError: a non-positive throughput, or a negative base or size.
    """
    if min_throughput_bytes_per_s <= 0:
        raise ValueError("min_throughput_bytes_per_s must be positive")
    if base_s < 0 or size_bytes < 0:
        raise ValueError("base_s and size_bytes must not be negative")
    return base_s + size_bytes / min_throughput_bytes_per_s
