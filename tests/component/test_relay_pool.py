"""``RelayPool`` against real SMTP sinks on loopback: breakers, failover, deadlines,
protocol faults, and cancellation around the final dot.

Real pieces: the pool (aiosmtplib for connection setup, our wire for transactions, one
pybreaker breaker and one trial gate per relay) and ``mailers_dev.sink.SinkServer``
in-process, whose fault plan each test changes at runtime. Every test runs twice: with
relays advertising PIPELINING (the pool pipelines each envelope) and with relays that do
not (one command per reply); the assertions are the same, so the same faults give the
same outcomes both ways. Breaker reset timeouts are real wall-clock time (pybreaker
reads the clock), so they are kept to a fraction of a second; the pure policy with a
fake clock is in ``tests/unit/test_relay_breaker.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mailers_dev.procs import free_port
from mailers_dev.sink import FaultPlan, SinkConfig, SinkServer, Window, read_log
from mailers_runtime.breaker import BreakerState
from sender_node.classify import Failure, Outcome, Phase, classify
from sender_node.smtp_client import RelayPool, SendAborted, SendOutcome
from tests.helpers import assert_eventually

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
FROM = "news@example.com"
RESET_S = 0.2

StartSink = Callable[[FaultPlan], Awaitable[SinkServer]]


def message(n: int, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: {FROM}\r\nTo: r{n}@example.org\r\nSubject: test {n}\r\n"
        f"Message-ID: <m{n}@example.com>\r\n\r\n"
    ).encode() + body


def verdict(outcome: SendOutcome) -> Outcome:
    return classify(outcome.code, outcome.text, outcome.phase, outcome.failure).outcome


async def wait_reset() -> None:
    # The breaker's reset timeout is wall-clock time inside pybreaker; nothing to poll.
    await asyncio.sleep(RESET_S * 1.5)


@pytest.fixture(params=[True, False], ids=["pipelined", "unpipelined"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Whether the relays advertise PIPELINING (and so whether the pool pipelines)."""
    return bool(request.param)


@pytest.fixture
async def sinks(tmp_path: Path, pipelining: bool) -> AsyncIterator[StartSink]:
    started: list[SinkServer] = []

    async def start(plan: FaultPlan) -> SinkServer:
        n = len(started)
        config = SinkConfig(
            maildir=tmp_path / f"md{n}", log_path=tmp_path / f"{n}.log", pipelining=pipelining
        )
        sink = SinkServer(config)
        await sink.start()
        sink.set_faults(plan)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        await sink.stop()


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., RelayPool]]:
    made: list[RelayPool] = []

    def make(relays: list[str], **kwargs: float) -> RelayPool:
        options: dict[str, float] = {"timeout_s": 5.0, "cooldown_s": RESET_S}
        options.update(kwargs)
        pool = RelayPool(relays, connections_per_relay=4, **options)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


async def test_relay_faults_open_the_breaker_and_traffic_fails_over(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a preferred relay answering 421 to every MAIL, and a healthy second relay
    a = await sinks(FaultPlan(tempfail=Window()))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], breaker_failures=3, cooldown_s=60)

    # When three messages are sent
    outcomes = [await pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(3)]

    # Then each was refused by the first relay and delivered through the second
    assert [(o.code, o.relay) for o in outcomes] == [(250, b.address)] * 3
    assert a.stats.tempfailed == 3
    # And three relay faults in a row opened the first relay's breaker
    first = pool.relays()[0]
    assert (first.breaker_state, first.cooling_down, first.consecutive_failures) == (OPEN, True, 3)
    assert pool.relays()[1].breaker_state is CLOSED

    # When more messages follow
    outcomes = [await pool.send(FROM, f"s{i}@example.org", message(10 + i)) for i in range(5)]

    # Then they go straight to the second relay: the open one is not even tried
    assert {o.relay for o in outcomes} == {b.address}
    assert a.stats.tempfailed == 3
    assert b.stats.messages == 8


