"""Backoff and ledger: the pure pieces of reassignment, on a fake clock."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.backoff import BackoffPolicy, delay
from coordinator.ledger import Ledger


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


def test_ledger_expiry_is_pushed_back_by_progress() -> None:
    ledger = Ledger()
    ledger.add("j/0", "n1", 50, now=0.0, timeout_s=10)
    ledger.add("j/1", "n2", 50, now=0.0, timeout_s=10)
    assert ledger.touch("j/0", "n1", now=8.0)
    # A node that does not hold the batch cannot extend it
    assert not ledger.touch("j/1", "n1", now=8.0)
    expired = ledger.expired(now=10.0)
    assert [e.batch_id for e in expired] == ["j/1"]
    assert ledger.expired(now=17.9) == []
    assert [e.batch_id for e in ledger.expired(now=18.0)] == ["j/0"]
    assert len(ledger) == 0


def test_ledger_orphans_only_the_dead_nodes_batches() -> None:
    ledger = Ledger()
    ledger.add("j/0", "n1", 50, 0.0, 10)
    ledger.add("j/1", "n1", 20, 0.0, 10)
    ledger.add("j/2", "n2", 50, 0.0, 10)
    assert ledger.recipients_on("n1") == 70
    assert sorted(e.batch_id for e in ledger.orphaned("n1")) == ["j/0", "j/1"]
    assert ledger.holder("j/2") == "n2" and ledger.holder("j/0") is None
    assert ledger.remove("j/2", "n1") is None
    assert ledger.remove("j/2", "n2") is not None
    with pytest.raises(ValueError):
        ledger.add("j/3", "n1", 1, 0.0, 1)
        ledger.add("j/3", "n2", 1, 0.0, 1)
