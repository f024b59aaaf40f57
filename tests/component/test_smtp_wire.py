"""The reply reader (``smtp_client._Wire``) and the pool's edges that no relay fault
produces on demand: bytes fed by hand on a fake transport, or injected into a pooled
connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from mailers_dev.sink import SinkConfig, SinkServer
from sender_node.classify import Failure, Phase
from sender_node.smtp_client import RelayPool, _Garbled, _Lost, _Wire


class FakeTransport:
    """Just enough of a transport for ``_Wire``: records writes, can be closed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = self.closing = True

    def close(self) -> None:
        self.closing = True


def wire() -> tuple[_Wire, FakeTransport]:
    transport = FakeTransport()
    return _Wire(cast(asyncio.WriteTransport, transport)), transport


async def test_replies_queue_in_order_and_a_waiting_reader_wakes() -> None:
    # Given a reader waiting for a reply
    w, _ = wire()
    waiting = asyncio.create_task(w.reply(5))
    await asyncio.sleep(0)
    # When a burst of pipelined replies arrives, split across two reads
    w.data_received(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n35")
    w.data_received(b"4 End data\r\n")
    # Then each comes out once, in order
    assert await waiting == (250, "2.1.0 Ok")
    assert [await w.reply(5), await w.reply(5)] == [(250, "2.1.5 Ok"), (354, "End data")]
    assert w.idle


async def test_no_reply_in_time_is_a_timeout_and_a_late_one_is_kept() -> None:
    w, _ = wire()
    with pytest.raises(TimeoutError):
        await w.reply(0)
    w.data_received(b"250 late\r\n")
    assert await w.reply(0) == (250, "late")


async def test_replies_before_the_connection_ended_are_still_read() -> None:
    # Given a 421 and then the connection closed by the relay
    w, _ = wire()
    w.data_received(b"421 4.3.2 closing\r\n")
    w.connection_lost(None)
    # Then the 421 is read, and only after it the loss
    assert await w.reply(5) == (421, "4.3.2 closing")
    with pytest.raises(_Lost):
        await w.reply(5)
    with pytest.raises(_Lost):
        w.write(b"RSET\r\n")


@pytest.mark.parametrize(
    "data",
    # not SMTP; continuation lines that never end (~72 KB); no line end at all
    [b"HTTP/1.1 400 Bad Request\r\n", (b"250-" + b"x" * 70 + b"\r\n") * 1000, b"2" * 70_000],
    ids=["not-smtp", "endless-continuation", "no-line-end"],
)
async def test_garbage_or_an_endless_reply_breaks_the_connection(data: bytes) -> None:
    w, transport = wire()
    w.data_received(data)
    with pytest.raises(_Garbled):
        await w.reply(5)
    assert transport.aborted and not w.idle


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SinkServer]:
    async with SinkServer(SinkConfig(maildir=tmp_path / "md", log_path=tmp_path / "l")) as s:
        yield s


async def test_a_pooled_connection_that_spoke_unasked_is_not_reused(sink: SinkServer) -> None:
    # Given a pooled connection on which the relay sent a reply nobody asked for
    pool = RelayPool([sink.address], connections_per_relay=1, timeout_s=5.0)
    try:
        assert (
            await pool.send("a@example.com", "r@example.org", b"Subject: 1\r\n\r\nx")
        ).code == 250
        pooled = pool._relays[0].idle[0]
        pooled.wire.data_received(b"250 unsolicited\r\n")
        # When the next message is sent
        outcome = await pool.send("a@example.com", "s@example.org", b"Subject: 2\r\n\r\nx")
        # Then it went over a fresh connection, in step, and the old one was closed
        assert outcome.code == 250
        assert pool._relays[0].idle[0] is not pooled
        assert pool.relays()[0].open_connections == 1
        assert sink.stats.messages == 2
    finally:
        await pool.close()


async def test_connection_gone_before_the_body_is_transient_not_ambiguous() -> None:
    # Given a connection that went away right after its 354, before the body was written
    pool = RelayPool(["127.0.0.1:25"], timeout_s=1.0)
    w, transport = wire()
    transport.closing = True
    # When the body would go out
    verdict = await pool._finish(w, b"body\r\n.\r\n", "127.0.0.1:25")
    # Then nothing was written: a transient failure of the DATA step, not ambiguous
    assert (verdict.phase, verdict.failure) == (Phase.DATA, Failure.DISCONNECTED)
    assert transport.written == []
