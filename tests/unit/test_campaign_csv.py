"""Unit tests of ``mailers send``'s pure parts: CSV reading, flags, the summary."""

from __future__ import annotations

import argparse
import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from client_sdk import (
    Address,
    Header,
    JobProgress,
    JobState,
    RecipientResult,
    RecipientStatus,
    SmtpReply,
)
from mailers.campaign import (
    EXIT_USAGE,
    CampaignInputError,
    DuplicateCount,
    add_send_parser,
    iter_recipients,
    main_send,
    parse_header,
    parse_mailbox,
    parse_time,
    read_recipients,
    reject_path,
    scan_csv,
    send_args_from,
    summarize,
    template_variables,
)


def recipients_of(text: str) -> list[tuple[str, str, dict[str, str]]]:
    return [(r.email, r.name, dict(r.variables)) for r in read_recipients(io.StringIO(text))]


def test_email_name_and_other_columns_become_variables() -> None:
    text = "Email,Name,plan,city\na@example.com,Ann,pro,Oslo\nb@example.com,,free,\n"
    assert recipients_of(text) == [
        ("a@example.com", "Ann", {"plan": "pro", "city": "Oslo"}),
        ("b@example.com", "", {"plan": "free", "city": ""}),
    ]


def test_name_column_is_optional_and_short_rows_are_padded() -> None:
    assert recipients_of("email,plan\n a@example.com \n") == [("a@example.com", "", {"plan": ""})]


def test_quoted_fields_with_commas_and_newlines_survive() -> None:
    text = 'email,name,note\na@example.com,"Doe, Jane","two\nlines"\n'
    assert recipients_of(text) == [("a@example.com", "Doe, Jane", {"note": "two\nlines"})]


def test_repeated_addresses_are_skipped_case_insensitively_and_counted() -> None:
    counted = DuplicateCount()
    text = "email\na@example.com\nA@Example.com\nb@example.com\n\n"
    got = [r.email for r in read_recipients(io.StringIO(text), duplicates=counted)]
    assert got == ["a@example.com", "b@example.com"]
    assert counted.value == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("name,plan\nAnn,pro\n", "no 'email' column"),
        ("email,name\na@example.com,Ann\nnot-an-address,Bob\n", "<csv>:3: invalid email"),
        ("email\na@example.com,extra\n", "<csv>:2: 2 fields, the header has 1"),
    ],
)
def test_invalid_csv_names_the_line(text: str, message: str) -> None:
    with pytest.raises(CampaignInputError, match=message):
        list(read_recipients(io.StringIO(text)))


def test_scan_counts_without_keeping_and_handles_a_bom(tmp_path: Path) -> None:
    # Given a CSV saved by a spreadsheet (BOM, CRLF) with one duplicate
    path = tmp_path / "list.csv"
    path.write_bytes(
        (
            "\ufeffemail,name,plan\r\n"
            "a@example.com,A,x\r\nb@example.com,B,y\r\na@example.com,A,x\r\n"
        ).encode()
    )
    # When it is scanned and read
    scan = scan_csv(path)
    # Then
    assert (scan.recipients, scan.duplicates) == (2, 1)
    assert scan.variables == frozenset({"plan"})
    assert [r.email for r in iter_recipients(path)] == ["a@example.com", "b@example.com"]


