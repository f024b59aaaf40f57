"""Submit validation matrix (issue 6): each bad input, the field and the exact message."""

from __future__ import annotations

import dataclasses
import email.utils
import string

import email_validator
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.model import Address, Content, Header, JobOptions, Recipient
from coordinator.validation import (
    ALLOWED_HEADERS_TEXT,
    Limits,
    ValidationError,
    address_problem,
    check_job,
    header_name_problem,
)

FORBIDDEN = "\r\n\x00\x0b\x0c\x85\u2028\u2029"
CONTROL_NAMES = {"CR": "\r", "LF": "\n", "NUL": "\x00", "VT": "\x0b", "FF": "\x0c",
                 "NEL": "\x85", "LS": "\u2028", "PS": "\u2029"}  # fmt: skip


def _content(**kw: object) -> Content:
    base = Content(Address("news@example.com", "News"), subject="Hello", text_body="Hi")
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _problems(
    content: Content, recipients: list[Recipient] | None = None, limits: Limits | None = None
) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        check_job(content, recipients or [Recipient("a@example.com")], "k", limits or Limits())
    return info.value.problems


@pytest.mark.parametrize("name", sorted(CONTROL_NAMES))
def test_control_characters_everywhere(name: str) -> None:
    # Given one forbidden character in every text that ends up in a header
    c = CONTROL_NAMES[name]
    content = _content(
        sender=Address("news@example.com", f"A{c}B"),
        reply_to=Address("r@example.com", f"R{c}"),
        subject=f"Hi{c}Bcc: x@example.com",
        headers=(Header("X-Tag", f"v{c}Bcc: y@example.com"), Header(f"X-A{c}", "v")),
        unsubscribe_url=f"https://example.com/u{c}",
    )
    # Then each is named, with its message
    assert _problems(content, [Recipient("a@example.com", f"Eve{c}")]) == [
        ("content.from.name", "contains a control character"),
        ("content.reply_to.name", "contains a control character"),
        ("content.subject", "contains a control character"),
        ("content.headers[0].value", "contains a control character"),
        ("content.headers[1].name", f"{'X-A' + c!r} is not a valid header name"),
        ("content.unsubscribe_url", "must be an http(s) or mailto URL"),
        ("recipients[0].name", "contains a control character"),
    ]


@pytest.mark.parametrize(
    "name",
    ["X-Campaign", "x-a", "List-Id", "Precedence", "Auto-Submitted", "Feedback-ID",
     "Organization", "Keywords", "Comments", "In-Reply-To", "References"],
)  # fmt: skip
def test_allowed_headers(name: str) -> None:
    assert header_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Bcc", "'Bcc' is set by mailers and cannot be given"),
        ("DKIM-Signature", "'DKIM-Signature' is set by mailers and cannot be given"),
        ("ARC-Seal", f"'ARC-Seal' is not an allowed header (allowed: {ALLOWED_HEADERS_TEXT})"),
        ("Resent-To", f"'Resent-To' is not an allowed header (allowed: {ALLOWED_HEADERS_TEXT})"),
        ("X-", f"'X-' is not an allowed header (allowed: {ALLOWED_HEADERS_TEXT})"),
        ("Bad Name", "'Bad Name' is not a valid header name"),
        ("A:B", "'A:B' is not a valid header name"),
        ("", "'' is not a valid header name"),
        ("X-Ü", "'X-Ü' is not a valid header name"),
    ],
)
def test_refused_headers(name: str, message: str) -> None:
    assert _problems(_content(headers=(Header(name, "v"),))) == [
        ("content.headers[0].name", message)
    ]


def test_sizes_come_from_limits() -> None:
    limits = Limits(
        max_recipients=2, max_body_bytes=10, max_content_bytes=40, max_subject_chars=5,
        max_headers=1, max_variables=1, max_variable_chars=3,
    )  # fmt: skip
    content = _content(
        subject="Hello!", text_body="é" * 6, headers=(Header("X-A", "1"), Header("X-B", "2"))
    )
    assert _problems(content, limits=limits) == [
        ("content.subject", "is longer than 5 characters"),
        ("content.text_body", "is larger than 10 bytes"),
        ("content.headers", "more than 1 headers"),
        ("content", "is larger than 40 bytes (90)"),
    ]
    many = [Recipient(f"a{i}@example.com") for i in range(3)]
    assert _problems(_content(), many, limits) == [("recipients", "more than 2 recipients")]
    vars_ = [Recipient("a@example.com", "", {"a": "1234", "b": "1"})]
    assert _problems(_content(), vars_, limits) == [
        ("recipients[0].variables", "more than 1 variables"),
        ("recipients[0].variables[a]", "is longer than 3 characters"),
    ]


