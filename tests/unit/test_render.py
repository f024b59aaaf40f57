"""Rendering: every message is parsed back with the stdlib and checked part by part."""

from __future__ import annotations

import email
import email.message
import email.policy
from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from sender_node.errors import RenderError
from sender_node.render import (
    CompiledMessage,
    Content,
    Mailbox,
    Template,
    TemplateCache,
    encode_words,
    fold_ascii,
    html_to_text,
)

DATE = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def render(
    content: Content,
    *,
    job_id: str = "job-42",
    index: int = 7,
    email_address: str = "ann@example.org",
    name: str = "Ann",
    variables: Mapping[str, str] | None = None,
) -> bytes:
    return CompiledMessage(job_id, content).render(
        index=index, email=email_address, name=name, variables=variables or {}, date=DATE
    )


def parse(raw: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def body(message: email.message.EmailMessage, kind: str) -> str:
    part = message.get_body((kind,))
    assert part is not None, f"no {kind} part"
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def content(**overrides: object) -> Content:
    base: dict[str, object] = {
        "sender": Mailbox("news@example.com", "Example News"),
        "subject": "Hello {{ name }}",
        "text_body": "Hi {{name}}, code {{ code }}.\n",
    }
    base.update(overrides)
    return Content(**base)  # type: ignore[arg-type]


def test_plain_text_message_headers_and_body() -> None:
    # Given a text-only job
    raw = render(content(), variables={"code": "X1"})

    # Then the message is 7-bit, CRLF-only and parses back with the expected headers
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    message = parse(raw)
    assert message["From"] == "Example News <news@example.com>"
    assert message["To"] == "Ann <ann@example.org>"
    assert message["Subject"] == "Hello Ann"
    assert message["Message-ID"] == "<job-42.7@example.com>"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime == DATE
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert body(message, "plain") == "Hi Ann, code X1.\n"
    assert message["Reply-To"] is None
    assert message["List-Unsubscribe"] is None


def test_non_ascii_subject_display_names_and_body_survive() -> None:
    # Given non-ASCII everywhere a human writes text
    job = content(
        sender=Mailbox("news@example.com", "Café Ñews"),
        subject="Grüße, {{ name }}! — a long subject that needs more than one encoded word ✓",
        text_body="Straße {{ name }} 日本語\n",
    )

    # When rendered for a recipient with a non-ASCII name
    raw = render(job, name="Zoë Ŝmith")

    # Then the raw bytes are ASCII and every header line stays within 78 characters
    assert raw.isascii()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    # And everything decodes back
    message = parse(raw)
    assert message["Subject"] == (
        "Grüße, Zoë Ŝmith! — a long subject that needs more than one encoded word ✓"
    )
    assert message["From"].addresses[0].display_name == "Café Ñews"
    assert message["To"].addresses[0].display_name == "Zoë Ŝmith"
    assert message["To"].addresses[0].addr_spec == "ann@example.org"
    assert body(message, "plain") == "Straße Zoë Ŝmith 日本語\n"


def test_html_only_gets_a_derived_text_part_and_escaped_values() -> None:
    # Given an HTML-only job and a variable full of markup
    job = content(
        text_body="",
        html_body=(
            "<html><head><style>p {color: red}</style></head><body>"
            "<p>Hi {{ name }} &amp; friends</p><p>{{ note }}</p><br>Bye</body></html>"
        ),
    )
    raw = render(job, name="Ann", variables={"note": "<script>alert('x')</script> & more"})

    # Then it is multipart/alternative: text first, HTML second
    message = parse(raw)
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    # And the HTML has the value escaped, the text has it verbatim and no tags
    html_part = body(message, "html")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in html_part
    assert "<script>" not in html_part
    text = body(message, "plain")
    assert "Hi Ann & friends" in text
    assert "<script>alert('x')</script> & more" in text
    assert "color: red" not in text
    assert "<p>" not in text
    assert text.rstrip().endswith("Bye")


def test_text_and_html_bodies_both_present() -> None:
    job = content(text_body="T {{ name }}\n", html_body="<b>H {{ name }}</b>")
    message = parse(render(job, name="A&B"))
    assert body(message, "plain") == "T A&B\n"
    assert body(message, "html") == "<b>H A&amp;B</b>"


def test_boundary_is_deterministic_and_absent_from_bodies() -> None:
    # Given two renders of the same job and a body that mimics a boundary line
    job = content(text_body="--=_mailers_\n=_ {{ name }}\n", html_body="<p>x</p>")
    first = parse(render(job, index=1))
    second = parse(render(job, index=2))

    # Then the boundary is the same per job and the bodies still decode intact
    boundary = first.get_boundary()
    assert boundary is not None and boundary.startswith("=_")
    assert boundary == second.get_boundary()
    assert parse(render(job, job_id="other")).get_boundary() != boundary
    assert body(first, "plain") == "--=_mailers_\n=_ Ann\n"


def test_unknown_variables_render_empty_and_explicit_variables_win() -> None:
    job = content(subject="{{ missing }}[{{ name }}]", text_body="{{ email }} {{ nope }}|\n")
    message = parse(render(job, variables={"name": "Override"}))
    assert message["Subject"] == "[Override]"
    assert body(message, "plain") == "ann@example.org |\n"


def test_no_header_injection_through_values_names_or_subject() -> None:
    # Given CR/LF in a variable used in the subject and in the recipient's name
    job = content(subject="Hi {{ evil }}")
    raw = render(
        job,
        name="Ann\r\nBcc: victim@example.net",
        variables={"evil": "x\r\nBcc: victim@example.net\nX-Injected: 1"},
    )

    # Then no extra header appears; the text stays inside the subject and the To name
    message = parse(raw)
    assert message["Bcc"] is None
    assert message["X-Injected"] is None
    assert "victim@example.net" in message["Subject"]
    assert len(message["To"].addresses) == 1
    assert message["To"].addresses[0].addr_spec == "ann@example.org"


def test_long_ascii_subject_is_folded_and_unfolds_exactly() -> None:
    subject = "word " * 40 + "end"
    message = parse(render(content(subject=subject)))
    assert message["Subject"] == subject
    raw = render(content(subject=subject))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


def test_reply_to_extra_headers_and_unsubscribe() -> None:
    # Given reply-to, extra headers (one non-ASCII) and a per-recipient unsubscribe URL
    job = content(
        reply_to=Mailbox("help@example.com", "Help, Desk"),
        headers=(("X-Campaign", "spring-25"), ("X-Note", "naïve")),
        unsubscribe_url="https://example.com/u?e={{ email }}&n={{ name }}",
    )
    message = parse(render(job, email_address="a+b@example.org", name="A B"))

    # Then all appear, with variable values percent-encoded in the URL
    assert message["Reply-To"].addresses[0].display_name == "Help, Desk"
    assert message["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert message["X-Campaign"] == "spring-25"
    assert message["X-Note"] == "naïve"
    assert message["List-Unsubscribe"] == "<https://example.com/u?e=a%2Bb%40example.org&n=A%20B>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ((("Bad Name", "v"),), "invalid header name"),
        ((("X-Colon:", "v"),), "invalid header name"),
        ((("X-Ok", "a\r\nBcc: x@y"),), "CR, LF or NUL"),
        ((("X-Ok", "a\x00b"),), "CR, LF or NUL"),
        ((("From", "x@y"),), "cannot be overridden"),
        ((("message-id", "<x@y>"),), "cannot be overridden"),
    ],
)
def test_bad_extra_headers_are_rejected(headers: tuple[tuple[str, str], ...], match: str) -> None:
    with pytest.raises(RenderError, match=match):
        CompiledMessage("job", content(headers=headers))


