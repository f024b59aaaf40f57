"""Throttles: token bucket, concurrency, rate meter, adaptive rate and the per-domain
limits syntax, on a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender_node.throttle import (
    AdaptivePolicy,
    AdaptiveRate,
    Admission,
    ConcurrencyLimiter,
    KeyStatus,
    Limits,
    RateMeter,
    Throttles,
    TokenBucket,
    is_slow_down,
    parse_domain_limits,
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
    # Given a domain allowed 10/s, burst 2, 2 at once (and a default of 100/s)
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
    for bad in (
        {"rate_per_s": math.inf},
        {"burst": math.nan},
        {"min_rate_per_s": 0},
        {"decrease_factor": 1},
        {"increase_per_s": 0},
        {"recovery_s": 0},
        {"cooldown_s": -1},
    ):
        with pytest.raises(ValueError):
            Limits(**bad)
    with pytest.raises(ValueError, match="no rate configured"):
        Limits().policy()
    with pytest.raises(ValueError):
        Throttles(idle_s=0)


# -- the rate meter -------------------------------------------------------------------


def _send(meter: RateMeter, start_s: float, rate_per_s: float, duration_s: float) -> float:
    """Record events at ``rate_per_s`` from ``start_s`` for ``duration_s``; returns the
    time of the last one."""
    count = round(rate_per_s * duration_s)
    for i in range(count):
        meter.record(start_s + i / rate_per_s)
    return start_s + (count - 1) / rate_per_s


def test_meter_measures_a_steady_rate_and_a_burst_after_a_pause() -> None:
    # Given a key sent at 1,000/s for 20 s
    meter = RateMeter()
    last = _send(meter, 100.0, 1000, 20)
    # Then it reads 1,000/s
    assert meter.rate(last) == pytest.approx(1000, rel=0.01)
    # When it pauses 20 s and then gets a burst at 2,000/s for half a second
    last = _send(meter, last + 20, 2000, 0.5)
    # Then the burst is measured at about its own rate, not averaged with the pause (the
    # traffic before the pause still weighs a little)
    assert meter.rate(last) == pytest.approx(2000, rel=0.15)
    # And once sending stops, the reading falls towards 0
    assert meter.rate(last + 5) < meter.rate(last) / 2
    assert meter.rate(last + 60) < 1.0


def test_meter_first_events_clock_going_backwards_and_validation() -> None:
    meter = RateMeter(min_span_s=0.1)
    assert meter.rate(5.0) == 0
    # The first events never read as an infinite rate
    meter.record(10.0)
    assert meter.rate(10.0) == pytest.approx(10.0)
    # A clock going backwards counts as no time passing
    meter.record(9.0)
    assert meter.rate(9.0) == pytest.approx(20.0)
    for bad in ({"tau_s": 0}, {"idle_gap_s": math.inf}, {"min_span_s": 0}):
        with pytest.raises(ValueError):
            RateMeter(**bad)


def _reference_rate(times: list[float], now_s: float, tau_s: float, idle_gap_s: float) -> float:
    """The meter's definition, summed directly: each event decays by its age, and the
    span is the decayed integral of the active time (each gap up to ``idle_gap_s``
    counts from its start, plus the time since the last event)."""
    count = sum(math.exp(-(now_s - t) / tau_s) for t in times)
    span = 0.0
    for before, after in zip(times, times[1:], strict=False):
        active = min(after - before, idle_gap_s)
        # the integral of exp(-(now - u) / tau) over [before, before + active]
        span += tau_s * (
            math.exp(-(now_s - before - active) / tau_s) - math.exp(-(now_s - before) / tau_s)
        )
    span += tau_s * -math.expm1(-(now_s - times[-1]) / tau_s)
    return count / max(span, 0.1)


@given(gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=40))
def test_meter_matches_its_definition_for_any_gaps(gaps: list[float]) -> None:
    # Gaps below and above idle_gap_s take different paths through record()
    meter = RateMeter(tau_s=5.0, idle_gap_s=1.0, min_span_s=0.1)
    times = [100.0]
    for gap in gaps:
        times.append(times[-1] + gap)
    for t in times:
        meter.record(t)
    now_s = times[-1] + 0.25
    assert meter.rate(now_s) == pytest.approx(
        _reference_rate(times, now_s, 5.0, 1.0), rel=1e-9, abs=1e-12
    )


def test_adaptive_rate_cuts_from_the_observed_rate_when_it_is_lower() -> None:
    # Given a rate allowed 100/s but a key sent at 30/s
    rate = AdaptiveRate(POLICY)
    # When a 421 arrives, the cut starts from the 30/s actually sent
    assert rate.on_slow_down(0.0, observed_rate_per_s=30)
    assert rate.rate(0.0) == 15
    # And an observed rate above the allowed one (recovered to 100/s) does not raise it
    assert rate.rate(10.0) == 100
    assert rate.on_slow_down(10.0, observed_rate_per_s=1e6)
    assert rate.rate(10.0) == 50


# -- default policy: concurrency only, slow-down from the measured rate ----------------


def test_default_limits_bound_concurrency_only() -> None:
    # Given the default limits: 20 at once per domain, no rate
    throttles = Throttles()
    assert Limits().max_concurrency == 20 and Limits().rate_per_s is None
    # When 10,000 transactions to one domain start (and end) at one instant
    for _ in range(10_000):
        assert throttles.try_acquire("gmail.com", 5.0).ok
        throttles.release("gmail.com")
    # Then none waited for a token; only the 21st at once waits, for a release
    for _ in range(20):
        assert throttles.try_acquire("gmail.com", 5.0).ok
    assert throttles.try_acquire("gmail.com", 5.0) == Admission(ok=False, retry_after_s=None)
    assert throttles.rate("gmail.com", 5.0) is None
    assert not throttles.status("gmail.com", 5.0).slowed_down


def _admitted(throttles: Throttles, key: str, start_s: float, end_s: float, step_s: float) -> int:
    """Ask for a slot every ``step_s`` (ending each transaction at once); count admissions."""
    taken = 0
    for i in range(round((end_s - start_s) / step_s) + 1):
        if throttles.try_acquire(key, start_s + i * step_s).ok:
            throttles.release(key)
            taken += 1
    return taken


def test_slow_down_on_an_unlimited_domain_paces_it_below_the_measured_rate_then_lifts() -> None:
    # Given a domain without a rate, sent at 200/s for 10 s
    throttles = Throttles()
    key = "big.example"
    assert _admitted(throttles, key, 0.0, 10.0, 0.005) == 2001
    now = 10.0
    measured = throttles.measured_rate(key, now)
    assert measured == pytest.approx(200, rel=0.02)
    # When it answers 421
    assert throttles.on_reply(key, 421, now)
    # Then it gets a rate of half the measured one; a 451 in the cooldown changes nothing
    assert throttles.rate(key, now) == pytest.approx(measured / 2)
    assert throttles.status(key, now).slowed_down
    assert not throttles.on_reply(key, 451, now + 1)
    # And over the next second it is admitted at that rate, growing by measured/60 per s
    taken = _admitted(throttles, key, now, now + 1, 0.001)
    assert measured / 2 - 2 <= taken <= 1 + measured / 2 + measured / 60 + 1
    # Then it recovers linearly, and after 30 s it has no rate again
    assert throttles.rate(key, now + 15) == pytest.approx(measured * 0.75)
    assert throttles.rate(key, now + 29.9) is not None
    assert throttles.rate(key, now + 30.0) is None
    assert not throttles.status(key, now + 30).slowed_down
    for _ in range(10_000):
        assert throttles.try_acquire(key, now + 30).ok
        throttles.release(key)


def test_slow_down_series_on_an_unlimited_domain_recovers_within_60_s() -> None:
    # Given a domain sent at 100/s, then as fast as allowed while it answers 421 three
    # times, 5 s apart
    throttles = Throttles()
    key = "big.example"
    _admitted(throttles, key, 0.0, 10.0, 0.01)
    measured = throttles.measured_rate(key, 10.0)
    after_cuts: list[float] = []
    for at in (10.0, 15.0, 20.0):
        assert throttles.on_reply(key, 421, at)
        rate = throttles.rate(key, at)
        assert rate is not None
        after_cuts.append(rate)
        _admitted(throttles, key, at, at + 5, 0.001)
    # Then each cut went deeper (halving what 5 s of recovery had added to the last one)
    assert after_cuts == sorted(after_cuts, reverse=True)
    assert after_cuts[-1] < measured / 4
    # And the rate is lifted within 60 s of the last cut
    assert throttles.rate(key, 21.0) is not None
    assert throttles.rate(key, 20.0 + 60.0) is None


def test_slow_down_on_a_key_sent_at_or_below_the_minimum_rate_changes_nothing() -> None:
    throttles = Throttles()
    assert not throttles.on_reply("quiet.example", 421, 0.0)
    assert throttles.try_acquire("quiet.example", 0.0).ok
    throttles.release("quiet.example")
    assert not throttles.on_reply("quiet.example", 421, 100.0)
    assert throttles.rate("quiet.example", 100.0) is None


def test_a_configured_rate_is_cut_from_what_was_sent_and_recovers_to_the_configured_one() -> None:
    # Given a domain allowed 100/s but sent at 20/s
    throttles = Throttles(overrides={"d.example": Limits(rate_per_s=100)})
    _admitted(throttles, "d.example", 0.0, 10.0, 0.05)
    # When it answers 421
    assert throttles.on_reply("d.example", 421, 10.0)
    # Then the rate is half the 20/s sent (not half of the 100/s allowed)
    assert throttles.rate("d.example", 10.0) == pytest.approx(10, rel=0.05)
    # And it grows by 100/60 per second back to 100/s, where it stays
    assert throttles.rate("d.example", 40.0) == pytest.approx(10 + 50, rel=0.05)
    assert throttles.rate("d.example", 70.0) == 100
    assert throttles.rate("d.example", 1000.0) == 100
    assert not throttles.status("d.example", 1000.0).slowed_down


OPS = st.lists(
    st.tuples(
        st.floats(0, 2, allow_nan=False),
        st.sampled_from(["acquire", "acquire", "release", "slow_down", "ok"]),
    ),
    max_size=150,
)


@given(rate=st.floats(0.5, 500), burst=st.floats(1, 50), ops=OPS)
def test_a_configured_rate_holds_over_any_window(
    rate: float, burst: float, ops: list[tuple[float, str]]
) -> None:
    # Given a domain allowed `rate`/s with `burst`, 3 at once, and any sequence of
    # acquisitions, releases and replies
    throttles = Throttles(
        overrides={"d": Limits(rate_per_s=rate, burst=burst, max_concurrency=3)}, idle_s=1
    )
    now = 0.0
    held = 0
    admitted: list[float] = []
    for dt, op in ops:
        now += dt
        if op == "acquire":
            admission = throttles.try_acquire("d", now)
            if admission.ok:
                admitted.append(now)
                held += 1
            else:
                # A refusal says why: concurrency (None) or a token due later
                assert (admission.retry_after_s is None) is (held >= 3)
        elif op == "release" and held:
            throttles.release("d")
            held -= 1
        elif op in ("slow_down", "ok"):
            throttles.on_reply("d", 421 if op == "slow_down" else 250, now)
        assert throttles.in_flight("d") == held <= 3
        allowed = throttles.rate("d", now)
        assert allowed is not None and 0.5 * min(1, rate) <= allowed <= rate
    # Then every window [t_i, t_j] holds at most burst + rate * (t_j - t_i) admissions
    for i, first in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= burst + rate * (admitted[j] - first) + 1e-6


# -- pruning ---------------------------------------------------------------------------


def test_memory_stays_bounded_with_100k_domains() -> None:
    # Given throttles that forget keys idle for 30 s
    throttles = Throttles(idle_s=30)
    most = 0
    # When 100,000 distinct domains get one message each, 100 a second
    for i in range(100_000):
        now = i * 0.01
        key = f"d{i}.example"
        assert throttles.try_acquire(key, now).ok
        throttles.release(key)
        most = max(most, len(throttles))
    # Then they are forgotten on the way: never more than 2 * idle_s seconds' worth
    assert most <= 2 * 30 * 100 + 1
    # And once all are idle, a prune forgets the rest
    throttles.prune(now + 30)
    assert len(throttles) == 0


def test_a_slowed_down_domain_is_kept_until_it_has_recovered() -> None:
    # Given an unlimited domain cut by a 421 at t=10
    throttles = Throttles(idle_s=5)
    _admitted(throttles, "a.example", 0.0, 10.0, 0.01)
    assert throttles.on_reply("a.example", 421, 10.0)
    # Then it is not forgotten while the cut lasts (forgetting it would lift the cut)
    assert throttles.prune(20.0) == 0 and throttles.prune(39.0) == 0
    # And it is once recovered
    assert throttles.prune(40.0) == 1 and len(throttles) == 0


def test_a_configured_domain_is_kept_until_its_bucket_is_full() -> None:
    # Given a domain allowed 0.1/s whose only token was taken
    throttles = Throttles(overrides={"slow": Limits(rate_per_s=0.1, burst=1)}, idle_s=5)
    assert throttles.try_acquire("slow", 0.0).ok
    throttles.release("slow")
    # Then it is kept until the bucket is full again (10 s), so forgetting changes nothing
    assert throttles.prune(9.0) == 0
    assert throttles.prune(10.0) == 1


def test_snapshot_reports_each_key() -> None:
    throttles = Throttles(overrides={"r": Limits(rate_per_s=5, max_concurrency=2)})
    assert throttles.try_acquire("r", 0.0).ok
    assert throttles.try_acquire("u", 0.0).ok
    snapshot = throttles.snapshot(0.0)
    assert snapshot["r"] == KeyStatus(
        in_flight=1,
        max_concurrency=2,
        rate_per_s=5,
        measured_rate_per_s=10.0,  # one message in the shortest span read (0.1 s)
        slowed_down=False,
    )
    assert snapshot["u"].rate_per_s is None and snapshot["u"].max_concurrency == 20
    assert throttles.status("never", 0.0).in_flight == 0


# -- MAILER_DOMAIN_LIMITS syntax --------------------------------------------------------


def test_parse_domain_limits() -> None:
    # Given the example of the issue
    default, overrides = parse_domain_limits(
        "default=concurrency:20;gmail.com=rate:10,burst:5,concurrency:4;yahoo.com=rate:5"
    )
    # Then unnamed settings come from the default
    assert default == Limits(max_concurrency=20)
    assert overrides == {
        "gmail.com": Limits(rate_per_s=10, burst=5, max_concurrency=4),
        "yahoo.com": Limits(rate_per_s=5),
    }
    # And `default` applies wherever it is written; domains are lower-cased
    default, overrides = parse_domain_limits(
        " GMail.COM = rate:1.5 , min_rate:0.1, decrease:0.7, increase:2, recovery:30,"
        " cooldown:0 ; default=concurrency:7,rate:1000 ; big.example=rate:none ;"
    )
    assert default == Limits(max_concurrency=7, rate_per_s=1000)
    assert overrides["gmail.com"] == Limits(
        rate_per_s=1.5,
        max_concurrency=7,
        min_rate_per_s=0.1,
        decrease_factor=0.7,
        increase_per_s=2,
        recovery_s=30,
        cooldown_s=0,
    )
    assert overrides["big.example"] == Limits(max_concurrency=7, rate_per_s=None)
    for empty in ("", "  ", ";;"):
        assert parse_domain_limits(empty) == (Limits(), {})


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("gmail.com=rate:fast", ["gmail.com", "rate", "'fast'"]),
        ("gmail.com=rate:0", ["gmail.com", "rate"]),
        ("gmail.com=rate:inf", ["gmail.com", "rate"]),
        ("gmail.com=speed:3", ["gmail.com", "speed"]),
        ("yahoo.com=concurrency:0", ["yahoo.com", "concurrency"]),
        ("yahoo.com=concurrency:2.5", ["yahoo.com", "concurrency"]),
        ("a.example=burst:0.5", ["a.example", "burst"]),
        ("a.example=decrease:1.5", ["a.example", "decrease"]),
        ("a.example=increase:nan", ["a.example", "increase"]),
        ("a.example=min_rate:-1", ["a.example", "min_rate"]),
        ("a.example=recovery:0", ["a.example", "recovery"]),
        ("default=cooldown:-1", ["default", "cooldown"]),
        ("a.example=rate", ["a.example", "rate"]),
        ("a.example=rate:1,rate:2", ["a.example", "rate", "twice"]),
        ("a.example=rate:1;A.example=rate:2", ["a.example", "twice"]),
        ("a.example=", ["a.example", "no settings"]),
        ("gmail.com", ["gmail.com"]),
        ("=rate:1", ["=rate:1"]),
        ("ann@x.example=rate:1", ["ann@x.example"]),
    ],
)
def test_parse_domain_limits_errors_name_the_domain_and_the_key(
    spec: str, named: list[str]
) -> None:
    with pytest.raises(ValueError) as raised:
        parse_domain_limits(spec)
    for word in named:
        assert word in str(raised.value)
