"""The rules of an etcd lease kept alive by its holder: pure, the clock passed in.

Both leased sessions follow them (the coordinator's election key and a sender node's
registration, through ``mailers_runtime.etcd.Session``):

- A lease is *trusted* until its TTL minus a safety margin has passed since the last
  successful grant or refresh was **sent**: etcd restarts the TTL no earlier than when
  it receives the request, so timing from the send never overstates what is left.
- A refresh is sent every TTL/3. After a failed one (an error or a timeout; an etcd
  leader election takes a second or two) the next is sent soon, after
  ``min(retry_s, TTL/6)``, so a single miss cannot cost the lease.
- A refresh answered with TTL 0 means the lease is gone (expired or revoked): aetcd
  reports that as a reply, not an error. A keepalive stream that ends without any reply
  is treated the same way: nothing confirmed the lease, and the holder starts over under
  a new one rather than keep acting on a lease it cannot vouch for.
- Each refresh may take half the trust left (:func:`attempt_deadline`): one sent to a
  member that never answers (it lost its peers, and its forward to the raft leader hangs)
  fails in time for the next to reach another member before trust ends.
- Once the trust deadline passes without a successful refresh, the lease is lost.

A lost lease stays lost: its holder must act as if its keys are gone and start a new
session. :class:`LeaseTrust` is that state machine; times are seconds on one monotonic
clock (the caller's).
"""

from __future__ import annotations

import enum

NO_REFRESH = "no successful refresh within the lease TTL minus the margin"
EXPIRED = "a refresh answered TTL 0: the lease expired or was revoked"
EMPTY = "the keepalive stream ended without a reply"


class Refresh(enum.Enum):
    """The result of one refresh (its value is the metric label)."""

    OK = "ok"
    """etcd confirmed the lease with a positive TTL."""
    EXPIRED = "expired"
    """etcd answered TTL 0: the lease is gone."""
    EMPTY = "empty"
    """The stream ended without a reply: treated as gone."""
    FAILED = "error"
    """The call raised or timed out: retried until the trust deadline."""


def classify_reply(ttl_s: int | None) -> Refresh:
    """What a refresh reply says, given its TTL (None: no reply at all)."""
    if ttl_s is None:
        return Refresh.EMPTY
    return Refresh.OK if ttl_s > 0 else Refresh.EXPIRED


def lease_trusted(last_ok_s: float, now_s: float, ttl_s: float, margin_s: float) -> bool:
    """Whether a lease last confirmed at ``last_ok_s`` surely still exists at ``now_s``.

    Args:
        last_ok_s: When the last successful grant or refresh was sent.
        now_s: The current time, on the same clock.
        ttl_s: The TTL the lease was granted or refreshed with.
        margin_s: Safety margin for clock rate differences and work in flight.
    """
    return now_s < trust_deadline(last_ok_s, ttl_s, margin_s)


def trust_deadline(last_ok_s: float, ttl_s: float, margin_s: float) -> float:
    """The time at which :func:`lease_trusted` turns false."""
    return last_ok_s + ttl_s - margin_s


MIN_ATTEMPT_S = 0.5
"""The shortest deadline :func:`attempt_deadline` gives while the trust left allows it: a
healthy member answers in milliseconds, a busy process may need some slack."""


def attempt_deadline(budget_s: float, call_timeout_s: float) -> float:
    """The deadline of one refresh with ``budget_s`` of trust left: half of it, so that a
    member which never answers leaves time for another attempt, but at least
    :data:`MIN_ATTEMPT_S`, and never more than the budget or ``call_timeout_s``."""
    return max(0.0, min(call_timeout_s, budget_s, max(budget_s / 2, MIN_ATTEMPT_S)))


class LeaseTrust:
    """What is known about one lease, and when to refresh it next.

    Args:
        ttl_s: The TTL etcd granted.
        margin_s: Trust ends this long before the lease could expire.
        granted_s: When the grant request was sent.
        retry_s: Longest pause before retrying a failed refresh.

    Raises:
        ValueError: a non-positive TTL or retry pause, or a negative margin.
    """

    def __init__(self, ttl_s: float, margin_s: float, granted_s: float, retry_s: float) -> None:
        if ttl_s <= 0 or retry_s <= 0 or margin_s < 0:
            raise ValueError("need ttl_s > 0, retry_s > 0 and margin_s >= 0")
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.retry_s = retry_s
        self.last_ok_s = granted_s
        self.next_refresh_s = granted_s + ttl_s / 3
        self.lost: str | None = None
        """Why the lease was lost; None while it may still be alive."""

    @property
    def deadline_s(self) -> float:
        """When trust ends unless a refresh succeeds first."""
        return trust_deadline(self.last_ok_s, self.ttl_s, self.margin_s)

    def trusted(self, now_s: float) -> bool:
        """Whether the lease surely still exists at ``now_s`` (never again once lost)."""
        return self.lost is None and now_s < self.deadline_s

    def poll(self, now_s: float) -> float | None:
        """Seconds to wait before sending the next refresh (0: now), or None once lost.

        Passing the trust deadline loses the lease here, with :data:`NO_REFRESH`.
        """
        if self.lost is None and now_s >= self.deadline_s:
            self.lost = NO_REFRESH
        if self.lost is not None:
            return None
        return max(0.0, min(self.next_refresh_s, self.deadline_s) - now_s)

    def record(
        self, result: Refresh, sent_s: float, now_s: float, ttl_s: float | None = None
    ) -> None:
        """Take in the result of a refresh sent at ``sent_s`` and ended at ``now_s``.

        Args:
            result: What the refresh came to.
            sent_s: When it was sent.
            now_s: When its result arrived.
            ttl_s: The TTL of an OK reply (the lease's TTL, which etcd restarted).
        """
        if self.lost is not None:
            return
        if result is Refresh.OK:
            if ttl_s is not None and ttl_s > 0:
                self.ttl_s = ttl_s
            # A slow reply cannot move trust back: keep the latest confirmed send.
            self.last_ok_s = max(self.last_ok_s, sent_s)
            self.next_refresh_s = self.last_ok_s + self.ttl_s / 3
        elif result is Refresh.EXPIRED:
            self.lost = EXPIRED
        elif result is Refresh.EMPTY:
            self.lost = EMPTY
        else:
            self.next_refresh_s = now_s + min(self.retry_s, self.ttl_s / 6)

    def lose(self, why: str) -> None:
        """Mark the lease lost (the first reason sticks)."""
        if self.lost is None:
            self.lost = why