async def test_failover_follows_the_configured_order(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given relays in order: one with nothing listening, then B, then C
    b = await sinks(FaultPlan())
    c = await sinks(FaultPlan())
    pool = pools([f"127.0.0.1:{free_port()}", b.address, c.address], breaker_failures=2)

    # When messages are sent
    for i in range(4):
        assert (await pool.send(FROM, f"r{i}@example.org", message(i))).relay == b.address

    # Then the first available relay in order takes them all, the third none
    assert (b.stats.messages, c.stats.messages) == (4, 0)
    assert [r.breaker_state for r in pool.relays()] == [OPEN, CLOSED, CLOSED]

    # When B starts refusing too
    b.set_faults(FaultPlan(tempfail=Window()))
    for i in range(4):
        assert (await pool.send(FROM, f"s{i}@example.org", message(10 + i))).code == 250

    # Then C takes over and B's breaker opens after its second fault (three 421s: the
    # first came on a pooled connection, which is retried once on a fresh one)
    assert c.stats.messages == 4
    assert [r.breaker_state for r in pool.relays()] == [OPEN, OPEN, CLOSED]
    assert b.stats.tempfailed == 3


async def test_exactly_one_trial_in_half_open_with_concurrent_sends(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given the preferred relay's breaker open after two 421s
    a = await sinks(FaultPlan(tempfail=Window()))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], breaker_failures=2)
    for i in range(2):
        await pool.send(FROM, f"r{i}@example.org", message(i))
    assert pool.relays()[0].breaker_state is OPEN
    # And the relay recovered, but answers slowly (the trial stays in flight a while)
    a.set_faults(FaultPlan(delay_ms=800))
    await wait_reset()

    # When twelve messages are sent at once after the reset timeout
    tasks = [
        asyncio.create_task(pool.send(FROM, f"c{i}@example.org", message(100 + i)))
        for i in range(12)
    ]
    await assert_eventually(
        lambda: pool.relays()[0].breaker_state is HALF_OPEN, timeout_s=5, message="half-open"
    )
    outcomes = await asyncio.gather(*tasks)

    # Then exactly one went to the recovering relay as the trial; the rest failed over
    assert [o.code for o in outcomes] == [250] * 12
    assert [o.relay for o in outcomes].count(a.address) == 1
    assert (a.stats.messages, b.stats.messages) == (1, 2 + 11)
    # And the successful trial closed the breaker, so traffic returns to the preferred relay
    assert pool.relays()[0].breaker_state is CLOSED
    assert (await pool.send(FROM, "after@example.org", message(999))).relay == a.address


async def test_failed_trial_reopens_the_breaker(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given an open breaker on a relay that is still refusing
    a = await sinks(FaultPlan(tempfail=Window()))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], breaker_failures=2)
    for i in range(2):
        await pool.send(FROM, f"r{i}@example.org", message(i))
    await wait_reset()

    # When concurrent sends arrive after the reset timeout
    outcomes = await asyncio.gather(
        *(pool.send(FROM, f"c{i}@example.org", message(10 + i)) for i in range(8))
    )

    # Then a single trial reached the relay, failed, and the breaker is open again
    assert a.stats.tempfailed == 2 + 1
    assert pool.relays()[0].breaker_state is OPEN
    assert {o.relay for o in outcomes} == {b.address}


async def test_every_relay_open_defers_with_a_clear_reason(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given the only relay's breaker open
    a = await sinks(FaultPlan(tempfail=Window()))
    pool = pools([a.address], breaker_failures=2, cooldown_s=60)
    first = [await pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(2)]
    assert [(o.code, verdict(o)) for o in first] == [(421, Outcome.TRANSIENT)] * 2

    # When another message is sent
    outcome = await pool.send(FROM, "late@example.org", message(3))

    # Then no relay is tried and the recipient is deferred, not failed
    assert outcome.failure is Failure.UNAVAILABLE
    assert a.stats.tempfailed == 2
    reason = classify(outcome.code, outcome.text, outcome.phase, outcome.failure)
    assert reason.outcome is Outcome.TRANSIENT
    assert reason.reason.startswith("all relays unavailable")


async def test_recipient_refusals_never_count_against_the_relay(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay that rejects some recipients with 550, and a second relay
    a = await sinks(FaultPlan(reject_pattern=r"^bounce"))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], breaker_failures=2)

    # When more refused recipients are sent than the breaker tolerates faults
    outcomes = [await pool.send(FROM, f"bounce{i}@example.org", message(i)) for i in range(5)]

    # Then each is a permanent 550 from the first relay, not retried elsewhere
    assert [(o.code, o.phase, o.relay) for o in outcomes] == [(550, Phase.RCPT, a.address)] * 5
    assert {verdict(o) for o in outcomes} == {Outcome.PERMANENT}
    assert b.stats.messages == 0
    # And the breaker stays closed: the others are still delivered through the first relay
    assert pool.relays()[0].breaker_state is CLOSED
    assert (await pool.send(FROM, "ok@example.org", message(9))).relay == a.address


