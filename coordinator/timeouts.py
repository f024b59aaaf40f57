"""The one table of waits between leader and nodes, and why each is as long as it is. Pure.

A node reports its own limits in its hello (:class:`NodeLimits`): how long an SMTP
transaction can still run after its final dot (its final-reply timeout), and how long a
whole transaction can take, slot and pacing waits included. The leader's waits are
derived from them, so they are always longer than what a node may still be doing:

- **authority** (``authority_s``): a node starts no transaction for a leader that has
  not sent a heartbeat for this long; heartbeats go out every
  ``heartbeat_interval_s`` and only while the leader trusts its election lease.
- **move after a node left** (:meth:`LeaderTimeouts.move_after_s`): a node whose lease
  is gone stopped starting transactions before it expired; those past their final dot
  end within its final-reply timeout. Only then can its batches go to another node
  without a second copy of what it was still sending; sooner when its address refuses
  connections and it has not registered again (:meth:`LeaderTimeouts.node_gone`).
- **stall** (:meth:`LeaderTimeouts.stall_s`): a node that holds a batch and reports
  nothing on it for several whole-transaction times is asked to stop it (a cancel),
  and the batch moves when the node releases it — never before.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NodeLimits:
    """A node's own upper bounds, from its hello; the defaults assume the node's."""

    final_reply_s: float = 60.0
    transaction_s: float = 180.0

    def __post_init__(self) -> None:
        if self.final_reply_s <= 0 or self.transaction_s < self.final_reply_s:
            raise ValueError("need 0 < final_reply_s <= transaction_s")

    @classmethod
    def from_ms(cls, final_reply_ms: int, transaction_ms: int) -> NodeLimits:
        """From a hello; zeros (an older node) give the defaults."""
        if final_reply_ms <= 0 or transaction_ms <= 0:
            return cls()
        final_s = final_reply_ms / 1000
        return cls(final_reply_s=final_s, transaction_s=max(final_s, transaction_ms / 1000))


@dataclasses.dataclass(frozen=True)
class LeaderTimeouts:
    election_ttl_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    authority_s: float = 3.0
    margin_s: float = 2.0
    """Added to every derived wait: clocks of two processes advance at slightly
    different rates, and messages take time."""
    rejoin_s: float = 1.0
    """How long after a node's lease is gone a refused dial may count as a dead process.
    A restarted node registers again as soon as its old lease is gone (it retries every
    0.5 s), and its hello replays what its journal holds; moving its batches before that
    would send its journaled deliveries again."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.margin_s < 0:
            raise ValueError("heartbeat_interval_s must be positive and margin_s not negative")
        if self.authority_s < 2 * self.heartbeat_interval_s:
            raise ValueError("authority_s must cover at least two heartbeat intervals")
        if self.authority_s > self.election_ttl_s:
            raise ValueError(
                "authority_s must not exceed the election TTL: a deposed leader's "
                "authority has to end by the time a new leader can be elected"
            )

    def move_after_s(self, node: NodeLimits) -> float:
        """How long after a node's lease is gone its batches may move."""
        return self.authority_s + node.final_reply_s + self.margin_s

    def node_gone(
        self, node: NodeLimits, *, left_at: float, refused_at: float | None, now: float
    ) -> bool:
        """Whether a node whose lease went at ``left_at`` can no longer be sending
        anything, so its batches may move.

        Once its lease is gone it starts no transaction; those past their final dot end
        within :meth:`move_after_s`. A node whose address refuses connections since its
        lease went (``refused_at``: the last refused dial) is a dead process, nothing of
        it in flight: it is gone once it has not registered again for ``rejoin_s``.
        """
        if refused_at is not None and refused_at >= left_at and now >= left_at + self.rejoin_s:
            return True
        return now >= left_at + self.move_after_s(node)

    def stall_s(self, node: NodeLimits) -> float:
        """How long a held batch may go without news before the leader asks it back."""
        return 3 * node.transaction_s + self.margin_s
