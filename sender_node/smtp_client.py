"""SMTP delivery through relays over pooled, persistent connections.

The only module that imports aiosmtplib. :class:`RelayPool` keeps up to N connections
per relay (the relay's ``connections``, else the pool default) and reuses each for many
transactions.

Choosing a relay: ``relay_choice.RelayChooser`` (pure) picks, per attempt, among the
relays not yet tried for this transaction whose breaker does not skip them and whose
SIZE limit is not known to be too small: ``failover`` takes the first in configured
order, ``balance`` uses smooth weighted round-robin by ``weight``. A relay with a
``rate`` has a ``throttle.TokenBucket`` (burst: one second's worth, at least one
message); each transaction takes one token. Out of tokens, ``failover`` sleeps exactly
until its preferred relay has one, and ``balance`` prefers a relay that has a token and
only sleeps (until the soonest one has) when none does. Sleeping goes through the
injected ``sleep``, time through the injected monotonic ``clock``.

Failover and circuit breakers: each relay has one ``relay_breaker.RelayBreaker`` (shared
by every message of the node: pybreaker plus a one-trial gate). A relay fault before the
message was handed over (refused, timeout, 421, a TLS or certificate failure, an auth
failure such as 535, ...) sends the still-undecided recipients on to the next relay in
the strategy's order. Only relay faults (``classify``'s ``relay_fault``) count against a
breaker; a 550 for one recipient does not. After the breaker's reset timeout exactly one
transaction is let through as the trial, and the others keep failing over meanwhile.
When every relay is skipped the outcome is ``Failure.UNAVAILABLE``: "all relays
unavailable", a DEFERRED recipient, never a FAILED one.

Security per relay (``config.RelayConfig``): ``tls=implicit`` connects with TLS,
``starttls`` requires STARTTLS (a relay not offering it is a relay fault), ``auto``
upgrades when STARTTLS is offered, ``none`` never does. Certificates and host names are
verified in every TLS mode (system trust store, or the relay's ``ca``) unless the relay
says ``verify=false``; a failed verification is a relay fault, never a downgrade to
plaintext. AUTH (``login``: PLAIN, LOGIN or CRAM-MD5, whatever the relay offers) happens
only on an encrypted connection; an ``auto`` relay without STARTTLS is refused as a
relay fault rather than sent the password in clear.

SIZE (RFC 1870): when a connection's EHLO advertises ``SIZE n``, MAIL carries
``SIZE=<bytes>`` and a message above ``n`` is not sent on it; the next relay is tried.
When every relay's advertised limit is too small the recipients fail permanently with a
local ``552 5.3.4``.

Connections: aiosmtplib opens each connection (connect, greeting, EHLO, STARTTLS, AUTH)
and then hands its transport to :class:`_Wire`, our own small reply reader, which runs
every transaction on it. aiosmtplib's protocol pairs one reply with one command and
drops replies that arrive unasked, so it cannot pipeline; and its step-by-step API
cannot tell a timeout waiting for ``354`` (nothing sent, safe to retry) from one after
the final dot (the relay may have the message: AMBIGUOUS). A ``STARTTLS`` answered with
anything but ``220`` is a relay fault, and so is a connection on which TLS did not
actually start: never a fall back to plaintext.

Transactions: when the relay's EHLO advertises ``PIPELINING`` (RFC 2920) and the pool
allows it, MAIL, every RCPT and DATA go out in one write (preceded by RSET when the
previous transaction on the connection left one open: RSET is sent only then), and the
replies are read in order; otherwise each command waits for the previous reply. The
pure ``classify.Envelope`` judges the replies the same way in both modes: each RCPT
refusal is that recipient's own outcome, only ``354`` to DATA lets the body go (a
``250`` there is a relay protocol fault, never a delivery), and only a 2xx to the final
dot delivers. :meth:`RelayPool.send_group` sends one message to several recipients in
one transaction; the accepted recipients share the outcome of the data. CHUNKING/BDAT
(RFC 3030) is not used: neither Postfix's smtp-sink nor aiosmtpd offers it, so no gain
could be measured here, and with PIPELINING a message already costs two writes.

Deadlines: every reply before the body must come within ``timeout_s`` of the previous
one. The body and the reply to its final dot get ``final_reply_timeout_s`` plus the
message size at ``min_throughput_bytes_per_s`` (``relay_breaker.data_timeout_s``); a
timeout or disconnect there is AMBIGUOUS.

Cancellation: cancelling a send before the body goes out closes the connection in use,
so the relay discards the transaction. Once ``may_send`` has said yes and the body is
written, the transaction runs to its final reply (or its deadline) even if the caller
is cancelled: the cancellation is caught and the wait resumed until then, then it is
re-raised, and the connection is then closed between transactions, never cut after the
dot (a cut there is exactly the lost-250 ambiguity). A cancelled breaker trial gives no
verdict and leaves the breaker half-open for the next caller.

Nothing here logs message content, commands or credentials (aiosmtplib has no debug
output to switch off), and no outcome text ever contains a password: only
:class:`config.Secret` holds it, and it is revealed solely as the argument of ``login``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, cast

import aiosmtplib
import pybreaker
from aiosmtplib.email import quote_address

from mailers_runtime.breaker import BreakerState
from sender_node.classify import After, Envelope, Failure, Phase, Verdict, classify
from sender_node.config import RelayConfig, RelayTls, parse_relay
from sender_node.relay_breaker import Admission, RelayBreaker, data_timeout_s
from sender_node.relay_choice import Candidate, RelayChooser, Strategy
from sender_node.throttle import TokenBucket

log = logging.getLogger(__name__)

_LEADING_DOT = re.compile(rb"(?m)^\.")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_FINAL_DOT = b".\r\n"
# A mailbox that needs no quoting or checking beyond this: the common case, encoded
# without aiosmtplib's (much slower) parser.
_PLAIN_MAILBOX = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_PENDING_REPLY_BYTES = 64 * 1024
"""A reply (with its continuation lines) longer than this is not SMTP."""

MaySend = Callable[[], bool]
"""Asked right before a message body goes out: False abandons the transaction."""


class SendOutcome(NamedTuple):
    """What happened to one recipient of a transaction: the inputs of ``classify.classify``.

    A named tuple, not a frozen dataclass: a transaction makes a few, and a frozen
    dataclass sets each field through ``object.__setattr__`` (11.5k instructions to
    build one, against about 3k, by callgrind)."""

    code: int
    """The deciding SMTP reply code; 0 when no reply decided (see ``failure``)."""
    text: str
    """The reply text, or a description of the failure."""
    phase: Phase
    """The failing step, or ``DATA_END`` when the relay gave its verdict on the message."""
    failure: Failure = Failure.NONE
    relay: str = ""
    """The relay that produced the outcome (the last one tried; empty for local verdicts)."""


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


class _Refused(Exception):
    """We refuse to go on with a connection (no STARTTLS where required, AUTH in clear)."""


class _TooLarge(Exception):
    """The connection's advertised SIZE limit is below the message: try another relay.

    Excluded from the breaker: the relay answered, it is just too small for this message.
    """


class _Declined(enum.Enum):
    """A relay that did not take part in the transaction."""

    SKIPPED = "skipped"
    """Its breaker is open or on trial."""
    TOO_LARGE = "too_large"
    """Its advertised SIZE limit is below the message."""


def _prepare_data(data: bytes) -> bytes:
    """CRLF line endings, dot-stuffing, and the terminating ``.CRLF``."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        # Bare CR or LF somewhere: normalise with the (slower) regular expressions.
        data = _LINE_ENDINGS.sub(b"\r\n", data)
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        return _LEADING_DOT.sub(b"..", data) + _FINAL_DOT
    # CRLF only (what the renderer produces): plain byte operations, ~15x faster.
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    if b"\n." in data:  # a search costs a tenth of a replace that finds nothing
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + _FINAL_DOT


