"""An in-process SMTP sink (aiosmtpd) on 127.0.0.1 port 0, with injectable faults.

The server runs on the test's own event loop (no thread), so faults are plain
attributes set by the test:

- ``refuse``: recipient → reply line for RCPT (e.g. ``"550 5.1.1 No such user"``).
- ``data_reply``: a reply to the final dot instead of ``250`` (e.g. ``"451 4.3.0 later"``).
- ``hold``: when set, the reply to the final dot waits until the event is set (a relay
  that took the message and went silent); release it to let the reply go. The client
  has sent the whole message by then, so a cancelled send waits for this reply (see
  ``RelayPool.send_group``): release it, or use ``hold_rcpt``, to test cancellation.
- ``hold_rcpt``: when set, each RCPT reply waits until the event is set: a transaction
  held before any body, which a cancelled send drops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.message
import email.policy
from collections.abc import AsyncIterator
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclasses.dataclass(frozen=True)
class Received:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes

    def parsed(self) -> email.message.EmailMessage:
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message


class SinkHandler:
    """aiosmtpd handler recording accepted messages."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.refuse: dict[str, str] = {}
        self.data_reply: str | None = None
        self.hold: asyncio.Event | None = None
        self.hold_rcpt: asyncio.Event | None = None
        self.data_started = 0
        self.rcpt_started = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        self.rcpt_started += 1
        if self.hold_rcpt is not None:
            await self.hold_rcpt.wait()
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_started += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.data_reply is not None:
            return self.data_reply
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        self.messages.append(Received(envelope.mail_from, tuple(envelope.rcpt_tos), content))
        return "250 2.0.0 OK queued"


@dataclasses.dataclass
class Sink:
    handler: SinkHandler
    address: str


@contextlib.asynccontextmanager
async def smtp_sink() -> AsyncIterator[Sink]:
    """Serve a :class:`SinkHandler` on a free loopback port for the duration of the block."""
    handler = SinkHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test", loop=loop), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield Sink(handler, f"127.0.0.1:{port}")
    finally:
        for event in (handler.hold, handler.hold_rcpt):
            if event is not None:
                event.set()
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)