def test_scan_reports_a_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(CampaignInputError, match="No such file"):
        scan_csv(tmp_path / "missing.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"email\n\xff\xfe\xfa@example.com\n")
    with pytest.raises(CampaignInputError, match="not UTF-8"):
        scan_csv(binary)


def test_template_variables_and_flag_parsers() -> None:
    assert template_variables("Hi {{ name }}", "{{plan}} and {{ plan }} {not}") == {"name", "plan"}
    assert parse_mailbox("Exämple News <news@example.com>", "--from") == Address(
        "news@example.com", "Exämple News"
    )
    assert parse_mailbox("news@example.com", "--from") == Address("news@example.com")
    with pytest.raises(CampaignInputError, match="--from"):
        parse_mailbox("News", "--from")
    assert parse_header("X-Campaign:  spring ") == Header("X-Campaign", "spring")
    with pytest.raises(CampaignInputError):
        parse_header("no colon")
    assert parse_time("2030-01-02T03:04:05+00:00", "--send-at") == datetime(
        2030, 1, 2, 3, 4, 5, tzinfo=UTC
    )
    assert parse_time("2030-01-02T03:04:05", "--send-at").tzinfo is not None
    with pytest.raises(CampaignInputError, match="--send-at"):
        parse_time("tomorrow", "--send-at")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mailers")
    add_send_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_send_flags_build_send_args(tmp_path: Path) -> None:
    # Given templates on disk and every flag
    (tmp_path / "body.txt").write_text("Hello {{ name }}")
    (tmp_path / "body.html").write_text("<p>Hello</p>")
    ns = _parse(
        [
            "send",
            "--csv", str(tmp_path / "spring.csv"),
            "--from", "News <news@example.com>",
            "--subject", "Hi {{ name }}",
            "--text", str(tmp_path / "body.txt"),
            "--html", str(tmp_path / "body.html"),
            "--reply-to", "help@example.com",
            "--header", "X-Campaign: spring",
            "--priority", "5",
            "--send-at", "2030-01-01T00:00:00+00:00",
            "--coordinators", "h:1,h:2",
            "--idempotency-key", "spring-2030",
            "--no-wait",
        ]
    )  # fmt: skip
    # When they are checked
    args = send_args_from(ns, {})
    # Then
    assert ns.func is main_send
    assert args.content.sender == Address("news@example.com", "News")
    assert args.content.text_body == "Hello {{ name }}" and args.content.html_body == "<p>Hello</p>"
    assert args.content.reply_to == Address("help@example.com")
    assert tuple(args.content.headers) == (Header("X-Campaign", "spring"),)
    assert args.options.priority == 5 and args.options.name == "spring"
    assert args.options.send_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert args.coordinators == ("h:1", "h:2")
    assert args.idempotency_key == "spring-2030" and args.wait is False
    assert args.submit_timeout == timedelta(minutes=10)


def test_send_needs_a_body(tmp_path: Path) -> None:
    ns = _parse(["send", "--csv", "x.csv", "--from", "a@example.com", "--subject", "s"])
    with pytest.raises(CampaignInputError, match="--text or --html"):
        send_args_from(ns, {})


def test_main_send_rejects_a_bad_csv_before_contacting_anyone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "body.txt").write_text("Hello")
    (tmp_path / "list.csv").write_text("email\nnot-an-address\n")
    ns = _parse(
        [
            "send",
            "--csv", str(tmp_path / "list.csv"),
            "--from", "a@example.com",
            "--text", str(tmp_path / "body.txt"),
            # Nothing listens here: reaching the network would fail differently.
            "--coordinators", "127.0.0.1:9",
        ]
    )  # fmt: skip
    # Skipped as invalid, it leaves nothing to send; --strict names it instead
    assert main_send(ns) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "skipped 1 invalid rows" in err and "no recipients" in err
    ns.strict = True
    assert main_send(ns) == EXIT_USAGE
    captured = capsys.readouterr()
    assert "list.csv:2: invalid email 'not-an-address'" in captured.err
    assert captured.out == ""


def test_invalid_rows_are_skipped_and_listed_with_line_and_reason(tmp_path: Path) -> None:
    # Given a CSV with rows the coordinator would refuse among good ones
    path = tmp_path / "list.csv"
    path.write_text(
        "email,name\n"
        "a@example.com,A\n"
        "not-an-address,B\n"
        "jöhn@example.com,C\n"
        "c@example.com,C,extra\n"
        ",D\n"
        "d@example.com,D\n"
    )
    # When it is scanned and read
    scan = scan_csv(path)
    # Then the good rows are sent and each bad one is listed once, by line
    assert (scan.recipients, scan.rejected) == (2, 4)
    assert [r.email for r in iter_recipients(path)] == ["a@example.com", "d@example.com"]
    assert scan.reject_file == reject_path(path) == tmp_path / "list.rejects.csv"
    listed = list(csv.reader(scan.reject_file.open()))
    assert listed[0] == ["line", "email", "reason"]
    assert [(int(line), email) for line, email, _ in listed[1:]] == [
        (3, "not-an-address"),
        (4, "jöhn@example.com"),
        (5, "c@example.com"),
        (6, ""),
    ]
    assert "non-ASCII local part" in listed[2][2] and "3 fields" in listed[3][2]
    # And a later scan of a clean file removes the old list
    path.write_text("email\na@example.com\n")
    assert scan_csv(path).reject_file is None and not reject_path(path).exists()


