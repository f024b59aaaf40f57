"""SMTP outcome classification and the recent-load statistics built from outcomes.

Pure: takes plain values (a reply code, its text, the phase of the transaction, how
it failed) and imports nothing that does I/O, so every rule is unit-tested without
a network. ``smtp_client.py`` produces the inputs; ``servicer.py`` maps the
:class:`Outcome` to the wire status.

Rules:

- 2xx → DELIVERED only as the reply to the final dot (``DATA_END``; or to ``BDAT LAST``,
  were CHUNKING used). A 2xx anywhere else is never a delivery: a deciding 2xx in an
  earlier phase means the relay answered something other than what was due (``250`` to
  ``DATA`` instead of ``354``, ``250`` to ``STARTTLS`` instead of ``220``): a relay
  protocol fault, TRANSIENT with ``relay_fault``, not AMBIGUOUS (no body was sent).
  A 2xx to MAIL or RCPT (250, 251, 252) is a positive completion: the transaction goes
  on, and only the final dot's reply decides (see :class:`Envelope`).
- 4xx (421, 450, 451, 452, ...) → TRANSIENT (the node reports DEFERRED; the coordinator
  retries after a backoff). ``relay_fault`` for 421 (the relay is closing the channel)
  and for any 4xx to the greeting or EHLO; a 450/451/452 to one recipient or message
  is not the relay's fault.
- 5xx → PERMANENT (FAILED, never retried), except auth failures (530, 534, 535, 538)
  and any 5xx to the connection greeting or EHLO: those are faults of the relay or of
  our account at it, not of the recipient, so TRANSIENT with ``relay_fault``.
- 1xx, 3xx or a malformed code where a verdict was due: before the final dot a relay
  protocol fault (TRANSIENT, ``relay_fault``); as the reply to the final dot AMBIGUOUS,
  because the relay had the whole message and its verdict cannot be read.
- No reply (connection refused, timeout, disconnect, unparsable reply) before the final
  dot was sent → TRANSIENT with ``relay_fault``: the relay cannot have accepted the
  message.
- Timeout, disconnect or an unparsable reply waiting for the reply to the final dot →
  AMBIGUOUS: the relay may have queued the message, so a retry may duplicate it (the
  Message-ID is the dedupe key downstream).
- No relay tried (:attr:`Failure.UNAVAILABLE`: every relay's breaker is open) →
  TRANSIENT, "all relays unavailable".

``relay_fault`` is what counts as a failure for a relay's circuit breaker
(``relay_breaker``) and for the node's error rate; a per-recipient refusal never is.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import re
from typing import NamedTuple


class Outcome(enum.Enum):
    """What one SMTP transaction means for its recipient."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    AMBIGUOUS = "ambiguous"


class Phase(enum.Enum):
    """The step of an SMTP transaction an outcome belongs to."""

    CONNECT = "connect"
    """TCP connect, greeting, EHLO (and STARTTLS when offered)."""
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    """The DATA command itself, answered by 354 before any content is sent."""
    DATA_END = "data_end"
    """The reply to the final dot: the relay's verdict on the message."""


class Failure(enum.Enum):
    """How a transaction ended when no SMTP reply decided it."""

    NONE = "none"
    """A reply was received; its code decides."""
    REFUSED = "refused"
    """The connection could not be made."""
    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"
    PROTOCOL = "protocol"
    """The relay answered something that is not SMTP."""
    UNAVAILABLE = "unavailable"
    """No relay was tried: every relay's circuit breaker is open (or on trial)."""


AUTH_CODES = frozenset({530, 534, 535, 538})

_ENHANCED = re.compile(r"\A\s*([245])\.(\d{1,3})\.(\d{1,3})(?=\s|\Z)")


class Classification(NamedTuple):
    """The meaning of one transaction's outcome (a named tuple: one is made per
    transaction, see ``SendOutcome``)."""

    outcome: Outcome
    relay_fault: bool
    """True when the relay or the connection failed, not the recipient; counts as an error
    in the node's load report and should open a relay breaker."""
    enhanced_code: str
    """RFC 3463 code from the reply text, e.g. ``"5.1.1"``, or ``""``."""
    reason: str
    """Short human-readable explanation."""


