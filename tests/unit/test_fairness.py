"""Dispatch rounds: priority first, then tenants take turns, then a tenant's jobs."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from coordinator.fairness import Eligible, round_order


def test_a_tenant_with_many_jobs_gets_the_same_share_as_one_with_a_single_job() -> None:
    # Given tenant a with ten campaigns and tenant b with one
    jobs = [Eligible(f"a{i}", "a", 0) for i in range(10)] + [Eligible("b0", "b", 0)]
    # When 100 rounds are dispatched
    picks = Counter(job for turn in range(100) for job in round_order(jobs, turn))
    # Then each tenant got 100 batches, and a's jobs shared its 100 evenly
    assert picks["b0"] == 100
    assert sum(n for j, n in picks.items() if j.startswith("a")) == 100
    assert {picks[f"a{i}"] for i in range(10)} == {10}


def test_higher_priority_comes_first_in_every_round() -> None:
    jobs = [Eligible("bulk", "a", 0), Eligible("otp", "b", 10), Eligible("news", "c", 0)]
    for turn in range(5):
        assert round_order(jobs, turn)[0] == "otp"


def test_tenant_order_rotates() -> None:
    jobs = [Eligible("x", "a", 0), Eligible("y", "b", 0)]
    assert round_order(jobs, 0) == ["x", "y"]
    assert round_order(jobs, 1) == ["y", "x"]


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 2)), min_size=1, max_size=12),
    st.integers(0, 1000),
)
def test_one_job_per_tenant_and_priority_each_round(spec: list[tuple[str, int]], turn: int) -> None:
    jobs = [Eligible(f"j{i}", tenant, prio) for i, (tenant, prio) in enumerate(spec)]
    order = round_order(jobs, turn)
    groups = {(j.tenant, j.priority) for j in jobs}
    assert len(order) == len(groups) == len(set(order))
    by_id = {j.job_id: j for j in jobs}
    priorities = [by_id[j].priority for j in order]
    assert priorities == sorted(priorities, reverse=True)
