"""The relay breaker's admission policy (one trial at a time) and size-scaled deadlines.

Pure: a fake clock is just the ``now_s`` argument. The same gate around a real
pybreaker breaker and real relays is covered in ``tests/component/test_relay_pool.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailers_runtime.breaker import BreakerState
from sender_node.relay_breaker import Admission, TrialGate, data_timeout_s

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def test_closed_breaker_lets_everyone_pass() -> None:
    gate = TrialGate(reset_timeout_s=5.0)
    assert [gate.admit(CLOSED, None, float(t)) for t in range(10)] == [Admission.PASS] * 10
    assert not gate.trial_in_flight


def test_open_breaker_skips_until_the_reset_timeout() -> None:
    # Given a breaker that opened at t=100 with a 5 s reset timeout
    gate = TrialGate(reset_timeout_s=5.0)
    # Then it is skipped (failover) until t=105
    assert gate.admit(OPEN, 100.0, 100.0) is Admission.SKIP
    assert gate.admit(OPEN, 100.0, 104.999) is Admission.SKIP
    assert not gate.trial_in_flight
    # And at t=105 one caller becomes the trial
    assert gate.admit(OPEN, 100.0, 105.0) is Admission.TRIAL
    assert gate.trial_in_flight and gate.trial_since_s == 105.0


def test_exactly_one_trial_among_concurrent_callers() -> None:
    # Given an open breaker whose reset timeout has elapsed
    gate = TrialGate(reset_timeout_s=1.0)
    # When 50 callers arrive while the first is still on trial (pybreaker is half-open
    # from the first call on)
    first = gate.admit(OPEN, 0.0, 2.0)
    others = [gate.admit(HALF_OPEN, 0.0, 2.0 + i / 100) for i in range(50)]
    # Then exactly one is admitted, and the others skip the relay
    assert first is Admission.TRIAL
    assert set(others) == {Admission.SKIP}
    # And once the trial is released a new trial may start (half-open with no trial,
    # e.g. the first trial was cancelled before giving a verdict)
    gate.release()
    assert gate.admit(HALF_OPEN, 0.0, 3.0) is Admission.TRIAL


def test_a_closed_breaker_passes_even_with_a_stale_trial_slot() -> None:
    # The trial closed the breaker before its task released the slot.
    gate = TrialGate(reset_timeout_s=1.0)
    assert gate.admit(OPEN, 0.0, 5.0) is Admission.TRIAL
    assert gate.admit(CLOSED, None, 5.1) is Admission.PASS


def test_open_without_a_timestamp_is_ready_for_a_trial() -> None:
    gate = TrialGate(reset_timeout_s=5.0)
    assert gate.admit(OPEN, None, 0.0) is Admission.TRIAL


@given(
    events=st.lists(
        st.tuples(
            st.sampled_from([CLOSED, OPEN, HALF_OPEN]),
            st.floats(min_value=0, max_value=100),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_never_two_trials_at_once(events: list[tuple[BreakerState, float, bool]]) -> None:
    # Invariant: between two releases at most one TRIAL is handed out.
    gate = TrialGate(reset_timeout_s=3.0)
    trials = 0
    for state, now, release in events:
        if release:
            gate.release()
            trials = 0
        if gate.admit(state, 0.0, now) is Admission.TRIAL:
            trials += 1
        assert trials <= 1


@pytest.mark.parametrize(
    ("name", "state"),
    [("closed", CLOSED), ("open", OPEN), ("half-open", HALF_OPEN), ("half_open", HALF_OPEN)],
)
def test_pybreaker_state_names(name: str, state: BreakerState) -> None:
    assert BreakerState.parse(name) is state


def test_unknown_state_name_is_refused() -> None:
    with pytest.raises(ValueError):
        BreakerState.parse("ajar")
    with pytest.raises(ValueError):
        TrialGate(reset_timeout_s=-1)


def test_data_timeout_grows_with_message_size() -> None:
    # A small message gets about the per-step deadline, a large one time to travel.
    assert data_timeout_s(30.0, 0, 64 * 1024) == 30.0
    assert data_timeout_s(30.0, 1024, 64 * 1024) == pytest.approx(30.015625)
    assert data_timeout_s(30.0, 10 * 1024 * 1024, 64 * 1024) == pytest.approx(190.0)
    assert data_timeout_s(2.0, 500_000, 100_000) == pytest.approx(7.0)


@given(
    base=st.floats(min_value=0, max_value=600),
    small=st.integers(min_value=0, max_value=10**8),
    extra=st.integers(min_value=0, max_value=10**8),
    rate=st.floats(min_value=1, max_value=10**9),
)
def test_data_timeout_is_monotonic_in_size(
    base: float, small: int, extra: int, rate: float
) -> None:
    assert base <= data_timeout_s(base, small, rate) <= data_timeout_s(base, small + extra, rate)


@pytest.mark.parametrize(("base", "size", "rate"), [(1.0, 10, 0.0), (-1.0, 10, 1.0), (1, -1, 1.0)])
def test_data_timeout_rejects_bad_input(base: float, size: int, rate: float) -> None:
    with pytest.raises(ValueError):
        data_timeout_s(base, size, rate)