def parse_enhanced_code(text: str) -> str:
    """The RFC 3463 status code at the start of a reply text, or ``""``."""
    match = _ENHANCED.match(text)
    return ".".join(match.groups()) if match else ""


def _first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text.strip() else ""


def classify(code: int, text: str, phase: Phase, failure: Failure = Failure.NONE) -> Classification:
    """Classify the outcome of one SMTP transaction for one recipient.

    Args:
        code: The deciding reply code, or 0 when no reply came (see ``failure``).
        text: The reply text (without the code), or an error description.
        phase: The step the outcome belongs to: the failing step, or ``DATA_END`` on success.
        failure: How the transaction ended when no reply decided it.
    """
    enhanced = parse_enhanced_code(text)
    if failure is Failure.UNAVAILABLE:
        detail = _first_line(text)
        return Classification(
            Outcome.TRANSIENT,
            True,
            enhanced,
            "all relays unavailable" + (f": {detail}" if detail else ""),
        )
    if failure is not Failure.NONE or code <= 0:
        kind = failure if failure is not Failure.NONE else Failure.PROTOCOL
        detail = _first_line(text)
        where = f"{kind.value} during {phase.value}" + (f": {detail}" if detail else "")
        if phase is Phase.DATA_END:
            # The whole message went out; whether the relay kept it is unknown.
            return Classification(
                Outcome.AMBIGUOUS, True, enhanced, f"no reply after data ({where})"
            )
        return Classification(Outcome.TRANSIENT, True, enhanced, where)
    summary = f"{code} {_first_line(text)}".strip()
    if 200 <= code < 300:
        if phase is Phase.DATA_END:
            return Classification(Outcome.DELIVERED, False, enhanced, summary)
        # A success where another reply was due (354 to DATA, 220 to STARTTLS): the relay
        # broke the protocol; nothing was delivered, and no body was sent.
        return Classification(
            Outcome.TRANSIENT,
            True,
            enhanced,
            f"relay protocol fault: {summary} in reply to {phase.value}",
        )
    if 400 <= code < 500:
        # 421 means the relay is shutting the connection, and a 4xx greeting/EHLO refuses
        # the whole session: the relay's problem, not the recipient's.
        relay_fault = code == 421 or phase is Phase.CONNECT
        return Classification(Outcome.TRANSIENT, relay_fault, enhanced, summary)
    if 500 <= code < 600:
        if code in AUTH_CODES or phase is Phase.CONNECT:
            return Classification(Outcome.TRANSIENT, True, enhanced, f"relay fault: {summary}")
        return Classification(Outcome.PERMANENT, False, enhanced, summary)
    # 1xx/3xx where a verdict was due, or a malformed code: the relay misbehaves. After
    # the final dot it had the whole message, so its unreadable verdict is AMBIGUOUS.
    if phase is Phase.DATA_END:
        return Classification(
            Outcome.AMBIGUOUS, True, enhanced, f"unexpected reply after data: {summary}"
        )
    return Classification(Outcome.TRANSIENT, True, enhanced, f"unexpected reply: {summary}")


class After(enum.Enum):
    """What a connection needs after a transaction that sent no message body."""

    KEEP = "keep"
    """No transaction is open at the relay: the next MAIL may follow."""
    RESET = "reset"
    """A transaction is open at the relay (MAIL accepted): RSET before the next MAIL."""
    CLOSE = "close"
    """The relay is closing, broke the protocol, waits for a body we will not send, or
    its state is unknown: drop the connection."""


class Verdict(NamedTuple):
    """A recipient's outcome decided by the envelope (before any message body), or the
    reply to the final dot (a named tuple: one is made per transaction)."""

    code: int
    text: str
    phase: Phase
    failure: Failure = Failure.NONE