def test_problems_among_clean_recipients_name_their_own_recipient() -> None:
    # Clean recipients of every shape (the check passes them without naming a field),
    # then one problem of each kind, each at its own place in the list
    clean = [
        Recipient("a@example.com"),
        Recipient("b@example.com", "B", {"code": "1", "city": "Oslo"}),
        Recipient("c@example.com", metadata={"customer": "C-1"}),
    ]
    bad = [
        Recipient("not-an-address"),
        Recipient("d@example.com", "D\r\nBcc: x@example.com"),
        Recipient("e@example.com", "", {"1x": "v"}),
        Recipient("f@example.com", "", {"ok": "v" * 11}),
        Recipient("g@example.com", "", {"ok": "a\x00b"}),
        Recipient("h@example.com", metadata={"bad key": "v"}),
    ]
    recipients = [*clean, bad[0], *clean, *bad[1:3], *clean, *bad[3:]]
    limits = Limits(max_variable_chars=10)
    # Then each problem names the recipient it belongs to, and nothing else is named
    assert _problems(_content(), recipients, limits) == [
        ("recipients[3].email", "'not-an-address' is not a valid email address"),
        ("recipients[7].name", "contains a control character"),
        ("recipients[8].variables", "'1x' is not a valid variable name"),
        ("recipients[12].variables[ok]", "is longer than 10 characters"),
        ("recipients[13].variables[ok]", "contains a NUL character"),
        ("recipients[14].metadata", "'bad key' is not a valid key (1-64 letters, digits, _ - .)"),
    ]


def test_stored_size_counts_json_escapes() -> None:
    # 300k CJK characters are 900 kB of UTF-8 but 1.8 MB as escaped JSON in etcd
    assert _problems(_content(text_body="中" * 300_000), limits=Limits()) == [
        ("content", "is larger than 1200000 bytes (1800037)"),
    ]


def test_templates_hook_maps_problems_to_fields() -> None:
    def templates(content: Content) -> list[str]:
        return ["subject: unexpected '}'", "html_body: access to attribute '__class__'", "other"]

    with pytest.raises(ValidationError) as info:
        check_job(_content(), [Recipient("a@example.com")], "k", Limits(), templates)
    assert info.value.problems == [
        ("content.subject", "unexpected '}'"),
        ("content.html_body", "access to attribute '__class__'"),
        ("content", "other"),
    ]


@pytest.mark.parametrize(
    ("email", "message"),
    [
        ("", "is required"),
        ("ü@example.com", "'ü@example.com' is not a valid email address (non-ASCII local part)"),
        (
            "a@münchen.de",
            "'a@münchen.de' is not a valid email address (give the domain in ASCII xn-- form)",
        ),
        ("a@b", "'a@b' is not a valid email address (bad domain)"),
        ('"q"@example.com', "'\"q\"@example.com' is not a valid email address"),
        (
            "a@x.invalid",
            "'a@x.invalid' is not a valid email address (The part after the @-sign is a "
            "special-use or reserved name that cannot be used with email)",
        ),
        (
            "a@xn--zz.de",
            "'a@xn--zz.de' is not a valid email address (The part after the @-sign is not "
            "valid IDNA (Invalid A-label))",
        ),
        ("a@[1.2.3.4]", "'a@[1.2.3.4]' is not a valid email address (bad domain)"),
    ],
)
def test_bad_address_messages(email: str, message: str) -> None:
    assert address_problem(email) == message


def test_each_bad_recipient_is_named() -> None:
    recipients = [Recipient("ok@example.com"), Recipient("a@x.local"), Recipient("b@-x.com")]
    fields = [f for f, _ in _problems(_content(), recipients)]
    assert fields == ["recipients[1].email", "recipients[2].email"]


def test_idn_in_a_label_form_and_test_domains_are_accepted() -> None:
    assert address_problem("a@xn--mnchen-3ya.de") is None
    assert address_problem("user@mailers.test") is None


# ---- properties --------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=30)
_interesting = st.text(
    st.sampled_from(list(FORBIDDEN + "\t :;<>@\"'\\ aZ09é中\x7f\x1b")), max_size=12
)


@settings(max_examples=300)
@given(name=st.one_of(_text, _interesting), value=st.one_of(_text, _interesting))
def test_no_accepted_header_carries_a_forbidden_character(name: str, value: str) -> None:
    try:
        check_job(
            _content(headers=(Header("X-" + name, value),), subject=value),
            [Recipient("a@example.com", value)],
            "k",
            Limits(),
        )
    except ValidationError:
        return
    for text in ("X-" + name, value):
        assert not any(c in text for c in FORBIDDEN)
        assert all(c >= " " or c == "\t" for c in text)