async def test_auth_failure_is_a_relay_fault_not_a_bounce(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay answering 535 (our credentials refused) to every MAIL
    a = await sinks(FaultPlan(tempfail=Window(), tempfail_code=535))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], breaker_failures=2)

    # When messages are sent
    outcomes = [await pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(3)]

    # Then they fail over and are delivered, and the 535s opened the breaker
    assert {(o.code, o.relay) for o in outcomes} == {(250, b.address)}
    assert a.stats.tempfailed == 2
    assert pool.relays()[0].breaker_state is OPEN


async def test_cancelled_trial_gives_no_verdict(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given an open breaker whose relay now holds every RCPT reply for a long time
    a = await sinks(FaultPlan(tempfail=Window()))
    pool = pools([a.address], breaker_failures=1)
    await pool.send(FROM, "r0@example.org", message(0))
    a.set_faults(FaultPlan(rcpt_delay_ms=10_000))
    await wait_reset()

    # When the trial is cancelled while under way (before its message body)
    trial = asyncio.create_task(pool.send(FROM, "t@example.org", message(1)))
    await assert_eventually(lambda: pool.relays()[0].breaker_state is HALF_OPEN, timeout_s=5)
    trial.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await trial

    # Then the breaker is neither closed nor re-opened: the next send is the new trial
    assert pool.relays()[0].breaker_state is HALF_OPEN
    a.set_faults(FaultPlan())
    outcome = await pool.send(FROM, "next@example.org", message(2))
    assert (outcome.code, outcome.relay) == (250, a.address)
    assert pool.relays()[0].breaker_state is CLOSED


async def test_no_reply_after_data_is_ambiguous_and_not_sent_elsewhere(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay that takes the next message and never answers its final dot
    a = await sinks(FaultPlan(hang_after_data=Window(count=1), hang_stores=True))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], timeout_s=0.3, final_reply_timeout_s=0.3)

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then it is ambiguous (the relay stored it) and was not handed to the second relay
    assert (outcome.phase, outcome.failure, verdict(outcome)) == (
        Phase.DATA_END,
        Failure.TIMEOUT,
        Outcome.AMBIGUOUS,
    )
    assert (a.stats.messages, b.stats.messages) == (1, 0)


@pytest.mark.parametrize(("fault", "stored"), [("cut_mid_data", 0), ("cut_after_data", 1)])
async def test_connection_cut_during_data_is_ambiguous(
    sinks: StartSink, pools: Callable[..., RelayPool], fault: str, stored: int
) -> None:
    # Given a relay that drops the connection during (or right after) the next message:
    # the client wrote it all and cannot tell which
    a = await sinks(FaultPlan(**{fault: Window(count=1)}))  # type: ignore[arg-type]
    pool = pools([a.address])

    # When two messages are sent
    first = await pool.send(FROM, "r1@example.org", message(1))
    second = await pool.send(FROM, "r2@example.org", message(2))

    # Then the first is ambiguous (a retry may duplicate it only if the relay stored it)
    assert (first.phase, first.failure, verdict(first)) == (
        Phase.DATA_END,
        Failure.DISCONNECTED,
        Outcome.AMBIGUOUS,
    )
    assert second.code == 250
    assert a.stats.messages == stored + 1


