"""A job's plan: every batch is in exactly one place, and releases settle it once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.plan import JobPlan


def places(plan: JobPlan) -> list[int]:
    """Every batch that is not done, by where it is (a batch may appear only once)."""
    fresh = list(range(plan.cursor, plan.batch_count))
    return sorted([*fresh, *plan.ready, *(s for _, s in plan.waiting), *plan.held])


def test_batches_go_fresh_then_ready_first() -> None:
    plan = JobPlan(batch_count=3)
    seq, attempt = plan.take("n1", now=0.0)
    assert (seq, attempt) == (0, 1)
    # When batch 0 comes back with unattempted recipients
    plan.settle(0, done=False, retry_at=None, lost=0)
    # Then it goes before the fresh ones, as its second attempt
    assert plan.take("n2", now=1.0) == (0, 2)
    assert plan.take("n2", now=1.0) == (1, 1)


def test_a_release_reported_twice_settles_once() -> None:
    # Given batch 0 held by n1 and released (a hello), then released again (a hand-back)
    plan = JobPlan(batch_count=2)
    plan.take("n1", now=0.0)
    plan.settle(0, done=False, retry_at=None, lost=0)
    plan.settle(0, done=False, retry_at=None, lost=0)
    # Then it is ready once, so it can be handed out once
    assert list(plan.ready) == [0]
    assert places(plan) == [0, 1]


def test_restored_holds_stay_until_released() -> None:
    # Given a new leader's view: 0 held by n1, 1 waiting, 2 ready, cursor at 3 of 4
    plan = JobPlan(batch_count=4, cursor=3)
    plan.restore(0, attempt=2, lost=0, holder="n1", retry_at=None, now=0.0)
    plan.restore(1, attempt=1, lost=0, holder=None, retry_at=50.0, now=0.0)
    plan.restore(2, attempt=1, lost=0, holder=None, retry_at=None, now=0.0)
    assert plan.holds(0, "n1", 2) and not plan.holds(0, "n1", 1)
    assert plan.take("n2", now=0.0) == (2, 2)
    assert plan.take("n2", now=0.0) == (3, 1)
    assert plan.peek() is None
    plan.promote(now=60.0)
    assert plan.take("n2", now=60.0) == (1, 2)


def test_nothing_to_take_raises() -> None:
    plan = JobPlan(batch_count=1)
    plan.take("n1", now=0.0)
    with pytest.raises(LookupError):
        plan.take("n1", now=0.0)


@given(
    st.integers(1, 30),
    st.lists(
        st.tuples(
            st.sampled_from(
                ["take", "done", "ready", "wait", "unsend", "promote", "clear", "late"]
            ),
            st.integers(0, 40),
        ),
        max_size=120,
    ),
)
def test_every_batch_is_in_exactly_one_place(
    batch_count: int, steps: list[tuple[str, int]]
) -> None:
    plan = JobPlan(batch_count)
    done: set[int] = set()
    now = 0.0
    for action, n in steps:
        now += 1.0
        held = sorted(plan.held)
        if action == "take" and plan.peek() is not None:
            seq, attempt = plan.take(f"n{n % 3}", now)
            assert attempt == plan.attempts[seq]
        elif action in ("done", "ready", "wait", "unsend") and held:
            seq = held[n % len(held)]
            if action == "unsend":
                plan.unsend(seq)
            else:
                retry = now + n if action == "wait" else None
                plan.settle(seq, done=action == "done", retry_at=retry, lost=0)
                if action == "done":
                    done.add(seq)
        elif action == "late":
            # A release of a batch no longer held (reported twice, or stale) changes nothing
            seq = n % batch_count
            if seq not in plan.held:
                before = (places(plan), list(plan.ready))
                plan.settle(seq, done=False, retry_at=None, lost=0)
                assert (places(plan), list(plan.ready)) == before
        elif action == "promote":
            plan.promote(now + n)
        elif action == "clear":
            plan.clear_queue()
            done |= set(range(batch_count)) - set(plan.held)
        # Then no batch is in two places, and none is lost
        where = places(plan)
        assert len(where) == len(set(where))
        if action != "clear":
            assert sorted(set(where) | done) == list(range(batch_count))
