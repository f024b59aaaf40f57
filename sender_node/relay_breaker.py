"""Relay policy: which relay a transaction may use now, and how long it may take. Pure.

``smtp_client`` pairs one ``pybreaker.CircuitBreaker`` with one :class:`TrialGate` per
relay. pybreaker counts consecutive relay faults and moves closed → open → half-open →
closed; it reads the wall clock itself and, in half-open, lets *every* concurrent caller
through (it has no notion of an asyncio call in progress). The gate supplies what is
missing, as a small state machine that takes ``now_s`` and reads no clock:

- closed: every transaction passes.
- open, reset timeout not elapsed: the relay is skipped without calling pybreaker, so
  the next relay in the configured order takes the transaction (failover).
- open with the timeout elapsed, or half-open: exactly one transaction becomes the
  *trial*; every other caller skips the relay until the trial ends. pybreaker then
  closes the breaker (the relay answered) or re-opens it (another relay fault).

Which outcomes are relay faults is decided in one place, ``classify.classify``
(``relay_fault``): connection errors, timeouts, 421, auth failures (530/534/535/538).
A per-recipient refusal such as 550 is not one.

:func:`data_timeout_s` scales the deadline of the message transfer with its size.
"""

from __future__ import annotations

import enum


class BreakerState(enum.Enum):
    """State of one relay's breaker, as reported in ``RelayStatus.breaker_state``."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @classmethod
    def parse(cls, name: str) -> BreakerState:
        """Map a pybreaker state name (``closed``, ``open``, ``half-open``) to the enum.

        Raises:
            ValueError: an unknown name.
        """
        # Asked for every transaction: a dict lookup, not an Enum call.
        state = _BY_PYBREAKER_NAME.get(name)
        return state if state is not None else cls(name.replace("-", "_"))


_BY_PYBREAKER_NAME = {
    "closed": BreakerState.CLOSED,
    "open": BreakerState.OPEN,
    "half-open": BreakerState.HALF_OPEN,
}


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

    def admit(self, state: BreakerState, opened_at_s: float | None, now_s: float) -> Admission:
        """Decide for one transaction, and take the trial slot when answering TRIAL.

        Args:
            state: The breaker's current state.
            opened_at_s: When the breaker last opened (same clock as ``now_s``), or None.
            now_s: The current time.
        """
        if state is BreakerState.CLOSED:
            return Admission.PASS
        if self._trial_since_s is not None:
            return Admission.SKIP
        if (
            state is BreakerState.OPEN
            and opened_at_s is not None
            and now_s < opened_at_s + self._reset_timeout_s
        ):
            return Admission.SKIP
        self._trial_since_s = now_s
        return Admission.TRIAL

    def release(self) -> None:
        """End the trial under way (no-op when there is none)."""
        self._trial_since_s = None


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
