"""SMTP delivery through relays over pooled, persistent connections.

The only module that imports aiosmtplib. :class:`RelayPool` keeps up to N connections
per relay and reuses each for many transactions. A send tries the relays in order: the
first is preferred; on a connection-level failure (refused, greeting/EHLO error, lost
before the message was handed over) the next one is tried, and the failing relay is
skipped for a short cool-down so later sends do not pay its connect timeout again.

Each transaction is driven step by step (MAIL, RCPT, DATA, content) rather than through
``SMTP.sendmail``, because sendmail cannot tell a timeout waiting for ``354`` (nothing
sent, safe to retry) from a timeout after the final dot (the relay may have the
message): the difference is the AMBIGUOUS outcome. Per-recipient refusals are still
honoured: with one recipient per transaction, a RCPT refusal is that recipient's result.

Every SMTP step has a deadline (``timeout_s``). Nothing here logs message content,
commands or credentials; aiosmtplib has no debug output to switch off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence

import aiosmtplib

from sender_node.classify import Failure, Phase

log = logging.getLogger(__name__)

_LEADING_DOT = re.compile(rb"(?m)^\.")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """What happened to one transaction: the inputs of ``classify.classify``."""

    code: int
    """The deciding SMTP reply code; 0 when no reply decided (see ``failure``)."""
    text: str
    """The reply text, or a description of the failure."""
    phase: Phase
    """The failing step, or ``DATA_END`` when the relay gave its verdict on the message."""
    failure: Failure = Failure.NONE
    relay: str = ""
    """The relay that produced the outcome (the last one tried)."""


@dataclasses.dataclass(frozen=True)
class RelayInfo:
    """A relay as the pool sees it."""

    address: str
    open_connections: int
    cooling_down: bool
    """True while the relay is skipped after a connection failure."""


class _StepFailed(Exception):
    def __init__(self, outcome: SendOutcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


def _prepare_data(data: bytes) -> bytes:
    """CRLF line endings, dot-stuffing, and the terminating ``.CRLF``."""
    data = _LINE_ENDINGS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(b"..", data) + b".\r\n"


class _Relay:
    def __init__(self, address: str, connections: int) -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.slots = asyncio.Semaphore(connections)
        self.idle: list[aiosmtplib.SMTP] = []
        self.open = 0
        self.cool_until = 0.0


class RelayPool:
    """Persistent SMTP connections to an ordered list of relays.

    Args:
        relays: ``host:port`` of each relay, preferred first.
        connections_per_relay: Bound on connections (and concurrent sends) per relay.
        timeout_s: Deadline of each SMTP step.
        helo_name: Name given in EHLO.
        cooldown_s: How long a relay is skipped after a connection failure; it is
            still tried when every relay is cooling down.
        clock: Monotonic seconds, injectable for tests.
    """

    def __init__(
        self,
        relays: Sequence[str],
        *,
        connections_per_relay: int = 4,
        timeout_s: float = 30.0,
        helo_name: str = "localhost",
        cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not relays:
            raise ValueError("at least one relay is required")
        self._relays = [_Relay(address, connections_per_relay) for address in relays]
        self._timeout_s = timeout_s
        self._helo_name = helo_name
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._closed = False

    def relays(self) -> list[RelayInfo]:
        """Current state of every relay, in order of preference."""
        now = self._clock()
        return [RelayInfo(r.address, r.open, r.cool_until > now) for r in self._relays]

    async def send(self, mail_from: str, rcpt: str, data: bytes) -> SendOutcome:
        """Send one message to one recipient.

        Never raises for SMTP or network failures: they come back as a
        :class:`SendOutcome`. Cancelling the call closes the connection in use (its
        state is unknown) so the pool never reuses a half-finished transaction.

        Args:
            mail_from: Envelope sender.
            rcpt: Envelope recipient.
            data: The message, CRLF line endings, not dot-stuffed.
        """
        if self._closed:
            return SendOutcome(0, "node is shutting down", Phase.CONNECT, Failure.REFUSED)
        payload = _prepare_data(data)
        now = self._clock()
        ready = [r for r in self._relays if r.cool_until <= now]
        cooling = [r for r in self._relays if r.cool_until > now]
        outcome = SendOutcome(0, "no relay", Phase.CONNECT, Failure.REFUSED)
        for relay in ready + cooling:
            outcome = await self._send_via(relay, mail_from, rcpt, payload)
            if not _try_next_relay(outcome):
                return outcome
            now = self._clock()
            if relay.cool_until <= now:
                log.warning(
                    "relay %s failed (%s); skipping it for %.0fs",
                    relay.address,
                    outcome.text,
                    self._cooldown_s,
                )
            relay.cool_until = now + self._cooldown_s
        return outcome

    async def _send_via(
        self, relay: _Relay, mail_from: str, rcpt: str, payload: bytes
    ) -> SendOutcome:
        async with relay.slots:
            outcome = SendOutcome(0, "not attempted", Phase.CONNECT, Failure.REFUSED, relay.address)
            for attempt in range(2):
                reused = attempt == 0 and bool(relay.idle)
                try:
                    smtp = relay.idle.pop() if reused else await self._connect(relay)
                except _StepFailed as failed:
                    return failed.outcome
                keep = False
                try:
                    outcome, keep = await self._transaction(smtp, relay, mail_from, rcpt, payload)
                finally:
                    if keep and smtp.is_connected and not self._closed:
                        relay.idle.append(smtp)
                    else:
                        relay.open -= 1
                        smtp.close()
                # A pooled connection may have been closed by the relay while idle. That
                # shows up before the message was handed over, so one retry on a fresh
                # connection is safe and spares the recipient a deferral.
                stale = outcome.failure in (Failure.DISCONNECTED, Failure.PROTOCOL) or (
                    outcome.code == 421
                )
                if not (reused and stale and outcome.phase is not Phase.DATA_END):
                    return outcome
            return outcome

    async def _connect(self, relay: _Relay) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            timeout=self._timeout_s,
            local_hostname=self._helo_name,
            # Certificates of internal relays are often self-signed; STARTTLS is used
            # when offered, for privacy on the wire, without verification.
            validate_certs=False,
        )
        try:
            await smtp.connect(timeout=self._timeout_s)
            # EHLO now, so a relay refusing it is a connection failure, not a recipient's.
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo(timeout=self._timeout_s)
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _StepFailed(
                SendOutcome(exc.code, exc.message, Phase.CONNECT, relay=relay.address)
            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            raise _StepFailed(_no_reply(exc, Phase.CONNECT, relay.address)) from None
        relay.open += 1
        return smtp

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, relay: _Relay, mail_from: str, rcpt: str, payload: bytes
    ) -> tuple[SendOutcome, bool]:
        """Run MAIL/RCPT/DATA on a connected client; returns the outcome and whether
        the connection is fit for reuse."""
        timeout = self._timeout_s
        phase = Phase.MAIL
        try:
            await smtp.mail(mail_from, timeout=timeout)
            phase = Phase.RCPT
            await smtp.rcpt(rcpt, timeout=timeout)
            phase = Phase.DATA
            reply = await smtp.execute_command(b"DATA", timeout=timeout)
            if reply.code != 354:
                raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
            protocol = smtp.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            phase = Phase.DATA_END
            # No await between write and read_response: the reply cannot arrive unseen.
            protocol.write(payload)
            reply = await protocol.read_response(timeout=timeout)
        except aiosmtplib.SMTPResponseException as exc:
            keep = exc.code != 421 and await self._reset(smtp)
            return SendOutcome(exc.code, exc.message, phase, relay=relay.address), keep
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return _no_reply(exc, phase, relay.address), False
        except ValueError as exc:
            # aiosmtplib refuses an address it cannot encode before writing it; render.py
            # already rejects such addresses, so this is a safety net. Nothing was sent
            # for it, and the local 553 makes the recipient fail permanently.
            keep = await self._reset(smtp)
            return SendOutcome(
                553, f"address not sendable: {exc}", phase, relay=relay.address
            ), keep
        if reply.code == 421:
            return SendOutcome(reply.code, reply.message, phase, relay=relay.address), False
        return SendOutcome(reply.code, reply.message, Phase.DATA_END, relay=relay.address), True

    async def _reset(self, smtp: aiosmtplib.SMTP) -> bool:
        """RSET after a refused step; False when the connection should be dropped."""
        if not smtp.is_connected:
            return False
        try:
            reply = await smtp.rset(timeout=self._timeout_s)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return reply.code == 250

    async def close(self) -> None:
        """QUIT idle connections (each with a deadline) and refuse further sends.

        Connections in use are closed when their transaction ends.
        """
        self._closed = True
        for relay in self._relays:
            idle, relay.idle = relay.idle, []
            for smtp in idle:
                relay.open -= 1
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await smtp.quit(timeout=min(self._timeout_s, 2.0))
                smtp.close()


def _no_reply(exc: BaseException, phase: Phase, relay: str) -> SendOutcome:
    failure: Failure
    if isinstance(exc, TimeoutError):  # includes aiosmtplib's connect and read timeouts
        failure = Failure.TIMEOUT
    elif isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        failure = Failure.DISCONNECTED
    elif isinstance(exc, aiosmtplib.SMTPConnectError) or phase is Phase.CONNECT:
        failure = Failure.REFUSED
    elif isinstance(exc, OSError):
        failure = Failure.DISCONNECTED
    else:
        failure = Failure.PROTOCOL
    text = str(exc) or type(exc).__name__
    return SendOutcome(0, text, phase, failure, relay)


def _try_next_relay(outcome: SendOutcome) -> bool:
    """True when the relay itself failed before taking responsibility for the message."""
    if outcome.phase is Phase.CONNECT:
        return outcome.failure is not Failure.NONE or outcome.code >= 400
    if outcome.phase is Phase.DATA_END:
        return False
    return outcome.failure is not Failure.NONE or outcome.code == 421
