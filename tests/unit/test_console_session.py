"""Console sessions and CSRF tokens with an injected clock: expiry, eviction, log-out."""

from __future__ import annotations

import itertools

import pytest

from coordinator.console.session import Session, SessionPolicy, Sessions, same_secret

POLICY = SessionPolicy(idle_s=60, max_age_s=600, max_sessions=3)


def _sessions() -> Sessions:
    ids = (f"id{i}" for i in itertools.count())
    return Sessions(POLICY, new_id=lambda: next(ids))


def _open(sessions: Sessions, now_s: float, tenant: str = "acme") -> Session:
    return sessions.open("mlr_t", admin=False, tenant=tenant, now_s=now_s)[0]


def test_a_session_lives_while_used_and_ends_when_idle() -> None:
    # Given a session opened at t=0
    sessions = _sessions()
    s = _open(sessions, 0)
    # When it is used every 50 s, it lives on past the idle limit
    for now_s in (50, 100, 150):
        assert sessions.touch(s.session_id, now_s) is s
    # Then a gap of a whole idle period ends it, and a sweep returns it to free
    assert sessions.touch(s.session_id, 150 + 60) is None
    assert sessions.sweep(150 + 60) == [s]
    assert len(sessions) == 0


def test_a_busy_session_still_ends_at_its_max_age() -> None:
    sessions = _sessions()
    s = _open(sessions, 0)
    for now_s in range(0, 600, 30):
        assert sessions.touch(s.session_id, now_s) is s
    assert sessions.touch(s.session_id, 600) is None


def test_unknown_and_missing_ids_find_nothing() -> None:
    sessions = _sessions()
    _open(sessions, 0)
    assert sessions.touch(None, 1) is None
    assert sessions.touch("", 1) is None
    assert sessions.touch("id-of-someone-else", 1) is None


def test_log_out_ends_the_session_at_once() -> None:
    sessions = _sessions()
    s = _open(sessions, 0)
    assert sessions.close(s.session_id) is s
    assert sessions.touch(s.session_id, 1) is None
    assert sessions.close(s.session_id) is None


def test_logging_in_beyond_the_limit_evicts_the_least_recently_used() -> None:
    # Given three sessions, the first used most recently
    sessions = _sessions()
    first, second, third = (_open(sessions, t) for t in (0, 1, 2))
    sessions.touch(first.session_id, 5)
    # When a fourth logs in
    opened = sessions.open("mlr_u", admin=True, tenant="", now_s=6)
    # Then the least recently used one is evicted and returned to free
    assert opened[1:] == [second]
    assert sessions.touch(second.session_id, 6) is None
    for kept in (first, third, opened[0]):
        assert sessions.touch(kept.session_id, 6) is kept


def test_csrf_tokens_are_per_session_and_compared_exactly() -> None:
    sessions = _sessions()
    a, b = _open(sessions, 0), _open(sessions, 0, tenant="other")
    assert a.csrf != b.csrf and a.csrf != a.session_id
    assert a.csrf_ok(a.csrf)
    assert not a.csrf_ok(b.csrf)
    assert not a.csrf_ok(None)
    assert not a.csrf_ok("")
    assert not a.csrf_ok(a.csrf + "x")
    assert not a.csrf_ok("\udcff")  # not encodable: refused, not an exception


def test_the_token_never_shows_in_a_repr() -> None:
    s = _open(_sessions(), 0)
    assert "mlr_t" not in repr(s)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [("x1", "x1", True), ("x1", "x2", False), ("", "", False), (None, "x", False)],
)
def test_the_login_form_secret_must_match_its_cookie(a: str | None, b: str, same: bool) -> None:
    assert same_secret(a, b) is same


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        SessionPolicy(idle_s=0)
    with pytest.raises(ValueError):
        SessionPolicy(max_sessions=0)