async def test_data_deadline_scales_with_message_size(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay taking 0.5 s to answer each final dot, a 0.2 s final-reply deadline
    # and an assumed minimum throughput of 100 kB/s
    a = await sinks(FaultPlan(delay_ms=500))
    pool = pools(
        [a.address], timeout_s=0.2, final_reply_timeout_s=0.2, min_throughput_bytes_per_s=100_000
    )

    # When a small and a 200 kB message are sent
    small = await pool.send(FROM, "small@example.org", message(1))
    large = await pool.send(FROM, "large@example.org", message(2, (b"x" * 78 + b"\r\n") * 2500))

    # Then the small one runs out of time (0.2 s), the large one has 0.2 + 2 s
    assert (small.failure, verdict(small)) == (Failure.TIMEOUT, Outcome.AMBIGUOUS)
    assert large.code == 250


# ---- honest phases: a 2xx delivers only as the final dot's reply ---------------------


async def test_data_answered_250_is_a_relay_fault_not_a_delivery(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a preferred relay answering DATA with 250 instead of 354, and a healthy one
    a = await sinks(FaultPlan(data_2xx=Window()))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], breaker_failures=2, cooldown_s=60)

    # When two messages are sent
    outcomes = [await pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(2)]

    # Then neither counts as delivered by the first relay: each failed over and was
    # delivered by the second; the first never received a body
    assert [(o.code, o.relay) for o in outcomes] == [(250, b.address)] * 2
    assert (a.stats.data_2xx, a.stats.messages, b.stats.messages) == (2, 0, 2)
    # And the faults opened the first relay's breaker
    assert pool.relays()[0].breaker_state is OPEN


