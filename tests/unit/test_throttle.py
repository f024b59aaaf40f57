"""Throttles: token bucket, concurrency and adaptive rate, on a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender_node.throttle import (
    AdaptivePolicy,
    AdaptiveRate,
    ConcurrencyLimiter,
    Limits,
    Throttles,
    TokenBucket,
    is_slow_down,
    recipient_domain,
)

STEPS = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.floats(0.1, 3, allow_nan=False)),
    max_size=60,
)


@given(
    rate=st.floats(0.1, 1000),
    burst=st.floats(1, 100),
    steps=STEPS,
)
def test_bucket_never_gives_more_than_burst_plus_rate_times_time(
    rate: float, burst: float, steps: list[tuple[float, float]]
) -> None:
    # Given a full bucket and any sequence of (time step, request size)
    bucket = TokenBucket.full(rate, burst, now_s=100.0)
    now = 100.0
    taken = 0.0
    for dt, count in steps:
        now += dt
        # When tokens are taken whenever the bucket allows it
        if bucket.try_take(now, count):
            taken += count
        # Then the bucket stays within [0, burst] and the total within the bound
        assert 0 <= bucket.tokens <= burst
        assert taken <= burst + rate * (now - 100.0) + 1e-6


@given(rate=st.floats(0.1, 1000), burst=st.floats(1, 100), count=st.floats(0.1, 100))
def test_waiting_wait_s_is_enough(rate: float, burst: float, count: float) -> None:
    bucket = TokenBucket.full(rate, burst, now_s=0.0)
    bucket.tokens = 0.0
    wait = bucket.wait_s(0.0, count)
    if count > burst:
        assert wait == math.inf
    else:
        assert wait == pytest.approx(count / rate)
        assert bucket.try_take(wait * (1 + 1e-9) + 1e-12, count)


def test_bucket_clock_going_backwards_adds_nothing_and_rate_change_keeps_earned_tokens() -> None:
    bucket = TokenBucket.full(10, 5, now_s=10.0)
    assert bucket.try_take(10.0, 5)
    assert not bucket.try_take(9.0)
    assert bucket.available(9.5) == 0
    # Half a second at 10/s earned 5 tokens... capped at burst; then the rate drops
    bucket.set_rate(1, now_s=10.2)
    assert bucket.available(10.2) == pytest.approx(2.0)
    assert bucket.available(11.2) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        bucket.set_rate(0, 12.0)
    with pytest.raises(ValueError):
        TokenBucket.full(1, 0.5, 0.0)
    with pytest.raises(ValueError):
        TokenBucket.full(math.inf, 1, 0.0)


@given(ops=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.booleans()), max_size=100))
def test_concurrency_limiter_matches_a_counting_model(ops: list[tuple[str, bool]]) -> None:
    limiter = ConcurrencyLimiter(2, {"a": 1, "c": 3})
    model: dict[str, int] = {}
    for key, acquire in ops:
        if acquire:
            allowed = model.get(key, 0) < limiter.limit(key)
            assert limiter.try_acquire(key) is allowed
            if allowed:
                model[key] = model.get(key, 0) + 1
        elif model.get(key, 0) > 0:
            limiter.release(key)
            model[key] -= 1
        else:
            with pytest.raises(ValueError):
                limiter.release(key)
        assert limiter.in_use(key) == model.get(key, 0) <= limiter.limit(key)
    assert limiter.total() == sum(model.values())


def test_concurrency_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimiter(0)
    with pytest.raises(ValueError):
        ConcurrencyLimiter(1, {"x": 0})


POLICY = AdaptivePolicy(
    max_rate_per_s=100, min_rate_per_s=1, decrease_factor=0.5, increase_per_s=10, cooldown_s=2
)


@given(events=st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.booleans()), max_size=50))
def test_adaptive_rate_stays_within_bounds_and_only_falls_on_a_cut(
    events: list[tuple[float, bool]],
) -> None:
    # Given any sequence of (time step, slow-down reply or not)
    rate = AdaptiveRate(POLICY)
    now = 0.0
    previous = rate.rate(now)
    for dt, slow_down in events:
        now += dt
        before = rate.rate(now)
        # Then without a cut the rate never falls, and it stays within [min, max]
        assert before >= previous - 1e-9
        cut = rate.on_slow_down(now) if slow_down else False
        after = rate.rate(now)
        if cut:
            assert after == pytest.approx(max(1.0, before * 0.5))
        else:
            assert after == pytest.approx(before)
        assert 1.0 <= after <= 100.0
        previous = after


def test_adaptive_rate_halves_ignores_replies_in_cooldown_and_recovers_linearly() -> None:
    # Given a rate of 100/s
    rate = AdaptiveRate(POLICY)
    # When a 421 arrives, the rate halves; more replies during the cooldown change nothing
    assert rate.on_slow_down(0.0)
    assert rate.rate(0.0) == 50
    assert not rate.on_slow_down(1.0)
    assert rate.rate(1.0) == 60
    # Then it recovers by 10/s until it is back at 100
    assert rate.rate(4.0) == 90
    assert not rate.recovered(4.0)
    assert rate.rate(5.0) == 100 and rate.recovered(5.0)
    # And a cut after the cooldown halves the current rate again
    assert rate.on_slow_down(6.0)
    assert rate.rate(6.0) == 50
    with pytest.raises(ValueError):
        AdaptivePolicy(max_rate_per_s=1, min_rate_per_s=2)
    with pytest.raises(ValueError):
        AdaptivePolicy(max_rate_per_s=1, decrease_factor=1)
    with pytest.raises(ValueError):
        AdaptivePolicy(max_rate_per_s=1, increase_per_s=0)
    with pytest.raises(ValueError):
        AdaptivePolicy(max_rate_per_s=1, cooldown_s=-1)


def test_throttles_combine_burst_concurrency_and_slow_down() -> None:
    # Given a domain allowed 10/s, burst 2, 2 at once
    throttles = Throttles(
        Limits(rate_per_s=100),
        {"slow.example": Limits(rate_per_s=10, burst=2, max_concurrency=2, increase_per_s=1)},
    )
    key = recipient_domain("Ann@Slow.Example")
    assert key == "slow.example"
    # When three transactions start at once, the third waits for a release
    assert throttles.try_acquire(key, 0.0).ok
    assert throttles.try_acquire(key, 0.0).ok
    assert throttles.try_acquire(key, 0.0) == throttles.try_acquire(key, 0.0)
    assert throttles.try_acquire(key, 0.0).retry_after_s is None
    throttles.release(key)
    # And, with the burst spent, the next waits for a token (1/10 s)
    admission = throttles.try_acquire(key, 0.0)
    assert not admission.ok and admission.retry_after_s == pytest.approx(0.1)
    assert throttles.try_acquire(key, 0.1).ok
    assert throttles.in_flight(key) == 2
    # When the domain answers 421, its rate halves; a 250 or a 550 changes nothing
    assert not throttles.on_reply(key, 250, 0.2)
    assert not throttles.on_reply(key, 550, 0.2)
    assert throttles.on_reply(key, 421, 0.2)
    assert throttles.rate(key, 0.2) == 5
    assert not throttles.on_reply(key, 451, 0.3)
    # Then other domains are not affected
    assert throttles.rate("other.example", 0.3) == 100
    throttles.release(key)
    throttles.release(key)
    with pytest.raises(ValueError):
        throttles.release(key)
    with pytest.raises(ValueError):
        throttles.release("never.example")


def test_idle_recovered_keys_are_pruned() -> None:
    throttles = Throttles(Limits(rate_per_s=10, increase_per_s=1), idle_s=60)
    assert throttles.try_acquire("a.example", 0.0).ok
    assert throttles.try_acquire("b.example", 0.0).ok
    throttles.release("b.example")
    throttles.on_reply("b.example", 421, 0.0)
    # a is in flight, b was cut and recovers after 5 s, both idle after 60 s
    assert throttles.prune(30.0) == 0
    assert throttles.prune(61.0) == 1
    assert len(throttles) == 1
    throttles.release("a.example")
    assert throttles.prune(61.0) == 1 and len(throttles) == 0


def test_slow_down_codes_and_limits_validation() -> None:
    assert is_slow_down(421) and is_slow_down(451)
    assert not is_slow_down(450) and not is_slow_down(550) and not is_slow_down(250)
    with pytest.raises(ValueError):
        Limits(burst=0)
    with pytest.raises(ValueError):
        Limits(max_concurrency=0)
    with pytest.raises(ValueError):
        Limits(rate_per_s=0)
    assert Limits(rate_per_s=0.2).policy().min_rate_per_s == 0.2
