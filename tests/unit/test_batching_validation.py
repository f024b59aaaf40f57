"""Batching and submit validation: every recipient in exactly one batch; clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.batching import (
    batch_id,
    batch_of,
    batch_range,
    chunks,
    job_batch_size,
    parse_batch_id,
)
from coordinator.model import (
    Address,
    Content,
    Header,
    JobOptions,
    JobSpec,
    Recipient,
    dump_spec,
    load_spec,
)
from coordinator.validation import Limits, ValidationError, address_problem, check_job


@given(st.integers(0, 2000), st.integers(1, 300))
def test_every_recipient_lands_in_exactly_one_batch(total: int, size: int) -> None:
    batches = list(chunks(range(total), size))
    flat = [i for b in batches for i in b]
    assert flat == list(range(total))
    assert all(0 < len(b) <= size for b in batches)
    for seq, batch in enumerate(batches):
        assert list(batch_range(seq, size, total)) == batch
        assert all(batch_of(i, size) == seq for i in batch)


def test_a_job_sharing_its_messages_gets_batches_that_fill_them() -> None:
    # One message per recipient: the configured size
    assert job_batch_size(50, 1) == 50
    # Shared messages: five full messages per batch, never below the configured size,
    # never above 1,000
    assert job_batch_size(50, 100) == 500
    assert job_batch_size(800, 100) == 800
    assert job_batch_size(50, 300) == 1000


def test_batch_ids_round_trip() -> None:
    assert parse_batch_id(batch_id("01ab-cd", 7)) == ("01ab-cd", 7)
    with pytest.raises(ValueError):
        parse_batch_id("nojob")


def _content(**kw: object) -> Content:
    base: dict[str, object] = {
        "sender": Address("news@example.com", "News"),
        "reply_to": None,
        "subject": "Hello",
        "text_body": "Hi",
        "html_body": "",
    }
    base.update(kw)
    return Content(**base)  # type: ignore[arg-type]


def _problems(content: Content, recipients: list[Recipient], key: str = "k") -> list[str]:
    with pytest.raises(ValidationError) as info:
        check_job(content, recipients, key, Limits())
    return [field for field, _ in info.value.problems]


def test_valid_job_passes() -> None:
    check_job(_content(), [Recipient("a@example.com", "A", {"x": "1"})], "k", Limits())


def test_missing_recipients_subject_and_body_are_named() -> None:
    fields = _problems(_content(subject="", text_body="", html_body=""), [])
    assert fields == ["content.subject", "content.text_body", "recipients"]


def test_each_bad_recipient_is_named_by_index() -> None:
    recipients = [Recipient("ok@example.com"), Recipient("bad"), Recipient("x@y"), Recipient("")]
    assert _problems(_content(), recipients) == [
        "recipients[1].email",
        "recipients[2].email",
        "recipients[3].email",
    ]


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (Header("X-Campaign", "a\r\nBcc: victim@example.com"), "content.headers[0].value"),
        (Header("Bad Name", "v"), "content.headers[0].name"),
        (Header("Bcc", "someone@example.com"), "content.headers[0].name"),
    ],
)
def test_header_injection_and_reserved_names_are_refused(header: Header, field: str) -> None:
    assert _problems(_content(headers=(header,)), [Recipient("a@example.com")]) == [field]


def test_control_characters_in_subject_and_names_are_refused() -> None:
    fields = _problems(
        _content(subject="Hi\nBcc: x@example.com", sender=Address("n@example.com", "A\u2028B")),
        [Recipient("a@example.com", "Eve\r\n")],
    )
    assert fields == ["content.from.name", "content.subject", "recipients[0].name"]


def test_idempotency_key_is_required() -> None:
    assert _problems(_content(), [Recipient("a@example.com")], key="") == ["idempotency_key"]


@pytest.mark.parametrize(
    "email", ["a@example.com", "first.last+tag@sub.example.co.uk", "o'neil@example.org"]
)
def test_good_addresses(email: str) -> None:
    assert address_problem(email) is None


@pytest.mark.parametrize(
    "email",
    ["", "plain", "@example.com", "a@", "a@b", "a..b@example.com", "a@-x.com", "a b@example.com",
     "a@example.123", "a@exa_mple.com", "x" * 65 + "@example.com"],
)  # fmt: skip
def test_bad_addresses(email: str) -> None:
    assert address_problem(email) is not None


def test_records_round_trip_through_json() -> None:
    spec = JobSpec(
        job_id="j1",
        idempotency_key="k",
        content=_content(headers=(Header("X-Tag", "v"),), reply_to=Address("r@example.com")),
        options=JobOptions(send_at=12.5, priority=3, name="n"),
        total=3,
        batch_size=2,
        created_at=1.0,
    )
    assert load_spec(dump_spec(spec)) == spec
