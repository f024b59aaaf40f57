"""Throttles: token buckets, per-key concurrency, and an adaptive (AIMD) rate. Pure.

Nothing here reads a clock or sleeps: every method that depends on time takes ``now_s``
(monotonic seconds) from the caller, and answers how long to wait instead of waiting.
The asyncio shell (the SMTP pool / dispatch loop) owns the sleeping and the clock.

- :class:`TokenBucket`: ``rate_per_s`` sustained, ``burst`` at once.
- :class:`ConcurrencyLimiter`: transactions (or connections) under way per key.
- :class:`AdaptiveRate`: a rate cut multiplicatively on a "slow down" reply (421/451,
  see :func:`is_slow_down`) and raised back additively over time, after TCP's AIMD.
  Replies that arrive within ``cooldown_s`` of a cut were caused by the traffic sent
  before it, so they do not cut again.
- :class:`Throttles`: the three together per key (a relay ``host:port`` or a recipient
  domain, see :func:`recipient_domain`), with per-key overrides, and idle keys pruned so
  memory stays bounded however many domains a job touches.

Typical use per SMTP transaction::

    admission = throttles.try_acquire(domain, now_s)
    if not admission.ok:  # wait admission.retry_after_s, or for a release when None
        ...
    try:
        reply = await send(...)
        throttles.on_reply(domain, reply.code, clock())
    finally:
        throttles.release(domain)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

SLOW_DOWN_CODES = frozenset({421, 451})
"""SMTP replies that mean "you are sending too fast" (service closing, local error /
greylisting / rate limit). They reduce the key's adaptive rate."""


def is_slow_down(code: int) -> bool:
    """Whether an SMTP reply code asks the sender to slow down."""
    return code in SLOW_DOWN_CODES


def recipient_domain(email: str) -> str:
    """The domain part of ``email``, lower-cased: the key of per-domain throttles."""
    return email.rpartition("@")[2].lower()


@dataclasses.dataclass
class TokenBucket:
    """A token bucket: at most ``burst`` tokens, refilled at ``rate_per_s``.

    Over any interval of length T, at most ``burst + rate_per_s * T`` tokens can be
    taken. A clock that goes backwards counts as no time passing.

    Attributes:
        rate_per_s: Tokens added per second.
        burst: Capacity.
        tokens: Tokens available at ``updated_s``.
        updated_s: When ``tokens`` was last brought up to date.
    """

    rate_per_s: float
    burst: float
    tokens: float
    updated_s: float

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0 or not math.isfinite(self.rate_per_s):
            raise ValueError("rate_per_s must be positive and finite")
        if not self.burst >= 1 or not math.isfinite(self.burst):
            raise ValueError("burst must be at least 1 and finite")
        self.tokens = min(max(self.tokens, 0.0), self.burst)

    @classmethod
    def full(cls, rate_per_s: float, burst: float, now_s: float) -> TokenBucket:
        """A bucket holding ``burst`` tokens at ``now_s``."""
        return cls(rate_per_s=rate_per_s, burst=burst, tokens=burst, updated_s=now_s)

    def _refill(self, now_s: float) -> None:
        elapsed = now_s - self.updated_s
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
            self.updated_s = now_s

    def available(self, now_s: float) -> float:
        """Tokens that could be taken at ``now_s``."""
        self._refill(now_s)
        return self.tokens

    def try_take(self, now_s: float, count: float = 1.0) -> bool:
        """Take ``count`` tokens if there are that many; False (and nothing taken) if not."""
        self._refill(now_s)
        if self.tokens >= count:
            self.tokens -= count
            return True
        return False

    def wait_s(self, now_s: float, count: float = 1.0) -> float:
        """Seconds from ``now_s`` until ``count`` tokens are there (0 when they are);
        ``inf`` when ``count`` exceeds the burst and so never can be."""
        if count > self.burst:
            return math.inf
        self._refill(now_s)
        missing = count - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate_per_s

    def set_rate(self, rate_per_s: float, now_s: float) -> None:
        """Change the rate from ``now_s`` on; tokens earned so far keep the old rate."""
        if not rate_per_s > 0 or not math.isfinite(rate_per_s):
            raise ValueError("rate_per_s must be positive and finite")
        self._refill(now_s)
        self.rate_per_s = rate_per_s


