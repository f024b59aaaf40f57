"""The sink reads MAIL/RCPT paths and Message-IDs with shortcuts of its own: for any input
they must give what aiosmtpd and the email package give."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
from collections.abc import Iterator

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailers_dev.sink import FaultPlan, SinkHandler, _FaultySMTP, message_id_of

PATH_PIECES = [
    "<", ">", "@", ".", "..", " ", "\t", "(", ")", "(c)", '"', "\\", "[", "]", ":", ",", ";",
    "a", "Z", "0", "+", "-", "_", "=", "!", "#", "'", "~", "é", "日", "SIZE=1200",
    "BODY=8BITMIME", " SMTPUTF8",
]  # fmt: skip
HEADER_PIECES = [
    "Message-ID:", "message-id:", "MESSAGE-ID :", "Message-Id:", "Subject:", "From ", ":",
    "X:", "\r\n", "\n", "\r", " ", "\t", "<a@b>", "<c@d>", "x", "\x0b", "\x0c", "\x1c", "\x85",
    "é", "\x00", "\x7f",
]  # fmt: skip
PROPERTY_SETTINGS = settings(max_examples=400, deadline=None)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SMTP, _FaultySMTP]]:
    loop = asyncio.new_event_loop()
    try:
        handler = SinkHandler(FaultPlan(), None, io.StringIO())
        yield SMTP(handler, loop=loop), _FaultySMTP(handler, loop=loop)
    finally:
        loop.close()


def read_path(server: SMTP, arg: str) -> object:
    """What ``_getaddr`` returns, or the type of what it raises (aiosmtpd's parser raises
    IndexError on a lone ``<``; the sink must not hide that difference either)."""
    try:
        return server._getaddr(arg)
    except Exception as error:  # compared, not handled
        return type(error)


def parsed_message_id(data: bytes) -> str:
    """The definition: the email package's header parser."""
    head = data.split(b"\r\n\r\n")[0].split(b"\n\n")[0].split(b"\n\r\n")[0].split(b"\r\n\n")[0]
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    value = headers.get("Message-ID")
    return " ".join(str(value).split()) if value is not None else ""


@PROPERTY_SETTINGS
@given(st.lists(st.sampled_from(PATH_PIECES) | st.text(max_size=3), max_size=12).map("".join))
@example("<user0@x.example>")
@example("<bounces+abc.1.xyz@bounces.example.com> SIZE=1200 BODY=8BITMIME")
@example("<a@b>(comment) SIZE=1")
@example("<a@b>  \tSIZE=1")
@example("<>")
@example("<")
@example("<a..b@c>")
def test_a_path_is_read_as_aiosmtpd_reads_it(servers: tuple[SMTP, _FaultySMTP], arg: str) -> None:
    plain, sink = servers
    assert read_path(sink, arg) == read_path(plain, arg)


def test_a_path_past_the_local_part_limit_is_refused(servers: tuple[SMTP, _FaultySMTP]) -> None:
    plain, sink = servers
    arg = f"<{'a' * 65}@b.example>"
    plain.local_part_limit = sink.local_part_limit = 64
    try:
        assert sink._getaddr(arg) == plain._getaddr(arg) == (None, None)
        assert sink._getaddr("<a@b.example>") == ("a@b.example", "")
    finally:
        plain.local_part_limit = sink.local_part_limit = 0


@PROPERTY_SETTINGS
@given(
    st.lists(st.sampled_from(HEADER_PIECES), max_size=24).map(
        lambda pieces: "".join(pieces).encode("utf-8")
    )
)
@example(b"Subject: x\r\nMessage-ID:\r\n <folded@x>\r\n\r\nMessage-ID: <in-body@x>\r\n")
@example(b"Message-ID: <a@b>\r\n\t<c@d>\r\nMessage-ID: <second@x>\r\n")
@example(b"From someone\r\nMessage-ID: <after-mbox-line@x>\r\n")
@example(b"Bad line\r\nMessage-ID: <after-the-body-began@x>\r\n")
@example(b" continued\r\nMessage-ID: <a@b>\r\n")
@example(b":\r\n <lost@x>\r\nMessage-ID: <a@b>\r\n")
@example(b"Message-ID: <a@b>\r\nFrom x\r\n <not-a-continuation@x>\r\n")
@example(b"Message-ID: <a@b>\r\rbody\r\n")
@example(b"Message-ID: <\xc3\xa9@b>\r\n")
def test_a_message_id_is_read_as_the_email_package_reads_it(data: bytes) -> None:
    assert message_id_of(data) == parsed_message_id(data)
