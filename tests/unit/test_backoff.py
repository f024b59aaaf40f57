"""Backoff: the delay before a batch goes again, on a seeded random source."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.backoff import BackoffPolicy, delay


@given(st.integers(1, 200), st.integers(0, 2**32))
def test_backoff_stays_within_bounds(attempt: int, seed: int) -> None:
    policy = BackoffPolicy(initial=timedelta(seconds=1), maximum=timedelta(seconds=60), jitter=0.5)
    d = delay(policy, attempt, random.Random(seed)).total_seconds()
    base = min(60.0, 2.0 ** (attempt - 1))
    assert base * 0.5 - 1e-9 <= d <= base + 1e-9


def test_backoff_grows_exponentially_without_jitter() -> None:
    policy = BackoffPolicy(initial=timedelta(seconds=2), maximum=timedelta(seconds=30), jitter=0)
    rng = random.Random(1)
    assert [delay(policy, a, rng).total_seconds() for a in range(1, 6)] == [2, 4, 8, 16, 30]
    with pytest.raises(ValueError):
        delay(policy, 0, rng)
