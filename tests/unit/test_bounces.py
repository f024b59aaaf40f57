"""Reading bounces and complaints (coordinator.bounces).

Three sources of messages:

- flufl.bounce 6.0.0's real-world samples (fetched at set-up, see tests/bounce_samples.py):
  every sample its detector table has an expectation for is read here, with the
  expected recipients and hard/soft verdict taken from that table. Two samples are
  expected to read differently from the table, and five to give None; each says why
  in :data:`DIFFERENT_HERE` and :data:`UNREADABLE`. None is left out.
- Hand-written DSNs and ARF reports in tests/data/bounces/, after the examples of
  RFC 3464 and RFC 5965 and a mailbox provider's feedback loop.
- Malformed input, which must give None and never raise.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.bounces import MAX_DIAGNOSTIC, Finding, Report, ReportKind, parse_report
from tests.bounce_samples import Expectation, Samples

DATA = Path(__file__).resolve().parents[1] / "data" / "bounces"
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _numbered(prefix: str, first: int, last: int, *skip: int) -> tuple[str, ...]:
    return tuple(f"{prefix}_{i:02}.txt" for i in range(first, last + 1) if i not in skip)


REAL_WORLD: dict[str, tuple[str, ...]] = {
    "qmail": _numbered("qmail", 1, 7),
    "Postfix": _numbered("postfix", 1, 5),
    "Exim": ("exim_01.txt",),
    "Sendmail (and LLNL's customised one)": ("sendmail_01.txt", "llnl_01.txt"),
    # groupwise_02.txt came from Exchange despite its name (flufl.bounce's table says so).
    "Microsoft Exchange": (*_numbered("microsoft", 1, 4), "groupwise_02.txt"),
    "Novell GroupWise": ("groupwise_01.txt",),
    "Lotus Domino": ("simple_11.txt",),
    "Yahoo": _numbered("yahoo", 1, 13),
    "AOL": ("aol_01.txt",),
    "Netscape Messaging Server": ("netscape_01.txt",),
    "Ipswitch IMail (SMTP32)": _numbered("smtp32", 1, 7),
    "Sina": ("sina_01.txt",),
    "Yale": ("yale_01.txt",),
    "CAI Wireless": ("caiwireless_01.txt",),
    "HotPOP": ("hotpop_01.txt",),
    "newmail.ru": ("newmailru_01.txt",),
    "RFC 3464 DSNs from assorted MTAs": _numbered("dsn", 1, 18, 2),
    "other non-standard MTAs": (
        *_numbered("simple", 1, 45, 11, 42, 43),
        "bounce_02.txt",
        "bounce_03.txt",
    ),
}
"""Samples read as flufl.bounce's detector table expects, grouped by the MTA that sent them."""

DIFFERENT_HERE: dict[str, tuple[Expectation, str]] = {
    "dsn_02.txt": (
        Expectation(frozenset({"zzzzz@example.uk"}), False, "dsn"),
        "an X.400 gateway's 'Action: failed' with 'Status: 4.4.7' (delivery time expired):"
        " soft here, by the status class, where flufl.bounce counts every failed action hard",
    ),
    "simple_42.txt": (
        Expectation(frozenset({"david...@gmail.com"}), True, "dsn"),
        "a standard Exim DSN (Status 5.0.0) with a redacted recipient; the table only says"
        " that flufl.bounce's SimpleMatch heuristic finds nothing in it",
    ),
}
"""Samples read differently from flufl.bounce's table: the expectation here, and why."""

UNREADABLE: dict[str, str] = {
    "groupwise_03.txt": "not a bounce: a reply (the table expects nothing)",
    "qmail_08.txt": "not a bounce: an auto-reply (the table expects nothing)",
    "simple_43.txt": "names no recipient (the table expects nothing)",
    "dumbass_01.txt": "an InterScan notice naming no recipient (flufl.bounce's test_scan.py)",
    "bounce_01.txt": "JetMail names only a local part ('dylan'); the table has no row for it",
}
"""Samples that must give None, and why."""


def _read(path: Path) -> Report:
    report = parse_report(path.read_bytes())
    assert report is not None, f"{path.name} was not read"
    return report


