"""Bounces and complaints read from the raw bytes of a message sent to the bounce domain. Pure.

:func:`parse_report` takes the bytes the inbound SMTP endpoint received and says which
recipients bounced (hard or soft) or complained, and which of our messages it was about.
It does no I/O and reads no clock; the caller bounds the size of what it passes.

Rules, in the order they are tried:

- **ARF** (RFC 5965): a ``message/feedback-report`` part. Every complaint is hard (a
  complaint suppresses). The recipients are the ``Original-Rcpt-To`` fields, or else
  the ``To`` addresses of the returned original. A report naming nobody (providers
  redact) is still a complaint: its Message-ID identifies the recipient to the caller.
- **DSN** (RFC 3464): a ``message/delivery-status`` part, one finding per recipient
  group whose ``Action`` is ``failed`` (hard unless its ``Status`` is 4.x.x) or
  ``delayed`` (soft). ``delivered``, ``relayed`` and ``expanded`` are not findings, so a
  pure success report gives a :class:`Report` without findings. A group with no
  ``Action`` is judged by its status class. The recipient is ``Original-Recipient``
  (the address we sent to, before any forwarding) when readable, else
  ``Final-Recipient``.
- **Anything else**: flufl.bounce's heuristic detectors (Mailman's, for the MTAs that
  never learned DSNs): permanent failures are hard, temporary ones soft. The first
  detector that finds anything decides, as in flufl.bounce itself. They run on a copy
  cut to :data:`DETECTOR_MAX_BYTES` with lines of at most :data:`DETECTOR_MAX_LINE`
  characters, because some of their line patterns backtrack quadratically.

The Message-ID is the original message's, from its returned copy (``message/rfc822``,
``text/rfc822-headers`` and their RFC 6533 forms), or else from a ``Message-ID:`` line
in a text part (the copies qmail and others paste inline).

Malformed input of any kind (broken MIME, garbage bytes, missing fields) gives None,
never an exception: the caller stores what could not be read for inspection.
"""

from __future__ import annotations

import dataclasses
import email
import email.parser
import email.utils
import enum
import re
from collections.abc import Iterable
from email.message import Message

# flufl.bounce's public entry points (all_failures) do not say which detector matched,
# and re-raise when one trips over malformed input; its detector list is read directly
# so each runs guarded and the report names it. The lock pins flufl.bounce 6.x.
from flufl.bounce._scan import _DETECTORS

MAX_DIAGNOSTIC = 500
"""Characters of diagnostic text kept per finding."""
MAX_PARTS = 256
"""MIME leaf parts looked at; real reports have three or four."""
MAX_FIELD = 4096
"""Characters of one header field read; longer values are not addresses or IDs."""
DETECTOR_MAX_BYTES = 64 * 1024
"""Bytes of a non-standard bounce the detectors see; the notice comes first."""
DETECTOR_MAX_LINE = 998
"""Characters per line the detectors see (the RFC 5322 limit)."""

_ORIGINAL_TYPES = frozenset(
    {
        "message/rfc822",
        "text/rfc822-headers",
        "message/rfc822-headers",
        "message/global",
        "message/global-headers",
    }
)
_ADDRESS_TYPES = frozenset({"rfc822", "utf-8"})
_ADDR_SPEC = re.compile(r"[^\s@<>]{1,64}@[^\s@<>]{1,253}")
_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_STATUS_IN_TEXT = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_MESSAGE_ID = re.compile(r"<[^<>\s]{1,500}>")
_MESSAGE_ID_LINE = re.compile(
    rb"^[ \t>]*Message-ID[ \t]*:[ \t]*(<[^<>\s]{1,500}>)", re.IGNORECASE | re.MULTILINE
)
_TRANSFER_ENCODED = frozenset({"base64", "quoted-printable"})


class ReportKind(enum.Enum):
    """What a report says about its recipients."""

    BOUNCE = "bounce"
    COMPLAINT = "complaint"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One recipient a report is about."""

    email: str
    """The failed (or complaining) recipient: a lower-cased addr-spec."""
    hard: bool
    """Permanent (5.x.x, ``Action: failed``, any complaint) rather than transient."""
    status: str
    """The RFC 3463 enhanced status code (``"5.1.1"``), ``""`` when unknown."""
    diagnostic: str
    """The ``Diagnostic-Code`` text (at most :data:`MAX_DIAGNOSTIC` characters), or ``""``."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What one inbound bounce or complaint says."""

    kind: ReportKind
    findings: tuple[Finding, ...]
    """One per recipient, in report order; may be empty (see the module docstring)."""
    message_id: str
    """The Message-ID of our original message, with angle brackets; ``""`` if absent."""
    feedback_type: str = ""
    """The ARF ``Feedback-Type`` (``abuse``, ``fraud``, ...), lower-cased; complaints only."""
    method: str = ""
    """How it was read: ``"arf"``, ``"dsn"`` or ``"detector:<flufl.bounce detector>"``."""


