"""When a node may start a transaction: epochs, authority, and the node's own state."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from sender_node.fencing import (
    LEASE_UNTRUSTED,
    NO_AUTHORITY,
    NOT_CURRENT,
    STALE_EPOCH,
    STREAM_ENDED,
    EpochFence,
    StreamView,
    authority_until,
    start_refusal,
)

OPEN = StreamView(epoch=7, current=True, open=True, authority_until_s=110.0)


def refusal(
    stream: StreamView = OPEN,
    *,
    now_s: float = 100.0,
    highest_epoch: int = 7,
    lease_trusted: bool = True,
    stopping: str | None = None,
) -> str | None:
    return start_refusal(
        stream,
        now_s=now_s,
        highest_epoch=highest_epoch,
        lease_trusted=lease_trusted,
        stopping=stopping,
    )


def test_a_current_authorized_stream_of_the_leading_epoch_may_start() -> None:
    assert refusal() is None


def test_each_condition_alone_refuses() -> None:
    assert refusal(dataclasses.replace(OPEN, open=False)) == STREAM_ENDED
    assert refusal(dataclasses.replace(OPEN, current=False)) == NOT_CURRENT
    assert refusal(highest_epoch=8) == STALE_EPOCH
    assert refusal(now_s=110.0) == NO_AUTHORITY
    assert refusal(lease_trusted=False) == LEASE_UNTRUSTED
    assert refusal(stopping="drain timed out") == "drain timed out"


def test_authority_runs_for_the_grant_and_no_longer_than_the_cap() -> None:
    # Given a heartbeat received at t=50 granting 3 s, with at most 4 s allowed
    assert authority_until(50.0, 3000, max_authority_s=4.0) == 53.0
    # A grant above the cap is cut to it
    assert authority_until(50.0, 60_000, max_authority_s=4.0) == 54.0
    # A non-positive grant gives nothing
    assert authority_until(50.0, 0, max_authority_s=4.0) == 50.0
    assert authority_until(50.0, -5, max_authority_s=4.0) == 50.0


@given(
    st.floats(min_value=0, max_value=1e6),
    st.integers(min_value=-(10**6), max_value=10**9),
    st.floats(min_value=0.001, max_value=60),
)
def test_authority_never_exceeds_the_cap(received: float, grant_ms: int, cap: float) -> None:
    until = authority_until(received, grant_ms, cap)
    assert received <= until <= received + cap


def test_the_fence_only_rises() -> None:
    fence = EpochFence()
    assert fence.admits(1)
    assert fence.observe(5)
    assert not fence.observe(3)
    assert not fence.observe(5)
    assert fence.highest == 5
    assert fence.admits(5) and fence.admits(6)
    assert not fence.admits(4)


@given(st.lists(st.integers(min_value=0, max_value=1000)))
def test_the_fence_holds_the_highest_epoch_seen(epochs: list[int]) -> None:
    fence = EpochFence()
    for epoch in epochs:
        fence.observe(epoch)
    assert fence.highest == max(epochs, default=0)
