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

Failover and circuit breakers: each relay has one ``pybreaker.CircuitBreaker`` (shared by
every message of the node) and one ``relay_breaker.TrialGate``. A relay fault before the
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

Each transaction is driven step by step (MAIL, each RCPT, DATA, content) rather than
through ``SMTP.sendmail``, because sendmail cannot tell a timeout waiting for ``354``
(nothing sent, safe to retry) from a timeout after the final dot (the relay may have the
message): the difference is the AMBIGUOUS outcome. :meth:`RelayPool.send_group` sends
one message to several recipients in one transaction: a RCPT refusal is that
recipient's outcome, the accepted recipients share the outcome of the data.

Every SMTP step has a deadline (``timeout_s``); the message transfer and the reply to the
final dot get ``relay_breaker.data_timeout_s``, which grows with the message size.
Cancelling a send closes the connection in use; a cancelled breaker trial gives no
verdict and leaves the breaker half-open for the next caller. Nothing here logs message
content, commands or credentials (aiosmtplib has no debug output to switch off), and no
outcome text ever contains a password: only :class:`config.Secret` holds it, and it is
revealed solely as the argument of ``login``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence

import aiosmtplib
import pybreaker

from sender_node.classify import Failure, Phase, classify
from sender_node.config import RelayConfig, RelayTls, parse_relay
from sender_node.relay_breaker import Admission, BreakerState, TrialGate, data_timeout_s
from sender_node.relay_choice import Candidate, RelayChooser, Strategy
from sender_node.throttle import TokenBucket

log = logging.getLogger(__name__)

_LEADING_DOT = re.compile(rb"(?m)^\.")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_FINAL_DOT = b".\r\n"


@dataclasses.dataclass(frozen=True)
class SendOutcome:
    """What happened to one recipient of a transaction: the inputs of ``classify.classify``."""

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
    return data.replace(b"\r\n.", b"\r\n..") + _FINAL_DOT


