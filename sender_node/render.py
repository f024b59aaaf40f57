"""Rendering a job's content into one RFC 5322 message per recipient.

Pure and fast: a job's content is compiled once (:class:`CompiledMessage`, cached by
job id in :class:`TemplateCache`) into sandboxed templates and precomputed bytes (the
static headers, the MIME part headers, every attachment already base64-encoded); each
recipient's message is then spliced together from bytes, without building an
``email.message.EmailMessage``.

Templates are Jinja2, run in an :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`
restricted further (see :func:`check_templates`, which the coordinator calls at submit):

- Allowed: ``{{ expressions }}`` with the filters in :data:`ALLOWED_FILTERS` and the
  string methods in :data:`ALLOWED_STR_METHODS`, ``{% if %}``, ``{% for %}`` (one level,
  not ``recursive``), ``{% filter %}``, ``{% raw %}``, ``{% autoescape %}``, comments.
- Rejected at compile time: ``set``, ``with``, ``macro``, ``call``, ``block``,
  ``extends``, ``include``, ``import``, nested loops, unknown filters, and any
  attribute or item whose name starts with ``_`` (or is one of Python's internal
  frame/code attributes). What the sandbox only sees at render time (an unsafe
  attribute reached through a computed name, a disallowed method) fails the recipient
  with a :class:`RenderError`.
- Resources: string repetition, ``join`` and ``replace`` may not build a value above
  ``RenderLimits.max_value_chars``, ``**`` and ``%``-formatting are bounded, and each
  rendered field stops at ``RenderLimits.max_output_chars``. Without assignments or
  nested loops, no template can grow a value exponentially.
- Missing variables render empty (Jinja's default ``Undefined``), so a CSV row with an
  empty or absent column still gets its message; write ``{{ name | default("there") }}``
  for a fallback. Using a missing variable in any other way (an attribute, a call) fails
  that recipient. :func:`template_variables` lists the names a job's templates use.

Variables are the recipient's ``variables`` plus ``email`` and ``name`` (explicit
variables win). Values are HTML-escaped in the HTML body (autoescape, HTML only),
percent-encoded in the unsubscribe URL, and, in every header, control characters (C0,
DEL, C1 including NEL, U+2028, U+2029) become a space *after* rendering, so nothing a
recipient's data or a template produces can start a header line. Header names come from
an allow-list (``X-*`` and :data:`ALLOWED_HEADERS`).

Guarantees of every rendered message:

- CRLF line endings, 7-bit clean, lines within 78 characters except for unbreakable
  ASCII header words (never above 998): bodies are quoted-printable UTF-8, attachments
  base64, non-ASCII header text RFC 2047 encoded, non-ASCII filenames RFC 2231 encoded.
- ``Message-ID`` is ``<{job_id}.{index}@{domain of From}>``: the same recipient of the
  same job always gets the same id, which lets relays and readers drop duplicates.
- Multipart boundaries start with ``=_``, which neither quoted-printable nor base64
  output ever contains, so they cannot collide with a body.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Protocol

import markupsafe
from jinja2 import Template as JinjaTemplate
from jinja2 import filters as jinja_filters
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
    ImmutableSandboxedEnvironment,
)
from jinja2.utils import pass_eval_context

from sender_node.errors import RenderError

# What may end or split a header line somewhere on the mail path: C0 controls (CR, LF,
# NUL, TAB, VT, FF...), DEL, C1 controls (NEL is U+0085), and the Unicode line and
# paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES = re.compile(" {2,}")
# RFC 5322 ftext: printable US-ASCII except colon.
_FIELD_NAME = re.compile(r"\A[\x21-\x39\x3b-\x7e]+\Z")
# A pragmatic addr-spec: dot-atom local part and domain, no quoting, no comments.
_ADDRESS = re.compile(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+\Z")
_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")
_NAME_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
# RFC 5322 atext: what a display-name word may be without quoting or encoding.
_ATOM = re.compile(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
_FILENAME_PLAIN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,59}\Z")
_CONTENT_TYPE = re.compile(r"\A[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*\Z")
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(?:\*|\d{4,})|%[-#0 +]*\d*\.(?:\*|\d{4,})")

# Headers the renderer writes itself; content.headers may not set them.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "Date", "From", "Sender", "To", "Cc", "Bcc", "Subject", "Message-ID", "Reply-To",
        "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
        "List-Unsubscribe", "List-Unsubscribe-Post", "Return-Path", "Received",
        "DKIM-Signature",
    )
)  # fmt: skip

# Extra headers a job may set besides ``X-*`` (matched case-insensitively).
ALLOWED_HEADERS = frozenset(
    name.lower()
    for name in (
        "List-Id", "List-Help", "List-Subscribe", "List-Owner", "List-Archive", "List-Post",
        "Precedence", "Auto-Submitted", "Feedback-ID", "Organization", "Keywords",
        "Comments", "Importance", "Priority", "Content-Language",
    )
)  # fmt: skip

# Attachment types a job may carry. Binary types are also checked by their magic bytes.
ATTACHMENT_TYPES = frozenset(
    (
        "application/pdf", "image/png", "image/jpeg", "image/gif", "image/webp",
        "text/plain", "text/csv", "text/calendar", "application/json",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
    )
)  # fmt: skip
_ZIP = (b"PK\x03\x04",)
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "application/pdf": (b"%PDF-",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": _ZIP,
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": _ZIP,
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": _ZIP,
    "application/vnd.oasis.opendocument.text": _ZIP,
    "application/vnd.oasis.opendocument.spreadsheet": _ZIP,
}

# Jinja filters a template may use: none can grow a value more than linearly, except
# ``join`` and ``replace``, which are wrapped with a size check.
ALLOWED_FILTERS = frozenset(
    (
        "abs", "capitalize", "count", "d", "default", "e", "escape", "first", "float",
        "forceescape", "int", "join", "last", "length", "list", "lower", "max", "min",
        "replace", "reverse", "round", "safe", "sort", "string", "striptags", "title",
        "tojson", "trim", "truncate", "unique", "upper", "urlencode", "wordcount",
    )
)  # fmt: skip
# ``str`` methods a template may call (``name.split(",")``); padding and formatting
# methods are left out because one call can allocate gigabytes.
ALLOWED_STR_METHODS = frozenset(
    (
        "capitalize", "casefold", "count", "endswith", "find", "isalnum", "isalpha",
        "isdecimal", "isdigit", "islower", "isnumeric", "isspace", "istitle", "isupper",
        "join", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "replace",
        "rfind", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith",
        "strip", "swapcase", "title", "upper",
    )
)  # fmt: skip
_UNSAFE_NAMES = frozenset(
    {"mro", "func_globals", "func_code", "f_globals", "f_locals", "f_builtins", "f_code"}
    | UNSAFE_GENERATOR_ATTRIBUTES
    | UNSAFE_COROUTINE_ATTRIBUTES
    | UNSAFE_ASYNC_GENERATOR_ATTRIBUTES
)
# The only functions a template may call (besides allowed methods); range is left out
# because it makes 100,000-step loops from nothing.
_GLOBALS = frozenset({"dict", "cycler", "joiner"})
_FORBIDDEN_NODES: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Extends, "extends"),
    (nodes.Include, "include"),
    (nodes.Import, "import"),
    (nodes.FromImport, "import"),
    (nodes.Macro, "macro"),
    (nodes.CallBlock, "call"),
    (nodes.Block, "block"),
    (nodes.Assign, "set"),
    (nodes.AssignBlock, "set"),
    (nodes.With, "with"),
)

_LINE_LIMIT = 78
# An ASCII header word longer than this is RFC 2047 encoded instead, so no line can
# exceed RFC 5322's hard limit of 998 characters.
_LONG_WORD = 900
# Raw bytes per RFC 2047 encoded word: 36 bytes -> 48 base64 chars -> 60 chars per word,
# so even the first line ("Subject: " + word) stays under 78 characters.
_WORD_BYTES = 36
# Display names longer than this are encoded (and so folded) even when ASCII.
_LONG_NAME = 60
_PART_HEAD = (
    b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'
)


@dataclasses.dataclass(frozen=True)
class Mailbox:
    """An address with an optional display name."""

    email: str
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Attachment:
    """A file every recipient receives, unchanged.

    Args:
        filename: Shown to the reader; non-ASCII is RFC 2231 encoded.
        content_type: ``type/subtype`` from :data:`ATTACHMENT_TYPES`.
        content: The raw bytes.
    """

    filename: str
    content_type: str
    content: bytes


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
    attachments: tuple[Attachment, ...] = ()
    recipients_per_message: int = 1
    """Above 1, every recipient gets the same message (see :meth:`CompiledMessage.render_shared`),
    so the templates may not read per-recipient values."""


MAX_RECIPIENTS_PER_MESSAGE = 100
"""RFC 5321 §4.5.3.1.8: a relay must accept at least 100 recipients per transaction."""

SHARED_TO = "undisclosed-recipients:;"
"""The To header of a message several recipients share (their addresses stay private)."""


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """Resource bounds of compiling and rendering one job."""

    max_output_chars: int = 4_000_000
    """A rendered field (subject, a body, a header) longer than this fails the recipient."""
    max_value_chars: int = 100_000
    """Largest string a template may build with ``*``, ``join`` or ``replace``."""
    max_attachments: int = 10
    """Attachments per job."""
    max_attachment_bytes: int = 1_000_000
    """Total size of a job's attachments before base64; the job travels through etcd
    and in every batch, so keep it well below etcd's request limit (1.5 MiB)."""
    attachment_types: frozenset[str] = ATTACHMENT_TYPES
    """Allowed attachment content types."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{field.name} must be at least 1")


class MessageSigner(Protocol):
    """Signs a rendered message, e.g. :class:`sender_node.dkim.DkimSigner`."""

    def can_sign(self, domain: str) -> bool:
        """Whether there is a key for ``domain``."""
        ...

    def sign(self, message: bytes, domain: str) -> bytes:
        """``message`` with a signature header prepended."""
        ...


# -- header encoding -------------------------------------------------------------------


def encode_words(text: str) -> str:
    """RFC 2047 base64 encoded words for ``text``, folded with CRLF SP between words.

    UTF-8 sequences are never split across words; lone surrogates become ``?``.
    """
    words: list[str] = []
    chunk = bytearray()
    for char in text:
        encoded = char.encode("utf-8", "replace")
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
        if width + len(current) + 1 + len(word) > _LINE_LIMIT and current.strip() and word:
            lines.append(current)
            current = " " + word
            width = 0
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


def clean_header_value(value: str) -> str:
    """Control characters become spaces; runs of spaces collapse; ends are stripped."""
    clean = _CONTROL.sub(" ", value)
    if "  " in clean:
        clean = _SPACES.sub(" ", clean)
    return clean.strip(" ")


def header_text(name: str, value: str) -> str:
    """A header value from untrusted text: cleaned (see :func:`clean_header_value`),
    RFC 2047 encoded when not ASCII or when a word would make a line too long, and
    folded."""
    clean = clean_header_value(value)
    if clean.isascii() and (len(clean) <= _LONG_WORD or _fits(clean)):
        return fold_ascii(name, clean)
    return encode_words(clean)


def _fits(value: str) -> bool:
    return max(len(word) for word in value.split(" ")) <= _LONG_WORD


def check_address(email: str) -> str:
    """Return ``email`` if it is a plain ASCII addr-spec.

    Raises:
        RenderError: it is empty, has no domain, or contains characters that could
            break the header or the SMTP envelope.
    """
    if not email.isascii() or not _ADDRESS.match(email):
        raise RenderError(f"invalid email address {email!r}")
    return email


def format_mailbox(mailbox: Mailbox, header: str = "To") -> str:
    """``Name <addr>`` with the name quoted or RFC 2047 encoded as needed, folded for
    a header called ``header``.

    ASCII words of a non-ASCII name stay plain, so encoded words are adjacent only
    within a long run of words that all need encoding (the stdlib parser, unlike RFC
    2047, keeps a space between adjacent encoded words in a display name).

    Raises:
        RenderError: the address is invalid (see :func:`check_address`).
    """
    email = check_address(mailbox.email)
    name = clean_header_value(mailbox.name)
    if not name:
        return email
    if name.isascii() and _fits(name) and "=?" not in name:
        if _NAME_SPECIALS.search(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        pieces = name.split(" ")
    else:
        pieces = []
        run: list[str] = []
        for token in name.split(" "):
            if (
                token.isascii()
                and len(token) <= _LONG_NAME
                and _ATOM.match(token)
                and "=?" not in token
            ):
                if run:
                    pieces.extend(encode_words(" ".join(run)).split("\r\n "))
                    run = []
                pieces.append(token)
            else:
                run.append(token)
        if run:
            pieces.extend(encode_words(" ".join(run)).split("\r\n "))
    pieces.append(f"<{email}>")
    return _fold_pieces(len(header) + 2, pieces)


def _fold_pieces(width: int, pieces: list[str]) -> str:
    """``pieces`` joined by spaces, a space becoming CRLF SP where a line would pass 78."""
    out = [pieces[0]]
    width += len(pieces[0])
    for piece in pieces[1:]:
        if width + 1 + len(piece) > _LINE_LIMIT:
            out.append("\r\n ")
            width = 1
        else:
            out.append(" ")
            width += 1
        out.append(piece)
        width += len(piece)
    return "".join(out)


def header_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a job's extra header, or None when it can."""
    if not _FIELD_NAME.match(name) or len(name) > 76:
        return f"invalid header name {name!r}"
    lower = name.lower()
    if lower in RESERVED_HEADERS:
        return f"header {name!r} is set by the sender and cannot be overridden"
    if (lower.startswith("x-") and len(lower) > 2) or lower in ALLOWED_HEADERS:
        return None
    return f"header {name!r} is not allowed (X-*, List-Id, Precedence, Feedback-ID, ...)"


