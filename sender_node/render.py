"""Rendering a job's content into one RFC 5322 message per recipient.

Pure and fast: a job's content is compiled once (:class:`CompiledMessage`, cached by
job id in :class:`TemplateCache`) into templates and precomputed header bytes; each
recipient's message is then spliced together from bytes, without building an
``email.message.EmailMessage``.

Guarantees of every rendered message:

- CRLF line endings, 7-bit clean: bodies are quoted-printable UTF-8, non-ASCII header
  text is RFC 2047 encoded.
- Template variables ``{{ name }}`` come from the recipient's variables plus the
  built-ins ``email`` and ``name`` (explicit variables win); unknown ones render empty.
  Values are HTML-escaped in the HTML body, percent-encoded in the unsubscribe URL, and
  stripped of control characters in headers, so no value can inject a header or markup.
- ``Message-ID`` is ``<{job_id}.{index}@{domain of From}>``: the same recipient of the
  same job always gets the same id, which lets relays and readers drop duplicates.
- The multipart boundary starts with ``=_``, which quoted-printable output never
  contains, so it cannot collide with a body.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import html
import re
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import datetime
from email.utils import format_datetime

from sender_node.errors import RenderError

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5322 ftext: printable US-ASCII except colon.
_FIELD_NAME = re.compile(r"\A[\x21-\x39\x3b-\x7e]+\Z")
# A pragmatic addr-spec: dot-atom local part and domain, no quoting, no comments.
_ADDRESS = re.compile(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+\Z")
_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")

# Headers the renderer writes itself; content.headers may not duplicate them.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "Date",
        "From",
        "Sender",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Message-ID",
        "Reply-To",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Return-Path",
    )
)

_LINE_LIMIT = 78
# Raw bytes per RFC 2047 encoded word: 36 bytes -> 48 base64 chars -> 60 chars per word,
# so even the first line ("Subject: " + word) stays under 78 characters.
_WORD_BYTES = 36
_PART_HEAD = (
    b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'
)


@dataclasses.dataclass(frozen=True)
class Mailbox:
    """An address with an optional display name."""

    email: str
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Content:
    """A job's message before personalisation (the pure twin of ``MessageContent``)."""

    sender: Mailbox
    subject: str = ""
    text_body: str = ""
    html_body: str = ""
    reply_to: Mailbox | None = None
    headers: tuple[tuple[str, str], ...] = ()
    unsubscribe_url: str = ""


@dataclasses.dataclass(frozen=True)
class Template:
    """A string with ``{{ name }}`` holes: ``literals`` has one more item than ``names``."""

    literals: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def compile(cls, source: str) -> Template:
        """Split ``source`` at its variables."""
        pieces = _VARIABLE.split(source)
        return cls(literals=tuple(pieces[0::2]), names=tuple(pieces[1::2]))

    def render(self, values: Mapping[str, str], escape: Callable[[str], str] | None = None) -> str:
        """Fill the holes from ``values`` (missing → empty), passing each through ``escape``."""
        if not self.names:
            return self.literals[0]
        literals = self.literals
        parts = [literals[0]]
        for i, name in enumerate(self.names, 1):
            value = values.get(name, "")
            parts.append(escape(value) if escape is not None and value else value)
            parts.append(literals[i])
        return "".join(parts)


def encode_words(text: str) -> str:
    """RFC 2047 base64 encoded words for ``text``, folded with CRLF SP between words.

    UTF-8 sequences are never split across words.
    """
    words: list[str] = []
    chunk = bytearray()
    for char in text:
        encoded = char.encode("utf-8", "surrogatepass")
        if len(chunk) + len(encoded) > _WORD_BYTES:
            words.append(base64.b64encode(chunk).decode("ascii"))
            chunk.clear()
        chunk += encoded
    if chunk or not words:
        words.append(base64.b64encode(chunk).decode("ascii"))
    return "\r\n ".join(f"=?utf-8?b?{word}?=" for word in words)


def fold_ascii(name: str, value: str) -> str:
    """``value`` folded at spaces so lines stay within 78 characters where possible.

    Unfolding (removing each CRLF) gives ``value`` back exactly. A word longer than
    the limit stays on one line: RFC 5322 allows up to 998 characters.
    """
    if len(name) + 2 + len(value) <= _LINE_LIMIT:
        return value
    words = value.split(" ")
    lines: list[str] = []
    current = words[0]
    width = len(name) + 2
    for word in words[1:]:
        if width + len(current) + 1 + len(word) > _LINE_LIMIT and current.strip():
            lines.append(current)
            current = " " + word
            width = 0
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


