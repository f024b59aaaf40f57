"""Property tests of the renderer: random values never inject a header line, every
message parses back cleanly, and the fast path renders exactly what Jinja renders."""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
import re
import urllib.parse
from datetime import UTC, datetime

import markupsafe
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import SandboxedEnvironment

from mailers_runtime.message import (
    CompiledMessage,
    Content,
    Header,
    Mailbox,
    clean_display_name,
    clean_header_value,
    encode_words,
    fold_ascii,
)
from mailers_runtime.message.headers import format_mailbox
from mailers_runtime.message.model import RenderLimits
from mailers_runtime.message.templates import Sandbox, compile_field, escape_html, url_quote
from mailers_runtime.message.text import QpPieces, encode_qp

DATE = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
NASTY = [
    "\r", "\n", "\r\n", "\x00", "\t", "\x0b", "\x0c", "\x1c", "\x7f", "\x85", "\u2028",
    "\u2029", "Bcc: victim@example.net", "\r\nX-Injected: 1", ":", ";", "<", ">", '"',
    "\\", "=?", "?=", "=?utf-8?b?QUFB?=", " ", "  ", "é", "日本", "😀", "--", "=_", ".",
]  # fmt: skip
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def nasty_text(max_size: int = 40) -> st.SearchStrategy[str]:
    piece = st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(NASTY))
    return st.lists(piece, max_size=max_size).map("".join)


def parse(raw: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def part_text(message: email.message.EmailMessage, kind: str) -> str:
    part = message.get_body((kind,))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


@PROPERTY_SETTINGS
@given(
    subject=nasty_text(),
    name=nasty_text(),
    header_value=nasty_text(),
    body_value=nasty_text(),
    token=nasty_text(20),
)
def test_no_value_can_inject_a_header_line(
    subject: str, name: str, header_value: str, body_value: str, token: str
) -> None:
    # Given every recipient-controlled value in every place a header is made
    content = Content(
        sender=Mailbox("news@example.com", "Example News"),
        subject="S {{ subject }}",
        text_body="{{ body }}|",
        html_body="<p>{{ body }}</p>",
        headers=(Header("X-Value", "{{ header }}"), Header("X-Static", "fixed")),
        unsubscribe_url="https://example.com/u?t={{ token }}",
    )
    variables = {"subject": subject, "header": header_value, "body": body_value, "token": token}
    raw = CompiledMessage("job", content).render(
        index=1, email="ann@example.org", name=name, variables=variables, date=DATE
    )

    # Then, byte-wise: 7-bit, CRLF only, no line over 998, and every header line is
    # either one of ours or a continuation line
    assert raw.isascii()
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    expected = [
        "Date", "From", "MIME-Version", "X-Static", "List-Unsubscribe-Post", "To", "Subject",
        "Message-ID", "X-Value", "List-Unsubscribe", "Content-Type",
    ]  # fmt: skip
    starts = [line.split(":", 1)[0] for line in head.split("\r\n") if not line[:1].isspace()]
    assert starts == expected
    # And the parser agrees: the same headers, no defects, two intact parts
    message = parse(raw)
    assert list(message.keys()) == expected
    assert message.defects == []
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["To"].addresses[0].addr_spec == "ann@example.org"
    # And what a value said stays inside its own header, cleaned of control characters
    for header, value in (("Subject", "S " + subject), ("X-Value", header_value)):
        cleaned = clean_header_value(value)
        if "=?" not in cleaned:
            assert str(message[header]) == cleaned
    assert message["List-Unsubscribe"].startswith("<https://example.com/u?t=")
    # And the bodies decode to exactly what the templates produced
    assert part_text(message, "plain") == newlines(body_value) + "|"
    assert part_text(message, "html") == newlines(f"<p>{markupsafe.escape(body_value)}</p>")


@PROPERTY_SETTINGS
@given(name=nasty_text(60))
@example(name="\xa0 \xa0")  # parsers drop Unicode spaces in an encoded name
@example(name="\xa1 \xa00")
def test_display_names_round_trip(name: str) -> None:
    raw = CompiledMessage("job", Content(sender=Mailbox("a@example.com"), text_body="x")).render(
        index=0, email="b@example.org", name=name, variables={}, date=DATE
    )
    cleaned = clean_display_name(name)
    to = parse(raw)["To"]
    assert len(to.addresses) == 1
    assert to.addresses[0].addr_spec == "b@example.org"
    if "=?" not in cleaned:
        # The stdlib keeps a space between adjacent encoded words in a display name
        # (RFC 2047 drops it), so compare without spaces.
        assert to.addresses[0].display_name.replace(" ", "") == cleaned.replace(" ", "")


LITERAL = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="{}%#\r"), max_size=30
)
NAMES = st.sampled_from(["name", "email", "code", "missing"])


@PROPERTY_SETTINGS
@given(
    pieces=st.lists(st.tuples(LITERAL, NAMES), max_size=6),
    tail=LITERAL,
    code=nasty_text(),
    jinja_path=st.booleans(),
)
def test_fast_path_renders_exactly_what_jinja_renders(
    pieces: list[tuple[str, str]], tail: str, code: str, jinja_path: bool
) -> None:
    # Given a template of text and {{ name }} holes (optionally with a no-op statement,
    # which sends it down Jinja's own path)
    source = "<" + "".join(f"{text}{{{{ {var} }}}}" for text, var in pieces) + tail
    if jinja_path:
        source += "{% if false %}never{% endif %}"
    values = {"name": "Ann <&>", "email": "ann@example.org", "code": code}

    # When our renderer and a plain Jinja sandbox render it
    content = Content(sender=Mailbox("a@example.com"), text_body="t", html_body=source)
    raw = CompiledMessage("job", content).render(
        index=0, email=values["email"], name=values["name"], variables={"code": code}, date=DATE
    )
    env = SandboxedEnvironment(autoescape=True, keep_trailing_newline=True)
    expected = env.from_string(newlines(source)).render(values)

    # Then the HTML part is the same
    assert part_text(parse(raw), "html") == newlines(expected)


