"""``RelayPool`` per-relay security and limits against real sinks on loopback.

Real pieces: the pool (aiosmtplib), ``mailers_dev.sink.SinkServer`` in-process with
STARTTLS, implicit TLS, AUTH and SIZE switched on per test, and certificates from
``mailers_dev.certs.DevCA``. Rate limits run on a fake monotonic clock whose ``sleep``
advances it, so the waits are asserted exactly. Every test runs against relays that
advertise PIPELINING and against relays that do not, with the same assertions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mailers_dev.certs import CertSpec, DevCA
from mailers_dev.sink import FaultPlan, SinkConfig, SinkServer, Window, read_log, server_tls_context
from sender_node.classify import Failure, Outcome, Phase, classify
from sender_node.config import RelayConfig, RelayTls, Secret
from sender_node.relay_choice import Strategy
from sender_node.smtp_client import RelayPool, SendOutcome

FROM = "news@example.com"
USER, PASSWORD = "bulk", "correct-horse-battery"


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Path
    """The CA the pools are told to trust."""
    cert: Path
    key: Path
    rogue_cert: Path
    """Valid for 127.0.0.1, but issued by a CA nobody trusts."""
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    spec = CertSpec("smtp", "smtp", ("localhost", "127.0.0.1"))
    trusted = DevCA.create(tmp_path_factory.mktemp("ca"))
    rogue = DevCA.create(tmp_path_factory.mktemp("rogue"), name="Rogue CA")
    good, bad = trusted.issue(spec), rogue.issue(spec)
    return Pki(trusted.cert_path, good.cert, good.key, bad.cert, bad.key)


StartSink = Callable[..., Any]


@pytest.fixture(params=[True, False], ids=["pipelined", "unpipelined"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Whether the relays advertise PIPELINING (and so whether the pool pipelines)."""
    return bool(request.param)


