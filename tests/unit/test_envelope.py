"""``classify.Envelope``: the replies to MAIL, RCPT and DATA judged in order, the same
way whether the commands were pipelined (RFC 2920) or sent one at a time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender_node.classify import After, Envelope, Failure, Outcome, Phase, Verdict, classify

CODES = [199, 220, 250, 251, 252, 334, 354, 421, 450, 451, 452, 503, 530, 535, 550, 553, 554]


def run(envelope: Envelope, script: list[int]) -> int:
    """Feed the reply the script gives for each command the envelope asks about, as a
    relay would answer them; returns how many replies were read. ``script[0]`` answers
    RSET, ``script[1]`` MAIL, then one per RCPT, then DATA."""
    read = 0
    while not envelope.done:
        envelope.feed(script[envelope.position], f"text {envelope.position}")
        read += 1
    return read


def script(mail: int, rcpts: list[int], data: int, rset: int = 250) -> list[int]:
    return [rset, mail, *rcpts, data]


@given(
    rset=st.sampled_from(CODES),
    mail=st.sampled_from(CODES),
    rcpts=st.lists(st.sampled_from(CODES), min_size=1, max_size=6),
    data=st.sampled_from(CODES),
    reset_first=st.booleans(),
)
def test_pipelined_and_unpipelined_give_every_recipient_the_same_verdict(
    rset: int, mail: int, rcpts: list[int], data: int, reset_first: bool
) -> None:
    # Given the same relay replies, read all at once (pipelined) or one by one
    replies = script(mail, rcpts, data, rset)
    piped = Envelope(len(rcpts), pipelined=True, reset_first=reset_first)
    stepped = Envelope(len(rcpts), pipelined=False, reset_first=reset_first)
    run(piped, replies)
    run(stepped, replies)

    # Then both modes decide each recipient and the body alike
    assert piped.verdicts == stepped.verdicts
    assert (piped.send_body, piped.accepted) == (stepped.send_body, stepped.accepted)
    # And a connection one mode closes is not reused by the other either
    if stepped.after is After.CLOSE:
        assert piped.after is After.CLOSE


@given(
    mail=st.sampled_from(CODES),
    rcpts=st.lists(st.sampled_from(CODES), min_size=1, max_size=6),
    data=st.sampled_from(CODES),
    pipelined=st.booleans(),
)
def test_nothing_is_delivered_or_ambiguous_before_the_body(
    mail: int, rcpts: list[int], data: int, pipelined: bool
) -> None:
    # Given any replies to the envelope
    envelope = Envelope(len(rcpts), pipelined=pipelined)
    run(envelope, script(mail, rcpts, data))

    # Then the body goes only after 354, with some recipient accepted; and always then,
    # unless a reply to MAIL or RCPT was not a plain SMTP verdict (a 1xx or 3xx, a 421
    # or an auth demand: the relay's fault, which ends the transaction)
    assert not envelope.send_body or (data == 354 and envelope.accepted > 0)
    plain = 200 <= mail < 300 and all(
        200 <= c < 300 or (400 <= c < 600 and c not in (421, 530, 535)) for c in rcpts
    )
    if plain and data == 354 and envelope.accepted > 0:
        assert envelope.send_body
    # And every recipient decided by the envelope is neither delivered nor ambiguous:
    # no body was sent
    for verdict in envelope.verdicts:
        if verdict is not None:
            outcome = classify(verdict.code, verdict.text, verdict.phase, verdict.failure).outcome
            assert outcome in (Outcome.TRANSIENT, Outcome.PERMANENT)
    # And without a body every recipient is decided; with one, only the refused are
    assert all(v is not None for v in envelope.verdicts) != envelope.send_body
    if envelope.send_body:
        assert sum(v is None for v in envelope.verdicts) == envelope.accepted


@pytest.mark.parametrize("pipelined", [True, False])
def test_354_lets_the_body_go_and_252_accepts_a_recipient(pipelined: bool) -> None:
    # Given MAIL accepted, one RCPT answered 250 and one 252, DATA answered 354
    envelope = Envelope(2, pipelined=pipelined)
    read = run(envelope, script(250, [250, 252], 354))
    # Then both recipients wait for the body's verdict, and the body goes
    assert (envelope.send_body, envelope.accepted, read) == (True, 2, 4)
    assert envelope.verdicts == [None, None]


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("data", [250, 251, 220, 334, 199])
def test_a_reply_to_data_other_than_354_is_a_relay_protocol_fault(
    pipelined: bool, data: int
) -> None:
    # Given a relay answering DATA with a 2xx (or another non-354 reply)
    envelope = Envelope(2, pipelined=pipelined)
    run(envelope, script(250, [250, 550], data))
    # Then no body goes, the accepted recipient gets the reply as a relay fault
    assert not envelope.send_body
    assert envelope.verdicts == [
        Verdict(data, "text 4", Phase.DATA),
        Verdict(550, "text 3", Phase.RCPT),
    ]
    first = envelope.verdicts[0]
    assert first is not None
    verdict = classify(first.code, first.text, first.phase)
    assert (verdict.outcome, verdict.relay_fault) == (Outcome.TRANSIENT, True)
    # And the connection, in an unknown state, is closed
    assert envelope.after is After.CLOSE


@pytest.mark.parametrize("pipelined", [True, False])
def test_data_refused_decides_the_accepted_and_resets(pipelined: bool) -> None:
    envelope = Envelope(2, pipelined=pipelined)
    run(envelope, script(250, [451, 250], 554))
    assert envelope.verdicts == [
        Verdict(451, "text 2", Phase.RCPT),
        Verdict(554, "text 4", Phase.DATA),
    ]
    assert (envelope.send_body, envelope.after) == (False, After.RESET)


def test_every_rcpt_refused_stops_before_data_unpipelined() -> None:
    # Given every recipient refused, one command at a time
    envelope = Envelope(2, pipelined=False)
    read = run(envelope, script(250, [550, 450], 354))
    # Then DATA is never sent; MAIL left a transaction open, so RSET comes next time
    assert (read, envelope.position) == (3, 4)
    assert envelope.verdicts == [
        Verdict(550, "text 2", Phase.RCPT),
        Verdict(450, "text 3", Phase.RCPT),
    ]
    assert (envelope.send_body, envelope.after) == (False, After.RESET)


@pytest.mark.parametrize(
    ("data", "after"), [(554, After.RESET), (503, After.RESET), (354, After.CLOSE)]
)
def test_every_rcpt_refused_pipelined_reads_the_data_reply(data: int, after: After) -> None:
    # Given every recipient refused, pipelined: DATA was sent anyway
    envelope = Envelope(2, pipelined=True)
    read = run(envelope, script(250, [550, 550], data))
    # Then its reply is read to stay in step; a 354 (waiting for a body we will not
    # send) closes the connection
    assert read == 4
    assert (envelope.send_body, envelope.after) == (False, after)


@pytest.mark.parametrize("mail", [451, 550, 530])
def test_mail_refused_decides_everyone(mail: int) -> None:
    stepped = Envelope(3, pipelined=False)
    assert run(stepped, script(mail, [503] * 3, 503)) == 1
    assert stepped.verdicts == [Verdict(mail, "text 1", Phase.MAIL)] * 3
    assert stepped.after is After.KEEP
    # Pipelined, the RCPT and DATA replies are still read (the relay answers them)
    piped = Envelope(3, pipelined=True)
    assert run(piped, script(mail, [503] * 3, 503)) == 5
    assert piped.verdicts == stepped.verdicts
    assert piped.after is After.RESET


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("code", [421, 530, 535])
def test_a_relay_verdict_at_rcpt_decides_every_recipient_not_yet_refused(
    pipelined: bool, code: int
) -> None:
    # Given the second of three recipients answered 421 (or an auth demand)
    envelope = Envelope(3, pipelined=pipelined)
    read = run(envelope, script(250, [550, code, 250], 354))
    # Then the first keeps its own refusal, the others get the relay's verdict
    assert envelope.verdicts == [
        Verdict(550, "text 2", Phase.RCPT),
        Verdict(code, "text 3", Phase.RCPT),
        Verdict(code, "text 3", Phase.RCPT),
    ]
    assert (read, envelope.after) == (3, After.CLOSE)


def test_421_to_mail_closes() -> None:
    envelope = Envelope(1, pipelined=True)
    assert run(envelope, script(421, [503], 503)) == 1
    assert envelope.after is After.CLOSE


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_failed_rset_is_a_protocol_fault_for_everyone(pipelined: bool) -> None:
    envelope = Envelope(2, pipelined=pipelined, reset_first=True)
    run(envelope, script(250, [250, 250], 354, rset=500))
    assert (
        envelope.verdicts
        == [Verdict(0, "RSET answered 500 text 0", Phase.MAIL, Failure.PROTOCOL)] * 2
    )
    assert envelope.after is After.CLOSE


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize(
    ("replies", "phase"),
    [
        ([], Phase.MAIL),
        ([250], Phase.RCPT),
        ([250, 550], Phase.RCPT),
        ([250, 550, 250], Phase.DATA),
    ],
)
def test_no_reply_decides_the_undecided_at_its_phase(
    pipelined: bool, replies: list[int], phase: Phase
) -> None:
    # Given the relay went silent after some replies
    envelope = Envelope(2, pipelined=pipelined)
    for code in replies:
        envelope.feed(code, "t")
    envelope.fail(Failure.TIMEOUT, "timed out")
    # Then the recipients not yet refused get the timeout at the step it hit
    timed_out = Verdict(0, "timed out", phase, Failure.TIMEOUT)
    first = Verdict(550, "t", Phase.RCPT) if len(replies) > 1 else timed_out
    assert envelope.verdicts == [first, timed_out]
    assert (envelope.done, envelope.after) == (True, After.CLOSE)


def test_no_reply_while_reading_replies_that_no_longer_matter_closes_only() -> None:
    # Given MAIL refused, pipelined: the rest is read only to stay in step
    envelope = Envelope(2, pipelined=True)
    envelope.feed(550, "no")
    envelope.feed(503, "need MAIL")
    envelope.fail(Failure.DISCONNECTED, "gone")
    assert envelope.verdicts == [Verdict(550, "no", Phase.MAIL)] * 2
    assert envelope.after is After.CLOSE


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError):
        Envelope(0, pipelined=True)
    envelope = Envelope(1, pipelined=False)
    run(envelope, script(250, [250], 354))
    with pytest.raises(RuntimeError):
        envelope.feed(250, "again")
    with pytest.raises(RuntimeError):
        envelope.fail(Failure.TIMEOUT, "late")