def _path(address: str) -> bytes:
    """``<address>`` as it goes after ``MAIL FROM:`` or ``RCPT TO:``.

    Raises:
        ValueError: the address is not ASCII, or holds characters that could smuggle
            parameters or commands onto the line (aiosmtplib's rules).
    """
    if _PLAIN_MAILBOX.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    if _CONTROL.search(address):
        raise ValueError(f"address {address!r} contains control characters")
    return quote_address(address).encode("ascii")


def parse_replies(buffer: bytes | bytearray) -> tuple[list[tuple[int, str]], int]:
    """The complete SMTP replies at the start of ``buffer``, and the bytes they span.

    A multi-line reply (``250-...`` lines, then ``250 ...``) is one reply whose text
    joins its lines with ``\\n``. A reply still arriving is left for the next call.

    Raises:
        ValueError: a line that is not ``<3 digits>[ -]<text>``.
    """
    end = buffer.rfind(b"\n")
    if end < 0:
        return [], 0
    replies: list[tuple[int, str]] = []
    pending: list[str] = []
    consumed = 0
    position = 0
    # One split of everything complete, then one pass: pipelined replies come in bursts.
    for line in bytes(buffer[:end]).split(b"\n"):
        position += len(line) + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        code, separator = line[:3], line[3:4]
        if len(code) != 3 or not code.isdigit() or separator not in (b" ", b"-", b""):
            raise ValueError(f"not an SMTP reply: {line[:80]!r}")
        text = line[4:].strip().decode("utf-8", "surrogateescape")
        if separator == b"-":
            pending.append(text)
            continue
        if pending:
            pending.append(text)
            text = "\n".join(pending)
            pending = []
        replies.append((int(code), text))
        consumed = position
    return replies, consumed


class _Lost(ConnectionError):
    """The relay closed the connection (or it broke) before the reply came."""


class _Garbled(Exception):
    """The relay sent something that is not an SMTP reply."""


