"""Body text: HTML turned into a plain-text template, newline normalisation, and
quoted-printable encoding.

Bodies are quoted-printable UTF-8 with CRLF line endings, so every message stays 7-bit
clean with short lines. A job with only an HTML body gets its text part from
:func:`html_to_text`, which keeps the template syntax, so both parts render from the
same variables.
"""

from __future__ import annotations

import binascii
import html
import re
from collections.abc import Sequence

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


def normalize_newlines(text: str) -> str:
    """``text`` with CRLF and lone CR turned into LF."""
    if "\r" in text:
        return text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def encode_qp(text: str) -> bytes:
    """UTF-8 quoted-printable with CRLF line endings (ending in CRLF only if ``text``
    ends in a newline)."""
    encoded = binascii.b2a_qp(normalize_newlines(text).encode("utf-8", "replace"), istext=True)
    return encoded.replace(b"\n", b"\r\n")


_MIN_AHEAD_CHARS = 64
"""Fewer fixed characters than this between a piece's first and last newline are
encoded with the lines around them: a separate encoding call would cost more."""


class QpPieces:
    """:func:`encode_qp` of a text made of fixed pieces with values between them (a
    simple template), with the lines no value touches encoded once, ahead.

    ``b2a_qp`` encodes a text line by line: soft breaks, trailing blanks and a lone
    dot depend on their own line only. So the encoding of a text is the encodings of
    its newline-ended runs of lines, joined, and a piece's whole lines (those after
    its first newline, up to its last) are encoded here. :meth:`encode` then encodes
    only the lines a value is on. Texts with a CR anywhere are left to
    :func:`encode_qp`: its newline normalisation would join a CR ending one part to an
    LF starting the next.

    Args:
        pieces: The fixed text before the first value, between values, after the last.
        min_ahead_chars: Fewest characters between a piece's first and last newline
            that are encoded ahead.
    """

    __slots__ = ("_heads", "_middles", "_tails", "usable")

    def __init__(self, pieces: Sequence[str], min_ahead_chars: int = _MIN_AHEAD_CHARS) -> None:
        self.usable = not any("\r" in piece for piece in pieces)
        """Whether :meth:`encode` applies (no CR in the pieces)."""
        self._heads: list[str] = []
        """Each piece up to its first newline (included); the whole piece when it is
        not split (no middle)."""
        self._middles: list[bytes | None] = []
        """Each piece's lines after its first newline, up to its last, encoded; None
        when the piece is not split."""
        self._tails: list[str] = []
        """Each piece after its last newline."""
        if not self.usable:
            return  # encode() answers None at once: nothing to split
        for piece in pieces:
            first = piece.find("\n")
            last = piece.rfind("\n")
            if last - first < max(1, min_ahead_chars):
                # No whole line, or too few characters to be worth an encoding call of
                # their own per message: the piece goes with its neighbours.
                self._heads.append(piece)
                self._middles.append(None)
                self._tails.append("")
                continue
            self._heads.append(piece[: first + 1])
            self._middles.append(encode_qp(piece[first + 1 : last + 1]))
            self._tails.append(piece[last + 1 :])

    def encode(self, values: Sequence[str]) -> bytes | None:
        """:func:`encode_qp` of the pieces with ``values`` between them (one fewer than
        the pieces); None when a value holds a CR (then encode the whole text)."""
        if not self.usable:
            return None
        out: list[bytes] = []
        lines: list[str] = []  # not encoded yet: they end on a line a value is on
        middles = self._middles
        for i, head in enumerate(self._heads):
            if i:
                value = values[i - 1]
                if "\r" in value:
                    return None
                # Appended, never added: a value may be a str subclass (markupsafe's
                # Markup escapes what is added to it).
                lines.append(value)
            lines.append(head)
            middle = middles[i]
            if middle is None:
                continue
            if middle:
                out.append(encode_qp("".join(lines)))
                out.append(middle)
                lines.clear()
            lines.append(self._tails[i])
        out.append(encode_qp("".join(lines)))
        return b"".join(out)