def test_the_samples_cover_many_mtas_and_every_sample_is_accounted_for(
    flufl_samples: Samples,
) -> None:
    # Given the samples that read as the table says
    chosen = [name for names in REAL_WORLD.values() for name in names]
    # Then they come from many MTAs, and each sample file is in exactly one list
    assert len(REAL_WORLD) >= 15 and len(chosen) >= 100
    accounted = [*chosen, *DIFFERENT_HERE, *UNREADABLE]
    assert len(accounted) == len(set(accounted))
    assert set(accounted) == {p.name for p in flufl_samples.data.glob("*.txt")}
    # And the table says what the reasons for reading differently claim
    assert flufl_samples.expected["dsn_02.txt"].hard
    assert not flufl_samples.expected["simple_42.txt"].addresses
    for name in UNREADABLE:
        assert name not in flufl_samples.expected or not flufl_samples.expected[name].addresses


@pytest.mark.parametrize("name", [name for names in REAL_WORLD.values() for name in names], ids=str)
def test_real_world_bounces_read_as_flufl_bounce_expects(flufl_samples: Samples, name: str) -> None:
    # Given a real bounce and flufl.bounce's expectation for it
    expected = flufl_samples.expected[name]
    assert expected.addresses, f"the table expects nothing of {name}"
    # When it is read
    report = _read(flufl_samples.data / name)
    # Then it finds exactly the expected recipients, with the expected verdict
    assert report.kind is ReportKind.BOUNCE
    assert {f.email for f in report.findings} == expected.addresses
    assert {f.hard for f in report.findings} == {expected.hard}
    # And standard DSNs are read as such; the heuristics only read the rest
    # (dsn_15.txt is a DSN forwarded as an attachment, found by flufl.bounce's DSN detector)
    if expected.detector == "dsn":
        assert report.method in ("dsn", "detector:dsn")
    else:
        assert report.method.startswith("detector:")


@pytest.mark.parametrize("name", sorted(DIFFERENT_HERE), ids=str)
def test_real_world_bounces_read_differently_from_the_table(
    flufl_samples: Samples, name: str
) -> None:
    expected, _why = DIFFERENT_HERE[name]
    report = _read(flufl_samples.data / name)
    assert report.method == "dsn"
    assert {f.email for f in report.findings} == expected.addresses
    assert {f.hard for f in report.findings} == {expected.hard}


@pytest.mark.parametrize("name", sorted(UNREADABLE), ids=str)
def test_real_world_messages_without_a_readable_recipient_give_none(
    flufl_samples: Samples, name: str
) -> None:
    assert parse_report((flufl_samples.data / name).read_bytes()) is None


def test_a_real_world_dsn_carries_status_diagnostic_and_the_original_message_id(
    flufl_samples: Samples,
) -> None:
    report = _read(flufl_samples.data / "dsn_17.txt")
    # A mailbox over quota: the failure is temporary
    assert report.findings == (
        Finding(
            "userx@example.fi",
            False,
            "4.3.0",
            "Quota exceeded message delivery failed to /mail/mbx/p/5/kb3543/INBOX",
        ),
    )
    assert report.message_id == (
        "<mailman.150418.1209869464.31038.pray4-team@strategicnetwork.org>"
    )


