"""How the SDK finds the leader and when it tries a call again: pure, clock and rng passed in.

A coordinator call fails in one of three ways that matter here:

* a standby answered FAILED_PRECONDITION naming the leader: switch to it and
  try again at once (the standby did nothing, so this is safe for every call);
* the address is down, or a standby knows no leader yet (UNAVAILABLE, or
  FAILED_PRECONDITION with an empty leader): try the next address after a backoff;
* anything else: raise.

UNAVAILABLE from the address believed to be the leader is retried only for
idempotent calls (reads, and submits, which always carry an idempotency key):
the leader may have acted before the connection broke.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Sequence
from datetime import timedelta

from client_sdk.errors import FailedPreconditionError, MailerError, UnavailableError


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Backoff and limits for finding the leader and retrying UNAVAILABLE."""

    initial_backoff: timedelta = timedelta(milliseconds=100)
    """Delay before the first retry."""
    max_backoff: timedelta = timedelta(seconds=2)
    """Upper bound of any one delay."""
    multiplier: float = 2.0
    """Growth of the delay from one retry to the next."""
    jitter: float = 0.2
    """Each delay is scaled by a random factor in [1 - jitter, 1 + jitter]."""
    max_attempts: int = 50
    """Attempts per call, the first one included."""
    max_elapsed: timedelta = timedelta(seconds=30)
    """No retry starts later than this after the call began (the call's own
    timeout may end it sooner)."""

    def __post_init__(self) -> None:
        if self.initial_backoff < timedelta(0):
            raise ValueError("initial_backoff must not be negative")
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must be at least initial_backoff")
        if self.multiplier < 1.0:
            raise ValueError("multiplier must be at least 1")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_elapsed <= timedelta(0):
            raise ValueError("max_elapsed must be positive")

    def backoff(self, retry: int, rng: random.Random) -> timedelta:
        """The delay before retry number ``retry`` (0 for the first retry)."""
        base_s = min(
            self.max_backoff.total_seconds(),
            self.initial_backoff.total_seconds() * self.multiplier**retry,
        )
        factor = 1.0 - self.jitter + 2.0 * self.jitter * rng.random()
        return timedelta(seconds=min(self.max_backoff.total_seconds(), base_s * factor))


class Step(enum.Enum):
    """What to do after a failed attempt."""

    REDIRECT = "redirect"
    """Switch to the leader a standby named and try again at once."""
    NEXT_ADDRESS = "next_address"
    """Try the next coordinator address after a backoff."""
    RAISE = "raise"
    """Give the error to the caller."""


def next_step(error: MailerError, *, idempotent: bool, believed_leader: bool) -> Step:
    """Decide how to go on after ``error``.

    Args:
        error: The typed error of the failed attempt.
        idempotent: Whether repeating the call cannot do harm.
        believed_leader: Whether the address that failed was believed to be the
            leader (a call succeeded there, or a standby named it).
    """
    if isinstance(error, FailedPreconditionError) and error.leader is not None:
        return Step.REDIRECT if error.leader else Step.NEXT_ADDRESS
    if isinstance(error, UnavailableError) and (idempotent or not believed_leader):
        return Step.NEXT_ADDRESS
    return Step.RAISE


class LeaderRouter:
    """Which coordinator address calls go to; shared by concurrent calls.

    Starts at the first address. A standby's redirect moves to the leader it
    names (added to the list if new); a failure at the current address moves to
    the next one. Failures reported for an address that is no longer current
    are ignored, so concurrent calls failing together advance only once.
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        unique = list(dict.fromkeys(a.strip() for a in addresses if a.strip()))
        if not unique:
            raise ValueError("at least one coordinator address is required")
        self._addresses = unique
        self._index = 0
        self._believed = False

    @property
    def addresses(self) -> Sequence[str]:
        """Every address known, configured ones first."""
        return tuple(self._addresses)

    @property
    def current(self) -> str:
        """The address the next call goes to."""
        return self._addresses[self._index]

    def is_believed_leader(self, address: str) -> bool:
        """Whether ``address`` is current and was confirmed or named as leader."""
        return self._believed and address == self.current

    def succeeded(self, address: str) -> None:
        """A call succeeded at ``address``: it is the leader."""
        if address == self.current:
            self._believed = True

    def redirect(self, leader: str) -> None:
        """A standby named ``leader``."""
        if leader not in self._addresses:
            self._addresses.append(leader)
        self._index = self._addresses.index(leader)
        self._believed = True

    def failed(self, address: str) -> None:
        """``address`` could not serve a call; move on to the next address."""
        if address == self.current:
            self._index = (self._index + 1) % len(self._addresses)
            self._believed = False


@dataclasses.dataclass
class RetryBudget:
    """Attempts and time left to one call; plain state, the clock is passed in.

    Attributes:
        policy: The backoff and limits.
        retry_deadline_s: Monotonic time after which no retry starts.
    """

    policy: RetryPolicy
    retry_deadline_s: float
    attempts: int = 0
    backoffs: int = 0
    redirects_in_row: int = 0

    @classmethod
    def start(cls, policy: RetryPolicy, now_s: float, call_deadline_s: float) -> RetryBudget:
        """A budget for a call that began at ``now_s`` and must end by ``call_deadline_s``."""
        return cls(policy, min(call_deadline_s, now_s + policy.max_elapsed.total_seconds()))

    def delay_s(self, step: Step, now_s: float, rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget is spent.

        The first redirect in a row goes at once; a chain of redirects (stale
        views during an election) backs off like any other retry.
        """
        self.attempts += 1
        if step is Step.RAISE or self.attempts >= self.policy.max_attempts:
            return None
        if step is Step.REDIRECT and self.redirects_in_row == 0:
            self.redirects_in_row = 1
            delay_s = 0.0
        else:
            self.redirects_in_row = self.redirects_in_row + 1 if step is Step.REDIRECT else 0
            delay_s = self.policy.backoff(self.backoffs, rng).total_seconds()
            self.backoffs += 1
        if now_s + delay_s >= self.retry_deadline_s:
            return None
        return delay_s

    def progressed(self, now_s: float) -> None:
        """A long-lived call (watch) made progress: its retries start over."""
        self.attempts = 0
        self.backoffs = 0
        self.redirects_in_row = 0
        self.retry_deadline_s = now_s + self.policy.max_elapsed.total_seconds()
