"""SMTP outcome classification and the recent-load statistics built from outcomes.

Pure: takes plain values (a reply code, its text, the phase of the transaction, how
it failed) and imports nothing that does I/O, so every rule is unit-tested without
a network. ``smtp_client.py`` produces the inputs; ``servicer.py`` maps the
:class:`Outcome` to the wire status.

Rules:

- 2xx → DELIVERED.
- 4xx (421, 450, 451, 452, ...) → TRANSIENT (the node reports DEFERRED; the coordinator
  retries after a backoff). ``relay_fault`` for 421 (the relay is closing the channel)
  and for any 4xx to the greeting or EHLO; a 450/451/452 to one recipient or message
  is not the relay's fault.
- 5xx → PERMANENT (FAILED, never retried), except auth failures (530, 534, 535, 538)
  and any 5xx to the connection greeting or EHLO: those are faults of the relay or of
  our account at it, not of the recipient, so TRANSIENT with ``relay_fault``.
- No reply (connection refused, timeout, disconnect) before the final dot was sent →
  TRANSIENT with ``relay_fault``: the relay cannot have accepted the message.
- Timeout or disconnect waiting for the reply to the final dot → AMBIGUOUS: the relay
  may have queued the message, so a retry may duplicate it (the Message-ID is the
  dedupe key downstream).
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


@dataclasses.dataclass(frozen=True)
class Classification:
    """The meaning of one transaction's outcome."""

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
        if phase is Phase.DATA_END and kind in (Failure.TIMEOUT, Failure.DISCONNECTED):
            return Classification(
                Outcome.AMBIGUOUS, True, enhanced, f"no reply after data ({where})"
            )
        return Classification(Outcome.TRANSIENT, True, enhanced, where)
    summary = f"{code} {_first_line(text)}".strip()
    if 200 <= code < 300:
        return Classification(Outcome.DELIVERED, False, enhanced, summary)
    if 400 <= code < 500:
        # 421 means the relay is shutting the connection, and a 4xx greeting/EHLO refuses
        # the whole session: the relay's problem, not the recipient's.
        relay_fault = code == 421 or phase is Phase.CONNECT
        return Classification(Outcome.TRANSIENT, relay_fault, enhanced, summary)
    if 500 <= code < 600:
        if code in AUTH_CODES or phase is Phase.CONNECT:
            return Classification(Outcome.TRANSIENT, True, enhanced, f"relay fault: {summary}")
        return Classification(Outcome.PERMANENT, False, enhanced, summary)
    # 1xx/3xx where a verdict was due, or a malformed code: the relay misbehaves.
    return Classification(Outcome.TRANSIENT, True, enhanced, f"unexpected reply: {summary}")


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
