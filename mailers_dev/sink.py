"""A local SMTP sink: accepts mail, stores it as Maildir files, logs every recipient as JSON.

Run it as ``python -m mailers_dev.sink --host 127.0.0.1 --port 2525 --maildir DIR --log FILE``,
or in-process with :class:`SinkServer` (``port=0`` picks a free port).

* Every accepted message is written once to ``DIR/new/<unique>.eml`` (written in
  ``DIR/tmp`` and renamed, as Maildir requires, so a reader never sees half a file).
* Every accepted recipient appends one line to the log, flushed at once:
  ``{"message_id", "rcpt", "mail_from", "size", "ts", "file"}``. The log is the
  ground truth of tests counting deliveries and duplicate Message-IDs: a message the
  sink stored is logged even when the client never saw the ``250`` (see below).

Fault catalogue (a :class:`FaultPlan`), chosen at startup by flags and changeable at
runtime, without a restart, through ``--control FILE``: a JSON object the sink re-reads
whenever the file changes (polled every 0.1 s; write it with :func:`write_control`).
While the file exists it is the whole plan; without it the flags are. Each applied plan
is announced on stdout as ``mailers-sink faults #N: {...}``.

- ``reject_pattern``: recipients matching the regex get ``550 5.1.1``.
- ``tempfail_pattern``: recipients matching the regex get ``451 4.3.0``.
- ``greylist_pattern``: recipients matching the regex get ``451 4.7.1`` the first time
  the sink sees each of them (greylisting), and are accepted from then on.
- ``tempfail``: every ``MAIL`` is answered with ``code`` (421 by default; 451, or 535
  to imitate an auth failure): the relay refuses all mail for a while, then recovers.
- ``hang_after_data``: the whole message is received, the final dot is never answered
  (the client times out). With ``"store": true`` the message is stored and logged first.
- ``cut_mid_data``: ``354``, one line of the message read, then the connection is
  dropped. Nothing is stored.
- ``cut_after_data``: the message is stored and logged, then the connection is dropped
  before the ``250``: the classic lost reply that makes a retry a legitimate duplicate.
- ``data_2xx``: ``DATA`` is answered ``250`` instead of ``354``; no body is read and
  nothing is stored (a client that sends the body anyway has it read as commands).
- ``rcpt_252``: each RCPT is accepted with ``252 2.1.5`` (RFC 5321: "cannot verify, but
  will accept"): a positive completion, the transaction goes on as with ``250``.
- ``starttls_2xx``: ``STARTTLS`` is answered ``250`` instead of ``220`` and the session
  stays in plaintext. While it is armed, EHLO offers STARTTLS even on a sink without TLS.
- ``rcpt_delay_ms``: each RCPT reply is held back this long (a slow relay).
- ``final_delay_ms``: the reply to the final dot is held back this long (the body has
  arrived; the relay is slow to commit it).
- ``delay_ms``: the older name of ``final_delay_ms``, kept for existing plans; when both
  are given the reply waits for their sum.

``tempfail``, ``hang_after_data``, the cuts and the three protocol faults (``data_2xx``,
``rcpt_252``, ``starttls_2xx``) take a window: ``count`` (the next N occurrences) and/or
``for_s`` (seconds from when the plan was applied); neither (``{}``) means until the plan
changes. Example::

    {"tempfail": {"code": 421, "for_s": 8}, "cut_after_data": {"count": 5},
     "data_2xx": {"count": 1}, "rcpt_delay_ms": 10000, "final_delay_ms": 25000}

ESMTP PIPELINING (RFC 2920) is advertised unless ``SinkConfig.pipelining`` is off
(``--no-pipelining``); aiosmtpd reads commands one line at a time either way, so a
client that pipelines without the keyword still works, as with real servers.

Security and limits, all off by default (in-process use through :class:`SinkConfig`):
``tls_context`` offers STARTTLS (or, with ``implicit_tls``, speaks TLS from the first
byte, like port 465); ``data_size_limit`` is advertised as ``SIZE`` and enforced;
``auth_user``/``auth_password`` accept exactly that login (PLAIN or LOGIN), only over
TLS unless ``auth_require_tls`` is off, and ``auth_required`` refuses MAIL without it.
Each log line also says whether the message came over TLS (``tls``) and the ``SIZE=``
the client declared in MAIL (``declared_size``, null without one).

**Ambiguous accepts.** A message whose ``250`` the client may never have read is logged
again, with its Message-ID, to ``<log>.ambiguous`` (JSON lines ``{"message_id", "ts",
"why"}``): the connection ended after the ``250`` without another command from the
client (``"why": "unconfirmed"``: the client may have died or lost the line before
reading it), or a fault stored the message and then cut or hung the connection
(``"cut_after_data"``, ``"hang_after_data"``). Any later command on the same connection
(RSET, MAIL, NOOP, QUIT, ...) confirms every accept before it: TCP delivers in order, so
the client had read the reply. A retry of an ambiguous accept is SMTP's own duplicate;
a duplicate whose earlier copies were all confirmed is the sender's fault.

Nothing is fsynced: the sink is for tests and demos, and must take large volumes
quickly; a crash can lose the last messages, never corrupt earlier lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.parser
import email.policy
import hmac
import itertools
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import uvloop
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

_HEADER_END = re.compile(rb"\r?\n\r?\n")
# The email package's parser, line by line: a line break is CRLF, CR or LF; a header line
# starts with a field name and a colon (or "From "), a continuation with a space or tab.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
# <local@domain> with both parts plain dot-atoms (RFC 5322 atext), then the parameters.
_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_PLAIN_PATH = re.compile(rf"<({_ATOMS}@{_ATOMS})>[ \t]*")
_TEMPFAIL_TEXT = {
    421: "4.3.2 Service not available, closing transmission channel",
    535: "5.7.8 Authentication credentials invalid",
}


@dataclasses.dataclass(frozen=True)
class Window:
    """When a fault applies: the next ``count`` occurrences and/or ``for_s`` seconds from
    when its plan was applied. Neither: until the plan changes."""

    count: int | None = None
    for_s: float | None = None

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 0:
            raise ValueError("count must not be negative")
        if self.for_s is not None and self.for_s < 0:
            raise ValueError("for_s must not be negative")

    def to_json(self) -> dict[str, Any]:
        """The JSON object form (only the fields that are set)."""
        return {k: v for k, v in (("count", self.count), ("for_s", self.for_s)) if v is not None}


def _json_window(
    obj: Mapping[str, Any], key: str, extra: frozenset[str] = frozenset()
) -> Window | None:
    """A control file's ``{"count": N, "for_s": S}`` window, or None when absent."""
    raw = obj.get(key)
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"count", "for_s", *extra}:
        raise ValueError(f"{key} must be an object with count and/or for_s")
    count, for_s = raw.get("count"), raw.get("for_s")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
        raise ValueError(f"{key}.count must be an integer")
    if for_s is not None and (isinstance(for_s, bool) or not isinstance(for_s, int | float)):
        raise ValueError(f"{key}.for_s must be a number")
    return Window(count, None if for_s is None else float(for_s))