class Envelope:
    """Judges the replies to one transaction's envelope, in order. Pure state machine.

    The commands, by :attr:`position`: ``0`` RSET (only with ``reset_first``), ``1`` MAIL,
    ``2 .. n+1`` one RCPT per recipient, ``n+2`` DATA. The shell writes them, feeds each
    reply (:meth:`feed`) or the lack of one (:meth:`fail`) until :attr:`done`, then sends
    the body if :attr:`send_body`, else leaves the connection as :attr:`after` says.

    - Pipelined (RFC 2920): every command was written at once, so every reply is read,
      also those after a refusal that already decided the transaction (they keep the
      connection in step; a ``354`` among them means the relay now waits for a body, so
      the connection is closed).
    - Unpipelined: the shell writes the command at :attr:`position` only when asked, so
      the exchange stops at the first reply that decides: no RCPT after a refused MAIL,
      no DATA when every RCPT was refused.

    Both give each recipient the same verdict for the same replies:

    - MAIL: 2xx goes on; 4xx/5xx is every recipient's verdict; anything else is a relay
      protocol fault for all (the connection is closed).
    - RCPT: 2xx (250, 251, 252) accepts the recipient; a 4xx/5xx is that recipient's own
      verdict, unless it is the relay's (421, an auth demand: ``classify``'s
      ``relay_fault``), which decides every recipient not yet refused; anything else is a
      protocol fault for them.
    - DATA: only ``354`` lets the body go; 4xx/5xx is the verdict of every accepted
      recipient; anything else (a ``250`` included) is a relay protocol fault for them:
      no body was sent, so nothing can have been delivered.
    - RSET: anything but 2xx is a protocol fault (the connection was reused; the shell
      retries on a fresh one).

    Args:
        recipients: How many RCPT commands the transaction has (at least one).
        pipelined: Whether all the commands were written at once.
        reset_first: Whether RSET precedes MAIL (a previous transaction left one open).

    Raises:
        ValueError: no recipients.
    """

    def __init__(self, recipients: int, *, pipelined: bool, reset_first: bool = False) -> None:
        if recipients < 1:
            raise ValueError("a transaction needs at least one recipient")
        self._n = recipients
        self._pipelined = pipelined
        self._last = recipients + 2
        self.position = 0 if reset_first else 1
        """The command whose reply comes next (see the class docstring)."""
        self.verdicts: list[Verdict | None] = [None] * recipients
        """Per recipient: its verdict, or None while accepted (or not yet answered)."""
        self.accepted = 0
        self.send_body = False
        """True once DATA got ``354`` with at least one recipient accepted."""
        self.after = After.KEEP
        self.done = False
        self._settled = False
        """Every recipient is decided; remaining replies are only read to stay in step."""

    def phase(self) -> Phase:
        """The phase of the command whose reply comes next."""
        if self.position <= 1:
            return Phase.MAIL
        return Phase.RCPT if self.position <= self._n + 1 else Phase.DATA

    def feed(self, code: int, text: str) -> None:
        """Take the reply to the command at :attr:`position`.

        Raises:
            RuntimeError: the envelope is already done.
        """
        if self.done:
            raise RuntimeError("no reply is expected")
        position = self.position
        self.position += 1
        positive = 200 <= code < 300
        refusal = 400 <= code < 600
        if self._settled:
            if code == 421 or (position == self._last and code == 354):
                self.after = After.CLOSE  # closing, or waiting for a body that will not come
            self.done = self.position > self._last
        elif position == 0:
            if not positive:
                text = f"RSET answered {code} {_first_line(text)}".strip()
                self._close(Verdict(0, text, Phase.MAIL, Failure.PROTOCOL))
        elif position == 1:
            if not positive:
                self._decide_all(Verdict(code, text, Phase.MAIL))
                if refusal and code != 421:
                    # No transaction is open; pipelined, the relay also saw RCPT and
                    # DATA after the refusal, so reset to be sure of its state.
                    self._settle(After.RESET if self._pipelined else After.KEEP)
                else:
                    self._close()
        elif position <= self._n + 1:
            self._rcpt(position - 2, code, text, positive, refusal)
        elif code == 354:
            self.send_body = True
            self.done = True
        else:
            self._decide_all(Verdict(code, text, Phase.DATA))
            if refusal and code != 421:
                self.after = After.RESET
                self.done = True
            else:
                self._close()

    def fail(self, failure: Failure, text: str) -> None:
        """No reply to the command at :attr:`position` (timeout, disconnect, garbage):
        every recipient not yet decided gets it, and the connection is closed.

        Raises:
            RuntimeError: the envelope is already done.
        """
        if self.done:
            raise RuntimeError("no reply is expected")
        if self._settled:
            self._close()
        else:
            self._close(Verdict(0, text, self.phase(), failure))

    def _rcpt(self, index: int, code: int, text: str, positive: bool, refusal: bool) -> None:
        if positive:
            self.accepted += 1
        elif refusal and not classify(code, text, Phase.RCPT).relay_fault:
            self.verdicts[index] = Verdict(code, text, Phase.RCPT)
        else:
            # 421, an auth demand, or not SMTP at all: the relay's verdict on all of them.
            self._close(Verdict(code, text, Phase.RCPT))
            return
        if index == self._n - 1 and self.accepted == 0:
            # Every recipient refused: no body. MAIL was accepted, so a transaction is open.
            self._settle(After.RESET)

    def _decide_all(self, verdict: Verdict) -> None:
        """Give ``verdict`` to every recipient not refused on its own."""
        self.verdicts = [v if v is not None else verdict for v in self.verdicts]

    def _close(self, verdict: Verdict | None = None) -> None:
        if verdict is not None:
            self._decide_all(verdict)
        self.after = After.CLOSE
        self.done = True

    def _settle(self, after: After) -> None:
        """Every recipient is decided; pipelined, the remaining replies are still read."""
        self.after = after
        self._settled = True
        self.done = not self._pipelined or self.position > self._last


