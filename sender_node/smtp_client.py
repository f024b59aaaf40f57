"""SMTP delivery through relays over pooled, persistent connections.

The only module that imports aiosmtplib. :class:`RelayPool` keeps up to N connections
per relay and reuses each for many transactions.

Failover and circuit breakers: each relay has one ``pybreaker.CircuitBreaker`` (shared by
every message of the node) and one ``relay_breaker.TrialGate``. A send tries the relays
in the configured order, skipping a relay whose breaker is open; a relay fault before the
message was handed over (refused, timeout, 421, an auth failure such as 535, ...) sends
the transaction on to the next relay. Only relay faults (``classify``'s ``relay_fault``)
count against a breaker; a 550 for one recipient does not. After the breaker's reset
timeout exactly one transaction is let through as the trial, and the others keep failing
over meanwhile. When every relay is skipped the outcome is ``Failure.UNAVAILABLE``:
"all relays unavailable", a DEFERRED recipient, never a FAILED one.

Each transaction is driven step by step (MAIL, RCPT, DATA, content) rather than through
``SMTP.sendmail``, because sendmail cannot tell a timeout waiting for ``354`` (nothing
sent, safe to retry) from a timeout after the final dot (the relay may have the
message): the difference is the AMBIGUOUS outcome. Per-recipient refusals are still
honoured: with one recipient per transaction, a RCPT refusal is that recipient's result.

Every SMTP step has a deadline (``timeout_s``); the message transfer and the reply to the
final dot get ``relay_breaker.data_timeout_s``, which grows with the message size.
Cancelling a send closes the connection in use; a cancelled breaker trial gives no
verdict and leaves the breaker half-open for the next caller. Nothing here logs message
content, commands or credentials; aiosmtplib has no debug output to switch off.
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
import pybreaker

from sender_node.classify import Failure, Phase, classify
from sender_node.relay_breaker import Admission, BreakerState, TrialGate, data_timeout_s

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
    """True while the relay's breaker is not closed (transactions go to other relays)."""
    breaker_state: BreakerState = BreakerState.CLOSED
    """The relay's circuit breaker, for ``RelayStatus.breaker_state``."""
    consecutive_failures: int = 0
    """Relay faults since its last success."""