# --- Hand-written DSNs (RFC 3464) ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "findings", "message_id"),
    [
        # A permanent failure, the original's headers returned as text/rfc822-headers
        ("dsn_permanent.eml",
         [Finding("louisl@example.net", True, "5.1.1",
                  "550 5.1.1 <louisl@example.net>... User unknown")],
         "<20250304050607.a1b2c3@mailers.example.com>"),
        ("dsn_delayed.eml",
         [Finding("thomas@example.org", False, "4.4.1",
                  "421 4.4.1 mx.example.org: connection timed out")],
         "<20250304092139.d4e5f6@mailers.example.com>"),
        # One failed and one delivered recipient: only the failure is a finding, with
        # its diagnostic unfolded
        ("dsn_multi_recipient.eml",
         [Finding("arathib@example.com", True, "5.1.1",
                  "550 'arathib@example.com' is not a registered gateway user")],
         "<20250305092140.778899@mailers.example.com>"),
        # Lower and upper case, the first group run into the per-message fields, an
        # untyped recipient, a group without Action (judged by its status), "failed"
        # with 4.0.0 (soft), and an X.400 recipient (skipped)
        ("dsn_odd_spacing.eml",
         [Finding("louise.smith@example.net", True, "5.2.2",
                  "552-5.2.2 mailbox full 552 5.2.2 over quota"),
          Finding("kim@example.net", False, "4.0.0", "426 connection timed out"),
          Finding("pat@example.net", True, "5.1.1", "550 5.1.1 no such user")],
         "<20250306101010.0a0b0c@mailers.example.com>"),
    ],
)  # fmt: skip
def test_delivery_status_notifications(name: str, findings: list[Finding], message_id: str) -> None:
    report = _read(DATA / name)
    assert report == Report(ReportKind.BOUNCE, tuple(findings), message_id, method="dsn")


def test_crlf_line_endings_read_the_same() -> None:
    raw = (DATA / "dsn_permanent.eml").read_bytes()
    assert parse_report(raw.replace(b"\n", b"\r\n")) == parse_report(raw)


def _dsn(groups: str, original: str = "") -> bytes:
    text = (
        "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        "--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.com\n\n"
        f"{groups}\n"
        + (f"--b\nContent-Type: message/rfc822\n\n{original}\n" if original else "")
        + "--b--\n"
    )
    return text.encode()


def test_the_original_recipient_is_preferred_to_the_final_one() -> None:
    # Given a recipient forwarded to another address before it failed
    raw = _dsn(
        "Original-Recipient: rfc822;list-member@example.com\n"
        "Final-Recipient: rfc822;member@forward.example.net\n"
        "Action: failed\nStatus: 5.1.1\n"
    )
    # Then the finding is the address we sent to
    report = parse_report(raw)
    assert report is not None
    assert [f.email for f in report.findings] == ["list-member@example.com"]


def test_a_success_report_is_a_report_without_findings() -> None:
    raw = _dsn(
        "Final-Recipient: rfc822;ann@example.com\nAction: delivered\nStatus: 2.0.0\n\n"
        "Final-Recipient: rfc822;bob@example.com\nAction: relayed\nStatus: 2.0.0\n",
        original="Message-ID: <m1@mailers.example.com>\n\nHi.",
    )
    assert parse_report(raw) == Report(
        ReportKind.BOUNCE, (), "<m1@mailers.example.com>", method="dsn"
    )


def test_long_diagnostics_are_capped_and_8bit_addresses_kept() -> None:
    raw = _dsn(
        "Final-Recipient: rfc822; j\u00fcrgen@example.com\nAction: failed\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 {'x' * 2000}\n"
    )
    report = parse_report(raw)
    assert report is not None
    [finding] = report.findings
    # The status comes from the diagnostic when the group has no Status field
    assert (finding.email, finding.status) == ("j\u00fcrgen@example.com", "5.1.1")
    assert len(finding.diagnostic) == MAX_DIAGNOSTIC


# --- Hand-written ARF reports (RFC 5965) -------------------------------------------


@pytest.mark.parametrize(
    ("name", "email", "feedback_type", "message_id"),
    [
        # RFC 5965's example, whose original has a Message-ID without angle brackets
        ("arf_rfc5965.eml", "user@example.com", "abuse",
         "<8787KJKJ3K4J3K4J3K4J3.mail@example.net>"),
        ("arf_abuse_rcpt_to.eml", "marie.curie@isp.example.net", "abuse",
         "<20250307091158.c0ffee@mailers.example.com>"),
        # No Original-Rcpt-To: the To of the returned original names the complainer
        ("arf_abuse_original_to.eml", "ada@mail.example.org", "abuse",
         "<20250307095958.facade@mailers.example.com>"),
        ("arf_fraud.eml", "customer@bank.example", "fraud",
         "<20250308075459.beef01@mailers.example.com>"),
        # A mailbox provider's loop: ARF 0.1 field names, no Original-Rcpt-To
        ("arf_yahoo_style.eml", "grace.hopper@yahoo.com", "abuse",
         "<20250309135808.5eed5@mailers.example.com>"),
    ],
)  # fmt: skip
def test_complaints(name: str, email: str, feedback_type: str, message_id: str) -> None:
    report = _read(DATA / name)
    assert report == Report(
        ReportKind.COMPLAINT,
        (Finding(email, True, "", ""),),
        message_id,
        feedback_type=feedback_type,
        method="arf",
    )