def test_strict_refuses_the_file_at_its_first_invalid_row(tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text("email\na@example.com\nx@-bad-.example\nnot-an-address\n")
    with pytest.raises(
        CampaignInputError, match=r"list.csv:3: 'x@-bad-.example' is not a valid email address"
    ):
        scan_csv(path, strict=True)
    assert not reject_path(path).exists()


def test_dry_run_renders_the_first_recipient_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "body.txt").write_text("Hello {{ name }}, your plan is {{ plan }}.")
    (tmp_path / "list.csv").write_text("email,name,plan\nbad,X,none\nann@example.com,Ann,pro\n")
    ns = _parse(
        [
            "send", "--csv", str(tmp_path / "list.csv"), "--from", "News <news@example.com>",
            "--subject", "Hi {{ name }}", "--text", str(tmp_path / "body.txt"), "--dry-run",
            # Nothing listens here: a dry run contacts nobody.
            "--coordinators", "127.0.0.1:9",
        ]
    )  # fmt: skip
    assert main_send(ns) == 0
    captured = capsys.readouterr()
    assert "To: Ann <ann@example.com>" in captured.out
    assert "Subject: Hi Ann" in captured.out
    assert "Hello Ann, your plan is pro." in captured.out
    assert "1 recipients would be sent, 1 invalid rows skipped" in captured.err


def test_summary_counts_failures_and_node_shares() -> None:
    # Given a final progress and the per-recipient results
    final = JobProgress(
        job_id="j1", state=JobState.COMPLETED, total=6, delivered=2, failed=3, cancelled=1
    )

    def bounce(address: str) -> SmtpReply:
        return SmtpReply(550, "5.1.1", f"5.1.1 <{address}>: Recipient address rejected")

    results = [
        RecipientResult(0, "a@x", RecipientStatus.DELIVERED, node_id="n1"),
        RecipientResult(1, "b@x", RecipientStatus.FAILED, reply=bounce("b@x.org"), node_id="n1"),
        RecipientResult(2, "c@x", RecipientStatus.DELIVERED, node_id="n2"),
        RecipientResult(3, "d@x", RecipientStatus.FAILED, reply=bounce("d@x.org"), node_id="n2"),
        RecipientResult(
            4, "e@x", RecipientStatus.FAILED, reason="connection refused", node_id="n2"
        ),
        RecipientResult(5, "f@x", RecipientStatus.CANCELLED),
    ]
    # When summarised over two seconds
    summary = summarize(final, results, elapsed_s=2.0)
    # Then
    assert (summary.delivered, summary.failed, summary.cancelled) == (2, 3, 1)
    # Bounces differing only in the address group together, the code said once
    assert list(summary.top_failures) == [
        ("550 5.1.1 <address>: Recipient address rejected", 2),
        ("connection refused", 1),
    ]
    assert dict(summary.per_node) == {"n2": 3, "n1": 2, "": 1}
    assert list(summary.per_node) == ["n2", "n1", ""]
    assert summary.rate_per_s == 1.0


def test_meta_columns_become_metadata_not_variables(tmp_path: Path) -> None:
    # Given a CSV whose meta.* columns hold the caller's own ids
    path = tmp_path / "list.csv"
    path.write_text("email,name,plan,meta.customer,meta.list\na@example.com,A,pro,C-1,spring\n"
                    "b@example.com,B,free,,spring\n")  # fmt: skip
    # When it is read
    scan = scan_csv(path)
    got = list(iter_recipients(path))
    # Then they are metadata (empty cells left out), never template variables
    assert scan.variables == frozenset({"plan"})
    assert [dict(r.metadata) for r in got] == [
        {"customer": "C-1", "list": "spring"},
        {"list": "spring"},
    ]
    assert [dict(r.variables) for r in got] == [{"plan": "pro"}, {"plan": "free"}]


def test_tags_come_from_repeated_tag_flags(tmp_path: Path) -> None:
    (tmp_path / "body.txt").write_text("Hi")
    ns = _parse(["send", "--csv", str(tmp_path / "l.csv"), "--from", "a@example.com",
                 "--text", str(tmp_path / "body.txt"),
                 "--tag", "newsletter", "--tag", "2026-12"])  # fmt: skip
    assert send_args_from(ns, {}).options.tags == ("newsletter", "2026-12")
