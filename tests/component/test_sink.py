"""The SMTP sink, in-process and as ``python -m mailers_dev.sink``, fed by aiosmtplib.

Includes each fault of the catalogue, and fault plans changed at runtime (in-process and
through the control file of a running process).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import smtplib
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailers_dev.procs import free_port, spawn_python, wait_for_port
from mailers_dev.sink import (
    FaultPlan,
    SinkConfig,
    SinkServer,
    Window,
    _parse_args,
    message_id_of,
    read_log,
    write_control,
)
from tests.helpers import assert_eventually, wait_until


def make_message(message_id: str, to: str = "a@example.com") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "News <news@example.com>"
    msg["To"] = to
    msg["Subject"] = "Grüße"
    msg["Message-ID"] = message_id
    msg.set_content("Hello there\n.\nA line with only a dot above.\n")
    return msg


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SinkServer]:
    config = SinkConfig(
        maildir=tmp_path / "maildir",
        log_path=tmp_path / "sink.jsonl",
        reject_pattern=r"^bounce",
        tempfail_pattern=r"^later",
    )
    async with SinkServer(config) as server:
        yield server


async def test_message_is_stored_as_maildir_file_and_logged_per_recipient(
    sink: SinkServer,
) -> None:
    # Given a message for two recipients
    msg = make_message("<m1@mailers.test>")
    # When it is sent to the sink
    errors, _ = await aiosmtplib.send(
        msg,
        hostname="127.0.0.1",
        port=sink.port,
        sender="bounces@example.com",
        recipients=["a@example.com", "b@example.com"],
        timeout=10,
    )
    assert errors == {}
    # Then one readable file is in new/, and nothing is left in tmp/
    files = list((sink.config.maildir / "new").iterdir())
    assert len(files) == 1 and files[0].suffix == ".eml"
    assert list((sink.config.maildir / "tmp").iterdir()) == []
    stored = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert stored["Subject"] == "Grüße"
    assert stored["Message-ID"] == "<m1@mailers.test>"
    assert ".\nA line with only a dot" in stored.get_content().replace("\r\n", "\n")
    # And the log has one line per recipient
    lines = read_log(sink.config.log_path)
    assert [(line["message_id"], line["rcpt"]) for line in lines] == [
        ("<m1@mailers.test>", "a@example.com"),
        ("<m1@mailers.test>", "b@example.com"),
    ]
    assert all(line["mail_from"] == "bounces@example.com" for line in lines)
    assert lines[0]["size"] == files[0].stat().st_size
    assert lines[0]["file"] == files[0].name and lines[0]["ts"] > 0
    assert (sink.stats.messages, sink.stats.recipients) == (1, 2)


async def test_a_sink_that_stores_nothing_still_logs_each_recipient(tmp_path: Path) -> None:
    config = SinkConfig(maildir=tmp_path / "maildir", log_path=tmp_path / "sink.jsonl", store=False)
    async with SinkServer(config) as server:
        errors, _ = await aiosmtplib.send(
            make_message("<m9@mailers.test>"),
            hostname="127.0.0.1",
            port=server.port,
            sender="bounces@example.com",
            recipients=["a@example.com", "b@example.com"],
            timeout=10,
        )
    assert errors == {}
    lines = read_log(config.log_path)
    assert [(line["rcpt"], line["file"]) for line in lines] == [
        ("a@example.com", None),
        ("b@example.com", None),
    ]
    assert lines[0]["message_id"] == "<m9@mailers.test>" and lines[0]["size"] > 0
    assert not (tmp_path / "maildir").exists()


async def test_reject_pattern_answers_550_and_logs_only_accepted(sink: SinkServer) -> None:
    msg = make_message("<m2@mailers.test>")
    errors, _ = await aiosmtplib.send(
        msg,
        hostname="127.0.0.1",
        port=sink.port,
        sender="bounces@example.com",
        recipients=["ok@example.com", "bounce-me@example.com"],
        timeout=10,
    )
    assert errors["bounce-me@example.com"].code == 550
    assert "5.1.1" in errors["bounce-me@example.com"].message
    assert [line["rcpt"] for line in read_log(sink.config.log_path)] == ["ok@example.com"]


async def test_tempfail_pattern_answers_451(sink: SinkServer) -> None:
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
        await aiosmtplib.send(
            make_message("<m3@mailers.test>"),
            hostname="127.0.0.1",
            port=sink.port,
            sender="bounces@example.com",
            recipients=["later@example.com"],
            timeout=10,
        )
    assert [r.code for r in info.value.recipients] == [451]
    assert read_log(sink.config.log_path) == []
    assert list((sink.config.maildir / "new").iterdir()) == []


async def test_greylisting_refuses_each_address_once(sink: SinkServer) -> None:
    # Given a sink greylisting addresses that start with "grey"
    sink.set_faults(FaultPlan(greylist_pattern=r"(?i)^grey"))

    async def send(n: int, *to: str) -> dict[str, int]:
        errors, _ = await aiosmtplib.send(
            make_message(f"<g{n}@mailers.test>"), hostname="127.0.0.1", port=sink.port,
            sender="b@example.com", recipients=list(to), timeout=10,
        )  # fmt: skip
        return {address: reply.code for address, reply in errors.items()}

    # When a message goes to two of them and another address, twice
    first = await send(1, "grey1@example.com", "GREY2@example.com", "ok@example.com")
    again = await send(2, "grey1@example.com", "grey2@example.com")
    # Then each greylisted address is refused with 451 4.7.1 the first time only
    assert first == {"grey1@example.com": 451, "GREY2@example.com": 451}
    assert again == {}
    assert sink.stats.greylisted == 2
    logged = [line["rcpt"] for line in read_log(sink.config.log_path)]
    assert logged == ["ok@example.com", "grey1@example.com", "grey2@example.com"]


async def test_many_messages_on_one_connection_each_get_a_file(sink: SinkServer) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=10) as smtp:
        for i in range(50):
            await smtp.send_message(make_message(f"<bulk{i}@mailers.test>", to=f"r{i}@example.com"))
    ids = [line["message_id"] for line in read_log(sink.config.log_path)]
    assert ids == [f"<bulk{i}@mailers.test>" for i in range(50)]
    assert len(list((sink.config.maildir / "new").iterdir())) == 50


def test_message_id_of_reads_only_headers_and_unfolds() -> None:
    raw = b"Subject: x\r\nMessage-ID:\r\n <folded@x>\r\n\r\nMessage-ID: <in-body@x>\r\n"
    assert message_id_of(raw) == "<folded@x>"
    assert message_id_of(b"Subject: none\r\n\r\nbody") == ""


def test_sink_runs_as_a_module(tmp_path: Path) -> None:
    # Given the sink started as a process
    port = free_port()
    log = tmp_path / "sink.jsonl"
    proc = spawn_python(
        "sink",
        "mailers_dev.sink",
        tmp_path / "logs",
        {},
        ["--port", str(port), "--maildir", str(tmp_path / "md"), "--log", str(log)],
    )
    try:
        wait_for_port(port, 15, proc.popen)
        # When a message is sent to it
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.send_message(
                make_message("<proc@mailers.test>"), "b@example.com", ["a@example.com"]
            )
        # Then its log has the line (flushed at once, the process still running)
        wait_until(lambda: len(read_log(log)) == 1, timeout_s=10, message="log line")
        assert read_log(log)[0]["message_id"] == "<proc@mailers.test>"
    finally:
        proc.stop()
    assert proc.popen.returncode == 0
    assert "listening on" in proc.log()


# -- the fault catalogue -------------------------------------------------------------


async def send_one(sink: SinkServer, n: int, deadline_s: float = 10) -> None:
    """Send one message for one recipient; raises what aiosmtplib raises."""
    await aiosmtplib.send(
        make_message(f"<f{n}@mailers.test>", to=f"r{n}@example.com"),
        hostname="127.0.0.1",
        port=sink.port,
        sender="bounces@example.com",
        recipients=[f"r{n}@example.com"],
        timeout=deadline_s,
    )


def logged_ids(sink: SinkServer) -> list[str]:
    return [str(line["message_id"]) for line in read_log(sink.config.log_path)]


@pytest.mark.parametrize("code", [421, 451])
async def test_tempfail_window_refuses_everything_then_recovers(
    sink: SinkServer, code: int
) -> None:
    # Given a sink answering every MAIL with a 4xx for 0.3 s
    sink.set_faults(FaultPlan(tempfail=Window(for_s=0.3), tempfail_code=code))
    # When a message is sent right away
    with pytest.raises(aiosmtplib.SMTPResponseException) as info:
        await send_one(sink, 1)
    # Then it is refused with that code and not stored
    assert info.value.code == code
    assert logged_ids(sink) == [] and sink.stats.tempfailed == 1

    # And once the window has passed, mail is accepted again
    async def accepted() -> bool:
        try:
            await send_one(sink, 2)
        except aiosmtplib.SMTPResponseException:
            return False
        return True

    await assert_eventually(accepted, timeout_s=5, interval_s=0.05, message="recovery")
    assert logged_ids(sink) == ["<f2@mailers.test>"]


async def test_tempfail_count_refuses_the_next_n_transactions(sink: SinkServer) -> None:
    sink.set_faults(FaultPlan(tempfail=Window(count=2)))
    codes = []
    for n in range(3):
        try:
            await send_one(sink, n)
            codes.append(250)
        except aiosmtplib.SMTPResponseException as exc:
            codes.append(exc.code)
    assert codes == [421, 421, 250]


@pytest.mark.parametrize("stores", [False, True])
async def test_hang_after_data_never_answers_the_final_dot(sink: SinkServer, stores: bool) -> None:
    # Given a sink that goes silent after the next message's final dot
    sink.set_faults(FaultPlan(hang_after_data=Window(count=1), hang_stores=stores))
    # When a client sends with a short deadline
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await send_one(sink, 1, deadline_s=0.3)
    # Then it timed out; the message is stored only when the plan says so
    assert sink.stats.hung == 1
    assert logged_ids(sink) == (["<f1@mailers.test>"] if stores else [])
    # And the next message is answered
    await send_one(sink, 2)
    assert logged_ids(sink)[-1] == "<f2@mailers.test>"


async def test_cut_mid_data_drops_the_connection_and_stores_nothing(sink: SinkServer) -> None:
    sink.set_faults(FaultPlan(cut_mid_data=Window(count=1)))
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send_one(sink, 1)
    assert (sink.stats.cut_mid_data, logged_ids(sink)) == (1, [])
    assert list((sink.config.maildir / "new").iterdir()) == []
    await send_one(sink, 2)
    assert logged_ids(sink) == ["<f2@mailers.test>"]


async def test_cut_after_data_stores_and_logs_but_withholds_the_250(sink: SinkServer) -> None:
    # Given a sink that drops the connection after storing the next message
    sink.set_faults(FaultPlan(cut_after_data=Window(count=1)))
    # When a message is sent, the client sees the connection lost, no reply
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send_one(sink, 1)
    # Then the sink has it nonetheless: a retry would be a legitimate duplicate
    await send_one(sink, 1)
    assert logged_ids(sink) == ["<f1@mailers.test>", "<f1@mailers.test>"]
    assert (sink.stats.cut_after_data, sink.stats.messages) == (1, 2)


@pytest.fixture
async def client(sink: SinkServer) -> AsyncIterator[aiosmtplib.SMTP]:
    """A connected aiosmtplib client that has said EHLO."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=10, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    yield smtp
    smtp.close()


