"""Header encoding: RFC 2047 encoded words, folding, mailboxes and addresses, and the
header names a job may set.

Every header value that comes from a template or a recipient's data goes through
:func:`header_text` (an address through :func:`format_mailbox`): control characters
(C0, DEL, C1 including NEL, U+2028, U+2029) become a space *after* rendering, so
nothing a recipient's data or a template produces can start a header line. The result
is 7-bit clean, with lines within 78 characters except for unbreakable ASCII words
(never above 998): non-ASCII header text is RFC 2047 encoded. Header names come from an
allow-list (``X-*`` and :data:`ALLOWED_HEADERS`); the compiler alone writes
:data:`RESERVED_HEADERS`.
"""

from __future__ import annotations

import email.base64mime
import re

from mailers_runtime.message.model import Mailbox, RenderError

# What may end or split a header line somewhere on the mail path: C0 controls (CR, LF,
# NUL, TAB, VT, FF...), DEL, C1 controls (NEL is U+0085), and the Unicode line and
# paragraph separators.
# Shared with the compiler and the attachment checks.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES = re.compile(" {2,}")
_UNICODE_SPACE = re.compile(r"(?![\r\n\t])\s")
# RFC 5322 ftext: printable US-ASCII except colon.
_FIELD_NAME = re.compile(r"\A[\x21-\x39\x3b-\x7e]+\Z")
# A pragmatic addr-spec: dot-atom local part and domain, no quoting, no comments.
_ADDRESS = re.compile(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+\Z")
_NAME_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
# RFC 5322 atext: what a display-name word may be without quoting or encoding.
_ATOM = re.compile(r"\A[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")

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

_LINE_LIMIT = 78
# An ASCII header word longer than this is RFC 2047 encoded instead, so no line can
# exceed RFC 5322's hard limit of 998 characters.
_LONG_WORD = 900
# Raw bytes per RFC 2047 encoded word: 36 bytes -> 48 base64 chars -> 60 chars per word,
# so even the first line ("Subject: " + word) stays under 78 characters.
_WORD_BYTES = 36
# Display names longer than this are encoded (and so folded) even when ASCII.
_LONG_NAME = 60


def encode_words(text: str) -> str:
    """RFC 2047 base64 encoded words for ``text``, folded with CRLF SP between words.

    UTF-8 sequences are never split across words; lone surrogates become ``?``.
    """
    words: list[str] = []
    chunk = bytearray()
    for char in text:
        encoded = char.encode("utf-8", "replace")
        if len(chunk) + len(encoded) > _WORD_BYTES:
            words.append(email.base64mime.header_encode(bytes(chunk), "utf-8"))
            chunk.clear()
        chunk += encoded
    if chunk:
        words.append(email.base64mime.header_encode(bytes(chunk), "utf-8"))
    elif not words:
        words.append("=?utf-8?b??=")  # the stdlib encodes nothing as nothing
    return "\r\n ".join(words)


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
    """Control characters become spaces; runs of spaces collapse; whitespace at the ends
    (Unicode's too, which parsers drop from an encoded display name) is stripped."""
    clean = CONTROL.sub(" ", value)
    if "  " in clean:
        clean = _SPACES.sub(" ", clean)
    return clean.strip()


def clean_display_name(name: str) -> str:
    """A display name cleaned as a header value, with every Unicode space (no-break,
    em, ideographic, ...) made a plain one: parsers drop such spaces next to a space
    in an encoded name, and a name loses nothing readers see by it."""
    if name.isascii() and name.isprintable():
        # The usual name: no control character and no space but the plain one, so
        # only its spaces need cleaning, without the regular expressions.
        if "  " in name:
            name = _SPACES.sub(" ", name)
        return name.strip()
    return clean_header_value(_UNICODE_SPACE.sub(" ", name))


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
    name = clean_display_name(mailbox.name)
    if not name:
        return email
    if name.isascii() and (len(name) <= _LONG_WORD or _fits(name)) and "=?" not in name:
        if _NAME_SPECIALS.search(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(header) + len(name) + len(email) + 5 <= _LINE_LIMIT:
            # "Header: name <email>" fits on one line: there is nothing to fold.
            return f"{name} <{email}>"
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