class _Wire(asyncio.Protocol):
    """Reads SMTP replies off a connection that aiosmtplib set up, in order, pipelined
    or not. Replies are parsed as bytes arrive and queued; :meth:`reply` takes the next.

    Args:
        transport: The connection's transport (TCP or TLS); this protocol replaces
            aiosmtplib's on it.
    """

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._buffer = bytearray()
        self._replies: collections.deque[tuple[int, str]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._broken: tuple[type[Exception], str] | None = None
        transport.set_protocol(self)

    @property
    def alive(self) -> bool:
        """False once the connection is lost or closing."""
        return self._broken is None and not self._transport.is_closing()

    @property
    def idle(self) -> bool:
        """Alive, with every reply read: fit for the next transaction. A reply nobody
        asked for (a relay announcing its timeout, say) would put every later reply
        out of step with its command."""
        return not self._replies and not self._buffer and self.alive

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if b"\n" in data:
            try:
                replies, consumed = parse_replies(buffer)
            except ValueError as exc:
                self._break(_Garbled, str(exc))
                return
            del buffer[:consumed]
            if replies:
                self._replies.extend(replies)
                self._wake()
        if len(buffer) > _MAX_PENDING_REPLY_BYTES:
            self._break(_Garbled, "reply too long")

    def eof_received(self) -> bool:
        self._break(_Lost, "connection closed by the relay")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(_Lost, f"connection lost: {exc}" if exc else "connection lost")

    def _break(self, kind: type[Exception], text: str) -> None:
        if self._broken is None:
            self._broken = (kind, text)
        if kind is _Garbled:
            # Nothing after garbage can be trusted to be in step with our commands.
            self._transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write(self, data: bytes) -> None:
        """Queue bytes on the transport (it sends what it can at once).

        Raises:
            _Lost: the connection is gone.
        """
        if not self.alive:
            raise _Lost(self._broken[1] if self._broken else "connection closing")
        self._transport.write(data)

    async def reply(self, timeout_s: float) -> tuple[int, str]:
        """The next reply, waiting at most ``timeout_s`` for it when none is queued.
        Cancellable; a reply arriving later stays queued for the next call.

        Raises:
            TimeoutError: no reply within ``timeout_s``.
            _Lost: the connection ended first.
            _Garbled: the relay sent something that is not a reply.
        """
        if not self._replies:
            if self._broken is None:
                loop = asyncio.get_running_loop()
                waiter = loop.create_future()
                self._waiter = waiter
                # A bare timer on the waiter rather than asyncio.timeout(): one reply
                # wait per command, and this is the transaction's hot path. It never
                # touches the task's cancellation count, so a caller may keep waiting
                # after a cancellation (see RelayPool._finish).
                timer = loop.call_later(timeout_s, _expire, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
            if not self._replies:
                kind, text = self._broken or (_Lost, "connection lost")
                raise kind(text)
        return self._replies.popleft()

    def close(self) -> None:
        """Close the connection (buffered bytes are still sent first)."""
        self._transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    """A reply wait's deadline passed (see :meth:`_Wire.reply`)."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection:
    """One relay connection after greeting, EHLO, TLS and AUTH, driven by a :class:`_Wire`."""

    __slots__ = ("wire", "pipelining", "declare_size", "size_limit", "reset_due")

    def __init__(self, smtp: aiosmtplib.SMTP, pipelining: bool) -> None:
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost after setup")
        # uvloop's transports do not derive from asyncio's classes: no isinstance here.
        self.wire = _Wire(cast(asyncio.WriteTransport, transport))
        self.pipelining = pipelining and smtp.supports_extension("pipelining")
        """Write the envelope in one go (the relay advertises PIPELINING)."""
        self.declare_size = smtp.supports_extension("size")
        """MAIL carries ``SIZE=`` (RFC 1870)."""
        self.size_limit = _size_limit(smtp)
        """The SIZE limit the relay advertised on this connection, if any."""
        self.reset_due = False
        """The last transaction left one open at the relay: RSET before the next MAIL."""

    async def quit(self, timeout_s: float) -> None:
        """QUIT, wait at most ``timeout_s`` for the reply, and close in any case."""
        try:
            self.wire.write(b"QUIT\r\n")
            await self.wire.reply(timeout_s)
        except (OSError, TimeoutError, _Garbled):
            pass
        finally:
            self.wire.close()


class _Setup:
    """Sets one relay connection up with aiosmtplib, step by step, each step with a
    deadline; ``step`` names the step under way, for the text of a failure.

    Args:
        relay: The relay to connect to (address, TLS mode and context, credentials).
        timeout_s: Deadline of each step.
        helo_name: Name given in EHLO.
    """

    def __init__(self, relay: _Relay, timeout_s: float, helo_name: str) -> None:
        self._config = relay.config
        self._timeout_s = timeout_s
        self.smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            timeout=timeout_s,
            local_hostname=helo_name,
            use_tls=relay.config.tls is RelayTls.IMPLICIT,
            # STARTTLS is ours to decide (aiosmtplib's default would upgrade silently).
            start_tls=False,
            tls_context=relay.tls_context,
        )
        self.step = "connect"

    async def run(self) -> None:
        """Connect, EHLO, STARTTLS (as configured), AUTH (when configured).

        Raises:
            _Refused: the connection cannot be used safely (no TLS where required).
            aiosmtplib.SMTPException | OSError | TimeoutError: a step failed.
        """
        smtp, timeout = self.smtp, self._timeout_s
        await smtp.connect(timeout=timeout)
        # EHLO now, so a relay refusing it is a connection failure, not a recipient's.
        self.step = "EHLO"
        if smtp.is_ehlo_or_helo_needed:
            await smtp.ehlo(timeout=timeout)
        encrypted = self._config.tls is RelayTls.IMPLICIT
        if self._config.tls in (RelayTls.AUTO, RelayTls.STARTTLS):
            encrypted = await self._starttls()
        config = self._config
        if config.user is not None and config.password is not None:
            if not encrypted:
                raise _Refused(
                    "refusing AUTH over an unencrypted connection"
                    " (the relay does not offer STARTTLS)"
                )
            self.step = "AUTH"
            await smtp.login(config.user, config.password.reveal(), timeout=timeout)

    async def _starttls(self) -> bool:
        """STARTTLS if the relay offers it, then EHLO again; whether TLS started.

        Raises:
            _Refused: ``tls=starttls`` and the relay does not offer it, or TLS did not
                actually start.
        """
        smtp, timeout = self.smtp, self._timeout_s
        if not smtp.supports_extension("starttls"):
            if self._config.tls is RelayTls.STARTTLS:
                raise _Refused("the relay does not offer STARTTLS (tls=starttls)")
            return False
        self.step = "STARTTLS"
        # aiosmtplib raises unless the reply is 220 and the handshake completes; a 250
        # (or any other reply) is a relay fault (see _setup_failure).
        await smtp.starttls(timeout=timeout)
        if smtp.get_transport_info("sslcontext") is None:
            raise _Refused("STARTTLS: TLS did not start; not sending in plaintext")
        # RFC 3207: forget what the plaintext EHLO said, ask again.
        self.step = "EHLO after STARTTLS"
        await smtp.ehlo(timeout=timeout)
        return True


def _setup_failure(exc: Exception, step: str, relay: str) -> SendOutcome:
    """The outcome (a relay fault, phase CONNECT) of a connection that failed at ``step``."""
    if isinstance(exc, _Refused):
        return SendOutcome(0, str(exc), Phase.CONNECT, Failure.PROTOCOL, relay)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = exc.message
        if 200 <= exc.code < 300:
            # A success where another reply was due (220 to STARTTLS, 235 to AUTH):
            # say which step, since classify makes it a protocol fault.
            text = f"{step}: {text}"
        return SendOutcome(exc.code, text, Phase.CONNECT, relay=relay)
    outcome = _no_reply(exc, Phase.CONNECT, relay)
    if step != "connect":
        outcome = outcome._replace(text=f"{step}: {outcome.text}")
    return outcome


class _RelayFault(Exception):
    """Raised inside ``breaker.calling()`` so pybreaker counts the outcome as a failure."""

    def __init__(self, outcomes: list[SendOutcome], fault: SendOutcome) -> None:
        super().__init__(fault.text)
        self.outcomes = outcomes


def _tls_context(config: RelayConfig) -> ssl.SSLContext | None:
    """The client context of a relay: verifying (system store or ``ca``) unless
    ``verify=false``; None for ``tls=none``."""
    if config.tls is RelayTls.NONE:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"relay {config.address}: cannot load ca {config.ca_file!r}: {exc}"
        ) from exc
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Relay:
    def __init__(
        self,
        index: int,
        config: RelayConfig,
        connections: int,
        breaker_failures: int,
        reset_timeout_s: float,
        now_s: float,
    ) -> None:
        self.index = index
        self.config = config
        self.address = config.address
        self.host = config.host
        self.port = config.port
        self.tls_context = _tls_context(config)
        self.slots = asyncio.Semaphore(connections)
        self.idle: list[_Connection] = []
        self.open = 0
        self.size_limit: int | None = None
        """SIZE advertised by the relay's most recent EHLO; None: unknown or unlimited."""
        self.bucket: TokenBucket | None = None
        if config.rate_per_s is not None:
            rate = config.rate_per_s
            self.bucket = TokenBucket.full(rate, max(1.0, rate), now_s)
        self.breaker = RelayBreaker(
            config.address,
            fail_max=breaker_failures,
            reset_timeout_s=reset_timeout_s,
            # A cancelled transaction says nothing about the relay; one too large for it
            # says the relay answered.
            exclude=[asyncio.CancelledError, SendAborted, _TooLarge],
        )

    def too_small_for(self, size: int) -> bool:
        return self.size_limit is not None and size > self.size_limit


class RelayPool:
    """Persistent SMTP connections to a list of relays, each behind a breaker.

    Args:
        relays: Each relay as a ``config.RelayConfig``, or a string in the
            ``MAILER_RELAYS`` entry syntax (``host:port`` plus ``;key=value`` options,
            without ``password_env``), in configured order.
        strategy: ``FAILOVER`` (configured order) or ``BALANCE`` (by ``weight``).
        connections_per_relay: Bound on connections (and concurrent sends) of a relay
            that does not set its own ``connections``.
        timeout_s: Deadline of each SMTP step before the message body (connect, TLS
            handshake, EHLO, AUTH, RSET, MAIL, each RCPT, DATA).
        final_reply_timeout_s: Deadline of the reply to the final dot (plus the transfer
            time, see ``min_throughput_bytes_per_s``); at least ``timeout_s``. None:
            ``max(60, timeout_s)``. A timeout there is AMBIGUOUS, so it is kept long.
        helo_name: Name given in EHLO.
        cooldown_s: Reset timeout of each relay's breaker: how long an open breaker
            skips its relay before one trial transaction is let through.
        breaker_failures: Consecutive relay faults that open a relay's breaker.
        min_throughput_bytes_per_s: Slowest transfer rate considered healthy; the
            deadline of the message transfer and final reply is ``final_reply_timeout_s``
            plus the message size at this rate.
        pipelining: Pipeline each transaction's envelope (RFC 2920) on connections whose
            relay advertises PIPELINING; False always waits for each reply.
        wall_clock: Unix seconds, the clock pybreaker stamps an opening with.
        clock: Monotonic seconds, for the relays' rate limits.
        sleep: Waits the given seconds (for a relay's rate limit); cancellable.

    Raises:
        ValueError: no relay, bad settings, a malformed relay string, or an
            unreadable ``ca`` file.
    """

    def __init__(
        self,
        relays: Sequence[RelayConfig | str],
        *,
        strategy: Strategy = Strategy.FAILOVER,
        connections_per_relay: int = 4,
        timeout_s: float = 30.0,
        final_reply_timeout_s: float | None = None,
        helo_name: str = "localhost",
        cooldown_s: float = 5.0,
        breaker_failures: int = 5,
        min_throughput_bytes_per_s: float = 64 * 1024,
        pipelining: bool = True,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not relays:
            raise ValueError("at least one relay is required")
        if breaker_failures < 1 or cooldown_s < 0 or min_throughput_bytes_per_s <= 0:
            raise ValueError("bad breaker or throughput settings")
        if connections_per_relay < 1:
            raise ValueError("connections_per_relay must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if final_reply_timeout_s is None:
            final_reply_timeout_s = max(60.0, timeout_s)
        if final_reply_timeout_s < timeout_s:
            raise ValueError("final_reply_timeout_s must not be below timeout_s")
        configs = [r if isinstance(r, RelayConfig) else parse_relay(r, {}) for r in relays]
        now_s = clock()
        self._relays = [
            _Relay(
                index,
                config,
                config.connections or connections_per_relay,
                breaker_failures,
                cooldown_s,
                now_s,
            )
            for index, config in enumerate(configs)
        ]
        self._chooser = RelayChooser(strategy, [c.weight for c in configs])
        # Failover without rate limits needs no chooser: the first relay that can take it.
        self._in_order = strategy is Strategy.FAILOVER and all(
            r.bucket is None for r in self._relays
        )
        self._timeout_s = timeout_s
        self._final_reply_timeout_s = final_reply_timeout_s
        self._pipelining = pipelining
        self._helo_name = helo_name
        self._min_throughput = min_throughput_bytes_per_s
        self._wall_clock = wall_clock
        self._clock = clock
        self._sleep = sleep
        self._closed = False

    def relays(self) -> list[RelayInfo]:
        """Current state of every relay, in configured order."""
        infos = []
        for r in self._relays:
            state = r.breaker.state()
            infos.append(
                RelayInfo(
                    r.address,
                    r.open,
                    state is not BreakerState.CLOSED,
                    state,
                    r.breaker.circuit.fail_counter,
                )
            )
        return infos

    async def send(
        self,
        mail_from: str,
        rcpt: str,
        data: bytes,
        may_send: MaySend | None = None,
    ) -> SendOutcome:
        """Send one message to one recipient: :meth:`send_group` with one recipient.

        Never raises for SMTP or network failures: they come back as a
        :class:`SendOutcome`. Cancellation is as for :meth:`send_group`.

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
        return (await self.send_group(mail_from, [rcpt], data, may_send))[0]

    async def send_group(
        self, mail_from: str, rcpts: Sequence[str], data: bytes, may_send: MaySend | None = None
    ) -> list[SendOutcome]:
        """Send one message to several recipients in one SMTP transaction per relay.

        Returns one outcome per recipient, in order. A recipient refused at RCPT gets
        that refusal; the accepted ones share the outcome of the data: delivered only
        when the relay answers the final dot with 2xx. When every RCPT is refused no
        data is sent (the connection is kept; RSET goes before its next MAIL). A relay fault
        before the data was handed over moves the recipients not yet decided to the
        next relay in the strategy's order; after the final dot nothing moves (the relay
        may hold the message: AMBIGUOUS). Each transaction takes one token of the
        relay's rate limit, and may sleep for it.

        Never raises for SMTP or network failures.

        Timeouts: each reply before the body within ``timeout_s`` (else TRANSIENT);
        the body and the final reply within ``final_reply_timeout_s`` plus the transfer
        time (else AMBIGUOUS).

        Cancellation: before ``may_send`` approved the body, cancelling closes the
        connection in use (the relay discards the transaction) and propagates at once.
        After it, the wait for the final reply resumes after each cancellation (bounded
        by the final-reply deadline); then the connection is closed between
        transactions and the cancellation propagates. The relay's verdict is
        then only logged (code, never content): the caller asked not to hear it.

        Args:
            mail_from: Envelope sender.
            rcpts: Envelope recipients (one message for all).
            data: The message, CRLF line endings, not dot-stuffed.
            may_send: As for :meth:`send`.

        Raises:
            SendAborted: may_send said no; nothing was delivered.
        """
        if not rcpts:
            return []
        if self._closed:
            closing = SendOutcome(0, "node is shutting down", Phase.CONNECT, Failure.REFUSED)
            return [closing] * len(rcpts)
        payload = _prepare_data(data)
        # What the relay counts against its SIZE limit: the content as transmitted.
        size = len(payload) - len(_FINAL_DOT)
        # Each recipient's latest outcome; final once it is no longer pending.
        outcomes: list[SendOutcome | None] = [None] * len(rcpts)
        pending = list(range(len(rcpts)))
        tried: set[int] = set()
        while pending:
            relay = await self._next_relay(tried, size)
            if relay is None:
                break
            got = await self._send_guarded(
                relay, mail_from, [rcpts[i] for i in pending], payload, size, may_send
            )
            if not isinstance(got, _Declined):  # declined: skipped or too small, no fault
                pending = _fail_over_undecided(pending, got, outcomes)
        return self._final_outcomes(outcomes, pending, size)

    def _final_outcomes(
        self, outcomes: list[SendOutcome | None], pending: list[int], size: int
    ) -> list[SendOutcome]:
        """Every recipient's final outcome: those still pending when no relay was left
        keep their last relay's outcome, or get :meth:`_nobody_took_it`."""
        for i in pending:
            outcomes[i] = outcomes[i] or self._nobody_took_it(size)
        return [o for o in outcomes if o is not None]

    def _nobody_took_it(self, size: int) -> SendOutcome:
        if all(r.too_small_for(size) for r in self._relays):
            return SendOutcome(
                552, f"5.3.4 message size {size} exceeds every relay's SIZE limit", Phase.MAIL
            )
        return SendOutcome(
            0,
            "every relay's circuit breaker is open or on trial",
            Phase.CONNECT,
            Failure.UNAVAILABLE,
        )

    async def _next_relay(self, tried: set[int], size: int) -> _Relay | None:
        """The relay for the next attempt (added to ``tried``), with one rate-limit token
        taken; None when no relay is left. May sleep (exactly the computed wait) for a
        token."""
        if self._in_order:
            wall_s = self._wall_clock()
            for r in self._relays:
                if (
                    r.index not in tried
                    and not r.too_small_for(size)
                    and r.breaker.admissible(wall_s)
                ):
                    tried.add(r.index)
                    return r
            return None
        while True:
            now_s = self._clock()
            wall_s = self._wall_clock()
            candidates = [
                Candidate(r.index, r.bucket.wait_s(now_s) if r.bucket is not None else 0.0)
                for r in self._relays
                if r.index not in tried
                and not r.too_small_for(size)
                and r.breaker.admissible(wall_s)
            ]
            choice = self._chooser.choose(candidates)
            if choice is None:
                return None
            if choice.wait_s > 0:
                await self._sleep(choice.wait_s)
                continue
            relay = self._relays[choice.index]
            if relay.bucket is None or relay.bucket.try_take(now_s):
                tried.add(relay.index)
                return relay

    async def _send_guarded(
        self,
        relay: _Relay,
        mail_from: str,
        rcpts: list[str],
        payload: bytes,
        size: int,
        may_send: MaySend | None,
    ) -> list[SendOutcome] | _Declined:
        """One transaction through ``relay``'s breaker, or why the relay did not take it."""
        admission = relay.breaker.admit(self._wall_clock())
        if admission is Admission.SKIP:
            return _Declined.SKIPPED
        try:
            # calling() around the awaited transaction: pybreaker sees its real end
            # (breaker.call(async_fn) would record success on creating the coroutine).
            # pybreaker counts an excluded exception (cancellation) as a success: outside
            # a trial that only resets the run of consecutive faults.
            with relay.breaker.circuit.calling():
                outcomes = await self._send_via(relay, mail_from, rcpts, payload, size, may_send)
                fault = next((o for o in outcomes if _is_relay_fault(o)), None)
                if fault is not None:
                    raise _RelayFault(outcomes, fault)
            return outcomes
        except _RelayFault as fault:
            return fault.outcomes
        except _TooLarge:
            return _Declined.TOO_LARGE
        except pybreaker.CircuitBreakerError:
            return _Declined.SKIPPED  # pybreaker's own clock says the breaker is still open
        except (asyncio.CancelledError, SendAborted):
            if admission is Admission.TRIAL:
                # pybreaker took the (excluded) cancellation as a success and closed the
                # breaker; the trial gave no verdict, so let the next caller be the trial.
                relay.breaker.circuit.half_open()
            raise
        finally:
            if admission is Admission.TRIAL:
                relay.breaker.release_trial()

    async def _send_via(
        self,
        relay: _Relay,
        mail_from: str,
        rcpts: list[str],
        payload: bytes,
        size: int,
        may_send: MaySend | None,
    ) -> list[SendOutcome]:
        async with relay.slots:
            # The wait for a slot may have been long (or the process frozen meanwhile).
            if may_send is not None and not may_send():
                raise SendAborted("stopped while waiting for a connection")
            untried = SendOutcome(0, "not attempted", Phase.CONNECT, Failure.REFUSED, relay.address)
            results = [untried] * len(rcpts)
            todo = list(range(len(rcpts)))
            while relay.idle and not relay.idle[-1].wire.idle:
                # Closed by the relay while idle (or it spoke unasked): no need to try it.
                self._release(relay, relay.idle.pop(), keep=False)
            for attempt in range(2):
                reused = attempt == 0 and bool(relay.idle)
                try:
                    conn = relay.idle.pop() if reused else await self._connect(relay)
                except _StepFailed as failed:
                    for i in todo:
                        results[i] = failed.outcome
                    return results
                if conn.size_limit is not None and size > conn.size_limit:
                    self._release(relay, conn, keep=True)
                    raise _TooLarge(f"message size {size} exceeds the relay's limit")
                keep = False
                try:
                    outcomes, keep = await self._transaction(
                        conn, relay, mail_from, [rcpts[i] for i in todo], payload, size, may_send
                    )
                finally:
                    self._release(relay, conn, keep)
                for i, outcome in zip(todo, outcomes, strict=True):
                    results[i] = outcome
                if not reused:
                    break
                # A pooled connection may have been closed by the relay while idle. That
                # shows up before the message was handed over, so one retry on a fresh
                # connection is safe and spares the recipients a deferral.
                todo = [i for i in todo if _stale(results[i])]
                if not todo:
                    break
            return results

    def _release(self, relay: _Relay, conn: _Connection, keep: bool) -> None:
        if keep and conn.wire.idle and not self._closed:
            relay.idle.append(conn)
        else:
            relay.open -= 1
            conn.wire.close()

    async def _connect(self, relay: _Relay) -> _Connection:
        """Connect, EHLO, TLS as configured, AUTH when configured (aiosmtplib, each step
        with a deadline), then take the connection over for transactions.

        Raises:
            _StepFailed: any step failed; its outcome is a relay fault (phase CONNECT).
        """
        setup = _Setup(relay, self._timeout_s, self._helo_name)
        try:
            await setup.run()
            setup.step = "setup"
            conn = _Connection(setup.smtp, self._pipelining)
        except (_Refused, aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            setup.smtp.close()
            raise _StepFailed(_setup_failure(exc, setup.step, relay.address)) from None
        relay.open += 1
        relay.size_limit = conn.size_limit
        return conn

    async def _transaction(
        self,
        conn: _Connection,
        relay: _Relay,
        mail_from: str,
        rcpts: list[str],
        payload: bytes,
        size: int,
        may_send: MaySend | None = None,
    ) -> tuple[list[SendOutcome], bool]:
        """One transaction on a set-up connection: (RSET,) MAIL, a RCPT per recipient,
        DATA, pipelined when the connection allows it, then the body.

        Returns an outcome per recipient and whether the connection is fit for reuse.
        Cancellation before the body closes the connection (the caller does); after
        it, see :meth:`_finish`.

        Raises:
            SendAborted: ``may_send`` said no before the body.
        """
        address = relay.address
        outcomes: list[SendOutcome | None] = [None] * len(rcpts)
        commands = [b"RSET\r\n"]
        declared = size if conn.declare_size else None
        sent = _envelope_commands(commands, outcomes, mail_from, rcpts, declared, address)
        if not sent:
            return [o for o in outcomes if o is not None], True
        envelope = Envelope(len(sent), pipelined=conn.pipelining, reset_first=conn.reset_due)
        conn.reset_due = False
        wire = conn.wire
        timeout = self._timeout_s
        try:
            if conn.pipelining:
                wire.write(b"".join(commands[envelope.position :]))
            while not envelope.done:
                if not conn.pipelining:
                    wire.write(commands[envelope.position])
                code, text = await wire.reply(timeout)
                envelope.feed(code, text)
        except (OSError, TimeoutError, _Garbled) as exc:
            envelope.fail(_failure(exc), _describe(exc))
        for i, verdict in zip(sent, envelope.verdicts, strict=True):
            if verdict is not None:  # a RCPT refusal, or a failure before the body
                outcomes[i] = _outcome(verdict, address)
        if not envelope.send_body:
            conn.reset_due = envelope.after is After.RESET
            return [o for o in outcomes if o is not None], envelope.after is not After.CLOSE
        if may_send is not None and not may_send():
            # Past 354 the relay waits for the body; dropping the connection (the caller
            # closes it, keep is False) makes it discard the transaction.
            raise SendAborted("stopped before the message body")
        verdict = await self._finish(wire, payload, address)
        return _data_outcomes(outcomes, verdict, address)

    async def _finish(self, wire: _Wire, payload: bytes, address: str) -> Verdict:
        """Send the body and read the reply to its final dot, to the end.

        The caller's cancellation does not cut the wait: it is caught, and the reply is
        awaited again (the wire keeps a reply that arrives meanwhile), as often as the
        caller is cancelled, until the verdict or the final-reply deadline; then the
        cancellation is re-raised. So the connection is never cut between the dot and
        the relay's verdict. Never raises otherwise: a timeout, disconnect or garbled
        reply is a verdict with a ``failure``: AMBIGUOUS once the body went out,
        TRANSIENT (phase DATA) when the connection was gone before any of it could be
        written.
        """
        deadline_s = data_timeout_s(self._final_reply_timeout_s, len(payload), self._min_throughput)
        try:
            wire.write(payload)
        except _Lost as exc:
            # Gone before the first byte of the body was handed over: nothing to wait for.
            return Verdict(0, _describe(exc), Phase.DATA, Failure.DISCONNECTED)
        loop = asyncio.get_running_loop()
        end_s = loop.time() + deadline_s
        # No inner task (and no shield): _Wire.reply's deadline is a plain timer, so the
        # wait can simply be resumed after a cancellation. One task less per message.
        try:
            return await _final_reply(wire, deadline_s)
        except asyncio.CancelledError:
            verdict = None
            while verdict is None:
                # Cancelled again while waiting: keep waiting; the deadline bounds it.
                with contextlib.suppress(asyncio.CancelledError):
                    verdict = await _final_reply(wire, max(0.0, end_s - loop.time()))
            log.warning(
                "relay %s: send cancelled after the message body; the relay answered %s %s",
                address,
                verdict.code or verdict.failure.value,
                verdict.text.splitlines()[0] if verdict.text else "",
            )
            raise

    async def close(self) -> None:
        """QUIT idle connections (each with a deadline) and refuse further sends.

        Connections in use are closed when their transaction ends.
        """
        self._closed = True
        for relay in self._relays:
            idle, relay.idle = relay.idle, []
            for conn in idle:
                relay.open -= 1
                await conn.quit(min(self._timeout_s, 2.0))


def _envelope_commands(
    commands: list[bytes],
    outcomes: list[SendOutcome | None],
    mail_from: str,
    rcpts: list[str],
    declared_size: int | None,
    relay: str,
) -> list[int]:
    """Append MAIL (with ``SIZE=`` when ``declared_size`` is given), a RCPT per sendable
    recipient and DATA to ``commands``; return the indexes of the recipients with a RCPT.

    An address that cannot be sent gets a local 553 in ``outcomes`` and no command;
    when it is the sender's, every recipient gets it and nothing is appended.
    """
    try:
        mail = b"MAIL FROM:" + _path(mail_from)
    except ValueError as exc:
        # Nothing is sent; the local 553 fails every recipient.
        shared = SendOutcome(553, f"address not sendable: {exc}", Phase.MAIL, relay=relay)
        outcomes[:] = [shared] * len(outcomes)
        return []
    if declared_size is not None:
        mail += b" SIZE=%d" % declared_size
    commands.append(mail + b"\r\n")
    sent: list[int] = []
    for i, rcpt in enumerate(rcpts):
        try:
            commands.append(b"RCPT TO:" + _path(rcpt) + b"\r\n")
        except ValueError as exc:
            # mailers_runtime.message already rejects such addresses, so this is a safety
            # net. Nothing is sent for it; the local 553 fails the recipient.
            outcomes[i] = SendOutcome(553, f"address not sendable: {exc}", Phase.RCPT, relay=relay)
        else:
            sent.append(i)
    if sent:
        commands.append(b"DATA\r\n")
    return sent


def _data_outcomes(
    outcomes: list[SendOutcome | None], verdict: Verdict, relay: str
) -> tuple[list[SendOutcome], bool]:
    """Every recipient's outcome once the relay answered the final dot (or did not),
    and whether the connection is fit for another transaction."""
    shared = _outcome(verdict, relay)
    done = [o if o is not None else shared for o in outcomes]
    keep = verdict.failure is Failure.NONE and verdict.code != 421 and 200 <= verdict.code < 600
    return done, keep


async def _final_reply(wire: _Wire, deadline_s: float) -> Verdict:
    """The reply to the final dot, or why none came (AMBIGUOUS, see ``classify``)."""
    try:
        code, text = await wire.reply(deadline_s)
    except (OSError, TimeoutError, _Garbled) as exc:
        return Verdict(0, _describe(exc), Phase.DATA_END, _failure(exc))
    return Verdict(code, text, Phase.DATA_END)


def _outcome(verdict: Verdict, relay: str) -> SendOutcome:
    return SendOutcome(verdict.code, verdict.text, verdict.phase, verdict.failure, relay)


def _failure(exc: BaseException) -> Failure:
    """How a transaction on a set-up connection ended without a reply."""
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, _Garbled):
        return Failure.PROTOCOL
    return Failure.DISCONNECTED


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the relay's reply"
    return str(exc) or type(exc).__name__


class SendAborted(Exception):
    """The caller's ``may_send`` said no before the message body went out."""


def _size_limit(smtp: aiosmtplib.SMTP) -> int | None:
    """The SIZE limit the connection's last EHLO advertised; None when none (or 0, which
    RFC 1870 defines as no fixed limit)."""
    raw = smtp.esmtp_extensions.get("size")
    if raw is None:
        return None
    head = raw.split()[0] if raw.split() else ""
    return int(head) if head.isdigit() and int(head) > 0 else None


def _fail_over_undecided(
    pending: list[int], got: list[SendOutcome], outcomes: list[SendOutcome | None]
) -> list[int]:
    """Record one relay's outcomes for the ``pending`` recipients; return those that go
    on to the next relay (see :func:`_try_next_relay`)."""
    undecided = []
    for i, outcome in zip(pending, got, strict=True):
        outcomes[i] = outcome
        if _try_next_relay(outcome):
            undecided.append(i)
    return undecided


def _stale(outcome: SendOutcome) -> bool:
    """An outcome that a relay closing an idle pooled connection would give."""
    return (
        outcome.failure in (Failure.DISCONNECTED, Failure.PROTOCOL) or outcome.code == 421
    ) and outcome.phase is not Phase.DATA_END


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
    if outcome.phase is Phase.DATA_END and 200 <= outcome.code < 300:
        return False  # delivered: the common case, decided without parsing the text
    return classify(outcome.code, outcome.text, outcome.phase, outcome.failure).relay_fault


def _try_next_relay(outcome: SendOutcome) -> bool:
    """True when the relay itself failed before taking responsibility for the message.

    After the final dot the relay may hold the message (AMBIGUOUS) or gave its verdict:
    sending it through another relay would risk a duplicate or override a bounce.
    """
    return outcome.phase is not Phase.DATA_END and _is_relay_fault(outcome)
