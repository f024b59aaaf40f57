"""The fast CRLF path of DATA preparation matches the general one on any input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sender_node import smtp_client


def _general(data: bytes) -> bytes:
    data = smtp_client._LINE_ENDINGS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return smtp_client._LEADING_DOT.sub(b"..", data) + b".\r\n"


@given(st.lists(st.sampled_from([b".", b"\r\n", b"a", b"\n", b"\r", b"..", b"\r\n.", b"x"])))
def test_fast_path_equals_general_path(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert smtp_client._prepare_data(data) == _general(data)


def test_leading_dots_are_doubled_and_the_end_marked() -> None:
    assert smtp_client._prepare_data(b".a\r\n.b\r\nc") == b"..a\r\n..b\r\nc\r\n.\r\n"