RAW = b"From: a@example.com\r\nMessage-ID: <raw@mailers.test>\r\n\r\nHi\r\n"


async def test_pipelining_is_advertised_unless_switched_off(tmp_path: Path) -> None:
    for pipelining in (True, False):
        config = SinkConfig(
            maildir=tmp_path / f"md{pipelining}",
            log_path=tmp_path / f"{pipelining}.log",
            pipelining=pipelining,
        )
        async with SinkServer(config) as sink:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
            await smtp.connect(timeout=10)
            await smtp.ehlo(timeout=10)
            # Then EHLO lists PIPELINING exactly when asked to (the rest unchanged)
            assert smtp.supports_extension("pipelining") is pipelining
            assert smtp.supports_extension("size") and smtp.supports_extension("8bitmime")
            smtp.close()


async def test_pipelined_commands_get_their_replies_in_order(sink: SinkServer) -> None:
    # Given MAIL, two RCPTs and DATA written in one go (RFC 2920), one RCPT refused
    reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
    try:
        async with asyncio.timeout(10):
            await reader.readuntil(b"\r\n")
            writer.write(b"EHLO client\r\n")
            while not (await reader.readline()).startswith(b"250 "):
                pass
            writer.write(
                b"MAIL FROM:<b@example.com>\r\nRCPT TO:<a@example.com>\r\n"
                b"RCPT TO:<bounce@example.com>\r\nDATA\r\n"
            )
            codes = [(await reader.readline())[:3] for _ in range(4)]
            writer.write(RAW + b".\r\n")
            final = await reader.readline()
    finally:
        writer.close()
    # Then each command got its own reply, in order, and the message was stored once
    assert codes == [b"250", b"250", b"550", b"354"]
    assert final.startswith(b"250")
    assert logged_ids(sink) == ["<raw@mailers.test>"]


