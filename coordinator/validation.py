"""Checks on a submitted job, before anything is stored. Pure.

Every problem is reported with the field it concerns ("recipients[3].email"), and
as many problems as :data:`MAX_REPORTED` are collected in one pass so a caller can
fix a list in one round trip.

Addresses follow email-validator in strict mode without DNS, restricted to ASCII:
no SMTPUTF8 (our SMTP client and relays do not negotiate it), and internationalised
domains only in their A-label (``xn--``) form, so the address stored is byte for byte
the one the relay sees. email-validator costs ~29 s per million addresses, too slow for
a 1M-recipient submit on the event loop, so the local part is checked by our own
dot-atom expression (what strict email-validator accepts for an ASCII local part; a
property test holds the two together) and each distinct domain is given to
email-validator once (memoised): ~1.5 s per million.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import email_validator

from coordinator.model import Address, Content, Header, JobOptions, Recipient
from mailers_runtime.errors import PermanentError

MAX_REPORTED = 20
MAX_RECIPIENTS_PER_MESSAGE = 100
"""RFC 5321's minimum of recipients per transaction a relay must accept."""

# RFC 5322 dot-atom local part and an LDH domain with at least two labels.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# Header field names: printable US-ASCII except colon (RFC 5322 ftext).
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
# C0 controls except TAB (CR, LF, NUL, VT, FF...), DEL, C1 controls (NEL U+0085), and
# the Unicode line and paragraph separators (U+2028, U+2029): anything a mail client or
# a header parser might take as a line break.
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

# Extra headers a job may set. Descriptive or list-management fields only; everything
# that routes mail (To/Cc/Bcc/Reply-To/Sender/Return-Path), authenticates it (DKIM,
# ARC, Authentication-Results), names the sender, or defines the MIME structure is
# written by the renderer or not at all. X-* stays open for campaign tags.
ALLOWED_HEADERS = frozenset(
    h.lower()
    for h in (
        "List-Id", "Precedence", "Auto-Submitted", "Feedback-ID", "Organization",
        "Keywords", "Comments", "In-Reply-To", "References",
    )
)  # fmt: skip
ALLOWED_HEADERS_TEXT = "X-*, " + ", ".join(
    ("List-Id", "Precedence", "Auto-Submitted", "Feedback-ID", "Organization", "Keywords",
     "Comments", "In-Reply-To", "References")
)  # fmt: skip