def test_a_complaint_naming_nobody_still_identifies_the_message() -> None:
    # Given a provider that redacts the complaining recipient everywhere
    raw = (
        b"Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n"
        b"--b\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nVersion: 1\n\n"
        b"--b\nContent-Type: text/rfc822-headers\n\nTo: redacted\n"
        b"Message-ID: <m7@mailers.example.com>\n--b--\n"
    )
    # Then it is still a complaint, and the caller finds the recipient by Message-ID
    assert parse_report(raw) == Report(
        ReportKind.COMPLAINT, (), "<m7@mailers.example.com>", "abuse", "arf"
    )


# --- Non-standard bounces -------------------------------------------------------------


def test_a_non_standard_bounce_names_its_detector_and_finds_the_pasted_message_id() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\nSubject: failure notice\n\n"
        b"Hi. This is the qmail-send program at mx.example.net.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        b"<gone@example.net>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
        b"--- Below this line is a copy of the message.\n\n"
        b"Message-ID: <m9@mailers.example.com>\nSubject: March news\n\nHello.\n"
    )
    report = parse_report(raw)
    assert report == Report(
        ReportKind.BOUNCE,
        (Finding("gone@example.net", True, "", ""),),
        "<m9@mailers.example.com>",
        method="detector:qmail",
    )


# --- Malformed input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"just some text, no headers at all\n",
        b"Subject: hello\n\nA letter, not a bounce.\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nSomething went wrong.\n--b--\n",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        b"no boundary ever appears\n",
        _dsn("Final-Recipient: x400; /S=x/C=GB/\nAction: failed\n"),
        bytes(range(256)) * 16,
    ],
    ids=["empty", "not-mime", "letter", "no-report-part", "no-boundary", "x400", "binary"],
)
def test_malformed_input_gives_none(raw: bytes) -> None:
    assert parse_report(raw) is None


@PROPERTY_SETTINGS
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    report = parse_report(raw)
    assert report is None or isinstance(report, Report)


@PROPERTY_SETTINGS
@given(st.data())
def test_damaged_reports_never_raise(data: st.DataObject) -> None:
    # Given a real report cut short and with a few bytes overwritten
    sample = data.draw(st.sampled_from(sorted(DATA.iterdir())))
    raw = bytearray(sample.read_bytes())
    del raw[data.draw(st.integers(0, len(raw))) :]
    for _ in range(data.draw(st.integers(0, 5))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    # Then it is read or refused, never an exception
    report = parse_report(bytes(raw))
    assert report is None or all(f.email == f.email.lower() for f in report.findings)


_POSTFIX_NOTICE_IN_BASE64 = (
    b"Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: message/rfc822\n\n"
    b"Content-Type: multipart/mixed; boundary=i\n\n--i\nContent-Type: text/plain\n"
    b"Content-Description: notification\nContent-Transfer-Encoding: base64\n\n"
    + base64.encodebytes(b"The Postfix program\n" + b"<" * 100_000)
    + b"\n--i--\n\n--o--\n"
)


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: x\n\nhere is your list of failed recipients\n" + b"<" * 1_000_000 + b"\n",
        _POSTFIX_NOTICE_IN_BASE64,
    ],
    ids=["megabyte-line", "line-inside-base64"],
)
def test_pathological_lines_do_not_make_the_heuristics_quadratic(raw: bytes) -> None:
    # Given a heuristic's start marker followed by a long line that one of its patterns
    # would backtrack over from every position (in the raw text, or once decoded)
    started = time.perf_counter()
    assert parse_report(raw) is None
    # Then it is refused in well under a second (minutes if the line reached the pattern)
    assert time.perf_counter() - started < 5