QP_PIECE = st.lists(
    st.sampled_from(["a", "é", "日本", " ", "\t", ".", "=", "\n", " \n", ".\n", "x" * 75, "_"]),
    max_size=12,
).map("".join)


@PROPERTY_SETTINGS
@given(
    pieces=st.lists(QP_PIECE, min_size=1, max_size=6),
    values=st.lists(QP_PIECE, max_size=5),
    min_ahead=st.sampled_from([0, 64]),
)
def test_fixed_lines_encoded_ahead_give_exactly_the_whole_encoding(
    pieces: list[str], values: list[str], min_ahead: int
) -> None:
    # Given fixed pieces with values between them (long lines, trailing blanks, lone
    # dots and '=' wherever the draw puts them, across the joins too)
    values = (values + [""] * len(pieces))[: len(pieces) - 1]
    joined = zip(values, pieces[1:], strict=True)
    text = pieces[0] + "".join(value + piece for value, piece in joined)

    # When the pieces' whole lines are encoded once and the rest per text
    encoded = QpPieces(pieces, min_ahead).encode(values)

    # Then the result is byte for byte the quoted-printable of the whole text
    assert encoded == encode_qp(text)


def test_a_carriage_return_leaves_the_text_to_the_whole_encoding() -> None:
    # A CR ending one part and an LF starting the next are one newline in the text.
    assert QpPieces(["a\r", "\nb"]).encode(["x"]) is None
    assert QpPieces(["a", "\nb"]).encode(["x\r"]) is None
    assert QpPieces(["a", "\nb"]).encode(["x"]) == encode_qp("ax\nb")


@PROPERTY_SETTINGS
@given(source=nasty_text(80), name=nasty_text(), html=st.booleans())
def test_a_body_field_encodes_exactly_what_it_renders(source: str, name: str, html: bool) -> None:
    # Given a body template of text and {{ name }} holes, HTML-escaped or not
    text = source.replace("{", "(").replace("%", "/").replace("#", "/")
    template = text + "{{ name }}" + text + "{{ name }}"
    field = compile_field(
        Sandbox(RenderLimits(), autoescape=html),
        template,
        "html_body" if html else "text_body",
        escape_html if html else None,
        RenderLimits(),
    )
    values = {"name": name}

    # Then its quoted-printable is the encoding of its rendered text
    assert field.render_qp(values) == encode_qp(field.render(values))


@given(value=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300))
def test_fold_ascii_unfolds_exactly(value: str) -> None:
    folded = fold_ascii("Subject", value)
    assert folded.replace("\r\n", "") == value
    for line in folded.split("\r\n")[1:]:
        assert line.startswith(" ") and line.strip()


@given(value=st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
def test_encoded_words_decode_back(value: str) -> None:
    encoded = encode_words(value)
    assert all(len(line) <= 76 for line in encoded.split("\r\n"))
    assert re.fullmatch(
        r"(=\?utf-8\?b\?[A-Za-z0-9+/=]*\?=)(\r\n =\?utf-8\?b\?[A-Za-z0-9+/=]*\?=)*", encoded
    )
    decoded = str(email.header.make_header(email.header.decode_header(encoded)))
    assert decoded == value


PRINTABLE_NAMES = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=90)


@PROPERTY_SETTINGS
@given(name=st.one_of(nasty_text(60), PRINTABLE_NAMES))
@example(name="  Ann   Lee  ")
def test_a_display_name_is_cleaned_as_its_definition_says(name: str) -> None:
    # Every Unicode space made a plain one (CR, LF and TAB are controls), then cleaned
    # as any header value: the shortcut for printable ASCII names changes nothing.
    assert clean_display_name(name) == clean_header_value(re.sub(r"(?![\r\n\t])\s", " ", name))


@PROPERTY_SETTINGS
@given(
    name=st.one_of(nasty_text(60), PRINTABLE_NAMES),
    local=st.text(st.sampled_from("abcxyz0123.+-_"), min_size=1, max_size=40),
)
@example(name="Ann Lee", local="ann")
# "To: <name> <annx@example.org>" on one line would take 79 characters, then 78
@example(name="a" * 10 + " " + "b" * 45, local="ann")
@example(name="a" * 10 + " " + "b" * 44, local="ann")
@example(name='Lee, "Ann"', local="ann")
def test_a_mailbox_folds_only_where_its_header_needs_it(name: str, local: str) -> None:
    # Whatever the header's length, unfolding gives the same value: a header too long
    # for the value to fit folds it (the general path) where a short one does not.
    mailbox = Mailbox(f"{local.strip('.')}x@example.org", name)
    short, long = format_mailbox(mailbox, "To"), format_mailbox(mailbox, "X" * 70)
    assert short.replace("\r\n", "") == long.replace("\r\n", "")
    for value, header in ((short, "To"), (long, "X" * 70)):
        if len(header) + 2 + len(value.replace("\r\n", "")) <= 78:
            assert "\r\n" not in value  # it fits: not folded
        first, *rest = value.split("\r\n")
        assert len(header) + 2 + len(first) <= 78 or " " not in first.strip()
        assert all(line.startswith(" ") for line in rest)


@given(value=nasty_text(40))
@example(value="r12345@big.example")
@example(value="a b/c?d=e&f~g_h.i-j%")
def test_url_quote_encodes_as_urllib_does(value: str) -> None:
    assert url_quote(value) == urllib.parse.quote(value, safe="")
