"""Retry delays: exponential with full jitter, capped. Pure; the random source is injected."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta


@dataclasses.dataclass(frozen=True)
class BackoffPolicy:
    initial: timedelta = timedelta(seconds=1)
    """Delay scale of the first retry."""
    multiplier: float = 2.0
    maximum: timedelta = timedelta(minutes=5)
    jitter: float = 0.5
    """Share of each delay that is random: 0 gives exact delays, 1 gives full jitter."""

    def __post_init__(self) -> None:
        if self.initial <= timedelta(0) or self.maximum < self.initial:
            raise ValueError("need 0 < initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")


def delay(policy: BackoffPolicy, attempt: int, rng: random.Random) -> timedelta:
    """Delay before retry number attempt (1 = first retry).

    The deterministic part grows as initial * multiplier**(attempt-1), capped at maximum;
    a `jitter` share of it is replaced by a uniform random amount, so the result lies in
    [(1 - jitter) * base, base].
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    initial_s = policy.initial.total_seconds()
    max_s = policy.maximum.total_seconds()
    # Cap the exponent before computing it so large attempts cannot overflow.
    base_s = max_s
    if attempt < 64:
        base_s = min(max_s, initial_s * policy.multiplier ** (attempt - 1))
    fixed = base_s * (1 - policy.jitter)
    return timedelta(seconds=fixed + rng.uniform(0, base_s - fixed))