@pytest.mark.parametrize(
    "address",
    ["", "no-at-sign", "a b@example.org", "a@b\r\nRCPT TO:<x@y>", "zoë@example.org", "<a@b.c>"],
)
def test_bad_recipient_addresses_are_rejected(address: str) -> None:
    with pytest.raises(RenderError, match="invalid email address"):
        render(content(), email_address=address)


def test_bad_sender_and_unsubscribe_url_are_rejected() -> None:
    with pytest.raises(RenderError):
        CompiledMessage("job", content(sender=Mailbox("nobody")))
    with pytest.raises(RenderError, match="unsubscribe"):
        CompiledMessage("job", content(unsubscribe_url="https://x.test/u\r\nBcc: y"))


def test_message_id_sanitises_job_id() -> None:
    compiled = CompiledMessage("job 1<>", content(sender=Mailbox("a@Mail.Example.COM")))
    assert compiled.message_id(3) == "<job-1--.3@mail.example.com>"


def test_quoting_of_ascii_display_names() -> None:
    message = parse(render(content(), name='Doe, "J." <x>'))
    assert message["To"].addresses[0].display_name == 'Doe, "J." <x>'
    assert message["To"].addresses[0].addr_spec == "ann@example.org"


def test_leading_dots_and_long_lines_survive_quoted_printable() -> None:
    text = ".starts with a dot\n" + "x" * 200 + "\ntrailing space \n"
    message = parse(render(content(text_body=text)))
    assert body(message, "plain") == text
    raw = render(content(text_body=text))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_template_compile_and_render() -> None:
    template = Template.compile("a{{x}}b{{ y }}c{{ bad-name }}")
    assert template.names == ("x", "y")
    assert template.render({"x": "1"}) == "a1bc{{ bad-name }}"
    assert template.render({"x": "1", "y": "2"}) == "a1b2c{{ bad-name }}"
    assert template.render({"x": "<"}, escape=lambda v: v * 2) == "a<<bc{{ bad-name }}"


def test_helpers() -> None:
    assert fold_ascii("Subject", "short") == "short"
    folded = fold_ascii("Subject", "a" * 50 + " " + "b" * 50)
    assert folded == "a" * 50 + "\r\n " + "b" * 50
    assert encode_words("").startswith("=?utf-8?b?")
    assert html_to_text("<p>a</p><p>b&nbsp;c</p>") == "a\n\nb\xa0c\n"


def test_template_cache_is_bounded_and_reuses_compiled_messages() -> None:
    cache = TemplateCache(max_jobs=2)
    first = cache.get("j1", content())
    assert cache.get("j1", content()) is first
    cache.get("j2", content())
    cache.get("j3", content())
    assert len(cache) == 2
    assert cache.get("j1", content()) is not first
    # Changed content under the same id is recompiled, never served stale
    changed = cache.get("j1", content(subject="new"))
    assert (
        parse(changed.render(index=0, email="a@b.c", name="", variables={}, date=DATE))["Subject"]
        == "new"
    )
