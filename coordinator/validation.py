"""Checks on a submitted job, before anything is stored. Pure.

Every problem is reported with the field it concerns ("recipients[3].email"), and
as many problems as :data:`MAX_REPORTED` are collected in one pass so a caller can
fix a list in one round trip.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from coordinator.model import Address, Content, Header, Recipient

MAX_REPORTED = 20

# RFC 5322 dot-atom local part and an LDH domain with at least two labels.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# Header field names: printable US-ASCII except colon (RFC 5322 ftext).
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
# C0 controls except TAB, DEL, C1 controls, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\x80-\x9f\u2028\u2029]")
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Headers the renderer writes itself; a job may not set or duplicate them.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "MIME-Version",
        "Content-Type", "Content-Transfer-Encoding", "Reply-To", "Sender", "Return-Path",
        "List-Unsubscribe", "List-Unsubscribe-Post", "Received", "DKIM-Signature",
    )
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size limits applied at submit."""

    max_recipients: int = 1_000_000
    max_body_bytes: int = 1_000_000
    max_subject_chars: int = 998
    max_headers: int = 50
    max_variables: int = 64
    max_variable_chars: int = 4_000


class ValidationError(ValueError):
    """A submitted job is invalid. ``problems`` are (field, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        shown = "; ".join(f"{field}: {message}" for field, message in problems[:MAX_REPORTED])
        more = len(problems) - MAX_REPORTED
        super().__init__(shown + (f"; and {more} more" if more > 0 else ""))


def address_problem(email: str) -> str | None:
    """Why email is not an acceptable addr-spec, or None when it is."""
    if not email:
        return "is required"
    if len(email) > 254:
        return "is longer than 254 characters"
    local, sep, domain = email.rpartition("@")
    if not sep or not local or not domain:
        return f"{email!r} is not a valid email address"
    if len(local) > 64 or not _LOCAL.match(local):
        return f"{email!r} is not a valid email address"
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return f"{email!r} is not a valid email address (bad domain)"
    if labels[-1].isdigit():
        return f"{email!r} is not a valid email address (bad domain)"
    return None


def _text_problem(value: str) -> str | None:
    if _CONTROL.search(value):
        return "contains a control character"
    return None


class Collector:
    """Gathers problems; raise_if_any() raises them together."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, field: str, message: str | None) -> None:
        if message is not None:
            self.problems.append((field, message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise ValidationError(self.problems)


def _check_address(out: Collector, field: str, address: Address) -> None:
    out.add(f"{field}.email", address_problem(address.email))
    out.add(f"{field}.name", _text_problem(address.name))


def check_header(out: Collector, field: str, header: Header) -> None:
    if not _FIELD_NAME.match(header.name):
        out.add(f"{field}.name", f"{header.name!r} is not a valid header name")
    elif header.name.lower() in RESERVED_HEADERS:
        out.add(f"{field}.name", f"{header.name!r} is set by mailers and cannot be given")
    out.add(f"{field}.value", _text_problem(header.value))


def check_content(out: Collector, content: Content, limits: Limits) -> None:
    """Add every problem of the job's content to out."""
    _check_address(out, "content.from", content.sender)
    if content.reply_to is not None:
        _check_address(out, "content.reply_to", content.reply_to)
    if not content.subject.strip():
        out.add("content.subject", "is required")
    elif len(content.subject) > limits.max_subject_chars:
        out.add("content.subject", f"is longer than {limits.max_subject_chars} characters")
    else:
        out.add("content.subject", _text_problem(content.subject))
    if not content.text_body.strip() and not content.html_body.strip():
        out.add("content.text_body", "a text_body or an html_body is required")
    for name, body in (("text_body", content.text_body), ("html_body", content.html_body)):
        if len(body.encode()) > limits.max_body_bytes:
            out.add(f"content.{name}", f"is larger than {limits.max_body_bytes} bytes")
        if "\x00" in body:
            out.add(f"content.{name}", "contains a NUL character")
    if len(content.headers) > limits.max_headers:
        out.add("content.headers", f"more than {limits.max_headers} headers")
    for i, header in enumerate(content.headers):
        check_header(out, f"content.headers[{i}]", header)
    if content.unsubscribe_url:
        url = content.unsubscribe_url
        if not url.startswith(("https://", "http://", "mailto:")) or _CONTROL.search(url):
            out.add("content.unsubscribe_url", "must be an http(s) or mailto URL")
        elif any(c in url for c in " <>,"):
            out.add("content.unsubscribe_url", "must not contain spaces, '<', '>' or ','")


def check_recipients(
    out: Collector, recipients: Iterable[Recipient], first_index: int, limits: Limits
) -> int:
    """Add every problem of these recipients to out; returns how many there were."""
    count = 0
    for offset, r in enumerate(recipients):
        field = f"recipients[{first_index + offset}]"
        out.add(f"{field}.email", address_problem(r.email))
        out.add(f"{field}.name", _text_problem(r.name))
        if len(r.variables) > limits.max_variables:
            out.add(f"{field}.variables", f"more than {limits.max_variables} variables")
        for key, value in r.variables.items():
            if not _VARIABLE_NAME.match(key):
                out.add(f"{field}.variables", f"{key!r} is not a valid variable name")
            elif len(value) > limits.max_variable_chars:
                out.add(f"{field}.variables[{key}]", "is too long")
            elif "\x00" in value:
                out.add(f"{field}.variables[{key}]", "contains a NUL character")
        count += 1
    return count


def check_job(
    content: Content, recipients: list[Recipient], idempotency_key: str, limits: Limits
) -> None:
    """Validate a whole job given at once.

    Raises:
        ValidationError: naming every field at fault.
    """
    out = Collector()
    check_idempotency_key(out, idempotency_key)
    check_content(out, content, limits)
    if not recipients:
        out.add("recipients", "at least one recipient is required")
    elif len(recipients) > limits.max_recipients:
        out.add("recipients", f"more than {limits.max_recipients} recipients")
    else:
        check_recipients(out, recipients, 0, limits)
    out.raise_if_any()


def check_idempotency_key(out: Collector, key: str) -> None:
    if not key:
        out.add("idempotency_key", "is required")
    elif len(key) > 200 or not key.isprintable() or "/" in key:
        out.add("idempotency_key", "must be at most 200 printable characters without '/'")