class ConcurrencyLimiter:
    """How many things are under way per key, against a limit per key.

    Keys with nothing under way are forgotten, so memory follows what is in flight.

    Args:
        default_limit: The limit of a key without an override.
        limits: Overrides by key.
    """

    def __init__(self, default_limit: int, limits: Mapping[str, int] | None = None) -> None:
        if default_limit < 1:
            raise ValueError("default_limit must be at least 1")
        for key, limit in (limits or {}).items():
            if limit < 1:
                raise ValueError(f"limit of {key!r} must be at least 1")
        self._default = default_limit
        self._limits = dict(limits or {})
        self._in_use: dict[str, int] = {}

    def limit(self, key: str) -> int:
        """The limit of ``key``."""
        return self._limits.get(key, self._default)

    def in_use(self, key: str) -> int:
        """How many are under way for ``key``."""
        return self._in_use.get(key, 0)

    def total(self) -> int:
        """How many are under way in all."""
        return sum(self._in_use.values())

    def try_acquire(self, key: str) -> bool:
        """Count one more under way for ``key`` unless it is at its limit."""
        used = self._in_use.get(key, 0)
        if used >= self.limit(key):
            return False
        self._in_use[key] = used + 1
        return True

    def release(self, key: str) -> None:
        """Count one less under way for ``key``.

        Raises:
            ValueError: nothing is under way for ``key`` (a double release).
        """
        used = self._in_use.get(key, 0)
        if used <= 0:
            raise ValueError(f"release of {key!r} without an acquire")
        if used == 1:
            del self._in_use[key]
        else:
            self._in_use[key] = used - 1


@dataclasses.dataclass(frozen=True)
class AdaptivePolicy:
    """How an :class:`AdaptiveRate` reacts to slow-down replies."""

    max_rate_per_s: float
    """The configured rate: the ceiling the rate recovers to."""
    min_rate_per_s: float = 0.1
    """Cuts never go below this."""
    decrease_factor: float = 0.5
    """A cut multiplies the rate by this."""
    increase_per_s: float = 1.0
    """After a cut, the rate grows by this much per second (additive increase)."""
    cooldown_s: float = 5.0
    """Slow-down replies within this long after a cut do not cut again."""

    def __post_init__(self) -> None:
        if not 0 < self.min_rate_per_s <= self.max_rate_per_s < math.inf:
            raise ValueError("need 0 < min_rate_per_s <= max_rate_per_s < inf")
        if not 0 < self.decrease_factor < 1:
            raise ValueError("decrease_factor must be between 0 and 1")
        if not 0 < self.increase_per_s < math.inf:
            raise ValueError("increase_per_s must be positive")
        if not 0 <= self.cooldown_s < math.inf:
            raise ValueError("cooldown_s must not be negative")


class AdaptiveRate:
    """A rate cut on slow-down replies and recovering linearly (AIMD).

    ``rate(now)`` is ``min(max, rate_after_cut + increase_per_s * (now - cut_at))``, so
    it never exceeds ``max_rate_per_s`` and never falls below ``min_rate_per_s``.

    Args:
        policy: Bounds and steps.
    """

    def __init__(self, policy: AdaptivePolicy) -> None:
        self.policy = policy
        self._base = policy.max_rate_per_s
        self._cut_at_s: float | None = None

    def rate(self, now_s: float) -> float:
        """The allowed rate at ``now_s``."""
        if self._cut_at_s is None:
            return self._base
        elapsed = max(0.0, now_s - self._cut_at_s)
        rate = self._base + self.policy.increase_per_s * elapsed
        if rate >= self.policy.max_rate_per_s:
            # Fully recovered: forget the cut.
            self._base = self.policy.max_rate_per_s
            self._cut_at_s = None
            return self._base
        return rate

    def recovered(self, now_s: float) -> bool:
        """Whether the rate is back at its maximum."""
        return self.rate(now_s) >= self.policy.max_rate_per_s

    def on_slow_down(self, now_s: float) -> bool:
        """Cut the rate, unless the last cut was less than ``cooldown_s`` ago.

        Returns:
            Whether the rate was cut.
        """
        if self._cut_at_s is not None and now_s - self._cut_at_s < self.policy.cooldown_s:
            return False
        current = self.rate(now_s)
        self._base = max(self.policy.min_rate_per_s, current * self.policy.decrease_factor)
        self._cut_at_s = now_s
        return True


@dataclasses.dataclass(frozen=True)
class Limits:
    """Throttle settings of one key (a relay or a recipient domain)."""

    rate_per_s: float = 50.0
    """Sustained messages per second (the adaptive rate's ceiling)."""
    burst: float = 20.0
    """Messages that may start at once after a quiet period."""
    max_concurrency: int = 10
    """Transactions (or connections) under way at once."""
    min_rate_per_s: float = 0.5
    """Slow-down replies never cut the rate below this."""
    decrease_factor: float = 0.5
    """A slow-down reply multiplies the rate by this."""
    increase_per_s: float = 1.0
    """The rate then grows back by this many messages/s every second."""
    cooldown_s: float = 5.0
    """Slow-down replies this soon after a cut do not cut again."""

    def __post_init__(self) -> None:
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.policy()  # validates the rest

    def policy(self) -> AdaptivePolicy:
        """The adaptive-rate policy these limits describe."""
        return AdaptivePolicy(
            max_rate_per_s=self.rate_per_s,
            min_rate_per_s=min(self.min_rate_per_s, self.rate_per_s),
            decrease_factor=self.decrease_factor,
            increase_per_s=self.increase_per_s,
            cooldown_s=self.cooldown_s,
        )