_local_chars = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-.\"@ \\é"
_addresses = st.one_of(
    st.builds(
        lambda local, domain: f"{local}@{domain}",
        st.text(st.sampled_from(list(_local_chars)), min_size=0, max_size=10),
        st.sampled_from(
            ["example.com", "xn--mnchen-3ya.de", "b", "x.invalid", "sub.example.co.uk",
             "-a.com", "a-.com", "münchen.de", "example.123", "[1.2.3.4]", "EXAMPLE.ORG"]
        ),
    ),
    st.emails(),
    _text,
)  # fmt: skip


@settings(max_examples=500)
@given(_addresses)
def test_accepted_addresses_round_trip_and_agree_with_email_validator(addr: str) -> None:
    problem = address_problem(addr)
    try:
        checked = email_validator.validate_email(
            addr,
            allow_smtputf8=False,
            check_deliverability=False,
            strict=True,
            test_environment=True,
        )
        validator_ok = addr.isascii() and checked.ascii_email is not None
    except email_validator.EmailNotValidError:
        validator_ok = False
    if problem is None:
        # Accepted: email-validator agrees, and the address survives a header round trip
        assert validator_ok, addr
        assert email.utils.parseaddr(email.utils.formataddr(("N", addr)))[1] == addr
        assert not any(c in addr for c in FORBIDDEN)
    else:
        # Refused by us: email-validator refuses too, or the domain is a U-label
        # (we want the ASCII form so the stored address is what the relay sees)
        assert not validator_ok or not addr.isascii(), (addr, problem)


def test_the_renderers_template_check_is_wired() -> None:
    # Given the coordinator's check, which compiles with the renderer's sandbox
    from coordinator.server import template_check

    content = _content(subject="Hi {{ name }", text_body="{{ x.__class__ }}")
    with pytest.raises(ValidationError) as info:
        check_job(content, [Recipient("a@example.com")], "k", Limits(), template_check())
    # Then each template problem is named on its field
    assert info.value.problems == [
        ("content.subject", "line 1: unexpected '}'"),
        ("content.text_body", "line 1: access to '__class__' is unsafe"),
    ]


def test_shared_messages_are_checked_at_submit() -> None:
    from coordinator.server import template_check

    # Given a shared job whose subject is personalised, and one asking for 101 per message
    personal = _content(subject="Hi {{ name }}", recipients_per_message=10)
    oversized = _content(recipients_per_message=101)
    with pytest.raises(ValidationError) as info:
        check_job(personal, [Recipient("a@example.com")], "k", Limits(), template_check())
    # Then each is refused on the field, naming the offending variable or the bound
    assert info.value.problems == [
        (
            "content.recipients_per_message",
            "recipients share one message, so the templates may not use per-recipient "
            "values (name)",
        )
    ]
    assert _problems(oversized) == [
        (
            "content.recipients_per_message",
            "must be between 0 (one message per recipient) and 100",
        )
    ]


def test_metadata_within_limits_is_accepted() -> None:
    ok = Recipient("a@example.com", metadata={"customer": "C-1", "list.id": "x" * 256})
    check_job(_content(), [ok], "k", Limits())


@pytest.mark.parametrize(
    ("metadata", "field", "message"),
    [
        ({f"k{i}": "v" for i in range(17)}, "recipients[0].metadata", "more than 16 entries"),
        ({"bad key": "v"}, "recipients[0].metadata", "not a valid key"),
        ({"": "v"}, "recipients[0].metadata", "not a valid key"),
        ({"k": "v" * 257}, "recipients[0].metadata[k]", "longer than 256 characters"),
        ({"k": "a\x00b"}, "recipients[0].metadata[k]", "NUL"),
        ({f"k{i}": "é" * 100 for i in range(6)}, "recipients[0].metadata", "1024 bytes"),
    ],
)
def test_metadata_problems_name_the_field(
    metadata: dict[str, str], field: str, message: str
) -> None:
    problems = _problems(_content(), [Recipient("a@example.com", metadata=metadata)])
    assert any(f == field and message in m for f, m in problems), problems


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        (JobOptions(name="n" * 201), "options.name", "longer than 200"),
        (JobOptions(name="a\nb"), "options.name", "control character"),
        (JobOptions(tags=tuple(f"t{i}" for i in range(11))), "options.tags", "more than 10"),
        (JobOptions(tags=("ok", "")), "options.tags[1]", "1 to 64 characters"),
        (JobOptions(tags=("t" * 65,)), "options.tags[0]", "1 to 64 characters"),
        (JobOptions(tags=("a\tb",)), "options.tags[0]", "control character"),
    ],
)
def test_name_and_tags_problems_name_the_field(
    options: JobOptions, field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        check_job(_content(), [Recipient("a@example.com")], "k", Limits(), options=options)
    assert any(f == field and message in m for f, m in info.value.problems), info.value.problems