def header_text(name: str, value: str) -> str:
    """A header value from untrusted text: control characters become spaces, non-ASCII
    is RFC 2047 encoded, and long lines are folded."""
    clean = _CONTROL.sub(" ", value)
    if clean.isascii():
        return fold_ascii(name, clean)
    return encode_words(clean)


def check_address(email: str) -> str:
    """Return ``email`` if it is a plain ASCII addr-spec.

    Raises:
        RenderError: it is empty, has no domain, or contains characters that could
            break the header or the SMTP envelope.
    """
    if not email.isascii() or not _ADDRESS.match(email):
        raise RenderError(f"invalid email address {email!r}")
    return email


def format_mailbox(mailbox: Mailbox) -> str:
    """``Name <addr>`` with the name quoted or RFC 2047 encoded as needed.

    Raises:
        RenderError: the address is invalid (see :func:`check_address`).
    """
    email = check_address(mailbox.email)
    name = _CONTROL.sub(" ", mailbox.name).strip()
    if not name:
        return email
    if name.isascii():
        if re.search(r'[][\\()<>@,:;".]', name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{name} <{email}>"
    return f"{encode_words(name)} <{email}>"


def html_to_text(source: str) -> str:
    """A crude plain-text rendering of HTML: tags dropped, entities unescaped.

    ``{{ name }}`` holes survive (they hold no markup), so this works on templates.
    """
    text = re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>", "", source)
    text = re.sub(r"(?s)<!--.*?-->", "", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(?i)<br\s*/?>", "\n", text)
    text = re.sub(r"(?i)</(p|div|h[1-6]|li|tr|table|blockquote|ul|ol)\s*>", "\n\n", text)
    text = re.sub(r"(?s)<[^>]*>", "", text)
    text = html.unescape(text)
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _normalize_newlines(text: str) -> str:
    if "\r" in text:
        return text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def encode_qp(text: str) -> bytes:
    """UTF-8 quoted-printable with CRLF line endings (ending in CRLF only if ``text``
    ends in a newline)."""
    encoded = binascii.b2a_qp(_normalize_newlines(text).encode("utf-8"), istext=True)
    return encoded.replace(b"\n", b"\r\n")


def _url_quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _header(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("ascii")


class CompiledMessage:
    """A job's content compiled for fast per-recipient rendering.

    Args:
        job_id: The job; part of every Message-ID and the source of the boundary.
        content: What every recipient receives.

    Raises:
        RenderError: the sender or reply-to address is invalid, an extra header has a
            bad name, a reserved name, or a value with CR, LF or NUL, or the
            unsubscribe URL has spaces, controls or angle brackets.
    """

    def __init__(self, job_id: str, content: Content) -> None:
        self.job_id = job_id
        self.content = content
        self.envelope_from = check_address(content.sender.email)
        self.domain = self.envelope_from.rpartition("@")[2].lower()
        self._msgid_prefix = _MSGID_UNSAFE.sub("-", job_id) or "job"
        self._subject = Template.compile(_CONTROL.sub(" ", content.subject))
        text_source = content.text_body
        if not text_source and content.html_body:
            text_source = html_to_text(content.html_body)
        self._text = Template.compile(_normalize_newlines(text_source))
        self._html = (
            Template.compile(_normalize_newlines(content.html_body)) if content.html_body else None
        )
        self._unsubscribe = self._compile_unsubscribe(content.unsubscribe_url)
        self._static_head = self._compile_static_head(content)
        self._boundary = b"=_mailers_" + hashlib.sha256(job_id.encode()).hexdigest()[:24].encode()
        self._date_key: int | None = None
        self._date_value = b""

    @staticmethod
    def _compile_unsubscribe(url: str) -> Template | None:
        if not url:
            return None
        template = Template.compile(url)
        for literal in template.literals:
            if _URL_UNSAFE.search(literal) or not literal.isascii():
                raise RenderError("unsubscribe URL must be ASCII without spaces, controls or <>")
        return template

    def _compile_static_head(self, content: Content) -> bytes:
        lines = [_header("From", format_mailbox(content.sender))]
        if content.reply_to is not None and content.reply_to.email:
            lines.append(_header("Reply-To", format_mailbox(content.reply_to)))
        lines.append(b"MIME-Version: 1.0\r\n")
        for name, value in content.headers:
            if not _FIELD_NAME.match(name):
                raise RenderError(f"invalid header name {name!r}")
            if name.lower() in RESERVED_HEADERS:
                raise RenderError(f"header {name!r} is set by the sender and cannot be overridden")
            if any(c in value for c in "\r\n\x00"):
                raise RenderError(f"header {name!r} has CR, LF or NUL in its value")
            lines.append(_header(name, header_text(name, value)))
        if self._unsubscribe is not None:
            lines.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
        return b"".join(lines)

    def message_id(self, index: int) -> str:
        """The Message-ID of the recipient at ``index`` in the job, with angle brackets."""
        return f"<{self._msgid_prefix}.{index}@{self.domain}>"

    def _date(self, date: datetime) -> bytes:
        key = int(date.timestamp())
        if key != self._date_key:
            self._date_key = key
            self._date_value = _header("Date", format_datetime(date.replace(microsecond=0)))
        return self._date_value

    def render(
        self,
        *,
        index: int,
        email: str,
        name: str,
        variables: Mapping[str, str],
        date: datetime,
    ) -> bytes:
        """The full message for one recipient, ready for SMTP DATA (before dot-stuffing).

        Args:
            index: The recipient's position in the job (goes into the Message-ID).
            email: The recipient's address.
            name: The recipient's display name, possibly empty.
            variables: The recipient's template variables.
            date: The Date header; must be timezone-aware.

        Raises:
            RenderError: the recipient's address is invalid.
        """
        values = {"email": email, "name": name}
        values.update(variables)
        head = [
            self._date(date),
            self._static_head,
            _header("To", format_mailbox(Mailbox(email, name))),
            _header("Subject", header_text("Subject", self._subject.render(values))),
            _header("Message-ID", self.message_id(index)),
        ]
        if self._unsubscribe is not None:
            url = self._unsubscribe.render(values, _url_quote)
            head.append(_header("List-Unsubscribe", f"<{url}>"))
        text = encode_qp(self._text.render(values))
        if self._html is None:
            head.append(_PART_HEAD % b"plain")
            head.append(b"\r\n")
            head.append(text if text.endswith(b"\r\n") else text + b"\r\n")
            return b"".join(head)
        markup = encode_qp(self._html.render(values, html.escape))
        # The CRLF before a boundary line belongs to the delimiter, not to the part, so
        # each part gets one of its own: decoded bodies end exactly as their templates.
        delimiter = b"\r\n--" + self._boundary
        head.append(b'Content-Type: multipart/alternative; boundary="' + self._boundary + b'"\r\n')
        head.append(b"\r\n")
        head.append(b"--" + self._boundary + b"\r\n")
        head.append(_PART_HEAD % b"plain")
        head.append(b"\r\n")
        head.append(text)
        head.append(delimiter + b"\r\n")
        head.append(_PART_HEAD % b"html")
        head.append(b"\r\n")
        head.append(markup)
        head.append(delimiter + b"--\r\n")
        return b"".join(head)


class TemplateCache:
    """Compiled messages by job id, least recently used evicted first.

    A job's content never changes, but the cache still compares it so a reused job
    id can never render stale content.

    Args:
        max_jobs: How many jobs' compiled messages to keep.
    """

    def __init__(self, max_jobs: int = 64) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self._max_jobs = max_jobs
        self._entries: collections.OrderedDict[str, CompiledMessage] = collections.OrderedDict()

    def get(self, job_id: str, content: Content) -> CompiledMessage:
        """The compiled message for ``job_id``, compiling it on first use.

        Raises:
            RenderError: the content is invalid (see :class:`CompiledMessage`).
        """
        compiled = self._entries.get(job_id)
        if compiled is not None and compiled.content == content:
            self._entries.move_to_end(job_id)
            return compiled
        compiled = CompiledMessage(job_id, content)
        self._entries[job_id] = compiled
        self._entries.move_to_end(job_id)
        while len(self._entries) > self._max_jobs:
            self._entries.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._entries)
