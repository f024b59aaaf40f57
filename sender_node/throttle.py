"""Throttles: token buckets, per-key concurrency, rate measurement and an adaptive
(AIMD) rate. Pure.

Nothing here reads a clock or sleeps: every method that depends on time takes ``now_s``
(monotonic seconds) from the caller, and answers how long to wait instead of waiting.
The asyncio shells (the SMTP pool, :mod:`sender_node.pacing`) own the sleeping and the
clock.

- :class:`TokenBucket`: ``rate_per_s`` sustained, ``burst`` at once.
- :class:`ConcurrencyLimiter`: transactions (or connections) under way per key.
- :class:`RateMeter`: how fast a key is actually being sent to (messages per second
  over the last few seconds), so that a slow-down can start from the real rate.
- :class:`AdaptiveRate`: a rate cut multiplicatively on a "slow down" reply (421/451,
  see :func:`is_slow_down`) and raised back additively over time, after TCP's AIMD.
  Replies that arrive within ``cooldown_s`` of a cut were caused by the traffic sent
  before it, so they do not cut again.
- :class:`Throttles`: all of them per key (a recipient domain, see
  :func:`recipient_domain`, or a relay ``host:port``), with per-key overrides, and idle
  keys pruned so memory stays bounded however many domains a job touches.
- :func:`parse_domain_limits`: the ``default=concurrency:20;gmail.com=rate:10`` syntax.

The default policy (:class:`Limits`) is Postfix's: at most 20 transactions at once per
destination (``default_destination_concurrency_limit``) and **no rate limit**. A node
pushes about 2,000 messages/s, and a campaign mostly to one big provider must not be
throttled to a made-up rate. Only a slow-down reply imposes a rate on such a key: half
the rate it was measured at, growing back by 1/60 of that rate per second, so one cut
is undone in 30 s, and even repeated cuts within 60 s of the last one; once back at the
measured rate, the key is unlimited again. A configured rate is a ceiling that is
always enforced, cut and recovered the same way.

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
from typing import Any

SLOW_DOWN_CODES = frozenset({421, 451})
"""SMTP replies that mean "you are sending too fast" (service closing, local error /
greylisting / rate limit). They reduce the key's adaptive rate."""

_EPSILON = 1e-9
"""Tokens a bucket may be short by and still give one: ``wait_s`` computes the wait
from a division, and the refill after exactly that wait can round to just below 1."""


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


class RateMeter:
    """Messages per second a key is being sent at, over the last few seconds.

    An exponentially decaying count of events divided by an equally decaying span of
    *active* time: a gap between two events counts as sending time up to
    ``idle_gap_s``, and beyond that as a pause. So a burst after a long pause is
    measured at the burst's rate rather than averaged with the pause, and a steady
    rate is measured exactly. Rates below ``1 / idle_gap_s`` read somewhat high, which
    only matters for keys far too slow to need throttling.

    Three floats of state per key. A clock that goes backwards counts as no time
    passing.

    Args:
        tau_s: Time constant of the decay: events older than a few ``tau_s`` no longer
            count.
        idle_gap_s: Longest gap between events still counted as sending.
        min_span_s: The span never reads shorter than this, so the first few events
            of a key do not read as an infinite rate.
    """

    __slots__ = ("_count", "_idle_gap_s", "_last_s", "_min_span_s", "_span_s", "_tau_s")

    def __init__(
        self, tau_s: float = 5.0, idle_gap_s: float = 1.0, min_span_s: float = 0.1
    ) -> None:
        if not 0 < tau_s < math.inf or not 0 < idle_gap_s < math.inf:
            raise ValueError("tau_s and idle_gap_s must be positive and finite")
        if not 0 < min_span_s < math.inf:
            raise ValueError("min_span_s must be positive and finite")
        self._tau_s = tau_s
        self._idle_gap_s = idle_gap_s
        self._min_span_s = min_span_s
        self._count = 0.0
        self._span_s = 0.0
        self._last_s: float | None = None

    def record(self, now_s: float, count: float = 1.0) -> None:
        """Count ``count`` events (messages started) at ``now_s``."""
        if self._last_s is None:
            self._last_s = now_s
        else:
            gap = max(0.0, now_s - self._last_s)
            if gap <= self._idle_gap_s:
                # All of the gap was sending (the usual case, once per transaction):
                # one expm1 gives both the decay and the span added.
                shrink = math.expm1(-gap / self._tau_s)
                decay = 1.0 + shrink
                added = self._tau_s * -shrink
            else:
                decay = math.exp(-gap / self._tau_s)
                # The active part is the start of the gap, so it has decayed for the rest.
                active = self._idle_gap_s
                added = (
                    self._tau_s
                    * -math.expm1(-active / self._tau_s)
                    * math.exp(-(gap - active) / self._tau_s)
                )
            self._count *= decay
            self._span_s = self._span_s * decay + added
            self._last_s = max(self._last_s, now_s)
        self._count += count

    def rate(self, now_s: float) -> float:
        """Events per second at ``now_s``: 0 before the first; falls towards 0 once
        events stop (the time since the last one counts as sending nothing)."""
        if self._last_s is None:
            return 0.0
        gap = max(0.0, now_s - self._last_s)
        decay = math.exp(-gap / self._tau_s)
        span = self._span_s * decay + self._tau_s * -math.expm1(-gap / self._tau_s)
        return self._count * decay / max(span, self._min_span_s)