@dataclasses.dataclass(frozen=True)
class LoadSnapshot:
    """Recent SMTP behaviour of the node."""

    latency_ms: float
    """Mean transaction latency over the window, 0 when there were none."""
    error_rate: float
    """Share of transactions in the window with a relay fault (0..1)."""
    samples: int


class LoadStats:
    """Windowed mean latency and error rate of recent SMTP transactions.

    Pure: the caller passes ``now`` (monotonic seconds) to every method. Holds at most
    ``max_samples`` samples so a burst cannot grow it without bound.

    Args:
        window_s: How far back samples count.
        max_samples: Bound on samples held.
    """

    def __init__(self, window_s: float = 30.0, max_samples: int = 10_000) -> None:
        if window_s <= 0 or max_samples < 1:
            raise ValueError("window_s and max_samples must be positive")
        self._window_s = window_s
        self._samples: collections.deque[tuple[float, float, bool]] = collections.deque(
            maxlen=max_samples
        )
        self._latency_sum_s = 0.0
        self._errors = 0

    def record(self, now: float, latency_s: float, error: bool) -> None:
        """Add one finished transaction."""
        self._expire(now)
        if len(self._samples) == self._samples.maxlen:
            self._drop_oldest()
        self._samples.append((now, latency_s, error))
        self._latency_sum_s += latency_s
        self._errors += int(error)

    def snapshot(self, now: float) -> LoadSnapshot:
        """Statistics over the samples recorded within the window before ``now``."""
        self._expire(now)
        count = len(self._samples)
        if count == 0:
            return LoadSnapshot(latency_ms=0.0, error_rate=0.0, samples=0)
        return LoadSnapshot(
            latency_ms=max(0.0, self._latency_sum_s) * 1000.0 / count,
            error_rate=self._errors / count,
            samples=count,
        )

    def _drop_oldest(self) -> None:
        _, latency_s, error = self._samples.popleft()
        self._latency_sum_s -= latency_s
        self._errors -= int(error)

    def _expire(self, now: float) -> None:
        horizon = now - self._window_s
        while self._samples and self._samples[0][0] <= horizon:
            self._drop_oldest()
        if not self._samples:
            # Float drift from repeated subtraction must not survive an empty window.
            self._latency_sum_s = 0.0