async def test_data_answered_250_alone_is_transient_never_delivered_nor_ambiguous(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given the only relay answers DATA with 250
    a = await sinks(FaultPlan(data_2xx=Window(count=1)))
    pool = pools([a.address])

    # When a group of three is sent (one refused at RCPT)
    outcomes = await pool.send_group(
        FROM, ["a@example.org", "bounce@example.org", "c@example.org"], message(1)
    )

    # Then the accepted ones get the 250 as a relay protocol fault at DATA, the refused
    # one its own refusal
    outcome_a, _, outcome_c = outcomes
    assert (outcome_a.code, outcome_a.phase, verdict(outcome_a)) == (
        250,
        Phase.DATA,
        Outcome.TRANSIENT,
    )
    assert outcome_c == outcome_a
    assert classify(250, outcome_a.text, Phase.DATA).relay_fault
    # And the connection in an unknown state was dropped; the next message is delivered
    assert (await pool.send(FROM, "d@example.org", message(2))).code == 250
    assert a.stats.messages == 1


async def test_rcpt_252_is_accepted_and_only_the_final_dot_delivers(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    a = await sinks(FaultPlan(rcpt_252=Window(), reject_pattern=r"^bounce"))
    pool = pools([a.address])
    outcomes = await pool.send_group(FROM, ["a@example.org", "bounce@example.org"], message(1))
    assert [(o.code, o.phase) for o in outcomes] == [(250, Phase.DATA_END), (550, Phase.RCPT)]
    assert [line["rcpt"] for line in read_log(a.config.log_path)] == ["a@example.org"]
    assert a.stats.rcpt_252 == 1


async def test_the_pool_pipelines_exactly_when_the_relay_offers_it(
    sinks: StartSink, pools: Callable[..., RelayPool], pipelining: bool
) -> None:
    # Given a relay (advertising PIPELINING or not) rejecting some recipients
    a = await sinks(FaultPlan(reject_pattern=r"^bounce"))
    pool = pools([a.address])

    # When groups and single messages go over its pooled connection, one refused in full
    for n in range(3):
        await pool.send_group(FROM, [f"a{n}@example.org", f"bounce{n}@example.org"], message(n))
    every_refused = await pool.send(FROM, "bounce@example.org", message(5))
    after = await pool.send(FROM, "z@example.org", message(6))

    # Then MAIL arrived with the rest of the envelope behind it only when pipelining
    assert (a.stats.pipelined_mails > 0) is pipelining
    # And the transaction left open by the all-refused one was reset before the next
    assert (every_refused.code, after.code) == (550, 250)
    assert a.stats.messages == 4
    assert pool.relays()[0].open_connections == 1


# ---- a slow relay, the final-reply deadline, and cancellation around the dot ----------


async def test_slow_rcpt_beyond_the_command_deadline_is_transient_and_fails_over(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay holding every RCPT reply 1 s, a 0.2 s command deadline, a second relay
    a = await sinks(FaultPlan(rcpt_delay_ms=1000))
    b = await sinks(FaultPlan())
    pool = pools([a.address, b.address], timeout_s=0.2)

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then it went to the second relay; the first had no body, so nothing is ambiguous
    assert (outcome.code, outcome.relay) == (250, b.address)
    assert (a.stats.held_rcpts, a.stats.messages) == (1, 0)

    # And alone, the timeout at RCPT is a transient relay fault, not an ambiguous one
    alone = pools([a.address], timeout_s=0.2)
    timed_out = await alone.send(FROM, "s@example.org", message(2))
    assert (timed_out.phase, timed_out.failure, verdict(timed_out)) == (
        Phase.RCPT,
        Failure.TIMEOUT,
        Outcome.TRANSIENT,
    )


async def test_final_reply_gets_its_own_longer_deadline(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay taking 0.6 s to answer the final dot, a 0.2 s command deadline
    a = await sinks(FaultPlan(final_delay_ms=600))

    # When the final-reply deadline is 3 s, the message is delivered
    patient = pools([a.address], timeout_s=0.2, final_reply_timeout_s=3.0)
    assert (await patient.send(FROM, "r@example.org", message(1))).code == 250

    # And when it is 0.3 s, the outcome is ambiguous: the relay had the whole message
    hasty = pools([a.address], timeout_s=0.2, final_reply_timeout_s=0.3)
    outcome = await hasty.send(FROM, "s@example.org", message(2))
    assert (outcome.phase, outcome.failure, verdict(outcome)) == (
        Phase.DATA_END,
        Failure.TIMEOUT,
        Outcome.AMBIGUOUS,
    )


def test_final_reply_deadline_below_the_command_deadline_is_refused() -> None:
    with pytest.raises(ValueError):
        RelayPool(["127.0.0.1:25"], timeout_s=10.0, final_reply_timeout_s=5.0)


async def test_cancelled_after_the_dot_the_transaction_still_ends_cleanly(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay that holds the reply to the final dot for 0.8 s
    a = await sinks(FaultPlan(final_delay_ms=800))
    pool = pools([a.address], timeout_s=0.5, final_reply_timeout_s=5.0)
    send = asyncio.create_task(pool.send(FROM, "r@example.org", message(1)))
    # And the whole message has reached it
    await assert_eventually(lambda: a.stats.held_finals == 1, timeout_s=5, interval_s=0.01)

    # When the caller is cancelled, twice
    cancelled_at = time.monotonic()
    send.cancel()
    await asyncio.sleep(0)
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send

    # Then the cancellation waited for the relay's verdict before propagating
    assert time.monotonic() - cancelled_at >= 0.5
    # And the relay stored the message; no connection was cut mid-transaction
    assert a.stats.messages == 1
    await assert_eventually(lambda: pool.relays()[0].open_connections == 0, timeout_s=5)
    assert a.stats.dropped_mid_transaction == 0


async def test_cancelled_before_the_body_drops_the_transaction_at_once(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay holding each RCPT reply for 10 s
    a = await sinks(FaultPlan(rcpt_delay_ms=10_000))
    pool = pools([a.address], timeout_s=30.0)
    send = asyncio.create_task(pool.send(FROM, "r@example.org", message(1)))
    await assert_eventually(lambda: a.stats.held_rcpts == 1, timeout_s=5, interval_s=0.01)

    # When the caller is cancelled before any body went out
    cancelled_at = time.monotonic()
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send

    # Then it propagates at once, the connection is closed, and nothing is stored
    assert time.monotonic() - cancelled_at < 1.0
    await assert_eventually(lambda: a.stats.dropped_mid_transaction == 1, timeout_s=5)
    assert a.stats.messages == 0
    assert pool.relays()[0].open_connections == 0


async def test_may_send_refusing_before_the_body_sends_nothing(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a caller whose permission is withdrawn during the envelope
    a = await sinks(FaultPlan())
    pool = pools([a.address])
    asked: list[int] = []

    def may_send() -> bool:
        asked.append(1)
        return len(asked) < 2  # yes for the connection slot, no right before the body

    # When a message is sent, the send is aborted and the relay stores nothing
    with pytest.raises(SendAborted):
        await pool.send(FROM, "r@example.org", message(1), may_send)
    assert (len(asked), a.stats.messages) == (2, 0)
    await assert_eventually(lambda: a.stats.dropped_mid_transaction == 1, timeout_s=5)
    # And the pool goes on with a fresh connection
    assert (await pool.send(FROM, "s@example.org", message(2))).code == 250


# ---- the same faults, pipelined or not, give the same outcomes -----------------------


FAULTS: dict[str, FaultPlan] = {
    "none": FaultPlan(),
    "reject": FaultPlan(reject_pattern=r"^b"),
    "tempfail_rcpt": FaultPlan(tempfail_pattern=r"^c"),
    "all_refused": FaultPlan(reject_pattern=r"^[abc]"),
    "mail_421": FaultPlan(tempfail=Window(count=2)),
    "mail_535": FaultPlan(tempfail=Window(count=2), tempfail_code=535),
    "data_2xx": FaultPlan(data_2xx=Window(count=1)),
    "rcpt_252": FaultPlan(rcpt_252=Window()),
    "cut_mid_data": FaultPlan(cut_mid_data=Window(count=1)),
    "cut_after_data": FaultPlan(cut_after_data=Window(count=1)),
    "hang_after_data": FaultPlan(hang_after_data=Window(count=1)),
    "slow_rcpt": FaultPlan(rcpt_delay_ms=600),
    "slow_final": FaultPlan(final_delay_ms=600),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_same_faults_give_the_same_outcomes_pipelined_or_not(
    tmp_path: Path, fault: str
) -> None:
    # Given two relays with the same fault, one advertising PIPELINING, one not
    results = {}
    for pipelined in (True, False):
        config = SinkConfig(
            maildir=tmp_path / f"md{pipelined}",
            log_path=tmp_path / f"{pipelined}.log",
            pipelining=pipelined,
        )
        async with SinkServer(config) as sink:
            sink.set_faults(FAULTS[fault])
            pool = RelayPool([sink.address], timeout_s=0.3, final_reply_timeout_s=0.4)
            try:
                # When the same group is sent to each, twice
                outcomes = [
                    await pool.send_group(
                        FROM, ["a@example.org", "b@example.org", "c@example.org"], message(n)
                    )
                    for n in range(2)
                ]
            finally:
                await pool.close()
            results[pipelined] = (
                [[(o.code, o.phase, o.failure, verdict(o)) for o in got] for got in outcomes],
                sink.stats.messages,
            )
    # Then every recipient's outcome, and what the relay stored, are the same
    assert results[True] == results[False]


async def test_addresses_that_cannot_go_on_the_wire_fail_locally(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay, and addresses the renderer should have refused (a safety net)
    a = await sinks(FaultPlan())
    pool = pools([a.address])

    # When one recipient of three cannot be encoded, it fails alone with a local 553
    mixed = await pool.send_group(
        FROM, ["a@example.org", "bøb@example.org", "c@example.org"], message(1)
    )
    assert [(o.code, o.phase) for o in mixed] == [
        (250, Phase.DATA_END),
        (553, Phase.RCPT),
        (250, Phase.DATA_END),
    ]
    # And when the sender or every recipient cannot, nothing reaches the relay
    bad_sender = await pool.send_group("bøb@example.com", ["a@example.org"], message(2))
    bad_all = await pool.send_group(FROM, ["x y@example.org", "bøb@example.org"], message(3))
    assert [(o.code, o.phase, verdict(o)) for o in [*bad_sender, *bad_all]] == [
        (553, Phase.MAIL, Outcome.PERMANENT),
        (553, Phase.RCPT, Outcome.PERMANENT),
        (553, Phase.RCPT, Outcome.PERMANENT),
    ]
    assert a.stats.messages == 1
    assert [line["rcpt"] for line in read_log(a.config.log_path)] == [
        "a@example.org",
        "c@example.org",
    ]
    # And the connection is still in step for the next message
    assert (await pool.send(FROM, "d@example.org", message(4))).code == 250
