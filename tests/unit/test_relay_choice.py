"""Relay choice: failover order, smooth weighted round-robin, and waiting for tokens. Pure."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender_node.relay_choice import Candidate, Choice, RelayChooser, SmoothWeighted, Strategy


def test_strategy_parses_names_case_insensitively() -> None:
    assert Strategy.parse(" Balance ") is Strategy.BALANCE
    assert Strategy.parse("failover") is Strategy.FAILOVER
    with pytest.raises(ValueError, match="unknown relay strategy 'random'"):
        Strategy.parse("random")


def test_smooth_weighted_interleaves_rather_than_bursts() -> None:
    # Given weights 3:1
    wrr = SmoothWeighted([3, 1])

    # When eight picks are made among both
    picks = [wrr.pick([0, 1]) for _ in range(8)]

    # Then each cycle of four gives three to the first, spread out (nginx's sequence)
    assert picks == [0, 0, 1, 0] * 2
    assert wrr.scores == (0, 0)


def test_smooth_weighted_five_one_one_is_nginx_sequence() -> None:
    wrr = SmoothWeighted([5, 1, 1])
    assert [wrr.pick([0, 1, 2]) for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


@given(
    weights=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    cycles=st.integers(1, 5),
)
def test_every_cycle_gives_each_relay_exactly_its_weight(weights: list[int], cycles: int) -> None:
    # Given any weights, and every relay eligible
    wrr = SmoothWeighted(weights)
    everyone = range(len(weights))

    # When sum(weights) * cycles picks are made
    counts = collections.Counter(wrr.pick(everyone) for _ in range(sum(weights) * cycles))

    # Then each relay got exactly weight * cycles of them, and the state is back at zero
    assert [counts[i] for i in everyone] == [w * cycles for w in weights]
    assert wrr.scores == (0,) * len(weights)


@given(
    weights=st.lists(st.integers(1, 9), min_size=2, max_size=6),
    eligible=st.lists(st.sets(st.integers(0, 5), min_size=1), min_size=1, max_size=40),
)
def test_picks_are_always_eligible_and_scores_sum_to_zero(
    weights: list[int], eligible: list[set[int]]
) -> None:
    wrr = SmoothWeighted(weights)
    for allowed in eligible:
        allowed = {i % len(weights) for i in allowed}
        assert wrr.pick(allowed) in allowed
        assert sum(wrr.scores) == 0


def test_smooth_weighted_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        SmoothWeighted([])
    with pytest.raises(ValueError):
        SmoothWeighted([1, 0])
    wrr = SmoothWeighted([1, 1])
    with pytest.raises(ValueError, match="nothing"):
        wrr.pick([])
    with pytest.raises(ValueError, match="unknown index"):
        wrr.pick([2])


def test_no_candidate_no_choice() -> None:
    assert RelayChooser(Strategy.FAILOVER, [1]).choose([]) is None
    assert RelayChooser(Strategy.BALANCE, [1]).choose([]) is None


def test_failover_takes_the_first_candidate_and_waits_for_its_tokens() -> None:
    chooser = RelayChooser(Strategy.FAILOVER, [1, 1, 1])
    # Given the preferred relay (index 0) skipped by its breaker: the next one in order
    assert chooser.choose([Candidate(1), Candidate(2)]) == Choice(1, 0.0)
    # Given the first candidate out of tokens for 0.25 s while the next has some
    # Then failover waits for its preferred relay rather than spilling over
    assert chooser.choose([Candidate(0, 0.25), Candidate(1)]) == Choice(0, 0.25)


def test_balance_prefers_relays_with_tokens() -> None:
    chooser = RelayChooser(Strategy.BALANCE, [3, 1])
    # Given the heavier relay out of tokens
    # Then the lighter one takes the message now, instead of waiting
    assert chooser.choose([Candidate(0, 0.5), Candidate(1)]) == Choice(1, 0.0)


def test_balance_waits_for_the_soonest_when_none_has_tokens() -> None:
    chooser = RelayChooser(Strategy.BALANCE, [1, 1, 1])
    choice = chooser.choose([Candidate(0, 0.5), Candidate(1, 0.125), Candidate(2, 0.125)])
    # Then the soonest (lowest index on a tie), and a wait is not a pick: no state change
    assert choice == Choice(1, 0.125)
    assert [chooser.choose([Candidate(i) for i in range(3)]) for _ in range(3)] == [
        Choice(0, 0.0),
        Choice(1, 0.0),
        Choice(2, 0.0),
    ]


def test_balance_400_picks_at_3_to_1_are_exactly_300_and_100() -> None:
    chooser = RelayChooser(Strategy.BALANCE, [3, 1])
    picks = collections.Counter(
        choice.index
        for _ in range(400)
        if (choice := chooser.choose([Candidate(0), Candidate(1)])) is not None
    )
    assert picks == {0: 300, 1: 100}