async def test_data_2xx_answers_250_instead_of_354_and_stores_nothing(
    sink: SinkServer, client: aiosmtplib.SMTP
) -> None:
    # Given a sink whose next DATA gets 250
    sink.set_faults(FaultPlan(data_2xx=Window(count=1)))
    await client.mail("b@example.com")
    await client.rcpt("a@example.com")
    # When DATA is sent
    reply = await client.execute_command(b"DATA")
    # Then it is answered 250, no body is awaited, nothing is stored
    assert reply.code == 250
    assert (sink.stats.data_2xx, sink.stats.messages) == (1, 0)
    # And the session is back to its start: the next transaction is normal
    await client.mail("b@example.com")
    await client.rcpt("a@example.com")
    await client.data(RAW)
    assert logged_ids(sink) == ["<raw@mailers.test>"]


async def test_rcpt_252_accepts_the_recipient(sink: SinkServer, client: aiosmtplib.SMTP) -> None:
    # Given a sink accepting every recipient with 252
    sink.set_faults(FaultPlan(rcpt_252=Window()))
    await client.mail("b@example.com")
    # When a recipient is given
    reply = await client.execute_command(b"RCPT", b"TO:<a@example.com>")
    # Then 252 accepts it: the message is delivered to it
    assert reply.code == 252
    await client.data(RAW)
    assert [line["rcpt"] for line in read_log(sink.config.log_path)] == ["a@example.com"]
    assert sink.stats.rcpt_252 == 1