@dataclasses.dataclass(frozen=True)
class Admission:
    """The answer of :meth:`Throttles.try_acquire`."""

    ok: bool
    """True: a slot and a token were taken; call :meth:`Throttles.release` when done."""
    retry_after_s: float | None = None
    """When not ok: seconds until a token is due, or None when the key is at its
    concurrency limit (wait for a release)."""


@dataclasses.dataclass
class _KeyState:
    bucket: TokenBucket
    rate: AdaptiveRate
    in_flight: int = 0
    last_used_s: float = 0.0


class Throttles:
    """Rate, burst, concurrency and adaptive slow-down per key.

    Args:
        default: Limits of keys without an override.
        overrides: Limits by key (a domain like ``gmail.com`` or a relay ``host:port``).
        idle_s: A key unused this long, with nothing in flight and a recovered rate, is
            forgotten by :meth:`prune` (it would start afresh anyway).
    """

    def __init__(
        self,
        default: Limits | None = None,
        overrides: Mapping[str, Limits] | None = None,
        idle_s: float = 600.0,
    ) -> None:
        self._default = default or Limits()
        self._overrides = dict(overrides or {})
        self._idle_s = idle_s
        self._keys: dict[str, _KeyState] = {}

    def limits(self, key: str) -> Limits:
        """The limits of ``key``."""
        return self._overrides.get(key, self._default)

    def _state(self, key: str, now_s: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            limits = self.limits(key)
            state = _KeyState(
                bucket=TokenBucket.full(limits.rate_per_s, limits.burst, now_s),
                rate=AdaptiveRate(limits.policy()),
                last_used_s=now_s,
            )
            self._keys[key] = state
        return state

    def try_acquire(self, key: str, now_s: float) -> Admission:
        """Take a concurrency slot and a token for ``key`` if both are free."""
        state = self._state(key, now_s)
        state.last_used_s = max(state.last_used_s, now_s)
        if state.in_flight >= self.limits(key).max_concurrency:
            return Admission(ok=False, retry_after_s=None)
        state.bucket.set_rate(state.rate.rate(now_s), now_s)
        if not state.bucket.try_take(now_s):
            return Admission(ok=False, retry_after_s=state.bucket.wait_s(now_s))
        state.in_flight += 1
        return Admission(ok=True)

    def release(self, key: str) -> None:
        """Give back the slot an ok :meth:`try_acquire` took.

        Raises:
            ValueError: nothing is in flight for ``key``.
        """
        state = self._keys.get(key)
        if state is None or state.in_flight <= 0:
            raise ValueError(f"release of {key!r} without an acquire")
        state.in_flight -= 1

    def on_reply(self, key: str, code: int, now_s: float) -> bool:
        """Record an SMTP reply for ``key``; a slow-down reply cuts its rate.

        Returns:
            Whether the rate was cut.
        """
        if not is_slow_down(code):
            return False
        state = self._state(key, now_s)
        cut = state.rate.on_slow_down(now_s)
        if cut:
            state.bucket.set_rate(state.rate.rate(now_s), now_s)
            # Drain the burst too: a server that says "slow down" should not get a
            # burst of retries the next moment.
            state.bucket.tokens = min(state.bucket.tokens, 1.0)
        return cut

    def rate(self, key: str, now_s: float) -> float:
        """The current allowed rate of ``key``."""
        state = self._keys.get(key)
        return state.rate.rate(now_s) if state is not None else self.limits(key).rate_per_s

    def in_flight(self, key: str) -> int:
        """Slots of ``key`` taken and not released."""
        state = self._keys.get(key)
        return state.in_flight if state is not None else 0

    def prune(self, now_s: float) -> int:
        """Forget idle keys (see ``idle_s``); returns how many were forgotten."""
        idle = [
            key
            for key, s in self._keys.items()
            if s.in_flight == 0
            and now_s - s.last_used_s >= self._idle_s
            and s.rate.recovered(now_s)
        ]
        for key in idle:
            del self._keys[key]
        return len(idle)

    def __len__(self) -> int:
        return len(self._keys)
