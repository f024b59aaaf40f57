"""The lease rules both etcd sessions follow (``mailers_runtime.lease``), on a fake clock.

Pure: the clock is the ``now_s``/``sent_s`` arguments. The same rules against a real
etcd are covered by ``tests/integration/test_registration.py`` (the node) and
``tests/component/test_fencing.py`` (the coordinator's election).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailers_runtime.lease import (
    EMPTY,
    EXPIRED,
    MIN_ATTEMPT_S,
    NO_REFRESH,
    LeaseTrust,
    Refresh,
    attempt_deadline,
    classify_reply,
)

TTL_S, MARGIN_S, RETRY_S = 6.0, 1.0, 0.5


def granted_at(t: float) -> LeaseTrust:
    return LeaseTrust(TTL_S, MARGIN_S, granted_s=t, retry_s=RETRY_S)


@pytest.mark.parametrize(
    ("ttl", "result"),
    [(5, Refresh.OK), (1, Refresh.OK), (0, Refresh.EXPIRED), (-1, Refresh.EXPIRED)],
)
def test_a_reply_is_ok_only_with_a_positive_ttl(ttl: int, result: Refresh) -> None:
    assert classify_reply(ttl) is result


def test_no_reply_at_all_is_its_own_result() -> None:
    assert classify_reply(None) is Refresh.EMPTY


def test_first_refresh_is_due_a_third_of_the_ttl_after_the_grant_was_sent() -> None:
    # Given a lease granted (request sent) at t=100
    trust = granted_at(100.0)
    # Then it is trusted, and the first refresh is due at t=102
    assert trust.trusted(100.0)
    assert trust.poll(100.0) == pytest.approx(2.0)
    assert trust.poll(101.5) == pytest.approx(0.5)
    assert trust.poll(102.0) == 0.0


def test_a_successful_refresh_restarts_trust_from_when_it_was_sent() -> None:
    # Given a lease granted at t=100 (trusted until 105: TTL 6 minus margin 1)
    trust = granted_at(100.0)
    # When a refresh sent at 102 is answered at 104.5 with TTL 6
    trust.record(Refresh.OK, sent_s=102.0, now_s=104.5, ttl_s=6)
    # Then trust runs to 102 + 6 - 1, not from the answer, and the next refresh is at 104
    assert trust.deadline_s == 107.0
    assert trust.trusted(106.9) and not trust.trusted(107.0)
    assert trust.poll(104.5) == 0.0
    assert trust.lost is None


def test_the_ttl_etcd_reports_replaces_the_granted_one() -> None:
    trust = granted_at(100.0)
    trust.record(Refresh.OK, sent_s=102.0, now_s=102.1, ttl_s=9)
    assert trust.ttl_s == 9.0
    assert trust.deadline_s == 110.0
    assert trust.poll(102.1) == pytest.approx(3.0 - 0.1)


def test_a_late_answer_to_an_older_refresh_does_not_move_trust_back() -> None:
    trust = granted_at(100.0)
    trust.record(Refresh.OK, sent_s=103.0, now_s=103.1, ttl_s=6)
    trust.record(Refresh.OK, sent_s=102.0, now_s=103.2, ttl_s=6)
    assert trust.last_ok_s == 103.0


@pytest.mark.parametrize(("result", "why"), [(Refresh.EXPIRED, EXPIRED), (Refresh.EMPTY, EMPTY)])
def test_ttl_zero_or_no_reply_loses_the_lease_at_once(result: Refresh, why: str) -> None:
    # Given a lease well within its trust
    trust = granted_at(100.0)
    # When a refresh is answered TTL 0, or its stream ends without a reply
    trust.record(result, sent_s=102.0, now_s=102.1, ttl_s=0 if result is Refresh.EXPIRED else None)
    # Then the lease is lost for good, with the reason, long before the deadline
    assert trust.lost == why
    assert not trust.trusted(102.1)
    assert trust.poll(102.1) is None
    trust.record(Refresh.OK, sent_s=102.2, now_s=102.3, ttl_s=6)
    assert trust.lost == why and not trust.trusted(102.3)


def test_a_failed_refresh_is_retried_soon_and_keeps_trust_until_the_deadline() -> None:
    # Given a lease granted at t=100 whose first refresh, sent at 102, fails at 102.2
    trust = granted_at(100.0)
    trust.record(Refresh.FAILED, sent_s=102.0, now_s=102.2)
    # Then it is retried after min(retry 0.5, TTL/6 = 1) s, still trusted meanwhile
    assert trust.poll(102.2) == pytest.approx(0.5)
    assert trust.trusted(104.9)
    assert trust.lost is None


def test_the_retry_pause_shrinks_with_a_short_ttl() -> None:
    trust = LeaseTrust(ttl_s=2.0, margin_s=0.5, granted_s=0.0, retry_s=5.0)
    trust.record(Refresh.FAILED, sent_s=0.7, now_s=0.8)
    assert trust.poll(0.8) == pytest.approx(2.0 / 6)


@pytest.mark.parametrize(
    ("budget_s", "deadline_s"),
    [(10.0, 2.0), (2.4, 1.2), (0.8, MIN_ATTEMPT_S), (0.3, 0.3), (0.0, 0.0), (-1.0, 0.0)],
)
def test_a_refresh_may_take_half_the_trust_left(budget_s: float, deadline_s: float) -> None:
    # Half, so that a member which never answers leaves time for one more attempt; but
    # never over the call's own deadline (2 s here) nor past the trust left.
    assert attempt_deadline(budget_s, call_timeout_s=2.0) == pytest.approx(deadline_s)


@given(st.floats(-5, 60), st.floats(0.01, 10))
def test_a_refresh_never_outlives_trust_or_its_call_deadline(budget: float, call: float) -> None:
    deadline = attempt_deadline(budget, call)
    assert 0 <= deadline <= max(0.0, min(budget, call))


def test_no_successful_refresh_before_the_deadline_loses_the_lease() -> None:
    # Given a lease granted at t=100 whose refreshes all fail
    trust = granted_at(100.0)
    for t in (102.0, 102.7, 103.4, 104.1, 104.8):
        trust.record(Refresh.FAILED, sent_s=t, now_s=t + 0.1)
    # Then the wait for the next retry (due at 105.4) stops at the deadline (105)
    assert trust.poll(104.9) == pytest.approx(0.1)
    # And at the deadline the lease is lost
    assert trust.poll(105.0) is None
    assert trust.lost == NO_REFRESH
    assert not trust.trusted(100.0)


def test_losing_keeps_the_first_reason() -> None:
    trust = granted_at(0.0)
    trust.record(Refresh.EXPIRED, sent_s=1.0, now_s=1.1)
    trust.lose("closed by its owner")
    assert trust.lost == EXPIRED


@pytest.mark.parametrize(
    ("ttl_s", "margin_s", "retry_s"), [(0.0, 0.0, 0.5), (5.0, -1.0, 0.5), (5.0, 1.0, 0.0)]
)
def test_invalid_settings_are_refused(ttl_s: float, margin_s: float, retry_s: float) -> None:
    with pytest.raises(ValueError):
        LeaseTrust(ttl_s, margin_s, granted_s=0.0, retry_s=retry_s)


@given(
    steps=st.lists(
        st.tuples(st.sampled_from([Refresh.OK, Refresh.FAILED]), st.floats(0.0, 3.0)),
        max_size=30,
    )
)
def test_trust_never_outlives_ttl_minus_margin_after_the_last_ok_send(
    steps: list[tuple[Refresh, float]],
) -> None:
    # Given any run of refreshes that succeed or fail, sent whenever poll says
    trust = granted_at(0.0)
    now = 0.0
    last_ok = 0.0
    for result, took in steps:
        wait = trust.poll(now)
        if wait is None:
            break
        sent = now + wait
        now = sent + took
        trust.record(result, sent_s=sent, now_s=now, ttl_s=6)
        if result is Refresh.OK:
            last_ok = sent
    # Then trust ends exactly TTL minus margin after the last successful send
    assert trust.trusted(last_ok + TTL_S - MARGIN_S - 1e-6) is (trust.lost is None)
    assert not trust.trusted(last_ok + TTL_S - MARGIN_S)
    # And a pending refresh is never scheduled past that point
    wait = trust.poll(now)
    assert wait is None or now + wait <= last_ok + TTL_S - MARGIN_S