TemplateCheck = Callable[[Content], Sequence[str]]
"""Compiles a job's templates; returns the problems found (empty when fine)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size limits applied at submit."""

    max_recipients: int = 10_000_000
    """Recipients per job."""
    max_body_bytes: int = 1_000_000
    """UTF-8 bytes of the text body, and of the HTML body."""
    max_content_bytes: int = 1_200_000
    """Bytes of the whole content (subject, bodies, headers, URL) as stored: the job
    record is one etcd request, which etcd refuses above 1.5 MiB."""
    max_subject_chars: int = 998
    """Characters of the subject (RFC 5322's line limit)."""
    max_headers: int = 50
    """Extra headers per job."""
    max_variables: int = 64
    """Template variables per recipient."""
    max_variable_chars: int = 4_000
    """Characters of one variable's value."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be at least 1")


class ValidationError(PermanentError, ValueError):
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
    if not local.isascii():
        return f"{email!r} is not a valid email address (non-ASCII local part)"
    if len(local) > 64 or not _LOCAL.match(local):
        return f"{email!r} is not a valid email address"
    domain_problem = _domain_problem(domain)
    if domain_problem is not None:
        return f"{email!r} is not a valid email address ({domain_problem})"
    return None


@functools.lru_cache(maxsize=65_536)
def _domain_problem(domain: str) -> str | None:
    # A memo of a pure function: bulk lists have few distinct domains.
    if not domain.isascii():
        return "give the domain in ASCII xn-- form"
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return "bad domain"
    if labels[-1].isdigit():
        return "bad domain"
    try:
        email_validator.validate_email(
            f"a@{domain.lower()}",
            allow_smtputf8=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            strict=True,
            check_deliverability=False,
            # RFC 6761 .test is harmless and is what the demo and tests use.
            test_environment=True,
        )
    except email_validator.EmailNotValidError as exc:
        return str(exc).rstrip(".")
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


def header_name_problem(name: str) -> str | None:
    """Why a job may not set a header of this name, or None when it may."""
    if not _FIELD_NAME.match(name) or _CONTROL.search(name):
        return f"{name!r} is not a valid header name"
    lower = name.lower()
    if lower in RESERVED_HEADERS:
        return f"{name!r} is set by mailers and cannot be given"
    if not ((lower.startswith("x-") and len(lower) > 2) or lower in ALLOWED_HEADERS):
        return f"{name!r} is not an allowed header (allowed: {ALLOWED_HEADERS_TEXT})"
    return None


def check_header(out: Collector, field: str, header: Header) -> None:
    out.add(f"{field}.name", header_name_problem(header.name))
    out.add(f"{field}.value", _text_problem(header.value))


def content_size(content: Content) -> int:
    """Bytes the content takes in the stored job record (JSON, non-ASCII escaped)."""
    texts = [content.subject, content.text_body, content.html_body, content.unsubscribe_url]
    for address in (content.sender, content.reply_to):
        if address is not None:
            texts += [address.email, address.name]
    for header in content.headers:
        texts += [header.name, header.value]
    return sum(len(json.dumps(t)) for t in texts)


def check_content(
    out: Collector, content: Content, limits: Limits, templates: TemplateCheck | None = None
) -> None:
    """Add every problem of the job's content to out.

    ``templates``, when given, compiles the subject and bodies (it runs only when the
    rest is sound); a problem starting ``subject: ``, ``text_body: `` or ``html_body: ``
    is reported on that field, any other on ``content``.
    """
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
    if not 1 <= content.recipients_per_message <= MAX_RECIPIENTS_PER_MESSAGE:
        out.add(
            "content.recipients_per_message",
            f"must be between 0 (one message per recipient) and {MAX_RECIPIENTS_PER_MESSAGE}",
        )
    size = content_size(content)
    if size > limits.max_content_bytes:
        out.add("content", f"is larger than {limits.max_content_bytes} bytes ({size})")
    if templates is not None and not out.problems:
        for problem in templates(content):
            name, sep, message = problem.partition(": ")
            if sep and name in ("subject", "text_body", "html_body", "recipients_per_message"):
                out.add(f"content.{name}", message)
            else:
                out.add("content", problem)


def check_recipients(
    out: Collector, recipients: Iterable[Recipient], first_index: int, limits: Limits
) -> int:
    """Add every problem of these recipients to out; returns how many there were."""
    count = 0
    for offset, r in enumerate(recipients):
        count += 1
        email_problem = address_problem(r.email)
        name_problem = _text_problem(r.name) if r.name else None
        variable_problems = _variable_problems(r.variables, limits) if r.variables else []
        if (
            email_problem is None
            and name_problem is None
            and not variable_problems
            and not r.metadata
        ):
            continue  # the common case: no problem to name, so no field name is formatted
        field = f"recipients[{first_index + offset}]"
        out.add(f"{field}.email", email_problem)
        out.add(f"{field}.name", name_problem)
        for where, problem in variable_problems:
            out.add(f"{field}.{where}", problem)
        if r.metadata:
            _check_metadata(out, f"{field}.metadata", r.metadata)
    return count


def _variable_problems(variables: Mapping[str, str], limits: Limits) -> list[tuple[str, str]]:
    """What is wrong with a recipient's variables, each with the field below the
    recipient it concerns (``variables`` or ``variables[key]``)."""
    problems = []
    if len(variables) > limits.max_variables:
        problems.append(("variables", f"more than {limits.max_variables} variables"))
    for key, value in variables.items():
        if not _VARIABLE_NAME.match(key):
            problems.append(("variables", f"{key!r} is not a valid variable name"))
        elif len(value) > limits.max_variable_chars:
            problems.append(
                (f"variables[{key}]", f"is longer than {limits.max_variable_chars} characters")
            )
        elif "\x00" in value:
            problems.append((f"variables[{key}]", "contains a NUL character"))
    return problems


# The API's own limits (proto/mailer/v1: Recipient.metadata, JobOptions.tags).
MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE_CHARS = 256
MAX_METADATA_BYTES = 1024
"""UTF-8 bytes of a recipient's metadata, keys and values together."""
MAX_TAGS = 10
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TAG_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_JOB_NAME_CHARS = 200
MAX_TAG_CHARS = 64


def _check_metadata(out: Collector, field: str, metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_METADATA_KEYS:
        out.add(field, f"more than {MAX_METADATA_KEYS} entries")
        return
    size = 0
    for key, value in metadata.items():
        size += len(key.encode()) + len(value.encode())
        if not _METADATA_KEY.match(key):
            out.add(field, f"{key[:80]!r} is not a valid key (1-64 letters, digits, _ - .)")
        elif len(value) > MAX_METADATA_VALUE_CHARS:
            out.add(f"{field}[{key}]", f"is longer than {MAX_METADATA_VALUE_CHARS} characters")
        elif "\x00" in value:
            out.add(f"{field}[{key}]", "contains a NUL character")
    if size > MAX_METADATA_BYTES:
        out.add(field, f"is larger than {MAX_METADATA_BYTES} bytes")


def check_options(out: Collector, options: JobOptions) -> None:
    """The job's name and tags."""
    if len(options.name) > MAX_JOB_NAME_CHARS:
        out.add("options.name", f"is longer than {MAX_JOB_NAME_CHARS} characters")
    else:
        out.add("options.name", _text_problem(options.name))
    if len(options.tags) > MAX_TAGS:
        out.add("options.tags", f"more than {MAX_TAGS} tags")
        return
    for i, tag in enumerate(options.tags):
        if not tag or len(tag) > MAX_TAG_CHARS:
            out.add(f"options.tags[{i}]", f"must be 1 to {MAX_TAG_CHARS} characters")
        elif _TAG_FORBIDDEN.search(tag):
            out.add(f"options.tags[{i}]", "contains a control character")


def check_job(
    content: Content,
    recipients: list[Recipient],
    idempotency_key: str,
    limits: Limits,
    templates: TemplateCheck | None = None,
    options: JobOptions | None = None,
) -> None:
    """Validate a whole job given at once.

    Raises:
        ValidationError: naming every field at fault.
    """
    out = Collector()
    check_idempotency_key(out, idempotency_key)
    check_content(out, content, limits, templates)
    if options is not None:
        check_options(out, options)
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