class _StepFailed(Exception):
    def __init__(self, outcome: SendOutcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


def _prepare_data(data: bytes) -> bytes:
    """CRLF line endings, dot-stuffing, and the terminating ``.CRLF``."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        # Bare CR or LF somewhere: normalise with the (slower) regular expressions.
        data = _LINE_ENDINGS.sub(b"\r\n", data)
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        return _LEADING_DOT.sub(b"..", data) + b".\r\n"
    # CRLF only (what the renderer produces): plain byte operations, ~15x faster.
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class _RelayFault(Exception):
    """Raised inside ``breaker.calling()`` so pybreaker counts the outcome as a failure."""

    def __init__(self, outcome: SendOutcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


class _LogTransitions(pybreaker.CircuitBreakerListener):
    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = old_state.name if old_state is not None else "none"
        if old != new_state.name:
            log.warning("relay %s: circuit breaker %s -> %s", cb.name, old, new_state.name)


class _Relay:
    def __init__(
        self, address: str, connections: int, breaker_failures: int, reset_timeout_s: float
    ) -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.slots = asyncio.Semaphore(connections)
        self.idle: list[aiosmtplib.SMTP] = []
        self.open = 0
        # Our own storage object, so the state and opened-at time are read through a
        # public API rather than the breaker's private attribute.
        self.storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=breaker_failures,
            reset_timeout=reset_timeout_s,
            # A cancelled transaction says nothing about the relay.
            exclude=[asyncio.CancelledError, SendAborted],
            state_storage=self.storage,
            listeners=[_LogTransitions()],
            name=address,
            # Re-raise the fault that tripped the breaker, so its outcome is reported.
            throw_new_error_on_trip=False,
        )
        self.gate = TrialGate(reset_timeout_s)

    def state(self) -> BreakerState:
        return BreakerState.parse(self.storage.state)

    def opened_at_s(self) -> float | None:
        opened_at = self.storage.opened_at
        return opened_at.timestamp() if opened_at is not None else None


class RelayPool:
    """Persistent SMTP connections to an ordered list of relays, each behind a breaker.

    Args:
        relays: ``host:port`` of each relay, preferred first.
        connections_per_relay: Bound on connections (and concurrent sends) per relay.
        timeout_s: Deadline of each SMTP step; the message transfer gets more, see
            ``min_throughput_bytes_per_s``.
        helo_name: Name given in EHLO.
        cooldown_s: Reset timeout of each relay's breaker: how long an open breaker
            skips its relay before one trial transaction is let through.
        breaker_failures: Consecutive relay faults that open a relay's breaker.
        min_throughput_bytes_per_s: Slowest transfer rate considered healthy; the
            deadline of the message transfer and final reply is ``timeout_s`` plus the
            message size at this rate.
        wall_clock: Unix seconds, the clock pybreaker stamps an opening with.
    """

    def __init__(
        self,
        relays: Sequence[str],
        *,
        connections_per_relay: int = 4,
        timeout_s: float = 30.0,
        helo_name: str = "localhost",
        cooldown_s: float = 5.0,
        breaker_failures: int = 5,
        min_throughput_bytes_per_s: float = 64 * 1024,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not relays:
            raise ValueError("at least one relay is required")
        if breaker_failures < 1 or cooldown_s < 0 or min_throughput_bytes_per_s <= 0:
            raise ValueError("bad breaker or throughput settings")
        self._relays = [
            _Relay(address, connections_per_relay, breaker_failures, cooldown_s)
            for address in relays
        ]
        self._timeout_s = timeout_s
        self._helo_name = helo_name
        self._min_throughput = min_throughput_bytes_per_s
        self._wall_clock = wall_clock
        self._closed = False

    def relays(self) -> list[RelayInfo]:
        """Current state of every relay, in order of preference."""
        infos = []
        for r in self._relays:
            state = r.state()
            infos.append(
                RelayInfo(
                    r.address,
                    r.open,
                    state is not BreakerState.CLOSED,
                    state,
                    r.breaker.fail_counter,
                )
            )
        return infos

    async def send(
        self,
        mail_from: str,
        rcpt: str,
        data: bytes,
        may_send: Callable[[], bool] | None = None,
    ) -> SendOutcome:
        """Send one message to one recipient through the first relay that takes it.

        Never raises for SMTP or network failures: they come back as a
        :class:`SendOutcome`. Cancelling the call closes the connection in use (its
        state is unknown) so the pool never reuses a half-finished transaction.

        Args:
            mail_from: Envelope sender.
            rcpt: Envelope recipient.
            data: The message, CRLF line endings, not dot-stuffed.
            may_send: Asked after a connection slot is obtained and again right before
                the message body goes out; when it answers False the transaction is
                abandoned (the connection is closed, so the relay discards it).

        Raises:
            SendAborted: may_send said no; nothing was delivered.
        """
        if self._closed:
            return SendOutcome(0, "node is shutting down", Phase.CONNECT, Failure.REFUSED)
        payload = _prepare_data(data)
        last: SendOutcome | None = None
        for relay in self._relays:
            outcome = await self._send_guarded(relay, mail_from, rcpt, payload, may_send)
            if outcome is None:
                continue  # breaker open or on trial: fail over without trying
            if not _try_next_relay(outcome):
                return outcome
            last = outcome
        if last is None:
            return SendOutcome(
                0,
                "every relay's circuit breaker is open or on trial",
                Phase.CONNECT,
                Failure.UNAVAILABLE,
            )
        return last

    async def _send_guarded(
        self,
        relay: _Relay,
        mail_from: str,
        rcpt: str,
        payload: bytes,
        may_send: Callable[[], bool] | None,
    ) -> SendOutcome | None:
        """One transaction through ``relay``'s breaker; None when the breaker refused it."""
        admission = relay.gate.admit(relay.state(), relay.opened_at_s(), self._wall_clock())
        if admission is Admission.SKIP:
            return None
        try:
            # calling() around the awaited transaction: pybreaker sees its real end
            # (breaker.call(async_fn) would record success on creating the coroutine).
            # pybreaker counts an excluded exception (cancellation) as a success: outside
            # a trial that only resets the run of consecutive faults.
            with relay.breaker.calling():
                outcome = await self._send_via(relay, mail_from, rcpt, payload, may_send)
                if _is_relay_fault(outcome):
                    raise _RelayFault(outcome)
            return outcome
        except _RelayFault as fault:
            return fault.outcome
        except pybreaker.CircuitBreakerError:
            return None  # pybreaker's own clock says the breaker is still open
        except (asyncio.CancelledError, SendAborted):
            if admission is Admission.TRIAL:
                # pybreaker took the (excluded) cancellation as a success and closed the
                # breaker; the trial gave no verdict, so let the next caller be the trial.
                relay.breaker.half_open()
            raise
        finally:
            if admission is Admission.TRIAL:
                relay.gate.release()

    async def _send_via(
        self,
        relay: _Relay,
        mail_from: str,
        rcpt: str,
        payload: bytes,
        may_send: Callable[[], bool] | None,
    ) -> SendOutcome:
        async with relay.slots:
            # The wait for a slot may have been long (or the process frozen meanwhile).
            if may_send is not None and not may_send():
                raise SendAborted("stopped while waiting for a connection")
            outcome = SendOutcome(0, "not attempted", Phase.CONNECT, Failure.REFUSED, relay.address)
            for attempt in range(2):
                reused = attempt == 0 and bool(relay.idle)
                try:
                    smtp = relay.idle.pop() if reused else await self._connect(relay)
                except _StepFailed as failed:
                    return failed.outcome
                keep = False
                try:
                    outcome, keep = await self._transaction(
                        smtp, relay, mail_from, rcpt, payload, may_send
                    )
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
        self,
        smtp: aiosmtplib.SMTP,
        relay: _Relay,
        mail_from: str,
        rcpt: str,
        payload: bytes,
        may_send: Callable[[], bool] | None = None,
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
            if may_send is not None and not may_send():
                # Past 354 the relay waits for the body; dropping the connection (the
                # caller closes it, keep is False) makes it discard the transaction.
                raise SendAborted("stopped before the message body")
            phase = Phase.DATA_END
            # No await between write and read_response: the reply cannot arrive unseen.
            # The deadline covers the transfer too (write only buffers), so it grows
            # with the size.
            protocol.write(payload)
            reply = await protocol.read_response(
                timeout=data_timeout_s(timeout, len(payload), self._min_throughput)
            )
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


class SendAborted(Exception):
    """The caller's ``may_send`` said no before the message body went out."""


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


def _is_relay_fault(outcome: SendOutcome) -> bool:
    """True when the outcome counts against the relay's breaker (see ``classify``)."""
    return classify(outcome.code, outcome.text, outcome.phase, outcome.failure).relay_fault


def _try_next_relay(outcome: SendOutcome) -> bool:
    """True when the relay itself failed before taking responsibility for the message.

    After the final dot the relay may hold the message (AMBIGUOUS) or gave its verdict:
    sending it through another relay would risk a duplicate or override a bounce.
    """
    return outcome.phase is not Phase.DATA_END and _is_relay_fault(outcome)
