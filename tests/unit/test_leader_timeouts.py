"""When the batches of a node whose lease went may move."""

from __future__ import annotations

from coordinator.timeouts import LeaderTimeouts, NodeLimits

TIMEOUTS = LeaderTimeouts()
NODE = NodeLimits(final_reply_s=60.0, transaction_s=180.0)
LEFT = 100.0


def gone(refused_at: float | None, now: float) -> bool:
    return TIMEOUTS.node_gone(NODE, left_at=LEFT, refused_at=refused_at, now=now)


def test_without_a_refusal_the_batches_wait_for_the_final_reply_bound() -> None:
    move_at = LEFT + TIMEOUTS.move_after_s(NODE)
    assert not gone(None, move_at - 0.01)
    assert gone(None, move_at)


def test_a_refusal_since_the_lease_went_moves_them_once_the_node_had_time_to_rejoin() -> None:
    # A refusal right after the lease went: a restarted process may still be about to
    # register again (and replay its journal)
    assert not gone(LEFT + 0.1, LEFT + 0.2)
    assert not gone(LEFT + 0.1, LEFT + TIMEOUTS.rejoin_s - 0.01)
    # Past rejoin_s without registering again: a dead process
    assert gone(LEFT + 0.1, LEFT + TIMEOUTS.rejoin_s)


def test_a_refusal_from_before_the_lease_went_proves_nothing() -> None:
    # The process may have been restarting then; only the final-reply bound counts
    assert not gone(LEFT - 0.5, LEFT + 30.0)
