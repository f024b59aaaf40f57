"""Balancer: batches go to nodes in proportion to the capacity they report."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from coordinator.balancer import Balancer, Candidate


def test_two_nodes_get_batches_in_proportion_to_free_capacity() -> None:
    # Given a node with three times the free capacity of the other
    nodes = [Candidate("a", capacity=300, in_flight=0), Candidate("b", capacity=100, in_flight=0)]
    balancer = Balancer()
    # When 400 batches are chosen with loads unchanged
    picks = Counter(balancer.choose(nodes, 1) for _ in range(400))
    # Then they split exactly 3:1
    assert picks == {"a": 300, "b": 100}


def test_reported_load_reduces_share() -> None:
    # Given equal capacity but node a already holds 150 of its 200
    nodes = [Candidate("a", capacity=200, in_flight=150), Candidate("b", capacity=200, in_flight=0)]
    balancer = Balancer()
    picks = Counter(balancer.choose(nodes, 1) for _ in range(250))
    # Then b (free 200) gets four times as many as a (free 50)
    assert picks == {"a": 50, "b": 200}


def test_error_rate_lowers_weight() -> None:
    nodes = [
        Candidate("a", capacity=100, in_flight=0, error_rate=0.5),
        Candidate("b", capacity=100, in_flight=0),
    ]
    balancer = Balancer()
    picks = Counter(balancer.choose(nodes, 1) for _ in range(300))
    assert picks == {"a": 100, "b": 200}


def test_unschedulable_and_full_nodes_are_skipped() -> None:
    nodes = [
        Candidate("cordoned", capacity=100, in_flight=0, schedulable=False),
        Candidate("full", capacity=100, in_flight=90),
        Candidate("ok", capacity=100, in_flight=0),
    ]
    balancer = Balancer()
    assert {balancer.choose(nodes, 50) for _ in range(10)} == {"ok"}


def test_none_when_nothing_can_take_the_batch() -> None:
    nodes = [Candidate("a", capacity=100, in_flight=80), Candidate("b", capacity=0, in_flight=0)]
    assert Balancer().choose(nodes, 50) is None
    assert Balancer().choose([], 1) is None


def test_idle_node_takes_a_batch_larger_than_its_capacity() -> None:
    assert Balancer().choose([Candidate("a", capacity=10, in_flight=0)], 50) == "a"


@given(
    st.lists(
        st.tuples(st.integers(1, 500), st.integers(0, 500), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 100),
)
def test_choice_is_always_an_eligible_node(spec: list[tuple[int, int, bool]], size: int) -> None:
    nodes = [
        Candidate(f"n{i}", capacity=cap, in_flight=min(held, cap), schedulable=ok)
        for i, (cap, held, ok) in enumerate(spec)
    ]
    choice = Balancer().choose(nodes, size)
    eligible = {
        n.node_id
        for n in nodes
        if n.schedulable and (n.free >= size or (n.in_flight == 0 and n.capacity > 0))
    }
    if eligible:
        assert choice in eligible
    else:
        assert choice is None
