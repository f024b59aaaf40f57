"""The SMTP sink, in-process and as ``python -m mailers.sink``, fed by aiosmtplib."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from mailers.procs import free_port, spawn_python, wait_for_port
from mailers.sink import SinkConfig, SinkServer, message_id_of, read_log
from tests.helpers import wait_until


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
        "mailers.sink",
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
