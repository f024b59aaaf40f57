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