async def test_starttls_2xx_offers_starttls_then_answers_250_in_plaintext(
    sink: SinkServer, client: aiosmtplib.SMTP
) -> None:
    # Given a sink without TLS whose next STARTTLS gets 250
    sink.set_faults(FaultPlan(starttls_2xx=Window(count=1)))
    await client.ehlo()
    # Then EHLO offers STARTTLS while the fault is armed
    assert client.supports_extension("starttls")
    # When STARTTLS is asked for, it is answered 250 and nothing else happens
    reply = await client.execute_command(b"STARTTLS")
    assert reply.code == 250
    assert sink.stats.starttls_2xx == 1
    assert client.get_transport_info("sslcontext") is None
    # And once the window is used up, the sink (without TLS) no longer offers it
    await client.ehlo()
    assert not client.supports_extension("starttls")


async def test_rcpt_and_final_delays_hold_those_replies(
    sink: SinkServer, client: aiosmtplib.SMTP
) -> None:
    # Given a slow relay: 0.2 s per RCPT reply, 0.3 s for the final dot's
    sink.set_faults(FaultPlan(rcpt_delay_ms=200, final_delay_ms=300))
    await client.mail("b@example.com")
    # When a recipient and a message are sent
    started = time.monotonic()
    await client.rcpt("a@example.com")
    rcpt_s = time.monotonic() - started
    started = time.monotonic()
    await client.data(RAW)
    data_s = time.monotonic() - started
    # Then each reply came no earlier than its hold, and the message is stored
    assert rcpt_s >= 0.2 and data_s >= 0.3
    assert (sink.stats.held_rcpts, sink.stats.held_finals, sink.stats.messages) == (1, 1, 1)


async def test_a_client_leaving_mid_transaction_is_counted(
    sink: SinkServer, client: aiosmtplib.SMTP
) -> None:
    # Given a transaction begun, then the connection dropped
    await client.mail("b@example.com")
    client.close()
    # Then the sink counts it; a session closed between transactions is not counted
    await assert_eventually(lambda: sink.stats.dropped_mid_transaction == 1, timeout_s=5)
    await send_one(sink, 1)
    assert sink.stats.dropped_mid_transaction == 1


def test_new_faults_have_flags(tmp_path: Path) -> None:
    config = _parse_args(
        [
            "--maildir", str(tmp_path), "--log", str(tmp_path / "l"), "--no-pipelining",
            "--rcpt-delay-ms", "10000", "--final-delay-ms", "25000", "--delay-ms", "5",
            "--data-2xx", "--rcpt-252", "--starttls-2xx",
        ]
    )  # fmt: skip
    assert not config.pipelining
    assert config.startup_plan() == FaultPlan(
        delay_ms=25005,
        rcpt_delay_ms=10000,
        data_2xx=Window(),
        rcpt_252=Window(),
        starttls_2xx=Window(),
    )


