"""Per-node breakers: pybreaker counts, our gate admits one trial in half-open.

The gate and the effective state are ``mailers_runtime.breaker``'s, shared with the
sender node's relay breakers.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.breaker import NodeBreaker, NodeFault, Released, State
from mailers_runtime.breaker import BreakerState, admits, effective_state

T0 = 1_767_225_600.0  # 2026-01-01, Unix seconds


@pytest.mark.parametrize(
    ("state", "trial", "expected"),
    [
        (State.CLOSED, False, True),
        (State.CLOSED, True, True),
        (State.OPEN, False, False),
        (State.HALF_OPEN, False, True),
        (State.HALF_OPEN, True, False),
    ],
)
def test_gate(state: State, trial: bool, expected: bool) -> None:
    assert admits(state, trial) is expected


def test_the_coordinator_state_is_the_shared_enum() -> None:
    assert State is BreakerState
    assert [s.value for s in State] == ["closed", "open", "half_open"]


def test_open_reads_half_open_once_the_timeout_passed() -> None:
    assert effective_state(State.OPEN, T0, 10, T0 + 9.9) is State.OPEN
    assert effective_state(State.OPEN, T0, 10, T0 + 10) is State.HALF_OPEN
    assert effective_state(State.OPEN, None, 10, T0) is State.HALF_OPEN
    assert effective_state(State.CLOSED, T0, 10, T0) is State.CLOSED
    assert effective_state(State.HALF_OPEN, T0, 10, T0) is State.HALF_OPEN


@given(st.floats(0, 100), st.floats(0.1, 50))
def test_open_never_reads_closed(elapsed: float, timeout: float) -> None:
    assert effective_state(State.OPEN, T0, timeout, T0 + elapsed) is not State.CLOSED


async def _settle(breaker: NodeBreaker, error: Exception | None) -> None:
    outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(breaker.guard(outcome))
    await asyncio.sleep(0)
    if error is None:
        outcome.set_result(None)
    else:
        outcome.set_exception(error)
    await task


def _age(breaker: NodeBreaker, seconds: float) -> None:
    """Pretend the breaker opened `seconds` ago (pybreaker reads the wall clock)."""
    storage = breaker._breaker.storage
    assert storage.opened_at is not None
    storage.opened_at = storage.opened_at - timedelta(seconds=seconds)


async def test_failures_open_the_breaker_and_one_trial_closes_it() -> None:
    breaker = NodeBreaker("n1", fail_max=2, reset_timeout_s=30)
    # Given two batches lost through the node's fault
    await _settle(breaker, NodeFault("lost"))
    assert breaker.state() is State.CLOSED
    await _settle(breaker, NodeFault("lost"))
    # Then the breaker is open and admits nothing
    assert breaker.state() is State.OPEN and not breaker.admits()
    # When the reset timeout has passed, exactly one trial is admitted
    _age(breaker, 31)
    assert breaker.state() is State.HALF_OPEN and breaker.admits()
    trial: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(breaker.guard(trial))
    await asyncio.sleep(0)
    assert not breaker.admits(), "a second concurrent trial must wait"
    # And its success closes the breaker
    trial.set_result(None)
    await task
    assert breaker.state() is State.CLOSED and breaker.admits()


async def test_failed_trial_reopens() -> None:
    breaker = NodeBreaker("n1", fail_max=1, reset_timeout_s=30)
    await _settle(breaker, NodeFault("lost"))
    _age(breaker, 31)
    await _settle(breaker, NodeFault("lost again"))
    assert breaker.state() is State.OPEN


async def test_cancellation_and_released_batches_do_not_count() -> None:
    breaker = NodeBreaker("n1", fail_max=1, reset_timeout_s=30)
    await _settle(breaker, Released())
    outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(breaker.guard(outcome))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state() is State.CLOSED


async def test_operator_reset_closes() -> None:
    breaker = NodeBreaker("n1", fail_max=1, reset_timeout_s=30)
    await _settle(breaker, NodeFault("lost"))
    assert breaker.state() is State.OPEN
    breaker.reset()
    assert breaker.state() is State.CLOSED and breaker.admits()
