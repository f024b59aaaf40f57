"""CallAttempts, the retry loop both clients run, driven by a fake clock."""

from __future__ import annotations

import random
from datetime import timedelta

import grpc
import pytest

from client_sdk.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    MailerError,
    NotFoundError,
    UnavailableError,
    error_for_status,
)
from client_sdk.retry import CallAttempts, LeaderRouter, RetryPolicy

POLICY = RetryPolicy(
    initial_backoff=timedelta(milliseconds=100),
    max_backoff=timedelta(seconds=1),
    jitter=0.0,
    max_attempts=4,
    max_elapsed=timedelta(seconds=30),
)


def _unavailable() -> MailerError:
    return error_for_status(grpc.StatusCode.UNAVAILABLE, "down")


def _standby(leader: str) -> MailerError:
    return error_for_status(
        grpc.StatusCode.FAILED_PRECONDITION, "not leader", [("mailers-leader", leader)]
    )


def _attempts(router: LeaderRouter, *, idempotent: bool, timeout_s: float = 10.0) -> CallAttempts:
    return CallAttempts.start(
        router, POLICY, random.Random(1), now_s=0.0, timeout_s=timeout_s, idempotent=idempotent
    )


def test_a_redirect_goes_at_once_and_a_success_confirms_the_leader() -> None:
    # Given a call starting at a standby
    router = LeaderRouter(["a:1", "b:2"])
    attempts = _attempts(router, idempotent=False)
    address, remaining_s = attempts.next(1.0)
    assert (address, remaining_s) == ("a:1", 9.0)
    # When it names b:2
    assert attempts.failed(address, _standby("b:2"), 1.0) == 0.0
    # Then the next attempt goes there, and succeeding makes it the believed leader
    address, _ = attempts.next(1.0)
    attempts.succeeded(address)
    assert address == "b:2" and router.is_believed_leader("b:2")


def test_unavailable_from_the_believed_leader_is_raised_unless_idempotent() -> None:
    router = LeaderRouter(["a:1", "b:2"])
    router.succeeded("a:1")
    error = _unavailable()
    with pytest.raises(UnavailableError) as info:
        _attempts(router, idempotent=False).failed("a:1", error, 1.0)
    assert info.value is error and router.current == "b:2"
    # An idempotent call backs off and tries the next address.
    assert _attempts(router, idempotent=True).failed("b:2", _unavailable(), 1.0) == 0.1


def test_a_domain_error_is_raised_and_leaves_the_route() -> None:
    router = LeaderRouter(["a:1", "b:2"])
    error = error_for_status(grpc.StatusCode.NOT_FOUND, "no job")
    with pytest.raises(NotFoundError):
        _attempts(router, idempotent=True).failed("a:1", error, 0.0)
    assert router.current == "a:1"


def test_running_out_of_attempts_means_no_leader_reachable() -> None:
    router = LeaderRouter(["a:1", "b:2"])
    attempts = _attempts(router, idempotent=True)
    for _ in range(POLICY.max_attempts - 1):
        address, _ = attempts.next(0.0)
        attempts.failed(address, _standby(""), 0.0)
    address, _ = attempts.next(0.0)
    with pytest.raises(UnavailableError, match="no leader reachable among a:1, b:2 after 4"):
        attempts.failed(address, _standby(""), 0.0)


def test_the_call_deadline_ends_the_search() -> None:
    attempts = _attempts(LeaderRouter(["a:1"]), idempotent=True, timeout_s=2.0)
    assert not attempts.deadline_passed(1.9)
    with pytest.raises(DeadlineExceededError, match="looking for the leader"):
        attempts.next(2.0)
    assert attempts.deadline_passed(2.0)


def test_a_watch_reopens_after_a_clean_end_at_the_same_address() -> None:
    router = LeaderRouter(["a:1", "b:2"])
    attempts = CallAttempts.watch(router, POLICY, random.Random(1), 0.0)
    assert attempts.deadline_s == float("inf")
    assert attempts.stream_ended("a:1", None, 3, 1.0) == 0.1
    assert router.current == "a:1"


def test_a_watch_that_timed_out_after_events_reopens_but_a_silent_one_fails_over() -> None:
    router = LeaderRouter(["a:1", "b:2"])
    attempts = CallAttempts.watch(router, POLICY, random.Random(1), 0.0)
    expired = error_for_status(grpc.StatusCode.DEADLINE_EXCEEDED, "stream timer")
    # The re-open timer after events: same address
    attempts.stream_ended("a:1", expired, 2, 1.0)
    assert router.current == "a:1"
    # Not one event within the stream deadline: a hung coordinator, skipped
    attempts.stream_ended("a:1", expired, 0, 2.0)
    assert router.current == "b:2"


def test_a_watch_that_keeps_ending_gives_up_and_an_event_restores_its_budget() -> None:
    router = LeaderRouter(["a:1"])
    attempts = CallAttempts.watch(router, POLICY, random.Random(1), 0.0)
    for _ in range(POLICY.max_attempts - 1):
        attempts.stream_ended("a:1", None, 0, 0.0)
    attempts.progressed("a:1", 5.0)
    assert attempts.budget.attempts == 0 and router.is_believed_leader("a:1")
    for _ in range(POLICY.max_attempts - 1):
        attempts.stream_ended("a:1", None, 0, 5.0)
    with pytest.raises(UnavailableError, match="watch stream kept ending"):
        attempts.stream_ended("a:1", None, 0, 5.0)


def test_a_standby_answer_redirects_a_watch() -> None:
    router = LeaderRouter(["a:1"])
    attempts = CallAttempts.watch(router, POLICY, random.Random(1), 0.0)
    standby = _standby("c:3")
    assert isinstance(standby, FailedPreconditionError)
    assert attempts.stream_ended("a:1", standby, 0, 0.0) == 0.0
    assert router.current == "c:3"