async def test_control_file_changes_faults_at_runtime(tmp_path: Path) -> None:
    # Given a sink watching a control file that does not exist yet
    control = tmp_path / "control.json"
    said: list[str] = []
    config = SinkConfig(
        maildir=tmp_path / "md",
        log_path=tmp_path / "log.jsonl",
        reject_pattern=r"^nobody",
        control_path=control,
        control_poll_s=0.02,
    )
    async with SinkServer(config, announce=said.append) as sink:
        assert sink.plan == FaultPlan(reject_pattern=r"^nobody")
        # When a plan is written, it is applied without a restart
        plan = FaultPlan(tempfail=Window(count=1), cut_after_data=Window(for_s=60.0))
        write_control(control, plan)
        await assert_eventually(lambda: sink.plan == plan, timeout_s=5, message="plan applied")
        assert said[-1] == f"mailers-sink faults #2: {json.dumps(plan.to_json())}"
        # When the file is broken, the faults stay as they were
        control.write_text("{not json")
        await assert_eventually(lambda: "control error" in said[-1], timeout_s=5)
        assert sink.plan == plan
        # When it is removed, the startup faults are back
        control.unlink()
        await assert_eventually(
            lambda: sink.plan == config.startup_plan(), timeout_s=5, message="startup plan"
        )


def test_fault_plan_json_round_trip_and_validation() -> None:
    plan = FaultPlan(
        reject_pattern="^b",
        tempfail=Window(for_s=8.0),
        tempfail_code=451,
        hang_after_data=Window(count=3),
        hang_stores=True,
        cut_mid_data=Window(count=1, for_s=2.5),
        cut_after_data=Window(),
        delay_ms=5,
        data_2xx=Window(count=1),
        rcpt_252=Window(for_s=3.0),
        starttls_2xx=Window(),
        rcpt_delay_ms=10_000,
        final_delay_ms=25_000,
    )
    assert FaultPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert FaultPlan.from_json({"data_2xx": {}, "final_delay_ms": 25000}) == FaultPlan(
        data_2xx=Window(), final_delay_ms=25_000
    )
    assert FaultPlan.from_json({}) == FaultPlan()
    assert FaultPlan.from_json({"tempfail": {"for_s": 8}}).tempfail_code == 421
    bad_plans: list[dict[str, Any]] = [
        {"explode": {}},
        {"tempfail": {"code": 250}},
        {"tempfail": 5},
        {"cut_mid_data": {"count": "3"}},
        {"cut_mid_data": {"count": -1}},
        {"hang_after_data": {"store": "yes"}},
        {"reject_pattern": "("},
        {"delay_ms": -5},
        {"rcpt_delay_ms": -1},
        {"final_delay_ms": "25"},
        {"data_2xx": True},
        {"rcpt_252": {"count": 1, "code": 251}},
        {"starttls_2xx": {"for_s": "1"}},
    ]
    for bad in bad_plans:
        with pytest.raises(ValueError):
            FaultPlan.from_json(bad)


def test_sink_process_applies_a_control_file_without_restart(tmp_path: Path) -> None:
    # Given the sink as a process with a control file rejecting one recipient
    port = free_port()
    control = tmp_path / "control.json"
    write_control(control, FaultPlan(reject_pattern=r"^a@"))
    proc = spawn_python(
        "sink",
        "mailers_dev.sink",
        tmp_path / "logs",
        {},
        [
            "--port", str(port), "--maildir", str(tmp_path / "md"),
            "--log", str(tmp_path / "l"), "--control", str(control),
            # (the control file, present, overrides these flags)
            "--tempfail-code", "451", "--tempfail-for-s", "30",
        ],
    )  # fmt: skip
    try:
        wait_for_port(port, 15, proc.popen)
        assert "mailers-sink faults #2" in proc.log()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.send_message(make_message("<p1@mailers.test>"), "b@example.com", ["a@x.org"])
        # When the control file changes, the running process follows it
        write_control(control, FaultPlan())
        wait_until(lambda: "mailers-sink faults #3" in proc.log(), timeout_s=10)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.send_message(make_message("<p2@mailers.test>"), "b@example.com", ["a@x.org"])
        wait_until(lambda: len(read_log(tmp_path / "l")) == 1, timeout_s=10)
    finally:
        proc.stop()
    assert proc.popen.returncode == 0