# -- bodies ---------------------------------------------------------------------------

# Template syntax, held aside while HTML is turned into text.
_JINJA_CONSTRUCT = re.compile(
    r"\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}|\{#.*?#\}|\{%.*?%\}|\{\{.*?\}\}", re.S
)
_HELD = re.compile("\x00([0-9]+)\x00")


def html_to_text(source: str) -> str:
    """A crude plain-text rendering of an HTML template: tags dropped, entities
    unescaped, template syntax (``{{ }}``, ``{% %}``) kept as it was.

    Text that only spells template syntax through entities (``&#123;&#123;``) stays
    literal text.
    """
    held: list[str] = []

    def hold(match: re.Match[str]) -> str:
        held.append(match.group(0))
        return f"\x00{len(held) - 1}\x00"

    text = _JINJA_CONSTRUCT.sub(hold, source.replace("\x00", ""))
    text = re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>", "", text)
    text = re.sub(r"(?s)<!--.*?-->", "", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(?i)<br\s*/?>", "\n", text)
    text = re.sub(r"(?i)</(p|div|h[1-6]|li|tr|table|blockquote|ul|ol)\s*>", "\n\n", text)
    text = re.sub(r"(?s)<[^>]*>", "", text)
    # unescape never produces NUL (it maps &#0; to U+FFFD), so the placeholders survive.
    text = html.unescape(text)
    text = re.sub(r"\{(?=[{%#])", "{{ '{' }}", text)
    lines = [line.strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    return _HELD.sub(lambda m: held[int(m.group(1))], text)


def _normalize_newlines(text: str) -> str:
    if "\r" in text:
        return text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def encode_qp(text: str) -> bytes:
    """UTF-8 quoted-printable with CRLF line endings (ending in CRLF only if ``text``
    ends in a newline)."""
    encoded = binascii.b2a_qp(_normalize_newlines(text).encode("utf-8", "replace"), istext=True)
    return encoded.replace(b"\n", b"\r\n")


def _url_quote(value: object) -> str:
    return urllib.parse.quote(str(value), safe="")


def _header(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("ascii")


# -- the template sandbox -------------------------------------------------------------


class _Undefined(Undefined):
    """A missing variable renders empty; an attribute the sandbox refused is an error."""

    __slots__ = ()

    def __str__(self) -> str:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()
        return ""


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, minus everything that can allocate without bound."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, limits: RenderLimits, **options: Any) -> None:
        super().__init__(
            undefined=_Undefined,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=0,
            **options,
        )
        self._max_value = limits.max_value_chars
        self.globals = {name: value for name, value in self.globals.items() if name in _GLOBALS}
        self.filters = {name: f for name, f in self.filters.items() if name in ALLOWED_FILTERS}
        self.filters["join"] = self._join_filter
        self.filters["replace"] = self._replace_filter

    def _check_size(self, size: int, what: str) -> None:
        if size > self._max_value:
            raise SecurityError(f"{what} would build {size} characters (limit {self._max_value})")

    def _bounded(self, items: Iterable[Any], separator: str) -> list[Any]:
        out: list[Any] = []
        size = 0
        for item in items:
            size += (len(item) if isinstance(item, str) else 20) + len(separator)
            self._check_size(size, "join")
            out.append(item)
        return out

    @pass_eval_context
    def _join_filter(self, eval_ctx: Any, value: Iterable[Any], d: str = "", **kw: Any) -> str:
        return str(jinja_filters.do_join(eval_ctx, self._bounded(value, str(d)), d, **kw))

    @pass_eval_context
    def _replace_filter(
        self, eval_ctx: Any, s: str, old: str, new: str, count: int | None = None
    ) -> str:
        self._check_size(_replaced_size(str(s), str(old), str(new), count), "replace")
        return jinja_filters.do_replace(eval_ctx, s, old, new, count)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr not in ALLOWED_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        # str.format is not in ALLOWED_STR_METHODS; never hand out a wrapper for it.
        return None

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            method = getattr(__obj, "__name__", "")
            if method == "replace" and len(args) >= 2:
                count = args[2] if len(args) > 2 and isinstance(args[2], int) else None
                __self._check_size(
                    _replaced_size(owner, str(args[0]), str(args[1]), count), "replace"
                )
            elif method == "join" and args:
                args = (__self._bounded(args[0], owner), *args[1:])
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    self._check_size(len(seq) * max(count, 0), "repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int):
                if abs(right) > 1024 or max(left.bit_length(), 1) * abs(right) > 65536:
                    raise SecurityError("the result of ** would be too large")
        elif operator == "%" and isinstance(left, str) and _FORMAT_WIDTH.search(left):
            raise SecurityError("%-formatting with a width or precision of 1000 or more")
        return super().call_binop(context, operator, left, right)


def _replaced_size(s: str, old: str, new: str, count: int | None) -> int:
    hits = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def _policy_problems(tree: nodes.Template) -> list[str]:
    """What the sandbox does not allow in ``tree``, statically (see the module doc)."""
    problems: list[str] = []
    for node_type, what in _FORBIDDEN_NODES:
        for node in tree.find_all(node_type):
            problems.append(f"line {node.lineno}: {{% {what} %}} is not allowed")
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            problems.append(f"line {loop.lineno}: recursive loops are not allowed")
        inner = next(iter(loop.find_all(nodes.For)), None)
        if inner is not None:
            problems.append(f"line {inner.lineno}: nested loops are not allowed")
    names: list[tuple[int, str]] = [(n.lineno, n.attr) for n in tree.find_all(nodes.Getattr)]
    for item in tree.find_all(nodes.Getitem):
        if isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
            names.append((item.lineno, item.arg.value))
    for lineno, name in names:
        if name.startswith("_") or name in _UNSAFE_NAMES:
            problems.append(f"line {lineno}: access to {name!r} is unsafe")
    for call in tree.find_all(nodes.Call):
        if isinstance(call.node, nodes.Name) and call.node.name not in _GLOBALS:
            problems.append(f"line {call.lineno}: there is no function {call.node.name!r}")
    return problems


class _Environments:
    """The four sandboxes, one per kind of output."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.html = _Sandbox(limits, autoescape=True)
        self.text = _Sandbox(limits, autoescape=False)
        self.url = _Sandbox(limits, autoescape=False, finalize=_url_quote)


def _escape_html(value: str) -> str:
    return markupsafe.escape(value)


class _Field:
    """One compiled template: subject, a body, a header value or the unsubscribe URL.

    Templates made only of text and ``{{ name }}`` holes (nearly all of them) are
    rendered by joining strings, with exactly Jinja's output; the rest run Jinja's
    compiled code from the sandbox.
    """

    def __init__(
        self,
        where: str,
        literals: tuple[str, ...],
        names: tuple[str, ...],
        escape: Callable[[str], str] | None,
        template: JinjaTemplate | None,
        max_output_chars: int,
    ) -> None:
        self.where = where
        self.literals = literals
        self.names = names
        self._escape = escape
        self._template = template
        self._max = max_output_chars
        self._literal_chars = sum(len(literal) for literal in literals)
        # HTML escaping turns one character into at most 6 (&#34;).
        self._growth = 6 if escape is _escape_html else 1

    @property
    def static(self) -> bool:
        """True when the output never depends on the recipient."""
        return self._template is None and not self.names

    def render(self, values: Mapping[str, str]) -> str:
        """The field for one recipient.

        Raises:
            RenderError: the template failed (a sandbox refusal, a type error, the
                output limit).
        """
        if self._template is not None:
            return self._render_jinja(values)
        literals = self.literals
        if not self.names:
            return literals[0]
        size = self._literal_chars + self._growth * sum(len(values.get(n, "")) for n in self.names)
        if size > self._max:
            raise RenderError(f"{self.where}: rendered text would exceed {self._max} characters")
        escape = self._escape
        parts = [literals[0]]
        for i, name in enumerate(self.names, 1):
            value = values.get(name)
            if value:
                parts.append(escape(value) if escape is not None else value)
            parts.append(literals[i])
        return "".join(parts)

    def _render_jinja(self, values: Mapping[str, str]) -> str:
        template = self._template
        assert template is not None
        parts: list[str] = []
        size = 0
        try:
            for chunk in template.root_render_func(template.new_context(dict(values))):
                size += len(chunk)
                if size > self._max:
                    raise RenderError(f"{self.where}: rendered text exceeds {self._max} characters")
                parts.append(chunk)
        except RenderError:
            raise
        except SecurityError as exc:
            raise RenderError(f"{self.where}: not allowed by the sandbox: {exc}") from None
        except Exception as exc:  # a template can raise anything a Python operator can
            raise RenderError(f"{self.where}: {type(exc).__name__}: {exc}") from None
        return "".join(parts)


def _simple_parts(tree: nodes.Template) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """Literals and names when ``tree`` is only text and ``{{ name }}``, else None."""
    literals = [""]
    names: list[str] = []
    for statement in tree.body:
        if not isinstance(statement, nodes.Output):
            return None
        for node in statement.nodes:
            if isinstance(node, nodes.TemplateData):
                literals[-1] += node.data
            elif isinstance(node, nodes.Name) and node.ctx == "load":
                names.append(node.name)
                literals.append("")
            else:
                return None
    return tuple(literals), tuple(names)


def _compile_field(
    env: _Sandbox,
    source: str,
    where: str,
    escape: Callable[[str], str] | None,
    limits: RenderLimits,
    check: Callable[[nodes.Template], list[str]] | None = None,
) -> _Field:
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as exc:
        raise RenderError(f"{where}: line {exc.lineno}: {exc.message}") from None
    problems = _policy_problems(tree) + (check(tree) if check is not None else [])
    if problems:
        raise RenderError(f"{where}: " + "; ".join(problems))
    simple = _simple_parts(tree)
    if simple is not None:
        return _Field(where, simple[0], simple[1], escape, None, limits.max_output_chars)
    try:
        template = env.from_string(tree)
    except TemplateSyntaxError as exc:  # e.g. an unknown filter
        raise RenderError(f"{where}: line {exc.lineno}: {exc.message}") from None
    return _Field(where, ("",), (), None, template, limits.max_output_chars)


# -- compiling a job -------------------------------------------------------------------


def _quote_param(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rfc2231_params(param: str, value: str) -> list[str]:
    """``param*=utf-8''...`` (RFC 2231), split into continuations of at most ~60 chars."""
    quoted = urllib.parse.quote(value.encode("utf-8", "replace"), safe="!#$&+-.^_`|~")
    if len(quoted) <= 50:
        return [f"{param}*=utf-8''{quoted}"]
    chunks: list[str] = []
    while quoted:
        cut = min(50, len(quoted))
        # Never split a %XX triplet.
        percent = quoted.rfind("%", max(0, cut - 2), cut)
        if percent != -1:
            cut = percent
        chunks.append(quoted[:cut])
        quoted = quoted[cut:]
    out = [f"{param}*0*=utf-8''{chunks[0]}"]
    out.extend(f"{param}*{i}*={chunk}" for i, chunk in enumerate(chunks[1:], 1))
    return out


def _attachment_part(attachment: Attachment, limits: RenderLimits, where: str) -> bytes:
    content_type = attachment.content_type.strip().lower()
    if not _CONTENT_TYPE.match(content_type) or content_type not in limits.attachment_types:
        raise RenderError(f"{where}: content type {attachment.content_type!r} is not allowed")
    filename = attachment.filename
    if not filename or _CONTROL.search(filename) or "/" in filename or "\\" in filename:
        raise RenderError(f"{where}: filename must be non-empty without controls or slashes")
    if len(filename) > 255:
        raise RenderError(f"{where}: filename is longer than 255 characters")
    data = attachment.content
    magic = _MAGIC.get(content_type)
    if magic is not None and not data.startswith(magic):
        raise RenderError(f"{where}: content does not look like {content_type}")
    if content_type == "image/webp" and not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        raise RenderError(f"{where}: content does not look like image/webp")
    type_params = ""
    if content_type.startswith("text/") or content_type == "application/json":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise RenderError(f"{where}: {content_type} content is not UTF-8") from None
        type_params = '; charset="utf-8"'
    if _FILENAME_PLAIN.match(filename):
        names = [f"name={_quote_param(filename)}"], [f"filename={_quote_param(filename)}"]
    else:
        names = _rfc2231_params("name", filename), _rfc2231_params("filename", filename)
    body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    head = (
        f"Content-Type: {content_type}{type_params};\r\n "
        + ";\r\n ".join(names[0])
        + "\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n "
        + ";\r\n ".join(names[1])
        + "\r\n\r\n"
    )
    # The CRLF before the next boundary belongs to the delimiter: drop the last one.
    return head.encode("ascii") + body.removesuffix(b"\r\n")


class _Compiled:
    """Everything compiled from one job's content, with the problems found."""

    def __init__(self, content: Content, limits: RenderLimits) -> None:
        self.problems: list[str] = []
        envs = _Environments(limits)
        self.limits = limits
        self.envelope_from = self._try(lambda: check_address(content.sender.email), "from") or ""
        reply_to = content.reply_to.email if content.reply_to is not None else ""
        if reply_to:
            self._try(lambda: check_address(reply_to), "reply_to")
        self.static_head = b"" if self.problems else self._static_head(content)
        self.subject = self._field(envs.text, _CONTROL.sub(" ", content.subject), "subject", None)
        text_source = content.text_body
        if not text_source and content.html_body:
            text_source = self._try(lambda: html_to_text(content.html_body), "html_body") or ""
            where = "text part derived from html_body"
        else:
            where = "text_body"
        self.text = self._field(envs.text, _normalize_newlines(text_source), where, None)
        self.html = (
            self._field(
                envs.html, _normalize_newlines(content.html_body), "html_body", _escape_html
            )
            if content.html_body
            else None
        )
        self.headers = [
            (name, field)
            for i, (name, value) in enumerate(content.headers)
            if (field := self._header_field(envs.text, i, name, value)) is not None
            and not field.static
        ]
        self.unsubscribe = self._unsubscribe(envs.url, content.unsubscribe_url)
        self.attachments: list[bytes] = []
        self._attachments(content.attachments, limits)
        self._check_shared(content)

    def _check_shared(self, content: Content) -> None:
        if not 1 <= content.recipients_per_message <= MAX_RECIPIENTS_PER_MESSAGE:
            self.problems.append(
                f"recipients_per_message: must be between 1 and {MAX_RECIPIENTS_PER_MESSAGE}"
            )
        elif content.recipients_per_message > 1:
            used = sorted(template_variables(content))
            if used:
                self.problems.append(
                    "recipients_per_message: recipients share one message, so the templates "
                    f"may not use per-recipient values ({', '.join(used)})"
                )

    def _try(self, make: Callable[[], Any], where: str) -> Any:
        try:
            return make()
        except RenderError as exc:
            message = str(exc)
            self.problems.append(message if message.startswith(where) else f"{where}: {message}")
            return None

    def _field(
        self,
        env: _Sandbox,
        source: str,
        where: str,
        escape: Callable[[str], str] | None,
        check: Callable[[nodes.Template], list[str]] | None = None,
    ) -> _Field | None:
        field: _Field | None = self._try(
            lambda: _compile_field(env, source, where, escape, self.limits, check), where
        )
        return field

    def _static_head(self, content: Content) -> bytes:
        lines = [_header("From", format_mailbox(content.sender, "From"))]
        if content.reply_to is not None and content.reply_to.email:
            lines.append(_header("Reply-To", format_mailbox(content.reply_to, "Reply-To")))
        lines.append(b"MIME-Version: 1.0\r\n")
        for name, value in content.headers:
            if "{" not in value and header_name_problem(name) is None:
                lines.append(_header(name, header_text(name, value)))
        if content.unsubscribe_url.lower().startswith("https://"):
            lines.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
        return b"".join(lines)

    def _header_field(self, env: _Sandbox, i: int, name: str, value: str) -> _Field | None:
        where = f"headers[{i}]"
        problem = header_name_problem(name)
        if problem is not None:
            self.problems.append(f"{where}: {problem}")
            return None
        # TAB is whitespace in a header (it becomes a space); every other control is refused.
        if _CONTROL.search(value.replace("\t", " ")):
            self.problems.append(f"{where}: header {name!r} has a control character in its value")
            return None
        if "{" not in value:
            # Static: already in the static head.
            return _Field(where, (value,), (), None, None, self.limits.max_output_chars)
        return self._field(env, value, where, None)

    def _unsubscribe(self, env: _Sandbox, url: str) -> _Field | None:
        if not url:
            return None
        where = "unsubscribe_url"
        if not url.lower().startswith(("https://", "http://", "mailto:")):
            self.problems.append(f"{where}: must be an https, http or mailto URL")
            return None

        def literal_text(tree: nodes.Template) -> list[str]:
            for data in tree.find_all(nodes.TemplateData):
                if _URL_UNSAFE.search(data.data) or not data.data.isascii():
                    return ["unsubscribe URL must be ASCII without spaces, controls or <>"]
            return []

        return self._field(env, url, where, _url_quote, literal_text)

    def _attachments(self, attachments: Sequence[Attachment], limits: RenderLimits) -> None:
        if len(attachments) > limits.max_attachments:
            self.problems.append(f"attachments: more than {limits.max_attachments}")
            return
        total = sum(len(a.content) for a in attachments)
        if total > limits.max_attachment_bytes:
            self.problems.append(
                f"attachments: {total} bytes in all, more than {limits.max_attachment_bytes}"
            )
            return
        for i, attachment in enumerate(attachments):
            where = f"attachments[{i}]"
            try:
                self.attachments.append(_attachment_part(attachment, limits, where))
            except RenderError as exc:
                self.problems.append(str(exc))


def check_templates(content: Content, limits: RenderLimits | None = None) -> list[str]:
    """Every reason ``content`` cannot be compiled, or an empty list when it can.

    Pure and cheap enough to call at submit: it compiles the templates (syntax, the
    sandbox policy, unknown filters), and checks the addresses, header names and
    values, the unsubscribe URL and the attachments. Each problem names its field,
    e.g. ``"subject: line 1: unexpected '}'"``.
    """
    return _Compiled(content, limits or RenderLimits()).problems


def template_variables(content: Content) -> frozenset[str]:
    """The variable names the templates of ``content`` read (``email`` and ``name``
    included); empty for templates that do not parse."""
    env = _Sandbox(RenderLimits())
    found: set[str] = set()
    sources = [content.subject, content.text_body, content.html_body, content.unsubscribe_url]
    sources.extend(value for _, value in content.headers)
    for source in sources:
        if source:
            try:
                found |= meta.find_undeclared_variables(env.parse(source))
            except TemplateSyntaxError:
                continue
    return frozenset(found)


class CompiledMessage:
    """A job's content compiled for fast per-recipient rendering.

    Args:
        job_id: The job; part of every Message-ID and the source of the boundaries.
        content: What every recipient receives.
        limits: Resource bounds of the templates and attachments.
        signer: Signs every message whose From domain it has a key for (DKIM).

    Raises:
        RenderError: the content is invalid; the message lists every problem
            :func:`check_templates` finds.
    """

    def __init__(
        self,
        job_id: str,
        content: Content,
        *,
        limits: RenderLimits | None = None,
        signer: MessageSigner | None = None,
    ) -> None:
        compiled = _Compiled(content, limits or RenderLimits())
        if compiled.problems:
            raise RenderError("; ".join(compiled.problems))
        assert compiled.subject is not None and compiled.text is not None
        self.job_id = job_id
        self.content = content
        self.envelope_from = compiled.envelope_from
        self.domain = self.envelope_from.rpartition("@")[2].lower()
        self._signer = signer if signer is not None and signer.can_sign(self.domain) else None
        self._msgid_prefix = _MSGID_UNSAFE.sub("-", job_id) or "job"
        self._subject = compiled.subject
        self._text = compiled.text
        self._html = compiled.html
        self._headers = [(name, field) for name, field in compiled.headers]
        self._unsubscribe = compiled.unsubscribe
        self._static_head = compiled.static_head
        digest = hashlib.sha256(job_id.encode("utf-8", "replace")).hexdigest()[:24].encode()
        self._date_key: int | None = None
        self._date_value = b""
        self._body_head, self._between, self._tail = self._skeleton(digest, compiled.attachments)
        # Bodies that do not depend on the recipient are encoded once.
        self._text_qp = self._encode_text(self._text.render({})) if self._text.static else None
        html = self._html
        self._html_qp = encode_qp(html.render({})) if html is not None and html.static else None

    def _skeleton(self, digest: bytes, attachments: list[bytes]) -> tuple[bytes, bytes, bytes]:
        """The bytes before the text body, between text and HTML, and after the last body."""
        alternative = b"=_mailers_a" + digest
        mixed = b"=_mailers_m" + digest
        if self._html is None:
            head = _PART_HEAD % b"plain" + b"\r\n"
            between = b""
            tail = b""
        else:
            # The CRLF before a boundary line belongs to the delimiter, not to the part,
            # so each part gets one of its own: decoded bodies end exactly as their
            # templates.
            head = (
                b'Content-Type: multipart/alternative;\r\n boundary="'
                + alternative
                + b'"\r\n\r\n--'
                + alternative
                + b"\r\n"
                + _PART_HEAD % b"plain"
                + b"\r\n"
            )
            between = b"\r\n--" + alternative + b"\r\n" + _PART_HEAD % b"html" + b"\r\n"
            tail = b"\r\n--" + alternative + b"--\r\n"
        if not attachments:
            return head, between, tail
        mixed_head = (
            b'Content-Type: multipart/mixed;\r\n boundary="'
            + mixed
            + b'"\r\n\r\n--'
            + mixed
            + b"\r\n"
        )
        if self._html is None:
            # A text/plain entity inside multipart/mixed: its CRLF is the delimiter's.
            tail = b"\r\n"
        parts = b"".join(b"\r\n--" + mixed + b"\r\n" + part for part in attachments)
        return (
            mixed_head + head,
            between,
            tail.removesuffix(b"\r\n") + parts + (b"\r\n--" + mixed + b"--\r\n"),
        )

    def _encode_text(self, text: str) -> bytes:
        encoded = encode_qp(text)
        if self._html is None and not self._tail and not encoded.endswith(b"\r\n"):
            # A single-part message should end in CRLF.
            encoded += b"\r\n"
        return encoded

    def message_id(self, index: int) -> str:
        """The Message-ID of the recipient at ``index`` in the job, with angle brackets."""
        return f"<{self._msgid_prefix}.{index}@{self.domain}>"

    @property
    def recipients_per_message(self) -> int:
        """How many recipients may share one message and transaction (1: none share)."""
        return self.content.recipients_per_message

    def render_shared(self, *, first_index: int, date: datetime) -> bytes:
        """The one message a group of recipients shares (``recipients_per_message`` > 1).

        The templates use no per-recipient values (checked at compile time), To is
        :data:`SHARED_TO`, and the Message-ID is ``<{job_id}.g{first_index}@{domain}>``:
        deterministic for the group that starts at ``first_index``.

        Raises:
            RenderError: the job does not share messages.
        """
        if self.recipients_per_message <= 1:
            raise RenderError("this job renders one message per recipient")
        return self._assemble(
            {},
            date,
            to=_header("To", SHARED_TO),
            message_id=f"<{self._msgid_prefix}.g{first_index}@{self.domain}>",
        )

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
            RenderError: the recipient's address is invalid, or a template failed for
                this recipient's values (see :class:`_Field`).
        """
        values = {"email": email, "name": name}
        values.update(variables)
        return self._assemble(
            values,
            date,
            to=_header("To", format_mailbox(Mailbox(email, name))),
            message_id=self.message_id(index),
        )

    def _assemble(
        self, values: Mapping[str, str], date: datetime, *, to: bytes, message_id: str
    ) -> bytes:
        head = [
            self._date(date),
            self._static_head,
            to,
            _header("Subject", header_text("Subject", self._subject.render(values))),
            _header("Message-ID", message_id),
        ]
        for header_name, field in self._headers:
            head.append(_header(header_name, header_text(header_name, field.render(values))))
        if self._unsubscribe is not None:
            url = self._unsubscribe.render(values)
            if _URL_UNSAFE.search(url) or not url.isascii():
                raise RenderError("unsubscribe URL renders with spaces, controls or <>")
            head.append(_header("List-Unsubscribe", f"<{url}>"))
        text = self._text_qp
        head.append(self._body_head)
        head.append(text if text is not None else self._encode_text(self._text.render(values)))
        if self._html is not None:
            head.append(self._between)
            markup = self._html_qp
            head.append(markup if markup is not None else encode_qp(self._html.render(values)))
        head.append(self._tail)
        message = b"".join(head)
        if self._signer is not None:
            return self._signer.sign(message, self.domain)
        return message


class TemplateCache:
    """Compiled messages by job id, least recently used evicted first.

    A job's content never changes, but the cache still compares it so a reused job
    id can never render stale content.

    Args:
        max_jobs: How many jobs' compiled messages to keep.
        limits: Passed to every :class:`CompiledMessage`.
        signer: Passed to every :class:`CompiledMessage` (DKIM), None to not sign.
    """

    def __init__(
        self,
        max_jobs: int = 64,
        *,
        limits: RenderLimits | None = None,
        signer: MessageSigner | None = None,
    ) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self._max_jobs = max_jobs
        self._limits = limits or RenderLimits()
        self._signer = signer
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
        compiled = CompiledMessage(job_id, content, limits=self._limits, signer=self._signer)
        self._entries[job_id] = compiled
        self._entries.move_to_end(job_id)
        while len(self._entries) > self._max_jobs:
            self._entries.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._entries)
