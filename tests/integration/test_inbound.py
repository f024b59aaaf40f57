"""The inbound SMTP endpoint against a real PostgreSQL: it keeps what it accepts before
answering, refuses other domains and oversized mail, and caps its sessions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from coordinator.db.store import Database, Store
from coordinator.inbound import InboundConfig, start_inbound
from mailers_dev.procs import free_port
from tests.integration.test_store import NOW, leader

MESSAGE = b"From: mailer-daemon@mx.example\r\nSubject: bounce\r\n\r\nreport\r\n"


@contextlib.asynccontextmanager
async def endpoint(database: Database, **kw: object) -> AsyncIterator[int]:
    port = free_port()
    config = InboundConfig(
        listen=f"127.0.0.1:{port}", domains=frozenset({"bounces.example.com"}),
        token_key_file="/unused", **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    server = await start_inbound(config, Store(database), None)
    assert server is not None
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


async def test_what_is_accepted_is_kept_and_other_domains_are_refused(database: Database) -> None:
    async with endpoint(database) as port:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
            # Mail for another domain is refused: the endpoint is no relay
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await smtp.sendmail("", ["x@elsewhere.example"], MESSAGE)
            assert [r.code for r in refused.value.recipients] == [550]
            # Mail for the bounce domain is kept, one row per recipient, before the 250
            await smtp.sendmail(
                "", ["bounces+t1@bounces.example.com", "fbl@Bounces.Example.com"], MESSAGE
            )
    rows = await Store(database).inbound(10)
    assert sorted(r["rcpt_to"] for r in rows) == [
        "bounces+t1@bounces.example.com", "fbl@Bounces.Example.com",
    ]  # fmt: skip
    assert all(r["kind"] == "mail" and r["processed_at"] is None for r in rows)


async def test_size_and_session_limits(database: Database) -> None:
    async with endpoint(database, max_bytes=2048, max_connections=2) as port:
        # A message over the limit is refused with 552
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
            with pytest.raises(aiosmtplib.SMTPResponseException) as big:
                await smtp.sendmail("", ["b@bounces.example.com"], MESSAGE + b"x" * 4096)
            assert big.value.code == 552
        # Two sessions at once are served; a third is told to come back later
        first = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
        second = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
        await first.connect()
        await second.connect()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(10):
                greeting = await reader.readline()
            writer.close()
            assert greeting.startswith(b"421 "), greeting
        finally:
            await first.quit()
            await second.quit()
    assert await Store(database).inbound(10) == []


async def test_applied_rows_go_at_retention_and_pending_ones_stay(database: Database) -> None:
    store = await leader(database, 1)
    # Given two rows kept, one of them applied at NOW
    applied, pending = await store.intake("mail", "", ["a@b.example", "c@b.example"], b"x", NOW)
    await store.apply_inbound(applied, "unparsed", "", [], NOW)
    # When retention runs for rows applied before NOW + 1
    assert await store.purge_inbound(NOW + 1) == 1
    # Then only the pending row is left
    assert [r["id"] for r in await store.inbound(10)] == [pending]