@pytest.fixture
async def sinks(tmp_path: Path, pipelining: bool) -> AsyncIterator[StartSink]:
    started: list[SinkServer] = []

    async def start(**options: Any) -> SinkServer:
        n = len(started)
        config = SinkConfig(
            maildir=tmp_path / f"md{n}",
            log_path=tmp_path / f"{n}.log",
            pipelining=pipelining,
            **options,
        )
        sink = SinkServer(config)
        await sink.start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        await sink.stop()


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., RelayPool]]:
    made: list[RelayPool] = []

    def make(relays: list[RelayConfig | str], **kwargs: Any) -> RelayPool:
        options: dict[str, Any] = {"timeout_s": 10.0, "cooldown_s": 60.0, "breaker_failures": 3}
        options.update(kwargs)
        pool = RelayPool(relays, **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


def message(n: int, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: {FROM}\r\nTo: r{n}@example.org\r\nSubject: test {n}\r\n"
        f"Message-ID: <m{n}@example.com>\r\n\r\n"
    ).encode() + body


def verdict(outcome: SendOutcome) -> tuple[Outcome, bool]:
    c = classify(outcome.code, outcome.text, outcome.phase, outcome.failure)
    return c.outcome, c.relay_fault


def log_of(sink: SinkServer) -> list[dict[str, Any]]:
    return read_log(sink.config.log_path)


# ---- TLS ------------------------------------------------------------------------------


async def test_starttls_with_a_verified_certificate_delivers(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    # Given a relay offering STARTTLS with a certificate from the CA the pool trusts
    a = await sinks(tls_context=server_tls_context(pki.cert, pki.key))
    for mode in ("auto", "starttls"):
        pool = pools([f"{a.address};tls={mode};ca={pki.ca}"])

        # When a message is sent
        outcome = await pool.send(FROM, f"{mode}@example.org", message(1))

        # Then it was delivered over TLS
        assert (outcome.code, outcome.phase) == (250, Phase.DATA_END)
    assert a.stats.tls_messages == 2
    assert [line["tls"] for line in log_of(a)] == [True, True]


async def test_untrusted_certificate_is_a_relay_fault_and_fails_over(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    # Given a preferred relay whose certificate comes from a CA the pool does not trust,
    # and a second, plaintext relay
    a = await sinks(tls_context=server_tls_context(pki.rogue_cert, pki.rogue_key))
    b = await sinks()
    pool = pools([f"{a.address};ca={pki.ca}", b.address])

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then the first relay counted a fault (no silent downgrade to plaintext) and the
    # second delivered
    assert (outcome.code, outcome.relay) == (250, b.address)
    assert a.stats.messages == 0
    assert pool.relays()[0].consecutive_failures == 1

    # And alone, the first relay's outcome says why, and defers rather than fails
    alone = await pools([f"{a.address};ca={pki.ca}"]).send(FROM, "r@example.org", message(2))
    assert verdict(alone) == (Outcome.TRANSIENT, True)
    assert "CERTIFICATE_VERIFY_FAILED" in alone.text and alone.text.startswith("STARTTLS")


async def test_dev_ca_is_not_in_the_system_trust_store(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    # Given a relay with a dev-CA certificate and a pool with the default settings
    # (tls=auto, verification against the system store)
    a = await sinks(tls_context=server_tls_context(pki.cert, pki.key))
    pool = pools([a.address])

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then STARTTLS was tried, verification failed, and nothing went in clear
    assert verdict(outcome) == (Outcome.TRANSIENT, True)
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.text
    assert a.stats.messages == 0


async def test_verify_false_accepts_an_untrusted_certificate(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    # Given a relay with an untrusted certificate, explicitly not verified
    a = await sinks(tls_context=server_tls_context(pki.rogue_cert, pki.rogue_key))
    pool = pools([f"{a.address};verify=false"])

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then it went through, still encrypted
    assert outcome.code == 250
    assert a.stats.tls_messages == 1


async def test_implicit_tls_delivers_and_verifies(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    # Given a relay speaking TLS from the first byte (like port 465)
    a = await sinks(tls_context=server_tls_context(pki.cert, pki.key), implicit_tls=True)

    # When messages are sent with and without the right CA
    good = await pools([f"{a.address};tls=implicit;ca={pki.ca}"]).send(FROM, "r@x.org", message(1))
    bad = await pools([f"{a.address};tls=implicit"]).send(FROM, "r@x.org", message(2))

    # Then the verified one was delivered over TLS, the other is a relay fault
    assert good.code == 250
    assert a.stats.tls_messages == 1
    assert verdict(bad) == (Outcome.TRANSIENT, True)
    assert "CERTIFICATE_VERIFY_FAILED" in bad.text


async def test_starttls_required_but_not_offered_is_a_relay_fault(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a preferred relay without STARTTLS where the pool requires it, and a second
    a = await sinks()
    b = await sinks()
    pool = pools([f"{a.address};tls=starttls", b.address])

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then the first relay counted a fault, the second delivered
    assert (outcome.code, outcome.relay) == (250, b.address)
    assert a.stats.messages == 0
    assert pool.relays()[0].consecutive_failures == 1
    alone = await pools([f"{a.address};tls=starttls"]).send(FROM, "r@example.org", message(2))
    assert (alone.phase, alone.failure) == (Phase.CONNECT, Failure.PROTOCOL)
    assert "does not offer STARTTLS" in alone.text
    assert verdict(alone) == (Outcome.TRANSIENT, True)


@pytest.mark.parametrize("mode", ["auto", "starttls"])
@pytest.mark.parametrize("with_tls", [True, False], ids=["tls-capable", "no-tls"])
async def test_starttls_answered_250_is_a_relay_fault_never_plaintext(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki, mode: str, with_tls: bool
) -> None:
    # Given a preferred relay offering STARTTLS but answering it 250 (no handshake), and
    # a second relay
    tls = {"tls_context": server_tls_context(pki.cert, pki.key)} if with_tls else {}
    a = await sinks(starttls_2xx=True, **tls)
    b = await sinks()
    pool = pools([f"{a.address};tls={mode};ca={pki.ca}", b.address])

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then nothing went to the first relay in plaintext; the second delivered
    assert (outcome.code, outcome.relay) == (250, b.address)
    assert (a.stats.starttls_2xx, a.stats.messages) == (1, 0)
    assert pool.relays()[0].consecutive_failures == 1

    # And alone, the 250 is a relay protocol fault at connection time, not a delivery
    alone = await pools([f"{a.address};tls={mode};ca={pki.ca}"]).send(FROM, "s@x.org", message(2))
    assert (alone.code, alone.phase) == (250, Phase.CONNECT)
    assert alone.text.startswith("STARTTLS")
    assert verdict(alone) == (Outcome.TRANSIENT, True)
    assert a.stats.messages == 0


async def test_tls_none_stays_plaintext_even_when_starttls_is_offered(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    a = await sinks(tls_context=server_tls_context(pki.rogue_cert, pki.rogue_key))
    outcome = await pools([f"{a.address};tls=none"]).send(FROM, "r@example.org", message(1))
    assert outcome.code == 250
    assert a.stats.tls_messages == 0


# ---- AUTH -----------------------------------------------------------------------------


def auth_relay(address: str, ca: Path, password: str = PASSWORD, **kw: Any) -> RelayConfig:
    return RelayConfig(address, ca_file=str(ca), user=USER, password=Secret(password), **kw)


async def test_auth_with_the_right_credentials_delivers(
    sinks: StartSink,
    pools: Callable[..., RelayPool],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Given a relay that requires AUTH (over STARTTLS)
    a = await sinks(
        tls_context=server_tls_context(pki.cert, pki.key),
        auth_user=USER,
        auth_password=PASSWORD,
        auth_required=True,
    )
    pool = pools([auth_relay(a.address, pki.ca)])

    # When three messages are sent
    outcomes = [await pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(3)]

    # Then all were delivered over one authenticated connection
    assert [o.code for o in outcomes] == [250] * 3
    assert (a.stats.auth_succeeded, a.stats.auth_failed, a.stats.tls_messages) == (1, 0, 3)
    # And the password appears in no log line of either side
    assert PASSWORD not in caplog.text


async def test_wrong_password_is_a_relay_fault_not_a_recipient_failure(
    sinks: StartSink,
    pools: Callable[..., RelayPool],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password"
    # Given a preferred relay refusing our credentials, and a second relay
    a = await sinks(
        tls_context=server_tls_context(pki.cert, pki.key),
        auth_user=USER,
        auth_password=PASSWORD,
        auth_required=True,
    )
    b = await sinks()
    pool = pools([auth_relay(a.address, pki.ca, wrong), b.address])

    # When a message is sent
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then the auth failure counted against the relay and the second delivered
    assert (outcome.code, outcome.relay) == (250, b.address)
    assert a.stats.auth_failed >= 1 and a.stats.messages == 0
    assert pool.relays()[0].consecutive_failures == 1

    # And alone, the relay's 535 defers the recipient (a relay fault), never bounces it
    alone = await pools([auth_relay(a.address, pki.ca, wrong)]).send(FROM, "r@x.org", message(2))
    assert (alone.code, alone.phase) == (535, Phase.CONNECT)
    assert verdict(alone) == (Outcome.TRANSIENT, True)
    assert wrong not in alone.text and wrong not in caplog.text


async def test_auth_over_plaintext_is_refused(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    # Given a relay without STARTTLS that would take AUTH in clear
    a = await sinks(
        auth_user=USER, auth_password=PASSWORD, auth_required=True, auth_require_tls=False
    )
    pool = pools([auth_relay(a.address, pki.ca)])

    # When a message is sent with tls=auto and credentials
    outcome = await pool.send(FROM, "r@example.org", message(1))

    # Then the pool refused to send the password: no AUTH reached the relay
    assert "refusing AUTH over an unencrypted connection" in outcome.text
    assert verdict(outcome) == (Outcome.TRANSIENT, True)
    assert (a.stats.auth_succeeded, a.stats.auth_failed, a.stats.messages) == (0, 0, 0)
    assert PASSWORD not in outcome.text


async def test_auth_over_implicit_tls(
    sinks: StartSink, pools: Callable[..., RelayPool], pki: Pki
) -> None:
    a = await sinks(
        tls_context=server_tls_context(pki.cert, pki.key),
        implicit_tls=True,
        auth_user=USER,
        auth_password=PASSWORD,
        auth_required=True,
    )
    pool = pools([auth_relay(a.address, pki.ca, tls=RelayTls.IMPLICIT)])
    assert (await pool.send(FROM, "r@example.org", message(1))).code == 250
    assert a.stats.auth_succeeded == 1


# ---- SIZE -----------------------------------------------------------------------------


async def test_message_above_a_relays_size_limit_goes_to_a_bigger_relay(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a preferred relay taking at most 2,000 bytes, and a second one taking more
    a = await sinks(data_size_limit=2_000)
    b = await sinks(data_size_limit=100_000)
    pool = pools([a.address, b.address])
    big = message(1, b"x" * 78 + b"\r\n") + (b"y" * 78 + b"\r\n") * 60

    # When a small and a 5 kB message are sent
    small = await pool.send(FROM, "small@example.org", message(2))
    large = await pool.send(FROM, "large@example.org", big)

    # Then the small one went to the first relay, the large one to the second, each
    # with its size declared in MAIL, and no relay fault was counted
    assert (small.code, small.relay) == (250, a.address)
    assert (large.code, large.relay) == (250, b.address)
    assert a.stats.sized_mails == 1 and b.stats.sized_mails == 1
    (line,) = log_of(b)
    assert line["declared_size"] == line["size"] == len(big)
    assert [r.consecutive_failures for r in pool.relays()] == [0, 0]


async def test_message_above_every_relays_size_limit_fails_with_552(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given two relays both too small for the message
    a = await sinks(data_size_limit=1_000)
    b = await sinks(data_size_limit=2_000)
    pool = pools([a.address, b.address], strategy=Strategy.BALANCE)
    big = message(1, (b"z" * 78 + b"\r\n") * 40)

    # When it is sent (twice: the second time the limits are already known)
    outcomes = [await pool.send(FROM, "r@example.org", big) for _ in range(2)]

    # Then the recipient fails permanently with a reason, and nothing was sent
    for outcome in outcomes:
        assert (outcome.code, verdict(outcome)) == (552, (Outcome.PERMANENT, False))
        assert outcome.text == f"5.3.4 message size {len(big)} exceeds every relay's SIZE limit"
    assert a.stats.messages == b.stats.messages == 0
    assert [r.breaker_state.value for r in pool.relays()] == ["closed", "closed"]


# ---- several recipients per transaction ----------------------------------------------


async def test_send_group_delivers_three_recipients_in_one_transaction(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    a = await sinks()
    pool = pools([a.address])
    rcpts = ["r1@example.org", "r2@example.org", "r3@example.org"]

    outcomes = await pool.send_group(FROM, rcpts, message(1))

    assert [(o.code, o.phase) for o in outcomes] == [(250, Phase.DATA_END)] * 3
    assert (a.stats.messages, a.stats.recipients) == (1, 3)
    lines = log_of(a)
    assert [line["rcpt"] for line in lines] == rcpts
    assert len({line["file"] for line in lines}) == 1


async def test_send_group_refused_recipient_gets_its_own_550(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a relay refusing one of three recipients, and a second relay
    a = await sinks(reject_pattern=r"^bounce")
    b = await sinks()
    pool = pools([a.address, b.address])

    # When the three are sent together
    rcpts = ["ok1@example.org", "bounce@example.org", "ok2@example.org"]
    outcomes = await pool.send_group(FROM, rcpts, message(1))

    # Then the refused one has its 550, the others are delivered in one message
    assert [(o.code, o.phase, o.relay) for o in outcomes] == [
        (250, Phase.DATA_END, a.address),
        (550, Phase.RCPT, a.address),
        (250, Phase.DATA_END, a.address),
    ]
    assert verdict(outcomes[1]) == (Outcome.PERMANENT, False)
    assert [line["rcpt"] for line in log_of(a)] == ["ok1@example.org", "ok2@example.org"]
    assert b.stats.messages == 0


async def test_send_group_all_refused_sends_no_data_and_keeps_the_connection(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    a = await sinks(reject_pattern=r"^bounce")
    pool = pools([a.address])

    outcomes = await pool.send_group(FROM, ["bounce1@x.org", "bounce2@x.org"], message(1))

    assert [o.code for o in outcomes] == [550, 550]
    assert a.stats.messages == 0
    assert pool.relays()[0].open_connections == 1
    assert (await pool.send(FROM, "ok@example.org", message(2))).code == 250
    assert pool.relays()[0].open_connections == 1


async def test_send_group_fails_over_as_one_transaction(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a preferred relay answering 421 to MAIL, and a healthy second relay
    a = await sinks()
    a.set_faults(FaultPlan(tempfail=Window()))
    b = await sinks()
    pool = pools([a.address, b.address])

    outcomes = await pool.send_group(FROM, ["r1@x.org", "r2@x.org", "r3@x.org"], message(1))

    # Then all three moved to the second relay together
    assert {(o.code, o.relay) for o in outcomes} == {(250, b.address)}
    assert (b.stats.messages, b.stats.recipients) == (1, 3)
    assert await pool.send_group(FROM, [], message(2)) == []


# ---- strategies and rate limits ------------------------------------------------------


async def test_balance_splits_by_weight(sinks: StartSink, pools: Callable[..., RelayPool]) -> None:
    # Given two healthy relays weighted 3:1
    a = await sinks()
    b = await sinks()
    pool = pools([f"{a.address};weight=3", b.address], strategy=Strategy.BALANCE)

    # When 400 messages are sent, 20 at a time
    for start in range(0, 400, 20):
        outcomes = await asyncio.gather(
            *(pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(start, start + 20))
        )
        assert {o.code for o in outcomes} == {250}

    # Then smooth weighted round-robin split them exactly 300/100
    assert (a.stats.messages, b.stats.messages) == (300, 100)


class FakeTime:
    """A monotonic clock that only moves when the pool sleeps."""

    def __init__(self) -> None:
        self.now_s = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds
        await asyncio.sleep(0)


async def test_failover_waits_exactly_for_its_preferred_relays_tokens(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a preferred relay limited to 2 messages/s (burst 2) and an unlimited second
    a = await sinks()
    b = await sinks()
    time = FakeTime()
    pool = pools([f"{a.address};rate=2", b.address], clock=time.clock, sleep=time.sleep)

    # When five messages are sent at once on a clock that only sleeping moves
    outcomes = [await pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(5)]

    # Then the burst went at once, and each further message waited exactly 1/rate for
    # the preferred relay instead of spilling to the second
    assert {o.relay for o in outcomes} == {a.address}
    assert time.sleeps == [0.5, 0.5, 0.5]
    assert b.stats.messages == 0


async def test_balance_prefers_a_relay_with_tokens_over_waiting(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    # Given a heavy relay limited to 1 message/s and a light unlimited one
    a = await sinks()
    b = await sinks()
    time = FakeTime()
    pool = pools(
        [f"{a.address};weight=3;rate=1", f"{b.address};weight=1"],
        strategy=Strategy.BALANCE,
        clock=time.clock,
        sleep=time.sleep,
    )

    # When four messages are sent without the clock moving
    first = [await pool.send(FROM, f"r{i}@example.org", message(i)) for i in range(4)]

    # Then the heavy relay took its one token's worth and the light one the rest, with
    # no waiting at all
    assert [o.relay for o in first] == [a.address, b.address, b.address, b.address]
    assert time.sleeps == []

    # When a second passes, the heavy relay has a token again and takes the next one
    time.now_s += 1.0
    assert (await pool.send(FROM, "later@example.org", message(9))).relay == a.address


async def test_balance_waits_for_the_soonest_token_when_every_relay_is_out(
    sinks: StartSink, pools: Callable[..., RelayPool]
) -> None:
    a = await sinks()
    b = await sinks()
    time = FakeTime()
    pool = pools(
        [f"{a.address};rate=1", f"{b.address};rate=4"],
        strategy=Strategy.BALANCE,
        clock=time.clock,
        sleep=time.sleep,
    )
    # Given both buckets drained (1 + 4 tokens)
    for i in range(5):
        assert (await pool.send(FROM, f"r{i}@example.org", message(i))).code == 250

    # When one more message is sent
    outcome = await pool.send(FROM, "next@example.org", message(5))

    # Then the pool slept exactly until the faster relay had a token, and used it
    assert time.sleeps == [0.25]
    assert outcome.relay == b.address


# ---- on uvloop, the node's event loop -------------------------------------------------


def test_on_uvloop_every_kind_of_connection_is_taken_over(tmp_path: Path, pki: Pki) -> None:
    # The node runs on uvloop (sender_node.__main__), whose transports are not asyncio's
    # classes: the pool must take over plain, STARTTLS and implicit-TLS connections there.
    async def scenario() -> list[tuple[int, bool]]:
        context = server_tls_context(pki.cert, pki.key)
        configs: list[tuple[dict[str, Any], str]] = [
            ({"pipelining": True}, ""),
            ({"pipelining": False}, ""),
            ({"tls_context": context}, f";tls=starttls;ca={pki.ca}"),
            ({"tls_context": context, "implicit_tls": True}, f";tls=implicit;ca={pki.ca}"),
        ]
        got = []
        for n, (options, relay_options) in enumerate(configs):
            config = SinkConfig(
                maildir=tmp_path / f"m{n}", log_path=tmp_path / f"{n}.log", **options
            )
            async with SinkServer(config) as sink:
                pool = RelayPool([sink.address + relay_options], timeout_s=10.0)
                try:
                    outcomes = [await pool.send(FROM, f"r{i}@x.org", message(i)) for i in range(3)]
                finally:
                    await pool.close()
                got.append((outcomes[-1].code, sink.stats.tls_messages == 3))
        return got

    # When each relay gets three messages over one pooled connection, on uvloop
    results = uvloop.run(scenario())

    # Then all were delivered, the TLS ones over TLS
    assert results == [(250, False), (250, False), (250, True), (250, True)]