def _json_text(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _json_millis(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer")
    return value


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Faults the sink injects (see the module docstring). The default injects none."""

    reject_pattern: str | None = None
    """Recipients matching this regular expression get ``550 5.1.1``."""
    tempfail_pattern: str | None = None
    """Recipients matching this regular expression get ``451 4.3.0``."""
    greylist_pattern: str | None = None
    """Recipients matching this get ``451 4.7.1`` once each, then are accepted."""
    tempfail: Window | None = None
    """While active, every ``MAIL`` is answered with :attr:`tempfail_code`."""
    tempfail_code: int = 421
    hang_after_data: Window | None = None
    """While active, the final dot is never answered."""
    hang_stores: bool = False
    """Whether a hung message is stored and logged before the sink goes silent."""
    cut_mid_data: Window | None = None
    """While active, the connection is dropped part-way through the message."""
    cut_after_data: Window | None = None
    """While active, the message is stored and logged, then the connection dropped."""
    delay_ms: int = 0
    """Held before every reply to a final dot (the older name of :attr:`final_delay_ms`;
    both set: their sum)."""
    data_2xx: Window | None = None
    """While active, ``DATA`` is answered ``250`` instead of ``354``."""
    rcpt_252: Window | None = None
    """While active, each RCPT is accepted with ``252`` instead of ``250``."""
    starttls_2xx: Window | None = None
    """While active, ``STARTTLS`` is answered ``250`` and no TLS handshake follows."""
    rcpt_delay_ms: int = 0
    """Held before every RCPT reply."""
    final_delay_ms: int = 0
    """Held before every reply to a final dot."""

    def __post_init__(self) -> None:
        for pattern in (self.reject_pattern, self.tempfail_pattern, self.greylist_pattern):
            if pattern is not None:
                re.compile(pattern)
        if not 400 <= self.tempfail_code <= 599:
            raise ValueError("tempfail code must be a 4xx or 5xx reply")
        if min(self.delay_ms, self.rcpt_delay_ms, self.final_delay_ms) < 0:
            raise ValueError("delays must not be negative")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FaultPlan:
        """Parse the control-file form.

        Raises:
            ValueError: unknown keys, wrong types, or bad values.
        """
        known = {
            "reject_pattern",
            "tempfail_pattern",
            "greylist_pattern",
            "tempfail",
            "hang_after_data",
            "cut_mid_data",
            "cut_after_data",
            "delay_ms",
            "data_2xx",
            "rcpt_252",
            "starttls_2xx",
            "rcpt_delay_ms",
            "final_delay_ms",
        }
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        tempfail_raw = obj.get("tempfail")
        code = tempfail_raw.get("code", 421) if isinstance(tempfail_raw, Mapping) else 421
        hang_raw = obj.get("hang_after_data")
        stores = hang_raw.get("store", False) if isinstance(hang_raw, Mapping) else False
        if not isinstance(code, int) or not isinstance(stores, bool):
            raise ValueError("tempfail.code must be an integer, hang_after_data.store a boolean")

        try:
            return cls(
                reject_pattern=_json_text(obj, "reject_pattern"),
                tempfail_pattern=_json_text(obj, "tempfail_pattern"),
                greylist_pattern=_json_text(obj, "greylist_pattern"),
                tempfail=_json_window(obj, "tempfail", frozenset({"code"})),
                tempfail_code=code,
                hang_after_data=_json_window(obj, "hang_after_data", frozenset({"store"})),
                hang_stores=stores,
                cut_mid_data=_json_window(obj, "cut_mid_data"),
                cut_after_data=_json_window(obj, "cut_after_data"),
                delay_ms=_json_millis(obj, "delay_ms"),
                data_2xx=_json_window(obj, "data_2xx"),
                rcpt_252=_json_window(obj, "rcpt_252"),
                starttls_2xx=_json_window(obj, "starttls_2xx"),
                rcpt_delay_ms=_json_millis(obj, "rcpt_delay_ms"),
                final_delay_ms=_json_millis(obj, "final_delay_ms"),
            )
        except re.error as exc:
            raise ValueError(f"bad pattern: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The control-file form; ``FaultPlan.from_json(plan.to_json()) == plan``."""
        out: dict[str, Any] = {}
        if self.reject_pattern is not None:
            out["reject_pattern"] = self.reject_pattern
        if self.tempfail_pattern is not None:
            out["tempfail_pattern"] = self.tempfail_pattern
        if self.greylist_pattern is not None:
            out["greylist_pattern"] = self.greylist_pattern
        if self.tempfail is not None:
            out["tempfail"] = {"code": self.tempfail_code, **self.tempfail.to_json()}
        if self.hang_after_data is not None:
            out["hang_after_data"] = {"store": self.hang_stores, **self.hang_after_data.to_json()}
        if self.cut_mid_data is not None:
            out["cut_mid_data"] = self.cut_mid_data.to_json()
        if self.cut_after_data is not None:
            out["cut_after_data"] = self.cut_after_data.to_json()
        for key, armed in (
            ("data_2xx", self.data_2xx),
            ("rcpt_252", self.rcpt_252),
            ("starttls_2xx", self.starttls_2xx),
        ):
            if armed is not None:
                out[key] = armed.to_json()
        for key, millis in (
            ("delay_ms", self.delay_ms),
            ("rcpt_delay_ms", self.rcpt_delay_ms),
            ("final_delay_ms", self.final_delay_ms),
        ):
            if millis:
                out[key] = millis
        return out


def write_control(path: Path, plan: FaultPlan) -> None:
    """Write a control file atomically (temporary file, then rename), for a running sink."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan.to_json()), encoding="utf-8")
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    """Where the sink listens and stores, and which faults it injects at startup."""

    maildir: Path
    """Maildir root; ``tmp``, ``new`` and ``cur`` are created inside."""
    log_path: Path
    """JSON-lines log of accepted recipients (appended to)."""
    store: bool = True
    """Keep each message as a Maildir file; False only logs its recipients (``file`` is
    then null): for runs that count, where a file per message was ~15% of the CPU."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port; read it from :attr:`SinkServer.port`."""
    delay: timedelta = timedelta(0)
    """Held before every reply to a final dot, to imitate a slow relay."""
    rcpt_delay: timedelta = timedelta(0)
    """Held before every RCPT reply."""
    data_2xx: bool = False
    """Answer every ``DATA`` with ``250`` instead of ``354`` (see the fault catalogue)."""
    rcpt_252: bool = False
    """Accept every RCPT with ``252`` instead of ``250``."""
    starttls_2xx: bool = False
    """Answer every ``STARTTLS`` with ``250``, without a TLS handshake."""
    pipelining: bool = True
    """Advertise ESMTP PIPELINING (RFC 2920) in EHLO."""
    reject_pattern: str | None = None
    """Recipients matching this regular expression get ``550 5.1.1``."""
    tempfail_pattern: str | None = None
    """Recipients matching this regular expression get ``451 4.3.0``."""
    tempfail_code: int = 421
    """The reply to every ``MAIL`` while the startup tempfail window lasts."""
    tempfail_for_s: float | None = None
    """Seconds from startup during which every ``MAIL`` gets :attr:`tempfail_code`."""
    control_path: Path | None = None
    """A JSON :class:`FaultPlan` re-read when it changes; while it exists it replaces
    the faults given here."""
    control_poll_s: float = 0.1
    """How often the control file is checked for changes."""
    hostname: str = "mailers-sink"
    """Name in the greeting (set, so no slow FQDN lookup per connection)."""
    data_size_limit: int = 32 * 1024 * 1024
    """Advertised as ``SIZE`` in EHLO; a larger ``SIZE=`` in MAIL or a larger message is
    refused with 552. 0 means no limit (and no ``SIZE`` advertised)."""
    tls_context: ssl.SSLContext | None = None
    """Server context (see :func:`server_tls_context`): STARTTLS is offered with it, or,
    with :attr:`implicit_tls`, every connection is TLS from the start."""
    implicit_tls: bool = False
    """TLS from the first byte (SMTPS) instead of STARTTLS; needs :attr:`tls_context`."""
    auth_user: str | None = None
    """The one login AUTH accepts (PLAIN and LOGIN); None: every AUTH fails."""
    auth_password: str | None = dataclasses.field(default=None, repr=False)
    auth_required: bool = False
    """Refuse MAIL (530) until the client has authenticated."""
    auth_require_tls: bool = True
    """Offer and accept AUTH only over TLS (implicit TLS always counts as TLS)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.implicit_tls and self.tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        if (self.auth_user is None) != (self.auth_password is None):
            raise ValueError("auth_user and auth_password go together")
        if self.data_size_limit < 0:
            raise ValueError("data_size_limit must not be negative")
        if min(self.delay, self.rcpt_delay) < timedelta(0):
            raise ValueError("delays must not be negative")
        if self.control_poll_s <= 0:
            raise ValueError("control_poll_s must be positive")
        self.startup_plan()  # validates patterns and codes

    def startup_plan(self) -> FaultPlan:
        """The faults given by the flags."""
        return FaultPlan(
            reject_pattern=self.reject_pattern,
            tempfail_pattern=self.tempfail_pattern,
            tempfail=Window(for_s=self.tempfail_for_s) if self.tempfail_for_s else None,
            tempfail_code=self.tempfail_code,
            delay_ms=int(self.delay.total_seconds() * 1000),
            rcpt_delay_ms=int(self.rcpt_delay.total_seconds() * 1000),
            data_2xx=Window() if self.data_2xx else None,
            rcpt_252=Window() if self.rcpt_252 else None,
            starttls_2xx=Window() if self.starttls_2xx else None,
        )


@dataclasses.dataclass
class SinkStats:
    """Counters since start."""

    messages: int = 0
    """Messages stored (including those whose reply was then withheld)."""
    recipients: int = 0
    rejected: int = 0
    tempfailed: int = 0
    """Recipients refused by ``tempfail_pattern`` and transactions refused by ``tempfail``."""
    greylisted: int = 0
    """Recipients refused once by ``greylist_pattern``."""
    hung: int = 0
    cut_mid_data: int = 0
    cut_after_data: int = 0
    auth_succeeded: int = 0
    auth_failed: int = 0
    tls_messages: int = 0
    """Messages stored that came over an encrypted connection."""
    sized_mails: int = 0
    """Stored messages whose MAIL carried a ``SIZE=`` parameter."""
    data_2xx: int = 0
    """DATA commands answered ``250`` by the ``data_2xx`` fault."""
    rcpt_252: int = 0
    """Recipients accepted with ``252`` by the ``rcpt_252`` fault."""
    starttls_2xx: int = 0
    """STARTTLS commands answered ``250`` by the ``starttls_2xx`` fault."""
    held_rcpts: int = 0
    """RCPT replies held back by ``rcpt_delay_ms`` (counted when the hold starts)."""
    held_finals: int = 0
    """Final-dot replies held back by ``final_delay_ms``/``delay_ms`` (counted when the
    hold starts, so the whole message has arrived by then)."""
    pipelined_mails: int = 0
    """MAIL commands that arrived with the next command already behind them: the client
    pipelined (RFC 2920) instead of waiting for the reply."""
    dropped_mid_transaction: int = 0
    """Connections that ended while a transaction was open (after MAIL, before the
    reply to the final dot or a RSET): a client that gave up mid-transaction."""
    ambiguous: int = 0
    """Accepts whose ``250`` the client may not have read (see the module docstring)."""


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context from a PEM certificate (chain) and key, for
    :attr:`SinkConfig.tls_context`; client certificates are not asked for."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _declared_size(mail_options: Sequence[str]) -> int | None:
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def _more_input_waiting(server: SMTP) -> bool:
    """Whether bytes after the command being handled have already arrived."""
    reader: Any = getattr(server, "_reader", None)
    buffer = getattr(reader, "_buffer", None)  # StreamReader's; nothing public says this
    return bool(buffer)


def _encrypted(server: SMTP) -> bool:
    transport: Any = server.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


class _Armed:
    """One windowed fault of the applied plan, counting down."""

    def __init__(self, window: Window | None, now: float) -> None:
        self._enabled = window is not None
        self._remaining = window.count if window is not None else None
        self._until = now + window.for_s if window is not None and window.for_s else None
        if window is not None and window.for_s == 0:
            self._enabled = False

    def armed(self, now: float) -> bool:
        """True when the fault would apply now (nothing used)."""
        if not self._enabled or (self._until is not None and now >= self._until):
            return False
        return self._remaining is None or self._remaining > 0

    def take(self, now: float) -> bool:
        """True (and one occurrence used) when the fault applies now."""
        if not self.armed(now):
            return False
        if self._remaining is not None:
            self._remaining -= 1
        return True


def message_id_of(data: bytes) -> str:
    """The Message-ID header of a raw message, its white space collapsed; ``""`` when absent.

    The header is found as the email package's parser finds it (``compat32``), but
    without building a message object, which cost the sink more than all its logging; a
    header block that is not ASCII still goes to the parser.
    """
    match = _HEADER_END.search(data)
    head = data[: match.start()] if match else data
    if not head.isascii():
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
        header = headers.get("Message-ID")
        return " ".join(str(header).split()) if header is not None else ""
    value: list[str] | None = None  # the header's lines, from the first Message-ID on
    for line in _LINE_BREAK.split(head.decode("ascii")):
        if not _HEADER_LINE.match(line):
            break  # the body begins
        if line[0] in " \t":
            if value is not None:
                value.append(line)
            continue
        if value is not None:
            break  # the first Message-ID is the one read, and it is complete
        name, _, rest = line.partition(":")
        if name.lower() == "message-id":
            value = [rest]
    return " ".join(" ".join(value).split()) if value is not None else ""


class MaildirWriter:
    """Writes messages as Maildir files named ``<time>.M<usec>P<pid>Q<n>.<host>.eml``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"
        self._pid = os.getpid()
        self._counter = itertools.count(1)

    def write(self, data: bytes) -> Path:
        """Store one message and return its path under ``new``."""
        now_ns = time.time_ns()
        name = (
            f"{now_ns // 1_000_000_000}.M{now_ns // 1000 % 1_000_000}"
            f"P{self._pid}Q{next(self._counter)}.{self._host}.eml"
        )
        tmp = self.root / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        final = self.root / "new" / name
        os.rename(tmp, final)
        return final


class SinkHandler:
    """aiosmtpd handler: applies the fault plan, stores and logs accepted mail.

    Args:
        plan: The faults to start with; :meth:`apply` replaces them.
        maildir: Where messages are stored; None keeps none.
        log: The recipient log, flushed after each message.
        clock: Monotonic seconds, for fault windows.
        pipelining: Advertise PIPELINING in EHLO.
    """

    def __init__(
        self,
        plan: FaultPlan,
        maildir: MaildirWriter | None,
        log: IO[str],
        clock: Callable[[], float] = time.monotonic,
        pipelining: bool = True,
        ambiguous_log: IO[str] | None = None,
    ) -> None:
        self._maildir = maildir
        self._log = log
        self._ambiguous_log = ambiguous_log
        self._clock = clock
        self._pipelining = pipelining
        self.stats = SinkStats()
        self.applied = 0
        """How many plans were applied (the startup plan is #1)."""
        self._greylist_seen: set[str] = set()
        """Addresses greylisted once; kept across plan changes, as a relay keeps them."""
        self.apply(plan)

    @property
    def plan(self) -> FaultPlan:
        """The plan in force."""
        return self._plan

    def apply(self, plan: FaultPlan) -> None:
        """Replace the faults; windows start now and counts start afresh."""
        now = self._clock()
        self._plan = plan
        self._reject = re.compile(plan.reject_pattern) if plan.reject_pattern else None
        self._tempfail_rcpt = re.compile(plan.tempfail_pattern) if plan.tempfail_pattern else None
        self._greylist = re.compile(plan.greylist_pattern) if plan.greylist_pattern else None
        self._tempfail = _Armed(plan.tempfail, now)
        self._hang = _Armed(plan.hang_after_data, now)
        self._cut_mid = _Armed(plan.cut_mid_data, now)
        self._cut_after = _Armed(plan.cut_after_data, now)
        self._data_2xx = _Armed(plan.data_2xx, now)
        self._rcpt_252 = _Armed(plan.rcpt_252, now)
        self._starttls_2xx = _Armed(plan.starttls_2xx, now)
        self.applied += 1

    def take_cut_mid_data(self) -> bool:
        """True (one occurrence used) when this DATA is to be cut part-way."""
        if self._cut_mid.take(self._clock()):
            self.stats.cut_mid_data += 1
            return True
        return False

    def take_data_2xx(self) -> bool:
        """True (one occurrence used) when this DATA is to be answered ``250``."""
        if self._data_2xx.take(self._clock()):
            self.stats.data_2xx += 1
            return True
        return False

    def take_starttls_2xx(self) -> bool:
        """True (one occurrence used) when this STARTTLS is to be answered ``250``."""
        if self._starttls_2xx.take(self._clock()):
            self.stats.starttls_2xx += 1
            return True
        return False

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Add PIPELINING (and STARTTLS while ``starttls_2xx`` is armed) to aiosmtpd's
        EHLO lines, which end with ``250 HELP``."""
        session.host_name = hostname  # aiosmtpd leaves this to a handler with the hook
        extra = []
        if self._pipelining:
            extra.append("250-PIPELINING")
        if (
            self._starttls_2xx.armed(self._clock())
            and "250-STARTTLS" not in responses
            and not _encrypted(server)
        ):
            extra.append("250-STARTTLS")
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if _more_input_waiting(server):
            self.stats.pipelined_mails += 1
        if self._tempfail.take(self._clock()):
            self.stats.tempfailed += 1
            code = self._plan.tempfail_code
            return f"{code} {_TEMPFAIL_TEXT.get(code, '4.3.0 Temporary failure, try again later')}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._plan.rcpt_delay_ms > 0:
            self.stats.held_rcpts += 1
            await asyncio.sleep(self._plan.rcpt_delay_ms / 1000)
        if self._reject is not None and self._reject.search(address):
            self.stats.rejected += 1
            return f"550 5.1.1 <{address}>: Recipient address rejected"
        if self._tempfail_rcpt is not None and self._tempfail_rcpt.search(address):
            self.stats.tempfailed += 1
            return f"451 4.3.0 <{address}>: Temporary failure, try again later"
        if self._greylisted(address):
            self.stats.greylisted += 1
            return f"451 4.7.1 <{address}>: Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        if self._rcpt_252.take(self._clock()):
            self.stats.rcpt_252 += 1
            return "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"
        return "250 2.1.5 OK"

    def _greylisted(self, address: str) -> bool:
        """Whether to refuse ``address`` now: it matches and was not seen before."""
        if self._greylist is None or not self._greylist.search(address):
            return False
        key = address.lower()
        if key in self._greylist_seen:
            return False
        self._greylist_seen.add(key)
        return True

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = self._clock()
        if self._hang.take(now):
            self.stats.hung += 1
            if self._plan.hang_stores:
                self.log_ambiguous([self._store(envelope, server)], "hang_after_data")
            await _forever()  # ended by connection_lost (the client gives up)
        if self._cut_after.take(now):
            self.stats.cut_after_data += 1
            self.log_ambiguous([self._store(envelope, server)], "cut_after_data")
            # abort(), not close(): no byte written after this point reaches the client.
            transport: Any = server.transport
            if transport is not None:
                transport.abort()
            await _forever()  # ended by connection_lost, a moment from now
        hold_ms = self._plan.delay_ms + self._plan.final_delay_ms
        if hold_ms > 0:
            self.stats.held_finals += 1
            await asyncio.sleep(hold_ms / 1000)
        message_id = self._store(envelope, server)
        if isinstance(server, _FaultySMTP):
            server.unconfirmed.append(message_id)
        return "250 2.0.0 OK queued"

    def log_ambiguous(self, message_ids: Sequence[str], why: str) -> None:
        """Record accepts whose ``250`` the client may not have seen."""
        self.stats.ambiguous += len(message_ids)
        if self._ambiguous_log is None or self._ambiguous_log.closed or not message_ids:
            return
        ts = time.time()
        self._ambiguous_log.write(
            "".join(json.dumps({"message_id": m, "ts": ts, "why": why}) + "\n" for m in message_ids)
        )
        self._ambiguous_log.flush()

    def authenticate(self, user: str, password: str, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd authenticator: accept exactly ``user``/``password`` (PLAIN, LOGIN)."""
        ok = (
            mechanism in ("PLAIN", "LOGIN")
            and isinstance(auth_data, LoginPassword)
            and hmac.compare_digest(auth_data.login, user.encode())
            and hmac.compare_digest(auth_data.password, password.encode())
        )
        if ok:
            self.stats.auth_succeeded += 1
        else:
            self.stats.auth_failed += 1
        # handled=False: aiosmtpd answers 535 5.7.8 itself on failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _store(self, envelope: Envelope, server: SMTP) -> str:
        """Store and log the message; returns its Message-ID."""
        data = envelope.original_content
        if data is None:
            raw = envelope.content
            data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw or b""
        path = None if self._maildir is None else self._maildir.write(data)
        message_id = message_id_of(data)
        ts = time.time()
        tls = _encrypted(server)
        declared = _declared_size(envelope.mail_options)
        lines = [
            json.dumps(
                {
                    "message_id": message_id,
                    "rcpt": rcpt,
                    "mail_from": envelope.mail_from,
                    "size": len(data),
                    "ts": ts,
                    "file": None if path is None else path.name,
                    "tls": tls,
                    "declared_size": declared,
                },
                ensure_ascii=False,
            )
            + "\n"
            for rcpt in envelope.rcpt_tos
        ]
        self._log.write("".join(lines))
        self._log.flush()
        self.stats.messages += 1
        self.stats.recipients += len(envelope.rcpt_tos)
        self.stats.tls_messages += int(tls)
        self.stats.sized_mails += int(declared is not None)
        return message_id


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


class _FaultySMTP(SMTP):
    """aiosmtpd's SMTP session plus the faults a handler hook cannot do: a cut while the
    message is still arriving (``handle_DATA`` runs after the final dot), ``250`` to
    DATA or STARTTLS, and counting connections that end mid-transaction."""

    def __init__(self, handler: SinkHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = handler
        self.unconfirmed: list[str] = []
        """Message-IDs accepted on this connection with no client command since."""

    def connection_lost(self, error: Exception | None) -> None:
        envelope = self.envelope
        if envelope is not None and envelope.mail_from is not None:
            self._sink.stats.dropped_mid_transaction += 1
        unconfirmed, self.unconfirmed = self.unconfirmed, []
        self._sink.log_ambiguous(unconfirmed, "unconfirmed")
        super().connection_lost(error)

    def _confirm(self) -> None:
        # A command after a 250 proves the client read it (TCP keeps the order).
        self.unconfirmed.clear()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's reading of a MAIL or RCPT path, without its RFC 5322 parser (which
        builds a parse tree, and a class, per call) for the plain ``<local@domain>`` that
        nearly every client sends; anything else goes to aiosmtpd's own."""
        match = _PLAIN_PATH.match(arg)
        if match is None or arg.startswith("(", match.end()):
            return super()._getaddr(arg)
        address = match.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[match.end() :]

    async def smtp_MAIL(self, arg: str) -> None:
        self._confirm()
        await super().smtp_MAIL(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self._confirm()
        await super().smtp_RSET(arg)

    async def smtp_NOOP(self, arg: str) -> None:
        self._confirm()
        await super().smtp_NOOP(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self._confirm()
        await super().smtp_QUIT(arg)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._confirm()
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        self._confirm()
        await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if not arg and self._sink.take_starttls_2xx():
            # A broken relay (or a man in the middle stripping TLS): "OK", and plaintext.
            await self.push("250 2.0.0 OK")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        envelope = self.envelope
        if envelope is not None and envelope.rcpt_tos and not arg and self._sink.take_data_2xx():
            # No 354: the relay claims success without having read a body.
            await self.push("250 2.0.0 OK")
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # aiosmtpd: untyped
            return
        if (
            envelope is not None
            and envelope.rcpt_tos
            and not arg
            and self._sink.take_cut_mid_data()
        ):
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            reader: asyncio.StreamReader = self._reader
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                await reader.readuntil(b"\r\n")
            transport: Any = self.transport
            if transport is not None:
                transport.abort()
            return
        await super().smtp_DATA(arg)


def ambiguous_log_path(log_path: Path) -> Path:
    """Where the sink records accepts whose ``250`` the client may not have read."""
    return log_path.with_name(log_path.name + ".ambiguous")


def read_ambiguous(log_path: Path) -> list[dict[str, Any]]:
    """The ambiguous accepts recorded next to ``log_path`` (empty when none)."""
    path = ambiguous_log_path(log_path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smtp_options(config: SinkConfig, handler: SinkHandler) -> dict[str, Any]:
    """aiosmtpd's keyword arguments for TLS and AUTH as configured."""
    options: dict[str, Any] = {}
    if config.tls_context is not None and not config.implicit_tls:
        options["tls_context"] = config.tls_context
    if config.auth_user is not None and config.auth_password is not None:
        user, password = config.auth_user, config.auth_password

        def authenticator(
            server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
        ) -> AuthResult:
            return handler.authenticate(user, password, mechanism, data)

        options["authenticator"] = authenticator
    if config.auth_required:
        options["auth_required"] = True
    if not config.auth_require_tls or config.implicit_tls:
        # aiosmtpd only counts STARTTLS as TLS; an implicit-TLS connection is one too.
        options["auth_require_tls"] = False
    return options


class SinkServer:
    """The sink on the running event loop; ``start`` binds, ``stop`` closes everything.

    Usable as ``async with SinkServer(config) as sink:``. Owns the control-file watcher
    task (when ``config.control_path`` is set) and cancels it in :meth:`stop`.

    Args:
        config: Where to listen and store, and the startup faults.
        announce: Called with a line for each applied plan or control-file error
            (``python -m mailers_dev.sink`` prints them).
    """

    def __init__(self, config: SinkConfig, announce: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._announce = announce
        self._server: asyncio.Server | None = None
        self._log: IO[str] | None = None
        self._ambiguous: IO[str] | None = None
        self._handler: SinkHandler | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._watcher: asyncio.Task[None] | None = None
        self._control_version: tuple[int, int, int] | None = None
        self.port = config.port

    @property
    def stats(self) -> SinkStats:
        """Counters since start."""
        if self._handler is None:
            return SinkStats()
        return self._handler.stats

    @property
    def plan(self) -> FaultPlan:
        """The faults in force."""
        if self._handler is None:
            return self.config.startup_plan()
        return self._handler.plan

    @property
    def address(self) -> str:
        """``host:port`` the sink listens on."""
        return f"{self.config.host}:{self.port}"

    def set_faults(self, plan: FaultPlan) -> None:
        """Replace the faults now (in-process use; a control file would override it).

        Raises:
            RuntimeError: the sink is not started.
        """
        if self._handler is None:
            raise RuntimeError("sink not started")
        self._handler.apply(plan)
        self._say(f"mailers-sink faults #{self._handler.applied}: {json.dumps(plan.to_json())}")

    async def start(self) -> None:
        """Create the Maildir and log, read the control file if any, and start listening."""
        maildir = MaildirWriter(self.config.maildir) if self.config.store else None
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.config.log_path.open("a", encoding="utf-8")
        self._ambiguous = ambiguous_log_path(self.config.log_path).open("a", encoding="utf-8")
        handler = SinkHandler(
            self.config.startup_plan(),
            maildir,
            self._log,
            pipelining=self.config.pipelining,
            ambiguous_log=self._ambiguous,
        )
        self._handler = handler
        if self.config.control_path is not None:
            self._check_control()

        config = self.config
        options = _smtp_options(config, handler)

        def factory() -> SMTP:
            with warnings.catch_warnings():
                # "Requiring AUTH while not requiring TLS": not so with implicit TLS.
                warnings.simplefilter("ignore", UserWarning)
                smtp = _FaultySMTP(
                    handler,
                    hostname=config.hostname,
                    enable_SMTPUTF8=True,
                    data_size_limit=config.data_size_limit or None,
                    ident="mailers-sink",
                    **options,
                )
            self._sessions.add(smtp)
            return smtp

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory,
            config.host,
            config.port,
            reuse_address=True,
            ssl=config.tls_context if config.implicit_tls else None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self.config.control_path is not None:
            self._watcher = asyncio.create_task(self._watch_control(), name="sink-control")

    async def _watch_control(self) -> None:
        while True:
            await asyncio.sleep(self.config.control_poll_s)
            self._check_control()

    def _check_control(self) -> None:
        """Apply the control file if it changed since last seen (or went away)."""
        path = self.config.control_path
        assert path is not None and self._handler is not None
        try:
            st = path.stat()
            version: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            version = None
        if version == self._control_version:
            return
        self._control_version = version
        if version is None:
            self.set_faults(self.config.startup_plan())
            return
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("the control file must hold a JSON object")
            plan = FaultPlan.from_json(obj)
        except (OSError, ValueError) as exc:
            self._say(f"mailers-sink control error, faults unchanged: {exc}")
            return
        self.set_faults(plan)

    def _say(self, line: str) -> None:
        if self._announce is not None:
            self._announce(line)

    async def stop(self) -> None:
        """Stop listening, drop open sessions and close the log. Idempotent."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                transport: Any = getattr(session, "transport", None)
                if transport is not None:
                    transport.close()
            await self._server.wait_closed()
            self._server = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._ambiguous is not None:
            self._ambiguous.close()
            self._ambiguous = None

    async def __aenter__(self) -> SinkServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a sink log (a torn last line is skipped)."""
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                entries.append(json.loads(line))
    return entries


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailers_dev.sink", description="Local SMTP sink for tests and demos."
    )
    _add_fault_arguments(parser)
    parser.add_argument(
        "--control", type=Path, help="JSON fault plan, re-read when it changes (see the docs)"
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate: offer STARTTLS")
    parser.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    parser.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte")
    parser.add_argument("--auth-user", help="accept AUTH for this user")
    parser.add_argument(
        "--auth-password-file", type=Path, help="file holding the AUTH password (one line)"
    )
    parser.add_argument(
        "--auth-required", action="store_true", help="answer MAIL with 530 until AUTH succeeded"
    )
    parser.add_argument("--size-limit", type=int, help="advertised SIZE in bytes; 0: none")
    return parser


def _add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Where it listens and stores, and the startup faults."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525, help="0 picks a free port")
    parser.add_argument("--maildir", type=Path, required=True)
    parser.add_argument(
        "--no-store", action="store_true", help="log recipients only, keep no message files"
    )
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines recipient log")
    parser.add_argument(
        "--delay-ms", type=int, default=0, help="hold each reply to a final dot this long"
    )
    parser.add_argument(
        "--final-delay-ms", type=int, default=0, help="same as --delay-ms (they add up)"
    )
    parser.add_argument("--rcpt-delay-ms", type=int, default=0, help="hold each RCPT reply")
    parser.add_argument("--data-2xx", action="store_true", help="answer DATA with 250, not 354")
    parser.add_argument("--rcpt-252", action="store_true", help="accept each RCPT with 252")
    parser.add_argument(
        "--starttls-2xx", action="store_true", help="answer STARTTLS with 250, stay plaintext"
    )
    parser.add_argument(
        "--pipelining",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="advertise ESMTP PIPELINING (default: yes)",
    )
    parser.add_argument("--reject-pattern", help="regex: matching recipients get 550")
    parser.add_argument("--tempfail-pattern", help="regex: matching recipients get 451")
    parser.add_argument(
        "--tempfail-code", type=int, default=421, help="reply to every MAIL during the window"
    )
    parser.add_argument(
        "--tempfail-for-s", type=float, help="answer every MAIL with --tempfail-code this long"
    )


def _parse_args(argv: Sequence[str] | None) -> SinkConfig:
    parser = _parser()
    ns = parser.parse_args(argv)
    if (ns.tls_cert is None) != (ns.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if (ns.auth_user is None) != (ns.auth_password_file is None):
        parser.error("--auth-user and --auth-password-file go together")
    try:
        tls_context = (
            server_tls_context(ns.tls_cert, ns.tls_key) if ns.tls_cert is not None else None
        )
        password = (
            ns.auth_password_file.read_text().rstrip("\r\n")
            if ns.auth_password_file is not None
            else None
        )
    except (OSError, ssl.SSLError) as exc:
        parser.error(f"cannot load TLS or AUTH files: {exc}")
    try:
        return SinkConfig(
            tls_context=tls_context,
            implicit_tls=ns.implicit_tls,
            auth_user=ns.auth_user,
            auth_password=password,
            auth_required=ns.auth_required,
            **({} if ns.size_limit is None else {"data_size_limit": ns.size_limit}),
            maildir=ns.maildir,
            store=not ns.no_store,
            log_path=ns.log,
            host=ns.host,
            port=ns.port,
            delay=timedelta(milliseconds=ns.delay_ms + ns.final_delay_ms),
            rcpt_delay=timedelta(milliseconds=ns.rcpt_delay_ms),
            data_2xx=ns.data_2xx,
            rcpt_252=ns.rcpt_252,
            starttls_2xx=ns.starttls_2xx,
            pipelining=ns.pipelining,
            reject_pattern=ns.reject_pattern,
            tempfail_pattern=ns.tempfail_pattern,
            tempfail_code=ns.tempfail_code,
            tempfail_for_s=ns.tempfail_for_s,
            control_path=ns.control,
        )
    except (ValueError, re.error) as exc:
        parser.error(str(exc))


async def _serve(config: SinkConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with SinkServer(config, announce=lambda line: print(line, flush=True)) as sink:
        print(f"mailers-sink listening on {sink.address}", flush=True)
        await stop.wait()
        print(
            f"mailers-sink stopping: {sink.stats.messages} messages, "
            f"{sink.stats.recipients} recipients",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mailers_dev.sink``; runs until SIGTERM or SIGINT."""
    config = _parse_args(argv)
    # On uvloop, as the nodes run: a sink is often a test's busiest process, and uvloop
    # takes ~20% less of its CPU per message (smtp-source -d, 10,000 messages).
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