class _RelayFault(Exception):
    """Raised inside ``breaker.calling()`` so pybreaker counts the outcome as a failure."""

    def __init__(self, outcomes: list[SendOutcome], fault: SendOutcome) -> None:
        super().__init__(fault.text)
        self.outcomes = outcomes


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
        self.idle: list[aiosmtplib.SMTP] = []
        self.open = 0
        self.size_limit: int | None = None
        """SIZE advertised by the relay's most recent EHLO; None: unknown or unlimited."""
        self.bucket: TokenBucket | None = None
        if config.rate_per_s is not None:
            rate = config.rate_per_s
            self.bucket = TokenBucket.full(rate, max(1.0, rate), now_s)
        self.reset_timeout_s = reset_timeout_s
        # Our own storage object, so the state and opened-at time are read through a
        # public API rather than the breaker's private attribute.
        self.storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=breaker_failures,
            reset_timeout=reset_timeout_s,
            # A cancelled transaction says nothing about the relay; one too large for it
            # says the relay answered.
            exclude=[asyncio.CancelledError, SendAborted, _TooLarge],
            state_storage=self.storage,
            listeners=[_LogTransitions()],
            name=config.address,
            # Re-raise the fault that tripped the breaker, so its outcome is reported.
            throw_new_error_on_trip=False,
        )
        self.gate = TrialGate(reset_timeout_s)

    def state(self) -> BreakerState:
        return BreakerState.parse(self.storage.state)

    def opened_at_s(self) -> float | None:
        opened_at = self.storage.opened_at
        return opened_at.timestamp() if opened_at is not None else None

    def admissible(self, now_s: float) -> bool:
        """Whether ``gate.admit`` would let a transaction in now (without taking a trial)."""
        state = self.state()
        if state is BreakerState.CLOSED:
            return True
        if self.gate.trial_in_flight:
            return False
        opened_at = self.opened_at_s()
        return not (
            state is BreakerState.OPEN
            and opened_at is not None
            and now_s < opened_at + self.reset_timeout_s
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
        timeout_s: Deadline of each SMTP step (connect, TLS handshake, EHLO, AUTH, MAIL,
            RCPT, DATA); the message transfer gets more, see ``min_throughput_bytes_per_s``.
        helo_name: Name given in EHLO.
        cooldown_s: Reset timeout of each relay's breaker: how long an open breaker
            skips its relay before one trial transaction is let through.
        breaker_failures: Consecutive relay faults that open a relay's breaker.
        min_throughput_bytes_per_s: Slowest transfer rate considered healthy; the
            deadline of the message transfer and final reply is ``timeout_s`` plus the
            message size at this rate.
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
        helo_name: str = "localhost",
        cooldown_s: float = 5.0,
        breaker_failures: int = 5,
        min_throughput_bytes_per_s: float = 64 * 1024,
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
        """Send one message to one recipient: :meth:`send_group` with one recipient.

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
        return (await self.send_group(mail_from, [rcpt], data, may_send))[0]

    async def send_group(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        data: bytes,
        may_send: Callable[[], bool] | None = None,
    ) -> list[SendOutcome]:
        """Send one message to several recipients in one SMTP transaction per relay.

        Returns one outcome per recipient, in order. A recipient refused at RCPT gets
        that refusal; the accepted ones share the outcome of the data. When every RCPT
        is refused no data is sent (RSET, and the connection is kept). A relay fault
        before the data was handed over moves the recipients not yet decided to the
        next relay in the strategy's order; after the final dot nothing moves (the relay
        may hold the message: AMBIGUOUS). Each transaction takes one token of the
        relay's rate limit, and may sleep for it.

        Never raises for SMTP or network failures. Cancelling the call closes the
        connection in use.

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
        results: list[SendOutcome | None] = [None] * len(rcpts)
        last: dict[int, SendOutcome] = {}
        pending = list(range(len(rcpts)))
        tried: set[int] = set()
        while pending:
            relay = await self._next_relay(tried, size)
            if relay is None:
                break
            tried.add(relay.index)
            got = await self._send_guarded(
                relay, mail_from, [rcpts[i] for i in pending], payload, size, may_send
            )
            if isinstance(got, _Declined):
                continue  # breaker open or on trial, or too small: fail over without a fault
            undecided = []
            for i, outcome in zip(pending, got, strict=True):
                if _try_next_relay(outcome):
                    last[i] = outcome
                    undecided.append(i)
                else:
                    results[i] = outcome
            pending = undecided
        for i in pending:
            results[i] = last.get(i) or self._nobody_took_it(size)
        return [r for r in results if r is not None]

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
        """The relay for the next attempt, with one rate-limit token taken; None when no
        relay is left. May sleep (exactly the computed wait) for a token."""
        if self._in_order:
            wall_s = self._wall_clock()
            for r in self._relays:
                if r.index not in tried and not r.too_small_for(size) and r.admissible(wall_s):
                    return r
            return None
        while True:
            now_s = self._clock()
            wall_s = self._wall_clock()
            candidates = [
                Candidate(r.index, r.bucket.wait_s(now_s) if r.bucket is not None else 0.0)
                for r in self._relays
                if r.index not in tried and not r.too_small_for(size) and r.admissible(wall_s)
            ]
            choice = self._chooser.choose(candidates)
            if choice is None:
                return None
            if choice.wait_s > 0:
                await self._sleep(choice.wait_s)
                continue
            relay = self._relays[choice.index]
            if relay.bucket is None or relay.bucket.try_take(now_s):
                return relay

    async def _send_guarded(
        self,
        relay: _Relay,
        mail_from: str,
        rcpts: list[str],
        payload: bytes,
        size: int,
        may_send: Callable[[], bool] | None,
    ) -> list[SendOutcome] | _Declined:
        """One transaction through ``relay``'s breaker, or why the relay did not take it."""
        admission = relay.gate.admit(relay.state(), relay.opened_at_s(), self._wall_clock())
        if admission is Admission.SKIP:
            return _Declined.SKIPPED
        try:
            # calling() around the awaited transaction: pybreaker sees its real end
            # (breaker.call(async_fn) would record success on creating the coroutine).
            # pybreaker counts an excluded exception (cancellation) as a success: outside
            # a trial that only resets the run of consecutive faults.
            with relay.breaker.calling():
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
                relay.breaker.half_open()
            raise
        finally:
            if admission is Admission.TRIAL:
                relay.gate.release()

    async def _send_via(
        self,
        relay: _Relay,
        mail_from: str,
        rcpts: list[str],
        payload: bytes,
        size: int,
        may_send: Callable[[], bool] | None,
    ) -> list[SendOutcome]:
        async with relay.slots:
            # The wait for a slot may have been long (or the process frozen meanwhile).
            if may_send is not None and not may_send():
                raise SendAborted("stopped while waiting for a connection")
            untried = SendOutcome(0, "not attempted", Phase.CONNECT, Failure.REFUSED, relay.address)
            results = [untried] * len(rcpts)
            todo = list(range(len(rcpts)))
            for attempt in range(2):
                reused = attempt == 0 and bool(relay.idle)
                try:
                    smtp = relay.idle.pop() if reused else await self._connect(relay)
                except _StepFailed as failed:
                    for i in todo:
                        results[i] = failed.outcome
                    return results
                limit = _size_limit(smtp)
                if limit is not None and size > limit:
                    self._release(relay, smtp, keep=True)
                    raise _TooLarge(f"message size {size} exceeds the relay's limit {limit}")
                keep = False
                try:
                    outcomes, keep = await self._transaction(
                        smtp, relay, mail_from, [rcpts[i] for i in todo], payload, size, may_send
                    )
                finally:
                    self._release(relay, smtp, keep)
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

    def _release(self, relay: _Relay, smtp: aiosmtplib.SMTP, keep: bool) -> None:
        if keep and smtp.is_connected and not self._closed:
            relay.idle.append(smtp)
        else:
            relay.open -= 1
            smtp.close()

    async def _connect(self, relay: _Relay) -> aiosmtplib.SMTP:
        """Connect, EHLO, TLS as configured, AUTH when configured; each step has a deadline.

        Raises:
            _StepFailed: any step failed; its outcome is a relay fault (phase CONNECT).
        """
        config = relay.config
        timeout = self._timeout_s
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            timeout=timeout,
            local_hostname=self._helo_name,
            use_tls=config.tls is RelayTls.IMPLICIT,
            # STARTTLS is ours to decide (aiosmtplib's default would upgrade silently).
            start_tls=False,
            tls_context=relay.tls_context,
        )
        step = "connect"
        try:
            await smtp.connect(timeout=timeout)
            # EHLO now, so a relay refusing it is a connection failure, not a recipient's.
            step = "EHLO"
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo(timeout=timeout)
            encrypted = config.tls is RelayTls.IMPLICIT
            if config.tls in (RelayTls.AUTO, RelayTls.STARTTLS):
                if smtp.supports_extension("starttls"):
                    step = "STARTTLS"
                    await smtp.starttls(timeout=timeout)
                    # RFC 3207: forget what the plaintext EHLO said, ask again.
                    step = "EHLO after STARTTLS"
                    await smtp.ehlo(timeout=timeout)
                    encrypted = True
                elif config.tls is RelayTls.STARTTLS:
                    raise _Refused("the relay does not offer STARTTLS (tls=starttls)")
            if config.user is not None and config.password is not None:
                if not encrypted:
                    raise _Refused(
                        "refusing AUTH over an unencrypted connection"
                        " (the relay does not offer STARTTLS)"
                    )
                step = "AUTH"
                await smtp.login(config.user, config.password.reveal(), timeout=timeout)
        except _Refused as exc:
            smtp.close()
            raise _StepFailed(
                SendOutcome(0, str(exc), Phase.CONNECT, Failure.PROTOCOL, relay.address)
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _StepFailed(
                SendOutcome(exc.code, exc.message, Phase.CONNECT, relay=relay.address)
            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            outcome = _no_reply(exc, Phase.CONNECT, relay.address)
            if step != "connect":
                outcome = dataclasses.replace(outcome, text=f"{step}: {outcome.text}")
            raise _StepFailed(outcome) from None
        relay.open += 1
        relay.size_limit = _size_limit(smtp)
        return smtp

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        relay: _Relay,
        mail_from: str,
        rcpts: list[str],
        payload: bytes,
        size: int,
        may_send: Callable[[], bool] | None = None,
    ) -> tuple[list[SendOutcome], bool]:
        """Run MAIL, RCPT per recipient, DATA on a connected client; returns an outcome per
        recipient and whether the connection is fit for reuse."""
        timeout = self._timeout_s
        address = relay.address
        outcomes: list[SendOutcome | None] = [None] * len(rcpts)

        def every_undecided(shared: SendOutcome) -> list[SendOutcome]:
            return [o if o is not None else shared for o in outcomes]

        options = [f"SIZE={size}"] if smtp.supports_extension("size") else []
        phase = Phase.MAIL
        try:
            await smtp.mail(mail_from, options=options, timeout=timeout)
            phase = Phase.RCPT
            accepted = 0
            for i, rcpt in enumerate(rcpts):
                try:
                    await smtp.rcpt(rcpt, timeout=timeout)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    refusal = SendOutcome(exc.code, exc.message, Phase.RCPT, relay=address)
                    if _is_relay_fault(refusal):
                        raise  # 421, an auth demand...: the relay's verdict on all of them
                    outcomes[i] = refusal
                except ValueError as exc:
                    # aiosmtplib refuses an address it cannot encode before writing it;
                    # render.py already rejects such addresses, so this is a safety net.
                    # Nothing was sent for it; the local 553 fails the recipient.
                    outcomes[i] = SendOutcome(
                        553, f"address not sendable: {exc}", Phase.RCPT, relay=address
                    )
                else:
                    accepted += 1
            if not accepted:
                # Every recipient refused: no DATA; the connection stays usable.
                refused = [o for o in outcomes if o is not None]
                return refused, await self._reset(smtp)
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
            return every_undecided(SendOutcome(exc.code, exc.message, phase, relay=address)), keep
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return every_undecided(_no_reply(exc, phase, address)), False
        except ValueError as exc:
            # The sender address could not be encoded (see above): nothing was sent.
            keep = await self._reset(smtp)
            shared = SendOutcome(553, f"address not sendable: {exc}", phase, relay=address)
            return every_undecided(shared), keep
        verdict = SendOutcome(reply.code, reply.message, Phase.DATA_END, relay=address)
        return every_undecided(verdict), reply.code != 421

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


def _size_limit(smtp: aiosmtplib.SMTP) -> int | None:
    """The SIZE limit the connection's last EHLO advertised; None when none (or 0, which
    RFC 1870 defines as no fixed limit)."""
    raw = smtp.esmtp_extensions.get("size")
    if raw is None:
        return None
    head = raw.split()[0] if raw.split() else ""
    return int(head) if head.isdigit() and int(head) > 0 else None


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
