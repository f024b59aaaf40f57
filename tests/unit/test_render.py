"""Rendering: every message is parsed back with the stdlib and checked part by part."""

from __future__ import annotations

import email
import email.header
import email.message
import email.policy
from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from mailers_runtime.message import (
    Attachment,
    CompiledMessage,
    Content,
    Mailbox,
    RenderError,
    RenderLimits,
    TemplateCache,
    check_templates,
    encode_words,
    fold_ascii,
    html_to_text,
    template_variables,
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
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in html_part
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
        ((("X-Ok", "a\r\nBcc: x@y"),), "control character"),
        ((("X-Ok", "a\x00b"),), "control character"),
        ((("X-Ok", "a\u2028b"),), "control character"),
        ((("X-Ok", "a\x85b"),), "control character"),
        ((("X-Ok", "a\x0bb"),), "control character"),
        ((("Organisation-Unknown", "v"),), "not allowed"),
        ((("DKIM-Signature", "v"),), "cannot be overridden"),
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


# -- Jinja templates and the sandbox ---------------------------------------------------


def test_jinja_filters_conditions_loops_and_defaults() -> None:
    # Given a template with filters, a condition, a flat loop and a default
    job = content(
        subject="{{ name | upper }}{% if vip == 'yes' %} (VIP){% endif %}",
        text_body=(
            "Hi {{ nick | default('there') }}!\n"
            "{% for item in items.split(',') %}- {{ item | trim | title }}\n{% endfor %}"
        ),
        html_body="<p>{{ name | replace('A', '<A>') }} {{ items.split(',') | join(' & ') }}</p>",
    )

    # When rendered
    message = parse(render(job, variables={"vip": "yes", "items": "tea, cake"}))

    # Then every construct works and HTML escaping applies to what expressions produce
    assert message["Subject"] == "ANN (VIP)"
    assert body(message, "plain") == "Hi there!\n- Tea\n- Cake\n"
    assert body(message, "html") == "<p>&lt;A&gt;nn tea &amp;  cake</p>"


def test_missing_variables_render_empty_but_misuse_fails_the_recipient() -> None:
    # Given a template reading an attribute of a variable this recipient lacks
    compiled = CompiledMessage("job", content(text_body="{{ missing }}|{{ missing.attr }}"))

    # Then rendering fails with a RenderError naming the field
    with pytest.raises(RenderError, match="text_body"):
        compiled.render(index=0, email="a@b.c", name="", variables={}, date=DATE)
    # And with the variable present it renders
    raw = compiled.render(index=0, email="a@b.c", name="", variables={"missing": "x"}, date=DATE)
    assert body(parse(raw), "plain") == "x|\n"


@pytest.mark.parametrize(
    ("field", "source", "match"),
    [
        ("subject", "Hi {{ name", "subject: line 1"),
        ("text_body", "{% set x = 1 %}{{ x }}", r"\{% set %\} is not allowed"),
        ("text_body", "{% with x = 1 %}{{ x }}{% endwith %}", "with"),
        ("text_body", "{% macro m() %}x{% endmacro %}{{ m() }}", "macro"),
        ("text_body", "{% include 'other.html' %}", "include"),
        ("text_body", "{% extends 'base.html' %}", "extends"),
        ("text_body", "{% import 'x' as y %}", "import"),
        ("text_body", "{% block b %}x{% endblock %}", "block"),
        ("html_body", "{% for a in x %}{% for b in x %}.{% endfor %}{% endfor %}", "nested"),
        ("html_body", "{% for a in x recursive %}{{ loop(a) }}{% endfor %}", "recursive"),
        ("text_body", "{{ name.__class__.__mro__ }}", "'__class__' is unsafe"),
        ("text_body", "{{ name['__class__'] }}", "'__class__' is unsafe"),
        ("text_body", "{{ cycler.__init__.__globals__ }}", "unsafe"),
        ("text_body", "{{ name | attr('__class__') }}", "No filter named 'attr'"),
        ("text_body", "{{ name | center(100000000) }}", "No filter named 'center'"),
        ("text_body", "{{ name | format(1) }}", "No filter named 'format'"),
        ("subject", "{{ range(10) | list }}", "no function 'range'"),
    ],
)
def test_templates_outside_the_sandbox_policy_are_rejected_at_compile_time(
    field: str, source: str, match: str
) -> None:
    # Given a template using something the sandbox does not allow
    job = content(**{field: source})

    # Then check_templates names the field and the problem, and compiling raises it
    problems = check_templates(job)
    assert len(problems) == 1 and problems[0].startswith(field.split(":")[0])
    with pytest.raises(RenderError, match=match):
        CompiledMessage("job", job)


def test_range_global_is_gone() -> None:
    # range() would allow 100,000-step loops; it is not in the sandbox's globals
    with pytest.raises(RenderError, match="no function 'range'"):
        render(content(subject="{% for i in range(3) %}{{ i }}{% endfor %}"))


@pytest.mark.parametrize(
    ("source", "variables", "match"),
    [
        ("{{ name[key] }}", {"key": "__class__"}, "unsafe"),
        ("{{ name.format(1) }}", {}, "unsafe"),
        ("{{ name.ljust(100000000) }}", {}, "unsafe"),
        ("{{ 'x' * 100000000 }}", {}, "repetition"),
        ("{{ name * n | int }}", {"n": "100000000"}, "repetition"),
        ("{{ 2 ** 1000000 }}", {}, r"\*\*"),
        ("{{ '%0100000d' % 1 }}", {}, "formatting"),
        ("{{ big | replace('', big) }}", {"big": "x" * 1000}, "replace"),
        ("{{ big.replace('', big) }}", {"big": "x" * 1000}, "replace"),
        ("{{ big | list | join(big) }}", {"big": "x" * 1000}, "join"),
        ("{{ big.join(big | list) }}", {"big": "x" * 1000}, "join"),
        ("{{ 1 / 0 }}", {}, "ZeroDivisionError"),
        ("{{ name + 1 }}", {}, "TypeError"),
    ],
)
def test_unsafe_or_unbounded_operations_fail_the_recipient(
    source: str, variables: dict[str, str], match: str
) -> None:
    # Given a template that compiles but misbehaves for these values
    compiled = CompiledMessage("job", content(text_body=source))

    # Then rendering raises a RenderError, never a raw exception or a huge allocation
    with pytest.raises(RenderError, match=match):
        compiled.render(index=0, email="a@b.c", name="Ann", variables=variables, date=DATE)


def test_output_limit_stops_loops_and_plain_splices() -> None:
    limits = RenderLimits(max_output_chars=1000)
    looped = CompiledMessage(
        "job", content(text_body="{% for c in v %}{{ v }}{% endfor %}"), limits=limits
    )
    with pytest.raises(RenderError, match="exceeds 1000"):
        looped.render(index=0, email="a@b.c", name="", variables={"v": "x" * 100}, date=DATE)
    spliced = CompiledMessage("job", content(text_body="{{ v }}" * 20), limits=limits)
    with pytest.raises(RenderError, match="exceed 1000"):
        spliced.render(index=0, email="a@b.c", name="", variables={"v": "x" * 100}, date=DATE)


def test_compiled_message_lists_every_problem() -> None:
    job = content(
        sender=Mailbox("bad"),
        reply_to=Mailbox("also bad"),
        subject="{{",
        headers=(("Bcc", "x"),),
        unsubscribe_url="ftp://x",
    )
    problems = check_templates(job)
    assert [p.split(":")[0] for p in problems] == [
        "from",
        "reply_to",
        "subject",
        "headers[0]",
        "unsubscribe_url",
    ]
    with pytest.raises(RenderError, match="reply_to"):
        CompiledMessage("job", job)
    assert check_templates(content()) == []


def test_template_variables_lists_names_used() -> None:
    job = content(
        subject="{{ name }}",
        text_body="{{ code }}{% for x in items.split() %}{{ x }}{% endfor %}",
        headers=(("X-Tag", "{{ tag }}"),),
        unsubscribe_url="https://x.test/u?e={{ email }}",
    )
    assert template_variables(job) == {"name", "code", "items", "tag", "email"}
    assert template_variables(content(subject="{{")) == {"code", "name"}


# -- headers and unsubscribe ----------------------------------------------------------


def test_tab_in_a_header_value_is_whitespace() -> None:
    # The coordinator accepts TAB in header values; the renderer folds it to a space
    message = parse(render(content(headers=(("X-Tabbed", "a\tb"),))))
    assert message["X-Tabbed"] == "a b"


def test_custom_header_templates_are_per_recipient_and_cleaned() -> None:
    # Given templated headers and values with every kind of line break
    job = content(
        headers=(("X-Member", "{{ code }}"), ("List-Id", "News <news.example.com>")),
    )
    raw = render(job, variables={"code": "A\x0bB\x0cC\x85D\u2028E\u2029F\rG\nH\x00I\tJ"})

    # Then each becomes one header; control characters became single spaces
    message = parse(raw)
    assert message["X-Member"] == "A B C D E F G H I J"
    assert message["List-Id"] == "News <news.example.com>"
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\x0b" not in head and b"\x85" not in head


@pytest.mark.parametrize(
    ("url", "post"),
    [
        ("https://example.com/u?e={{ email }}", True),
        ("http://example.com/u?e={{ email }}", False),
        ("mailto:unsubscribe@example.com?subject=unsub%20{{ email }}", False),
    ],
)
def test_unsubscribe_schemes(url: str, post: bool) -> None:
    message = parse(render(content(unsubscribe_url=url)))
    listed = message["List-Unsubscribe"]
    assert listed.startswith("<") and listed.endswith(">")
    assert "ann%40example.org" in listed
    assert (message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click") is post
    if not post:
        assert message["List-Unsubscribe-Post"] is None


def test_unsubscribe_url_values_cannot_break_out_of_the_brackets() -> None:
    job = content(unsubscribe_url="https://x.test/u?t={{ token | upper }}")
    message = parse(render(job, variables={"token": "a> <https://evil.test"}))
    assert message["List-Unsubscribe"] == "<https://x.test/u?t=A%3E%20%3CHTTPS%3A%2F%2FEVIL.TEST>"


def test_long_unbreakable_ascii_subject_is_encoded_within_line_limits() -> None:
    subject = "x" * 1500
    raw = render(content(subject="{{ s }}"), variables={"s": subject})
    assert parse(raw)["Subject"] == subject
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


@pytest.mark.parametrize(
    "name",
    [
        "A" * 100 + ", Jr.",
        "Alexandra Josephine Montgomery-Fitzwilliam, Countess of Somewhere Very Far Away",
        "Zoë Ŝmith Großmann von und zu Hohenzollern-Sigmaringen und Überlingen am See",
        "=?utf-8?b?QUFB?= looks encoded",
        "B" * 950,
    ],
)
def test_long_display_names_fold_within_line_limits(name: str) -> None:
    # When rendered, lines stay within 78 characters unless a word is longer than
    # that, and never reach RFC 5322's hard limit of 998
    raw = render(content(), name=name)
    head = raw.split(b"\r\n\r\n", 1)[0]
    longest_word = max(len(word) for word in name.split(" "))
    limit = 78 if longest_word < 60 else 998
    assert max(len(line) for line in head.split(b"\r\n")) <= limit
    decoded = parse(raw)["To"].addresses[0].display_name
    if longest_word <= 900:
        assert decoded == name
    else:
        # Encoded in several adjacent words: the stdlib parser adds spaces between them
        assert decoded.replace(" ", "") == name.replace(" ", "")


def test_adjacent_encoded_words_decode_per_rfc_2047() -> None:
    # Given a name whose non-ASCII run needs several encoded words
    name = "Ŝŝŝŝŝŝŝŝŝŝ Ĝĝĝĝĝĝĝĝĝĝĝĝĝĝ Ĥĥĥĥĥĥĥĥĥĥĥĥĥĥ Ĵĵĵĵĵĵĵĵĵĵĵĵ Smith"
    raw = render(content(), name=name)
    to = parse(raw)["To"]

    # Then an RFC 2047 decoder (which drops the space between adjacent encoded words)
    # gives the name back; the stdlib's address parser keeps that space, so it only
    # differs in spacing
    folded = raw.split(b"\r\nTo: ", 1)[1].split(b"\r\nSubject:", 1)[0].decode()
    phrase = folded.rsplit(" <", 1)[0]
    decoded = str(email.header.make_header(email.header.decode_header(phrase)))
    assert decoded == name
    assert to.addresses[0].display_name.replace(" ", "") == name.replace(" ", "")


# -- bodies ---------------------------------------------------------------------------


def test_derived_text_keeps_template_logic_and_literal_braces() -> None:
    # Given HTML with a condition, an attribute holding a variable, and entities that
    # spell template syntax
    job = content(
        text_body="",
        html_body=(
            '<p>Hi {% if name %}{{ name }}{% else %}there{% endif %}</p><a href="{{ url }}">x</a>'
            "<p>&#123;&#123; literal &#125;&#125; {&#37; also %&#125;</p>"
        ),
    )

    # Then the text part evaluates the logic and keeps the literal braces literal
    text = body(parse(render(job, name="Bo")), "plain")
    assert text == "Hi Bo\n\nx{{ literal }} {% also %}\n"
    assert html_to_text("<p>{% if a < b %}x{% endif %}</p>") == "{% if a < b %}x{% endif %}\n"


def test_static_bodies_render_identically_to_dynamic_ones() -> None:
    static = parse(render(content(text_body="Same for all\n", html_body="<p>Same</p>")))
    assert body(static, "plain") == "Same for all\n"
    assert body(static, "html") == "<p>Same</p>"


# -- attachments ----------------------------------------------------------------------

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 20


def test_attachments_with_text_and_html() -> None:
    # Given a PDF with a long non-ASCII name and a CSV with a plain name
    long_name = "Rechnung für Zoë Ŝmith, November 2026 — bitte aufbewahren.pdf"
    job = content(
        html_body="<p>Hi {{ name }}</p>",
        attachments=(
            Attachment(long_name, "application/pdf", PDF),
            Attachment("data (1).csv", "text/csv", "a,b\né,ü\n".encode()),
        ),
    )
    raw = render(job)

    # Then the message is multipart/mixed around multipart/alternative, 7-bit, and every
    # attachment decodes to its bytes under its name
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    message = parse(raw)
    assert message.defects == []
    assert message.get_content_type() == "multipart/mixed"
    types = [part.get_content_type() for part in message.walk()]
    assert types == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
        "text/csv",
    ]
    attachments = list(message.iter_attachments())
    assert [a.get_filename() for a in attachments] == [long_name, "data (1).csv"]
    assert attachments[0].get_content() == PDF
    assert attachments[1].get_content() == "a,b\né,ü\n"
    assert body(message, "plain") == "Hi {{name}}, code {{ code }}.\n".replace(
        "{{name}}", "Ann"
    ).replace("{{ code }}", "")
    assert body(message, "html") == "<p>Hi Ann</p>"


def test_attachment_with_text_only() -> None:
    job = content(attachments=(Attachment("ünï.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"x"),))
    message = parse(render(job))
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/mixed",
        "text/plain",
        "image/png",
    ]
    assert body(message, "plain") == "Hi Ann, code .\n"
    (png,) = message.iter_attachments()
    assert png.get_filename() == "ünï.png"


@pytest.mark.parametrize(
    ("attachment", "match"),
    [
        (Attachment("a.exe", "application/x-msdownload", b"MZ"), "not allowed"),
        (Attachment("a.svg", "image/svg+xml", b"<svg/>"), "not allowed"),
        (Attachment("a.pdf", "application/pdf", b"MZ not a pdf"), "does not look like"),
        (Attachment("a.webp", "image/webp", b"RIFF0000JPEG"), "does not look like"),
        (Attachment("a.txt", "text/plain", b"\xff\xfe"), "not UTF-8"),
        (Attachment("", "text/plain", b"x"), "filename"),
        (Attachment("a\r\nb.txt", "text/plain", b"x"), "filename"),
        (Attachment("../etc/passwd", "text/plain", b"x"), "filename"),
        (Attachment("a" * 300, "text/plain", b"x"), "255"),
    ],
)
def test_bad_attachments_are_rejected(attachment: Attachment, match: str) -> None:
    with pytest.raises(RenderError, match=match):
        CompiledMessage("job", content(attachments=(attachment,)))


def test_attachment_count_and_size_limits() -> None:
    limits = RenderLimits(max_attachments=1, max_attachment_bytes=10)
    two = tuple(Attachment(f"{i}.txt", "text/plain", b"x") for i in range(2))
    assert check_templates(content(attachments=two), limits) == ["attachments: more than 1"]
    big = (Attachment("a.txt", "text/plain", b"x" * 11),)
    assert "more than 10" in check_templates(content(attachments=big), limits)[0]
    with pytest.raises(ValueError, match="at least 1"):
        RenderLimits(max_attachments=0)


# -- signing ----------------------------------------------------------------------------


class FakeSigner:
    def __init__(self, domains: set[str]) -> None:
        self.domains = domains
        self.calls: list[str] = []

    def can_sign(self, domain: str) -> bool:
        return domain in self.domains

    def sign(self, message: bytes, domain: str) -> bytes:
        self.calls.append(domain)
        return b"X-Signed: " + domain.encode() + b"\r\n" + message


def test_signer_is_used_only_for_domains_it_has_keys_for() -> None:
    signer = FakeSigner({"example.com"})
    cache = TemplateCache(signer=signer)
    raw = cache.get("j", content()).render(index=0, email="a@b.c", name="", variables={}, date=DATE)
    assert parse(raw)["X-Signed"] == "example.com"
    other = content(sender=Mailbox("news@other.test"))
    raw = cache.get("k", other).render(index=0, email="a@b.c", name="", variables={}, date=DATE)
    assert parse(raw)["X-Signed"] is None
    assert signer.calls == ["example.com"]


def test_a_shared_message_hides_the_recipients_and_names_its_group() -> None:
    # Given a job whose recipients share one message
    compiled = CompiledMessage(
        "job-42",
        content(subject="Maintenance tonight", text_body="Down 22:00-23:00.\n",
                recipients_per_message=50),
    )  # fmt: skip

    # When the group starting at recipient 120 is rendered
    raw = compiled.render_shared(first_index=120, date=DATE)

    # Then no recipient address appears, and the Message-ID names the group
    message = parse(raw)
    assert message["To"] == "undisclosed-recipients:;"
    assert message["Message-ID"] == "<job-42.g120@example.com>"
    assert body(message, "plain") == "Down 22:00-23:00.\n"
    assert compiled.render_shared(first_index=120, date=DATE) == raw


def test_a_shared_message_may_not_use_per_recipient_values() -> None:
    # Given shared jobs whose templates read the recipient, or an oversized group
    personal = content(recipients_per_message=2)
    too_many = content(subject="Hi", text_body="Hi.\n", recipients_per_message=101)

    # Then compiling names the field and the variables
    assert check_templates(personal) == [
        "recipients_per_message: recipients share one message, so the templates may not "
        "use per-recipient values (code, name)"
    ]
    assert check_templates(too_many) == ["recipients_per_message: must be between 1 and 100"]
    # And a job that does not share refuses render_shared
    with pytest.raises(RenderError, match="one message per recipient"):
        CompiledMessage("j", content()).render_shared(first_index=0, date=DATE)
