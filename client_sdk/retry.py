"""How the SDK finds the leader and when it tries a call again: pure, clock and rng passed in.

A coordinator call fails in one of three ways that matter here:

* a standby answered FAILED_PRECONDITION naming the leader: switch to it and
  try again at once (the standby did nothing, so this is safe for every call);
* the address is down, or a standby knows no leader yet (UNAVAILABLE, or
  FAILED_PRECONDITION with an empty leader): try the next address after a backoff;
* anything else: raise.

UNAVAILABLE from the address believed to be the leader is retried only for
idempotent calls (reads, and submits, which always carry an idempotency key; the
table is :mod:`client_sdk._operations`): the leader may have acted before the
connection broke.

:class:`CallAttempts` is the retry loop of both clients, which only add the I/O:
sending an attempt and sleeping between them. The router is shared by a client's
concurrent calls (tasks or threads) and guards itself with a lock.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta

import grpc

from client_sdk.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    MailerError,
    UnavailableError,
)


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
    are ignored, so concurrent calls failing together advance only once. Safe
    for the tasks of the async client and the threads of the blocking one: a
    lock, never held across I/O, guards every change.
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        unique = list(dict.fromkeys(a.strip() for a in addresses if a.strip()))
        if not unique:
            raise ValueError("at least one coordinator address is required")
        self._addresses = unique
        self._index = 0
        self._believed = False
        self._lock = threading.Lock()

    @property
    def addresses(self) -> Sequence[str]:
        """Every address known, configured ones first."""
        with self._lock:
            return tuple(self._addresses)

    @property
    def current(self) -> str:
        """The address the next call goes to."""
        with self._lock:
            return self._addresses[self._index]

    def is_believed_leader(self, address: str) -> bool:
        """Whether ``address`` is current and was confirmed or named as leader."""
        with self._lock:
            return self._is_believed(address)

    def succeeded(self, address: str) -> None:
        """A call succeeded at ``address``: it is the leader."""
        with self._lock:
            if address == self._addresses[self._index]:
                self._believed = True

    def redirect(self, leader: str) -> None:
        """A standby named ``leader``."""
        with self._lock:
            self._redirect(leader)

    def failed(self, address: str) -> None:
        """``address`` could not serve a call; move on to the next address."""
        with self._lock:
            self._failed(address)

    def route_after(self, address: str, error: MailerError) -> None:
        """Move after ``error`` at ``address``.

        A standby naming another address redirects there; a standby knowing no
        leader, an unreachable address, or one that let the deadline pass (a frozen
        process accepts connections and never answers) moves on to the next address;
        any other error leaves the route alone.
        """
        with self._lock:
            self._route_after(address, error)

    def after_failure(self, address: str, error: MailerError, *, idempotent: bool) -> Step:
        """Decide the next step after ``error`` at ``address`` and move the route.

        One step under the lock, so that a concurrent success cannot change
        whether ``address`` counted as the leader between the two.
        """
        with self._lock:
            step = next_step(
                error, idempotent=idempotent, believed_leader=self._is_believed(address)
            )
            self._route_after(address, error)
            return step

    def _is_believed(self, address: str) -> bool:
        return self._believed and address == self._addresses[self._index]

    def _redirect(self, leader: str) -> None:
        if leader not in self._addresses:
            self._addresses.append(leader)
        self._index = self._addresses.index(leader)
        self._believed = True

    def _failed(self, address: str) -> None:
        if address == self._addresses[self._index]:
            self._index = (self._index + 1) % len(self._addresses)
            self._believed = False

    def _route_after(self, address: str, error: MailerError) -> None:
        if isinstance(error, FailedPreconditionError) and error.leader is not None:
            if error.leader and error.leader != address:
                self._redirect(error.leader)
            else:
                self._failed(address)
        elif isinstance(error, UnavailableError | DeadlineExceededError):
            self._failed(address)


SETTLED_STREAM_S = 5.0
"""A stream open this long without an answer had been accepted: refusals (a standby's
redirect, no leader known, a closed port) come within a second."""


def give_up_error(
    step: Step, error: MailerError, addresses: Sequence[str], attempts: int
) -> MailerError:
    """The error to raise when no retry is left.

    Running out of redirects and failovers means no leader could be reached,
    which is transient whatever the last coordinator said.
    """
    if step is Step.RAISE:
        return error
    return UnavailableError(
        f"no leader reachable among {', '.join(addresses)} after {attempts} attempts; "
        f"last: {error}",
        grpc.StatusCode.UNAVAILABLE,
    )


def timeout_s(timeout: timedelta | None, default: timedelta) -> float:
    """Seconds of a call's deadline: ``timeout``, or ``default`` when None.

    Raises:
        ValueError: The deadline is not positive.
    """
    value = (timeout if timeout is not None else default).total_seconds()
    if value <= 0:
        raise ValueError("timeout must be positive")
    return value


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


StreamEnded = Callable[[str, MailerError | None, int, float], float]
"""How the clients' re-opened streams (watch, events) go on after one ends: given its
address, its error (None for a clean end), the messages it delivered and the seconds it
was open, the seconds to wait before the next; raises to end the iteration."""


@dataclasses.dataclass
class CallAttempts:
    """The attempts of one call, as both clients loop over them; the clock is passed in.

    A unary or client-streaming call::

        attempts = CallAttempts.start(router, policy, rng, now_s=now(), timeout_s=t, idempotent=i)
        while True:
            address, remaining_s = attempts.next(now())  # raises once the deadline passed
            try:
                result = invoke(address, remaining_s)
            except RpcError as exc:
                error = error_of(exc)
            else:
                attempts.succeeded(address)
                return result
            sleep(attempts.failed(address, error, now()))  # raises when no retry is left

    A watch uses :meth:`progressed` and :meth:`stream_ended` instead, without
    an overall deadline; an event subscription :meth:`subscription_ended`.

    Attributes:
        router: The client's leader router (shared with its other calls).
        budget: Attempts and time left for retries.
        deadline_s: Monotonic time the whole call must end by (``inf`` for a watch).
        idempotent: Whether repeating the call cannot do harm (reads, and
            calls that carry an idempotency key).
        rng: Randomness for backoff jitter.
    """

    router: LeaderRouter
    budget: RetryBudget
    deadline_s: float
    idempotent: bool
    rng: random.Random
    settled_s: float = SETTLED_STREAM_S
    """A subscription's stream open this long had been accepted (see
    :meth:`subscription_ended`)."""

    @classmethod
    def start(
        cls,
        router: LeaderRouter,
        policy: RetryPolicy,
        rng: random.Random,
        *,
        now_s: float,
        timeout_s: float,
        idempotent: bool,
    ) -> CallAttempts:
        """The attempts of a call beginning at ``now_s`` that may take ``timeout_s``."""
        deadline_s = now_s + timeout_s
        budget = RetryBudget.start(policy, now_s, deadline_s)
        return cls(router, budget, deadline_s, idempotent, rng)

    @classmethod
    def watch(
        cls, router: LeaderRouter, policy: RetryPolicy, rng: random.Random, now_s: float
    ) -> CallAttempts:
        """The attempts of a watch: no overall deadline, idempotent (it only reads)."""
        return cls.start(router, policy, rng, now_s=now_s, timeout_s=math.inf, idempotent=True)

    @classmethod
    def subscription(
        cls,
        router: LeaderRouter,
        policy: RetryPolicy,
        rng: random.Random,
        now_s: float,
        stream_s: float,
    ) -> CallAttempts:
        """The attempts of a subscription whose streams last ``stream_s`` each: a watch
        whose streams may stay silent (see :meth:`subscription_ended`)."""
        attempts = cls.watch(router, policy, rng, now_s)
        attempts.settled_s = min(SETTLED_STREAM_S, stream_s)
        return attempts

    def next(self, now_s: float) -> tuple[str, float]:
        """The address of the next attempt and the seconds left for it.

        Raises:
            DeadlineExceededError: The call's deadline has passed.
        """
        address = self.router.current
        remaining_s = self.deadline_s - now_s
        if remaining_s <= 0:
            raise DeadlineExceededError(
                "deadline passed while looking for the leader", grpc.StatusCode.DEADLINE_EXCEEDED
            )
        return address, remaining_s

    def deadline_passed(self, now_s: float) -> bool:
        """Whether the call's deadline has passed."""
        return now_s >= self.deadline_s

    def succeeded(self, address: str) -> None:
        """The attempt at ``address`` succeeded: it is the leader."""
        self.router.succeeded(address)

    def failed(self, address: str, error: MailerError, now_s: float) -> float:
        """Route after the attempt at ``address`` failed with ``error``.

        Returns:
            Seconds to wait before the next attempt.

        Raises:
            MailerError: ``error`` when it is not retried, or an
                :class:`UnavailableError` when redirects and failovers ran out.
        """
        step = self.router.after_failure(address, error, idempotent=self.idempotent)
        return self._delay_s(step, error, now_s)

    def progressed(self, address: str, now_s: float) -> None:
        """A stream at ``address`` delivered a message: its retries start over."""
        self.router.succeeded(address)
        self.budget.progressed(now_s)

    def stream_ended(
        self, address: str, error: MailerError | None, received: int, now_s: float
    ) -> float:
        """Decide how a watch goes on after its stream at ``address`` ended.

        A stream that ended cleanly, or hit its own deadline after delivering
        events (the re-open timer, or a leader stepping down), is re-opened
        after a backoff against a loop. One that delivered nothing within its
        deadline is a hung coordinator, treated as unavailable. Any other error
        is routed like a failed call.

        Returns:
            Seconds to wait before re-opening the stream.

        Raises:
            MailerError: As :meth:`failed`; a stream that kept ending without an
                error gives up with :class:`UnavailableError`.
        """
        if error is None or (isinstance(error, DeadlineExceededError) and received):
            step = Step.NEXT_ADDRESS
        else:
            if isinstance(error, DeadlineExceededError):
                error = UnavailableError(error.details, error.code)
            step = self.router.after_failure(address, error, idempotent=self.idempotent)
        if error is None:
            error = UnavailableError("watch stream kept ending", grpc.StatusCode.UNAVAILABLE)
        return self._delay_s(step, error, now_s)

    def subscription_ended(
        self, address: str, error: MailerError | None, received: int, open_s: float, now_s: float
    ) -> tuple[float, bool]:
        """Decide how a subscription goes on after its stream at ``address`` ended.

        Unlike a watch's, a subscription's stream may rightly deliver nothing for its
        whole deadline (no event happened). A stream that delivered something, or
        stayed open :attr:`settled_s`, had been accepted: its end starts a new run of
        retries, counted from now rather than from the last message. One that reached
        its own deadline so is re-opened at once where it was (the periodic re-open);
        any other end is decided as by :meth:`stream_ended`.

        Args:
            address: Where the stream was open.
            error: How it ended; None when the server ended it cleanly.
            received: Messages it delivered.
            open_s: How long it was open.
            now_s: The monotonic time now.

        Returns:
            Seconds to wait before re-opening the stream, and whether an accepted
            stream was lost (a failover, a broken connection, the server ending it),
            which the periodic re-open is not.

        Raises:
            MailerError: As :meth:`stream_ended`.
        """
        accepted = received > 0 or open_s >= self.settled_s
        if accepted:
            self.budget.progressed(now_s)
            if isinstance(error, DeadlineExceededError):
                return 0.0, False
        return self.stream_ended(address, error, received, now_s), accepted

    def _delay_s(self, step: Step, error: MailerError, now_s: float) -> float:
        delay_s = self.budget.delay_s(step, now_s, self.rng)
        if delay_s is None:
            raise give_up_error(step, error, self.router.addresses, self.budget.attempts) from error
        return delay_s