def parse_report(raw: bytes) -> Report | None:
    """Read a bounce or complaint.

    Args:
        raw: The message as received (headers and body), of a size the caller bounded.

    Returns:
        None when the message is not a bounce or complaint that could be read.
    """
    try:
        message = email.message_from_bytes(raw)
        parts = _leaves(message)
        return _arf(parts) or _dsn(parts) or _detected(raw)
    except Exception:
        # The email package raises on some malformed input in undocumented ways
        # (IndexError, UnicodeError, RecursionError on deep nesting, ...); unreadable
        # input is what None means.
        return None


def _leaves(message: Message) -> list[Message]:
    """The non-multipart parts in document order, at most :data:`MAX_PARTS`.

    A ``message/*`` part is a leaf: the returned original is never searched for reports.
    """
    leaves: list[Message] = []
    pending = [message]
    while pending and len(leaves) < MAX_PARTS:
        part = pending.pop()
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            pending.extend(p for p in reversed(payload) if isinstance(p, Message))
        else:
            leaves.append(part)
    return leaves


def _arf(parts: list[Message]) -> Report | None:
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    if report is None:
        return None
    blocks = _field_blocks(report)
    feedback_type = next((t for b in blocks if (t := _field(b, "Feedback-Type"))), "").lower()
    recipients = [a for b in blocks for a in _addresses(b, "Original-Rcpt-To")]
    original = _original(parts)
    if not recipients and original is not None:
        recipients = _addresses(original, "To")
    if not feedback_type and not recipients:
        return None
    findings = tuple(Finding(a, True, "", "") for a in dict.fromkeys(recipients))
    return Report(
        ReportKind.COMPLAINT,
        findings,
        _message_id(original, parts),
        feedback_type=feedback_type.split(maxsplit=1)[0] if feedback_type else "",
        method="arf",
    )


def _dsn(parts: list[Message]) -> Report | None:
    findings: dict[str, Finding] = {}
    groups = 0
    for part in parts:
        if part.get_content_type() != "message/delivery-status":
            continue
        for block in _field_blocks(part):
            address = _recipient(block)
            if not address:
                continue  # the per-message fields, or a foreign (X.400) address
            groups += 1
            finding = _dsn_finding(address, block)
            known = findings.get(address)
            if finding is not None and (known is None or (finding.hard and not known.hard)):
                findings[address] = finding
    if not groups:
        return None
    original = _original(parts)
    return Report(
        ReportKind.BOUNCE, tuple(findings.values()), _message_id(original, parts), method="dsn"
    )


def _dsn_finding(address: str, block: Message) -> Finding | None:
    """The finding of one recipient group, None when it reports no failure."""
    diagnostic = _diagnostic(" ".join(_values(block, "Diagnostic-Code")[:1]))
    match = _STATUS.match(_field(block, "Status")) or _STATUS_IN_TEXT.search(diagnostic)
    status = ".".join(match.groups()) if match else ""
    action = _field(block, "Action").lower()
    if action.startswith(("fail", "error")):  # "error": OpenSMTPD, not RFC 3464
        hard = not status.startswith("4")
    elif action.startswith("delayed"):
        hard = False
    elif not action and status[:1] in ("4", "5"):
        hard = status.startswith("5")
    else:
        return None
    return Finding(address, hard, status, diagnostic)


def _recipient(block: Message) -> str:
    """The address of a recipient group: Original-Recipient when readable, else Final."""
    for name in ("Original-Recipient", "Final-Recipient"):
        kind, typed, address = _field(block, name).partition(";")
        if not typed:
            kind, address = "rfc822", kind  # untyped: some MTAs omit "rfc822;"
        if kind.strip().lower() in _ADDRESS_TYPES and (found := _address(address)):
            return found
    return ""


def _diagnostic(text: str) -> str:
    """Diagnostic text without its type (``smtp;``), capped."""
    kind, typed, rest = text.partition(";")
    if typed and kind and not any(c.isspace() for c in kind.strip()):
        text = rest.strip()
    return text[:MAX_DIAGNOSTIC]