@dataclasses.dataclass(frozen=True)
class AdaptivePolicy:
    """How an :class:`AdaptiveRate` reacts to slow-down replies."""

    max_rate_per_s: float
    """The ceiling the rate recovers to: the configured rate, or the measured rate
    of a key without one."""
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

    def on_slow_down(self, now_s: float, observed_rate_per_s: float | None = None) -> bool:
        """Cut the rate, unless the last cut was less than ``cooldown_s`` ago.

        Args:
            now_s: When the reply arrived.
            observed_rate_per_s: The rate actually sent at (see :class:`RateMeter`).
                When below the allowed rate, the cut starts from it: halving an
                allowance the key does not use would not slow it down.

        Returns:
            Whether the rate was cut.
        """
        if self._cut_at_s is not None and now_s - self._cut_at_s < self.policy.cooldown_s:
            return False
        current = self.rate(now_s)
        if observed_rate_per_s is not None:
            current = min(current, observed_rate_per_s)
        self._base = max(self.policy.min_rate_per_s, current * self.policy.decrease_factor)
        self._cut_at_s = now_s
        return True


@dataclasses.dataclass(frozen=True)
class Limits:
    """Throttle settings of one key (a recipient domain or a relay).

    The defaults limit concurrency only (Postfix's
    ``default_destination_concurrency_limit = 20``); see the module docstring for what
    a slow-down reply does to a key without a rate.
    """

    rate_per_s: float | None = None
    """Sustained messages per second; None: no rate limit until a slow-down reply."""
    burst: float | None = None
    """Messages that may start at once after a quiet period, whenever a rate applies;
    None: one second's worth of the rate (at least 1)."""
    max_concurrency: int = 20
    """Transactions under way at once."""
    min_rate_per_s: float = 0.5
    """Slow-down replies never cut the rate below this."""
    decrease_factor: float = 0.5
    """A slow-down reply multiplies the rate by this."""
    increase_per_s: float | None = None
    """After a cut, the rate grows back by this many messages/s every second; None:
    by the ceiling divided by ``recovery_s``."""
    recovery_s: float = 60.0
    """With ``increase_per_s`` None: how long a rate takes to grow from 0 back to its
    ceiling (so a single halving is undone in half that)."""
    cooldown_s: float = 5.0
    """Slow-down replies this soon after a cut do not cut again."""

    def __post_init__(self) -> None:
        if self.rate_per_s is not None and not 0 < self.rate_per_s < math.inf:
            raise ValueError("rate_per_s must be positive and finite")
        if self.burst is not None and not 1 <= self.burst < math.inf:
            raise ValueError("burst must be at least 1 and finite")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not 0 < self.min_rate_per_s < math.inf:
            raise ValueError("min_rate_per_s must be positive and finite")
        if not 0 < self.decrease_factor < 1:
            raise ValueError("decrease_factor must be between 0 and 1")
        if self.increase_per_s is not None and not 0 < self.increase_per_s < math.inf:
            raise ValueError("increase_per_s must be positive and finite")
        if not 0 < self.recovery_s < math.inf:
            raise ValueError("recovery_s must be positive and finite")
        if not 0 <= self.cooldown_s < math.inf:
            raise ValueError("cooldown_s must not be negative")

    def burst_at(self, rate_per_s: float) -> float:
        """The burst of a bucket running at ``rate_per_s``."""
        return self.burst if self.burst is not None else max(1.0, rate_per_s)

    def policy(self, ceiling_per_s: float | None = None) -> AdaptivePolicy:
        """The adaptive-rate policy these limits describe.

        Args:
            ceiling_per_s: The rate to recover to; by default the configured rate.

        Raises:
            ValueError: no ceiling given and no rate configured.
        """
        ceiling = self.rate_per_s if ceiling_per_s is None else ceiling_per_s
        if ceiling is None:
            raise ValueError("no rate configured: give the ceiling")
        return AdaptivePolicy(
            max_rate_per_s=ceiling,
            min_rate_per_s=min(self.min_rate_per_s, ceiling),
            decrease_factor=self.decrease_factor,
            increase_per_s=(
                self.increase_per_s
                if self.increase_per_s is not None
                else ceiling / self.recovery_s
            ),
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


_ADMITTED = Admission(ok=True)
_AT_LIMIT = Admission(ok=False, retry_after_s=None)
"""The two answers without a wait time, made once: ``try_acquire`` is on every
transaction's path, and a frozen dataclass costs as much to build as the rest of it."""


@dataclasses.dataclass(frozen=True)
class KeyStatus:
    """What :meth:`Throttles.status` reports about one key (for metrics and status)."""

    in_flight: int
    """Slots taken and not released."""
    max_concurrency: int
    """The key's concurrency limit."""
    rate_per_s: float | None
    """The rate allowed now; None: not rate-limited."""
    measured_rate_per_s: float
    """The rate actually sent at lately (see :class:`RateMeter`)."""
    slowed_down: bool
    """A slow-down reply holds the rate below its ceiling (or imposes one)."""


@dataclasses.dataclass(slots=True)
class _RateLimit:
    bucket: TokenBucket
    adaptive: AdaptiveRate


@dataclasses.dataclass(slots=True)
class _KeyState:
    meter: RateMeter
    last_used_s: float
    limit: _RateLimit | None = None
    """None: not rate-limited (no configured rate and no slow-down under way)."""
    in_flight: int = 0


class Throttles:
    """Concurrency, rate, burst and adaptive slow-down per key.

    A key with a configured rate always has a token bucket, whose rate a slow-down
    reply cuts and time restores up to the configured rate. A key without one only
    counts concurrency and measures its rate, until a slow-down reply imposes a rate
    below the measured one; once that rate has grown back to the measured one, the key
    is unlimited again.

    Keys are created on first use and forgotten when idle (see ``idle_s``), by
    :meth:`prune` or automatically by :meth:`try_acquire` once per ``idle_s``, so
    memory follows the keys used in the last ``2 * idle_s`` seconds.

    Args:
        default: Limits of keys without an override.
        overrides: Limits by key (a domain like ``gmail.com`` or a relay ``host:port``).
        idle_s: A key unused this long, with nothing in flight, no slow-down under way
            and a full bucket, is forgotten (it would start afresh just the same).
    """

    def __init__(
        self,
        default: Limits | None = None,
        overrides: Mapping[str, Limits] | None = None,
        idle_s: float = 30.0,
    ) -> None:
        if not 0 < idle_s < math.inf:
            raise ValueError("idle_s must be positive and finite")
        self._default = default or Limits()
        self._overrides = dict(overrides or {})
        self._idle_s = idle_s
        self._keys: dict[str, _KeyState] = {}
        self._pruned_at_s: float | None = None

    def limits(self, key: str) -> Limits:
        """The limits of ``key``."""
        return self._overrides.get(key, self._default)

    def _state(self, key: str, now_s: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = _KeyState(meter=RateMeter(), last_used_s=now_s)
            limits = self.limits(key)
            if limits.rate_per_s is not None:
                state.limit = _RateLimit(
                    bucket=TokenBucket.full(
                        limits.rate_per_s, limits.burst_at(limits.rate_per_s), now_s
                    ),
                    adaptive=AdaptiveRate(limits.policy()),
                )
            self._keys[key] = state
        return state

    def _limit(self, key: str, state: _KeyState, now_s: float) -> _RateLimit | None:
        """The rate limit of ``key`` now; lifts the slow-down of a key without a
        configured rate once it has recovered."""
        limit = state.limit
        if (
            limit is not None
            and self.limits(key).rate_per_s is None
            and limit.adaptive.recovered(now_s)
        ):
            state.limit = limit = None
        return limit

    def try_acquire(self, key: str, now_s: float) -> Admission:
        """Take a concurrency slot and a token for ``key`` if both are free.

        The slot is checked first, so a key at its concurrency limit keeps its tokens.
        """
        if self._pruned_at_s is None:
            self._pruned_at_s = now_s
        elif now_s - self._pruned_at_s >= self._idle_s:
            self.prune(now_s)
        state = self._state(key, now_s)
        state.last_used_s = max(state.last_used_s, now_s)
        if state.in_flight >= self.limits(key).max_concurrency:
            return _AT_LIMIT
        limit = self._limit(key, state, now_s)
        if limit is not None:
            bucket = limit.bucket
            bucket.set_rate(limit.adaptive.rate(now_s), now_s)
            if bucket.available(now_s) < 1.0 - _EPSILON:
                return Admission(ok=False, retry_after_s=bucket.wait_s(now_s))
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
        state.in_flight += 1
        state.meter.record(now_s)
        return _ADMITTED

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

        The cut starts from the lower of the allowed rate and the measured one. A key
        without a rate gets one, with the measured rate as its ceiling; nothing
        happens when it was measured at no more than ``min_rate_per_s``.

        Returns:
            Whether the rate was cut.
        """
        if not is_slow_down(code):
            return False
        state = self._state(key, now_s)
        state.last_used_s = max(state.last_used_s, now_s)
        limits = self.limits(key)
        measured = state.meter.rate(now_s)
        limit = self._limit(key, state, now_s)
        if limit is None:
            if measured <= limits.min_rate_per_s:
                return False
            limit = state.limit = _RateLimit(
                bucket=TokenBucket.full(measured, limits.burst_at(measured), now_s),
                adaptive=AdaptiveRate(limits.policy(ceiling_per_s=measured)),
            )
        cut = limit.adaptive.on_slow_down(now_s, observed_rate_per_s=measured)
        if cut:
            limit.bucket.set_rate(limit.adaptive.rate(now_s), now_s)
            # Drain the burst too: a server that says "slow down" should not get a
            # burst of retries the next moment.
            limit.bucket.tokens = min(limit.bucket.tokens, 1.0)
        return cut

    def rate(self, key: str, now_s: float) -> float | None:
        """The rate ``key`` is allowed now; None when it is not rate-limited."""
        state = self._keys.get(key)
        if state is None:
            return self.limits(key).rate_per_s
        limit = self._limit(key, state, now_s)
        return limit.adaptive.rate(now_s) if limit is not None else None

    def measured_rate(self, key: str, now_s: float) -> float:
        """Messages per second ``key`` has lately been admitted at."""
        state = self._keys.get(key)
        return state.meter.rate(now_s) if state is not None else 0.0

    def in_flight(self, key: str) -> int:
        """Slots of ``key`` taken and not released."""
        state = self._keys.get(key)
        return state.in_flight if state is not None else 0

    def status(self, key: str, now_s: float) -> KeyStatus:
        """The state of ``key`` (a key not tracked reads as fresh)."""
        rate = self.rate(key, now_s)
        limits = self.limits(key)
        return KeyStatus(
            in_flight=self.in_flight(key),
            max_concurrency=limits.max_concurrency,
            rate_per_s=rate,
            measured_rate_per_s=self.measured_rate(key, now_s),
            slowed_down=rate is not None
            and (limits.rate_per_s is None or rate < limits.rate_per_s),
        )

    def snapshot(self, now_s: float) -> dict[str, KeyStatus]:
        """The state of every tracked key (at most those used in the last
        ``2 * idle_s`` seconds, plus any in flight or slowed down)."""
        return {key: self.status(key, now_s) for key in list(self._keys)}

    def _forgettable(self, key: str, state: _KeyState, now_s: float) -> bool:
        if state.in_flight > 0 or now_s - state.last_used_s < self._idle_s:
            return False
        limit = self._limit(key, state, now_s)
        if limit is None:
            return True
        bucket = limit.bucket
        return limit.adaptive.recovered(now_s) and (
            bucket.available(now_s) >= bucket.burst - _EPSILON
        )

    def prune(self, now_s: float) -> int:
        """Forget idle keys (see ``idle_s``); returns how many were forgotten."""
        self._pruned_at_s = now_s
        idle = [key for key, s in self._keys.items() if self._forgettable(key, s, now_s)]
        for key in idle:
            del self._keys[key]
        return len(idle)

    def __len__(self) -> int:
        return len(self._keys)


_SPEC_KEYS: Mapping[str, str] = {
    "rate": "rate_per_s",
    "burst": "burst",
    "concurrency": "max_concurrency",
    "min_rate": "min_rate_per_s",
    "decrease": "decrease_factor",
    "increase": "increase_per_s",
    "recovery": "recovery_s",
    "cooldown": "cooldown_s",
}
"""Keys of :func:`parse_domain_limits` and the :class:`Limits` fields they set."""


def _spec_value(key: str, text: str) -> float | int | None:
    if key == "rate" and text.lower() in ("none", "unlimited"):
        return None
    if key == "concurrency":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _valid_domain(name: str) -> bool:
    return bool(name) and not any(c.isspace() or c in "@:,=;" for c in name)


def parse_domain_limits(spec: str) -> tuple[Limits, dict[str, Limits]]:
    """Parse per-domain limits such as
    ``default=concurrency:20;gmail.com=rate:10,burst:5,concurrency:4;yahoo.com=rate:5``.

    Entries are separated by ``;``, settings by ``,``. Keys: ``rate`` (messages/s, or
    ``none``), ``burst``, ``concurrency``, ``min_rate``, ``decrease`` (factor of a cut),
    ``increase`` (messages/s per second), ``recovery`` (seconds), ``cooldown``
    (seconds); see :class:`Limits`. ``default`` changes the defaults, which every
    domain entry starts from, wherever ``default`` is written. Domains are
    lower-cased. An empty spec gives ``(Limits(), {})``.

    Raises:
        ValueError: a malformed entry, an unknown or repeated key or domain, or a bad
            value; the message names the domain and the key.
    """
    entries: dict[str, list[tuple[str, str]]] = {}
    for raw in spec.split(";"):
        entry = raw.strip()
        if not entry:
            continue
        name, eq, settings = entry.partition("=")
        domain = name.strip().lower()
        if not eq or not _valid_domain(domain):
            raise ValueError(f"domain limits: {entry!r} is not DOMAIN=KEY:VALUE,...")
        if domain in entries:
            raise ValueError(f"domain limits: {domain} is given twice")
        pairs: list[tuple[str, str]] = []
        for item in settings.split(","):
            key, colon, value = (part.strip() for part in item.partition(":"))
            key = key.lower()
            if not key and not value and not colon:
                continue
            if not colon or not value:
                raise ValueError(f"domain limits: {domain}: {item.strip()!r} is not KEY:VALUE")
            if key not in _SPEC_KEYS:
                known = ", ".join(_SPEC_KEYS)
                raise ValueError(f"domain limits: {domain}: unknown key {key!r} (known: {known})")
            if any(key == seen for seen, _ in pairs):
                raise ValueError(f"domain limits: {domain}: {key} is given twice")
            pairs.append((key, value))
        if not pairs:
            raise ValueError(f"domain limits: {domain}: no settings")
        entries[domain] = pairs

    def build(domain: str, base: Limits) -> Limits:
        limits = base
        for key, text in entries[domain]:
            try:
                value = _spec_value(key, text)
                change: dict[str, Any] = {_SPEC_KEYS[key]: value}
                limits = dataclasses.replace(limits, **change)
            except ValueError as exc:
                raise ValueError(f"domain limits: {domain}: {key}: {exc}") from None
        return limits

    default = build("default", Limits()) if "default" in entries else Limits()
    overrides = {d: build(d, default) for d in entries if d != "default"}
    return default, overrides
