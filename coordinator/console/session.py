"""Console sessions and CSRF tokens: a small state machine over plain values. Pure.

A session is made when an operator's token is accepted at log-in. The browser holds
only its random id (a cookie); the token stays here, in this process's memory, so a
leaked page or log line never shows it. Each session has its own CSRF token, which
every form carries in a hidden field and every POST must echo (compared in constant
time): a page of another site can make the browser send the cookie, but it cannot
read the CSRF token (SameSite=Strict on the cookie is a second, independent guard).

A session ends at log-out, after :attr:`SessionPolicy.idle_s` without a request, or
:attr:`SessionPolicy.max_age_s` after log-in, whichever comes first. Sessions live in
one coordinator's memory: a restart logs everyone out, and behind a load balancer the
console needs sticky sessions (the id means nothing to another coordinator).

The clock is the caller's (``now_s`` arguments) and so is randomness (``new_id``), so
expiry is tested without waiting.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
from collections.abc import Callable


def random_id() -> str:
    """A new unguessable id (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclasses.dataclass(frozen=True)
class SessionPolicy:
    """How long sessions last and how many one coordinator keeps."""

    idle_s: float = 30 * 60.0
    """A session unused this long ends."""
    max_age_s: float = 12 * 3600.0
    """A session ends this long after log-in however busy it is."""
    max_sessions: int = 1000
    """Above this, logging in ends the least recently used session: memory stays
    bounded whoever floods the log-in form with valid tokens."""

    def __post_init__(self) -> None:
        if self.idle_s <= 0 or self.max_age_s <= 0 or self.max_sessions < 1:
            raise ValueError("session lifetimes and max_sessions must be positive")


@dataclasses.dataclass
class Session:
    """One logged-in operator."""

    session_id: str
    csrf: str
    token: str = dataclasses.field(repr=False)
    """The API token the console calls the cluster with, as this operator."""
    admin: bool
    tenant: str
    """The tenant the token belongs to ("" for admins and when auth is off)."""
    created_s: float
    last_seen_s: float

    def expired(self, policy: SessionPolicy, now_s: float) -> bool:
        return (
            now_s - self.last_seen_s >= policy.idle_s or now_s - self.created_s >= policy.max_age_s
        )

    def csrf_ok(self, submitted: str | None) -> bool:
        """Whether a form's CSRF field matches this session's (constant time)."""
        return submitted is not None and hmac.compare_digest(
            submitted.encode(errors="replace"), self.csrf.encode()
        )


class Sessions:
    """Every live session of one console, by id. Not thread safe (one event loop)."""

    def __init__(self, policy: SessionPolicy, new_id: Callable[[], str] = random_id) -> None:
        self.policy = policy
        self._new_id = new_id
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, token: str, *, admin: bool, tenant: str, now_s: float) -> list[Session]:
        """Make a session; returns it first, then any sessions it evicted (least
        recently used, beyond ``max_sessions``) whose resources the caller frees."""
        session = Session(
            session_id=self._new_id(),
            csrf=self._new_id(),
            token=token,
            admin=admin,
            tenant=tenant,
            created_s=now_s,
            last_seen_s=now_s,
        )
        evicted = []
        while len(self._by_id) >= self.policy.max_sessions:
            oldest = min(self._by_id.values(), key=lambda s: s.last_seen_s)
            evicted.append(self._by_id.pop(oldest.session_id))
        self._by_id[session.session_id] = session
        return [session, *evicted]

    def touch(self, session_id: str | None, now_s: float) -> Session | None:
        """The live session with this id, marked used now; None when unknown or
        expired (an expired one is dropped; :meth:`sweep` returns it to free)."""
        session = self._by_id.get(session_id or "")
        if session is None or session.expired(self.policy, now_s):
            return None
        session.last_seen_s = now_s
        return session

    def close(self, session_id: str) -> Session | None:
        """End a session (log-out); the session, or None when there was none."""
        return self._by_id.pop(session_id, None)

    def sweep(self, now_s: float) -> list[Session]:
        """Drop every expired session and return them, for the caller to free."""
        gone = [s for s in self._by_id.values() if s.expired(self.policy, now_s)]
        for session in gone:
            del self._by_id[session.session_id]
        return gone


def same_secret(a: str | None, b: str | None) -> bool:
    """Whether two submitted secrets (e.g. the log-in form's field and its cookie) are
    both present and equal (constant time)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(errors="replace"), b.encode(errors="replace"))