def _detected(raw: bytes) -> Report | None:
    message = _for_detectors(raw)
    for detector in _DETECTORS:
        try:
            temporary, permanent = detector().process(message)
        except Exception:
            continue  # a heuristic tripped over malformed input; the next may still read it
        if not temporary and not permanent:
            continue
        findings = {a: Finding(a, True, "", "") for a in _decoded(permanent)}
        for address in _decoded(temporary):
            findings.setdefault(address, Finding(address, False, "", ""))
        if not findings:
            return None
        name = detector.__module__.rsplit(".", 1)[-1]
        parts = _leaves(message)
        return Report(
            ReportKind.BOUNCE,
            tuple(findings.values()),
            _message_id(_original(parts), parts),
            method=f"detector:{name}",
        )
    return None


def _for_detectors(raw: bytes) -> Message:
    """A copy of the message cut to bounds in which the detectors run in bounded time.

    Transfer-encoded parts are decoded (and their lines cut) here, since the detectors
    decode them again and a base64 body decodes to lines of any length.
    """
    message = email.message_from_bytes(_cut(raw[:DETECTOR_MAX_BYTES]))
    for part in message.walk():  # into returned originals too: some detectors look there
        encoding = _field(part, "Content-Transfer-Encoding").lower()
        body = part.get_payload(decode=True) if encoding in _TRANSFER_ENCODED else None
        if isinstance(body, bytes):
            del part["Content-Transfer-Encoding"]
            part.set_payload(_cut(body).decode("latin-1"))
    return message


def _cut(data: bytes) -> bytes:
    return b"\n".join(line[:DETECTOR_MAX_LINE] for line in data.splitlines())


def _decoded(addresses: Iterable[bytes]) -> list[str]:
    found = (_address(a.decode("ascii", "replace")) for a in sorted(addresses))
    return [a for a in found if a]


def _field_blocks(part: Message) -> list[Message]:
    """The field blocks of a ``message/delivery-status`` or ``message/feedback-report``.

    The email package parses each blank-line-separated block into a Message; a report
    it left as text (a transfer encoding, a generator's quirk) is split here.
    """
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    body = part.get_payload(decode=True)
    if not isinstance(body, bytes):
        return []
    parser = email.parser.BytesHeaderParser()
    blocks = re.split(rb"\r?\n[ \t]*\r?\n", body.strip())
    return [parser.parsebytes(block) for block in blocks if block.strip()]


def _original(parts: list[Message]) -> Message | None:
    """The headers of the returned original message, None when not returned."""
    for part in parts:
        if part.get_content_type() not in _ORIGINAL_TYPES:
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            return payload[0] if payload and isinstance(payload[0], Message) else None
        body = part.get_payload(decode=True)
        if isinstance(body, bytes):
            return email.parser.BytesHeaderParser().parsebytes(body)
    return None


def _message_id(original: Message | None, parts: list[Message]) -> str:
    if original is not None:
        value = _field(original, "Message-ID")
        if match := _MESSAGE_ID.search(value):
            return match.group(0)
        if _ADDR_SPEC.fullmatch(value):
            return f"<{value}>"  # RFC 5965's own example omits the brackets
    for part in parts:
        if part.get_content_maintype() != "text":
            continue
        body = part.get_payload(decode=True)
        if isinstance(body, bytes) and (line := _MESSAGE_ID_LINE.search(body)):
            return line.group(1).decode("ascii", "replace")
    return ""


def _addresses(block: Message, name: str) -> list[str]:
    """Every addr-spec in every ``name`` field of ``block``, lower-cased."""
    values = [v for v in _values(block, name) if len(v) <= MAX_FIELD]
    found = (_address(address) for _, address in email.utils.getaddresses(values))
    return [a for a in found if a]


def _address(text: str) -> str:
    """The addr-spec in ``text`` (``<a@b>``, ``a@b``, ``Name <a@b>``), lower-cased; ``""``
    when there is none or it cannot be a deliverable address (undecodable bytes)."""
    if len(text) > MAX_FIELD:
        return ""
    address = email.utils.parseaddr(text)[1].strip().lower()
    if not _ADDR_SPEC.fullmatch(address) or not address.isprintable() or "\ufffd" in address:
        return ""
    return address


def _field(block: Message, name: str) -> str:
    """The first ``name`` field; ``""`` when absent or too long to be one value."""
    values = _values(block, name)
    return values[0] if values and len(values[0]) <= MAX_FIELD else ""


def _values(block: Message, name: str) -> list[str]:
    """Every ``name`` field of ``block``, unfolded, 8-bit bytes read as UTF-8.

    Raw items, because for a field carrying 8-bit bytes compat32's accessors return a
    Header object whose text has already replaced them.
    """
    wanted = name.lower()
    return [_text(value) for key, value in block.raw_items() if key.lower() == wanted]


def _text(value: object) -> str:
    text = str(value)
    if not text.isascii():  # the parser keeps 8-bit bytes as surrogate escapes
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(text.split())
