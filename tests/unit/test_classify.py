"""SMTP outcome classification (a table of codes and phases) and recent-load statistics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender_node.classify import (
    Classification,
    Failure,
    LoadStats,
    Outcome,
    Phase,
    classify,
    parse_enhanced_code,
)

D, T, P, A = Outcome.DELIVERED, Outcome.TRANSIENT, Outcome.PERMANENT, Outcome.AMBIGUOUS


@pytest.mark.parametrize(
    ("code", "phase", "failure", "outcome", "relay_fault"),
    [
        # Replies decide by class.
        (250, Phase.DATA_END, Failure.NONE, D, False),
        (251, Phase.DATA_END, Failure.NONE, D, False),
        (421, Phase.MAIL, Failure.NONE, T, True),
        (421, Phase.CONNECT, Failure.NONE, T, True),
        (450, Phase.RCPT, Failure.NONE, T, False),
        (451, Phase.DATA_END, Failure.NONE, T, False),
        (452, Phase.RCPT, Failure.NONE, T, False),
        (550, Phase.RCPT, Failure.NONE, P, False),
        (551, Phase.RCPT, Failure.NONE, P, False),
        (553, Phase.MAIL, Failure.NONE, P, False),
        (554, Phase.DATA_END, Failure.NONE, P, False),
        (552, Phase.DATA, Failure.NONE, P, False),
        # Auth failures and a refusing greeting are the relay's fault, not the recipient's.
        (530, Phase.MAIL, Failure.NONE, T, True),
        (535, Phase.MAIL, Failure.NONE, T, True),
        (554, Phase.CONNECT, Failure.NONE, T, True),
        # Unexpected codes are treated as a misbehaving relay; after the final dot the
        # relay had the whole message, so its unreadable verdict is ambiguous.
        (354, Phase.DATA_END, Failure.NONE, A, True),
        (-1, Phase.DATA_END, Failure.NONE, A, True),
        (-1, Phase.RCPT, Failure.NONE, T, True),
        (354, Phase.MAIL, Failure.NONE, T, True),
        (334, Phase.RCPT, Failure.NONE, T, True),
        (199, Phase.DATA, Failure.NONE, T, True),
        # A 2xx delivers only as the reply to the final dot; anywhere else it stood where
        # another reply was due (354 to DATA, 220 to STARTTLS): a relay protocol fault.
        (250, Phase.DATA, Failure.NONE, T, True),
        (251, Phase.DATA, Failure.NONE, T, True),
        (250, Phase.CONNECT, Failure.NONE, T, True),
        (250, Phase.MAIL, Failure.NONE, T, True),
        (252, Phase.RCPT, Failure.NONE, T, True),
        (252, Phase.DATA_END, Failure.NONE, D, False),
        # No reply: transient before the final dot, ambiguous after it.
        (0, Phase.CONNECT, Failure.REFUSED, T, True),
        (0, Phase.CONNECT, Failure.TIMEOUT, T, True),
        (0, Phase.MAIL, Failure.DISCONNECTED, T, True),
        (0, Phase.RCPT, Failure.TIMEOUT, T, True),
        (0, Phase.DATA, Failure.TIMEOUT, T, True),
        (0, Phase.DATA, Failure.DISCONNECTED, T, True),
        (0, Phase.DATA_END, Failure.TIMEOUT, A, True),
        (0, Phase.DATA_END, Failure.DISCONNECTED, A, True),
        (0, Phase.DATA_END, Failure.PROTOCOL, A, True),
        (0, Phase.MAIL, Failure.PROTOCOL, T, True),
        # A 4xx refusing the whole session (greeting, EHLO) is the relay's fault; a 4xx
        # for one message or recipient is not, nor is any per-recipient 5xx.
        (421, Phase.DATA_END, Failure.NONE, T, True),
        (450, Phase.CONNECT, Failure.NONE, T, True),
        (451, Phase.MAIL, Failure.NONE, T, False),
        (451, Phase.RCPT, Failure.NONE, T, False),
        (550, Phase.DATA_END, Failure.NONE, P, False),
        (553, Phase.RCPT, Failure.NONE, P, False),
        # Auth failures at any step trip the relay's breaker, never bounce the recipient.
        (534, Phase.MAIL, Failure.NONE, T, True),
        (535, Phase.CONNECT, Failure.NONE, T, True),
        (535, Phase.RCPT, Failure.NONE, T, True),
        (535, Phase.DATA_END, Failure.NONE, T, True),
        (538, Phase.MAIL, Failure.NONE, T, True),
        # No relay tried (every breaker open): deferred, never failed.
        (0, Phase.CONNECT, Failure.UNAVAILABLE, T, True),
    ],
)
def test_classification_table(
    code: int, phase: Phase, failure: Failure, outcome: Outcome, relay_fault: bool
) -> None:
    verdict = classify(code, "text", phase, failure)
    assert (verdict.outcome, verdict.relay_fault) == (outcome, relay_fault)


def test_reason_and_enhanced_code_come_from_the_reply() -> None:
    verdict = classify(550, "5.1.1 <bob@example.org>: Recipient unknown\nmore", Phase.RCPT)
    assert verdict == Classification(
        Outcome.PERMANENT, False, "5.1.1", "550 5.1.1 <bob@example.org>: Recipient unknown"
    )


def test_reason_of_a_connection_failure_names_the_phase() -> None:
    verdict = classify(0, "Connect call failed", Phase.CONNECT, Failure.REFUSED)
    assert verdict.reason == "refused during connect: Connect call failed"
    assert "no reply after data" in classify(0, "", Phase.DATA_END, Failure.TIMEOUT).reason


def test_all_relays_unavailable_is_deferred_with_a_clear_reason() -> None:
    verdict = classify(
        0, "circuit breakers of every relay are open", Phase.CONNECT, Failure.UNAVAILABLE
    )
    assert verdict.outcome is Outcome.TRANSIENT
    assert verdict.reason == "all relays unavailable: circuit breakers of every relay are open"
    assert classify(0, "", Phase.CONNECT, Failure.UNAVAILABLE).reason == "all relays unavailable"


def test_ambiguous_only_when_the_final_dot_went_unanswered() -> None:
    # The same timeout is safe to retry before the dot, ambiguous after it.
    for phase in (Phase.CONNECT, Phase.MAIL, Phase.RCPT, Phase.DATA):
        assert classify(0, "timed out", phase, Failure.TIMEOUT).outcome is Outcome.TRANSIENT
    for failure in (Failure.TIMEOUT, Failure.DISCONNECTED, Failure.PROTOCOL):
        assert classify(0, "x", Phase.DATA_END, failure).outcome is Outcome.AMBIGUOUS


def test_reason_of_a_2xx_before_the_dot_says_protocol_fault_and_where() -> None:
    verdict = classify(250, "2.0.0 OK", Phase.DATA)
    assert verdict == Classification(
        Outcome.TRANSIENT, True, "2.0.0", "relay protocol fault: 250 2.0.0 OK in reply to data"
    )


PHASES = list(Phase)
REPLIES = st.integers(min_value=-1, max_value=999)
FAILURES = st.sampled_from([f for f in Failure if f is not Failure.UNAVAILABLE])


@given(REPLIES, st.sampled_from(PHASES), FAILURES)
def test_delivered_only_by_a_2xx_to_the_final_dot(
    code: int, phase: Phase, failure: Failure
) -> None:
    # Given any reply (or none) in any phase
    verdict = classify(code, "text", phase, failure)
    # Then it is a delivery exactly when it is a 2xx to the final dot
    delivered = phase is Phase.DATA_END and failure is Failure.NONE and 200 <= code < 300
    assert (verdict.outcome is Outcome.DELIVERED) == delivered
    # And a delivery is never a relay fault
    assert not (delivered and verdict.relay_fault)


@given(REPLIES, st.sampled_from(PHASES), FAILURES)
def test_ambiguous_only_after_the_final_dot(code: int, phase: Phase, failure: Failure) -> None:
    # Given any reply (or none) in any phase
    verdict = classify(code, "text", phase, failure)
    # Then before the dot nothing is ambiguous (no body was sent)
    if phase is not Phase.DATA_END:
        assert verdict.outcome is not Outcome.AMBIGUOUS
    # And after it, anything but a readable 2xx/4xx/5xx verdict is ambiguous
    readable = failure is Failure.NONE and 200 <= code < 600 and code // 100 != 3
    if phase is Phase.DATA_END and not readable:
        assert verdict.outcome is Outcome.AMBIGUOUS


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("code", [220, 235, 250, 251, 252, 299])
def test_every_2xx_in_every_phase(code: int, phase: Phase) -> None:
    # Given a 2xx as the deciding reply of each phase
    verdict = classify(code, "OK", phase)
    # Then only the final dot's delivers; the others are relay protocol faults
    if phase is Phase.DATA_END:
        assert (verdict.outcome, verdict.relay_fault) == (D, False)
    else:
        assert (verdict.outcome, verdict.relay_fault) == (T, True)
        assert verdict.reason.startswith("relay protocol fault")


@pytest.mark.parametrize(
    ("text", "enhanced"),
    [
        ("2.0.0 OK", "2.0.0"),
        ("  4.7.1 greylisted", "4.7.1"),
        ("5.1.10 no such domain", "5.1.10"),
        ("5.1.1", "5.1.1"),
        ("OK queued as 5.1.1", ""),
        ("3.1.1 nope", ""),
        ("5.1.1234 too long", ""),
        ("5.1.1a", ""),
        ("", ""),
    ],
)
def test_parse_enhanced_code(text: str, enhanced: str) -> None:
    assert parse_enhanced_code(text) == enhanced


def test_load_stats_window_mean_and_error_rate() -> None:
    # Given three transactions at t=0, 1, 2
    stats = LoadStats(window_s=10.0)
    stats.record(0.0, 0.100, error=False)
    stats.record(1.0, 0.300, error=True)
    stats.record(2.0, 0.200, error=False)

    # Then the snapshot averages them
    snap = stats.snapshot(5.0)
    assert snap.samples == 3
    assert snap.latency_ms == pytest.approx(200.0)
    assert snap.error_rate == pytest.approx(1 / 3)

    # And samples leave the window as time passes
    snap = stats.snapshot(10.5)
    assert snap.samples == 2
    assert snap.latency_ms == pytest.approx(250.0)
    assert snap.error_rate == 0.5
    assert stats.snapshot(100.0).samples == 0
    assert stats.snapshot(100.0).latency_ms == 0.0


def test_load_stats_is_bounded() -> None:
    stats = LoadStats(window_s=100.0, max_samples=3)
    for i in range(10):
        stats.record(float(i), float(i), error=i % 2 == 0)
    snap = stats.snapshot(10.0)
    assert snap.samples == 3
    assert snap.latency_ms == pytest.approx(8000.0)  # mean of 7, 8, 9 s
    assert snap.error_rate == pytest.approx(1 / 3)


def test_load_stats_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        LoadStats(window_s=0)
