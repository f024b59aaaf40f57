"""The pure pieces of the SMTP wire: reply parsing and envelope address encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender_node.smtp_client import _path, parse_replies


def test_single_and_multi_line_replies_in_one_chunk() -> None:
    # Given pipelined replies arriving together, one of them multi-line
    data = b"250 2.1.0 Ok\r\n250-first\r\n250-second\r\n250 last\r\n354 End data\r\n"
    # When parsed
    replies, consumed = parse_replies(data)
    # Then each reply comes out once, in order, continuation lines joined
    assert replies == [(250, "2.1.0 Ok"), (250, "first\nsecond\nlast"), (354, "End data")]
    assert consumed == len(data)


def test_a_reply_still_arriving_is_left_for_later() -> None:
    data = b"250 Ok\r\n250-EHLO line\r\n250-PIPE"
    replies, consumed = parse_replies(data)
    assert replies == [(250, "Ok")]
    assert data[consumed:] == b"250-EHLO line\r\n250-PIPE"


def test_bare_codes_and_lf_only_line_endings() -> None:
    assert parse_replies(b"250\r\n221\n") == ([(250, ""), (221, "")], 9)


@pytest.mark.parametrize(
    "line",
    [b"hello\r\n", b"25 short\r\n", b"2500 nope\r\n", b"250_bad\r\n", b"\r\n", b"250\rx\r\n"],
)
def test_anything_else_is_not_smtp(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_replies(b"250 ok\r\n" + line)


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=200, max_value=599),
            st.lists(st.text(alphabet="abc .-", max_size=10), min_size=1, max_size=3),
        ),
        max_size=5,
    ),
    st.integers(min_value=1, max_value=7),
)
def test_replies_split_anywhere_parse_the_same(
    replies: list[tuple[int, list[str]]], chunk: int
) -> None:
    # Given replies serialized, then fed in chunks of any size
    wire = b"".join(
        b"".join(
            f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode()
            for i, line in enumerate(lines)
        )
        for code, lines in replies
    )
    buffer = bytearray()
    parsed: list[tuple[int, str]] = []
    for start in range(0, len(wire), chunk):
        buffer += wire[start : start + chunk]
        got, consumed = parse_replies(buffer)
        parsed += got
        del buffer[:consumed]
    # Then every reply comes out exactly once
    assert parsed == [(code, "\n".join(s.strip() for s in lines)) for code, lines in replies]
    assert not buffer


@pytest.mark.parametrize(
    ("address", "wire"),
    [
        ("bob@example.org", b"<bob@example.org>"),
        ("", b"<>"),
        ("Bob <bob@example.org>", b"<bob@example.org>"),
        ('"odd one"@example.org', b'<"odd one"@example.org>'),
        # aiosmtplib's parser keeps the address and drops what follows it
        ("a@b.org> SIZE=1", b"<a@b.org>"),
    ],
)
def test_envelope_addresses(address: str, wire: bytes) -> None:
    assert _path(address) == wire


@pytest.mark.parametrize(
    "address",
    ["bøb@example.org", "a@b.org\r\nRSET", "a\x00@b.org", "a b@c.org"],
)
def test_addresses_that_could_not_go_on_the_line_are_refused(address: str) -> None:
    with pytest.raises(ValueError):
        _path(address)
