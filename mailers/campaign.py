"""``mailers send``: submit a CSV of recipients as one job, show its progress, summarise it.

The CSV needs an ``email`` column; ``name`` is optional, a column named ``meta.KEY``
becomes the recipient's metadata ``KEY`` (returned with its results, never sent), and
every other column becomes a template variable (``{{ column }}``). The file is checked in one pass
before anything is sent, then streamed to the cluster in chunks (read again on
a retried attempt, never held whole in one request). A row the cluster would refuse
(an address the coordinator does not accept, more fields than the header) is skipped
and listed, with its line and the reason, in ``<name>.rejects.csv`` next to the CSV;
``--strict`` refuses the whole file instead. Progress and errors go to stderr, the
summary (``--json``: one JSON object) to stdout. Progress is a rich
progress bar over delivered + failed + cancelled; the summary gives the counts,
the most frequent failure replies, each node's share and the throughput.

Pure parts (CSV reading, argument parsing, the summary) are separate from the
one async function that talks to the cluster, :func:`run_send`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import dataclasses
import email.utils
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from client_sdk import (
    Address,
    ClientTls,
    Header,
    JobOptions,
    JobProgress,
    JobState,
    MailerClient,
    MailerError,
    MessageContent,
    Recipient,
    RecipientResult,
    RecipientStatus,
)
from coordinator.validation import address_problem
from mailers.config import ConfigError, add_connection_arguments, resolve
from mailers.output import add_output_arguments, dump, output_format, stderr
from mailers_runtime.message.compiler import CompiledMessage
from mailers_runtime.message.model import Content, Mailbox, RenderError
from mailers_runtime.message.model import Header as RuntimeHeader

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_INTERRUPTED = 130

_EMAIL_RE = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")
_ADDRESS_RE = re.compile(r"<?[^\s<>@,;]+@[^\s<>,;]+>?")
_VARIABLE_RE = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*\}\}")


META = "meta."
"""Prefix of the CSV columns that hold metadata rather than template variables."""


class CampaignInputError(ValueError):
    """The CSV, a template or an argument is unusable; the message says where."""


@dataclasses.dataclass(frozen=True)
class Reject:
    """A row skipped because the cluster would refuse it."""

    line: int
    address: str
    reason: str


REJECT_COLUMNS = ("line", "email", "reason")


def reject_path(csv_path: Path) -> Path:
    """Where the rejected rows of ``csv_path`` are listed: ``<stem>.rejects.csv`` beside it."""
    return csv_path.with_name(f"{csv_path.stem}.rejects.csv")


@dataclasses.dataclass(frozen=True)
class CsvScan:
    """What a checking pass over the CSV found."""

    recipients: int
    """Recipients that will be sent (duplicates excluded)."""
    duplicates: int
    """Rows skipped because their address (case-insensitive) came earlier."""
    variables: frozenset[str]
    """Column names that become template variables."""
    rejected: int = 0
    """Rows skipped as invalid (listed in :attr:`reject_file`)."""
    reject_file: Path | None = None
    """Where the rejected rows are listed; None when there are none."""


@dataclasses.dataclass
class DuplicateCount:
    """Rows :func:`read_recipients` skipped as repeats."""

    value: int = 0


def read_recipients(
    f: TextIO,
    source: str = "<csv>",
    duplicates: DuplicateCount | None = None,
    rejects: Callable[[Reject], None] | None = None,
) -> Iterator[Recipient]:
    """Yield the recipients of a CSV, skipping repeated addresses (case-insensitive).

    Args:
        f: The CSV text (a header row first).
        source: Name used in error messages.
        duplicates: Counts the rows skipped as repeats, when given.
        rejects: When given, an invalid row (an address the coordinator would refuse,
            or more fields than the header) is passed to it and skipped; otherwise it
            ends the reading with an error.

    Raises:
        CampaignInputError: No ``email`` column; without ``rejects`` also an invalid
            row; the message gives the line.
    """
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        raise CampaignInputError(f"{source}: empty file, expected a header row") from None
    columns = [c.strip() for c in header]
    lowered = [c.lower() for c in columns]
    if "email" not in lowered:
        raise CampaignInputError(f"{source}:1: no 'email' column in header {columns!r}")
    email_i = lowered.index("email")
    name_i = lowered.index("name") if "name" in lowered else None
    meta_columns, var_columns = _data_columns(columns, (email_i, name_i))
    seen: set[str] = set()
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        row = row + [""] * (len(columns) - len(row))
        address = row[email_i].strip()
        problem = _row_problem(row, len(columns), address)
        if problem is not None:
            if rejects is None:
                raise CampaignInputError(f"{source}:{line}: {problem}")
            rejects(Reject(line, address, problem))
            continue
        key = address.lower()
        if key in seen:
            if duplicates is not None:
                duplicates.value += 1
            continue
        seen.add(key)
        yield Recipient(
            email=address,
            name=row[name_i].strip() if name_i is not None else "",
            variables={c: row[i] for i, c in var_columns},
            metadata={k: row[i] for i, k in meta_columns if row[i]},
        )


def _data_columns(
    columns: Sequence[str], taken: tuple[int, int | None]
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(place, key) of the metadata columns and (place, name) of the variable columns."""
    meta = [(i, c[len(META) :]) for i, c in enumerate(columns) if c.startswith(META)]
    variables = [
        (i, c)
        for i, c in enumerate(columns)
        if i not in taken and c != "" and not c.startswith(META)
    ]
    return meta, variables


def _row_problem(row: Sequence[str], columns: int, address: str) -> str | None:
    """Why the cluster would refuse a row (padded to the header), or None."""
    if len(row) > columns:
        return f"{len(row)} fields, the header has {columns}"
    if not address:
        return "no email address"
    if not _EMAIL_RE.match(address):
        return f"invalid email {address!r}"
    return address_problem(address)  # the coordinator's own rule; it names the address


def csv_variables(f: TextIO) -> frozenset[str]:
    """The columns of a CSV that become template variables."""
    header = next(csv.reader(f), [])
    return frozenset(
        c.strip()
        for c in header
        if c.strip()
        and c.strip().lower() not in ("email", "name")
        and not c.strip().startswith(META)
    )


def scan_csv(path: Path, strict: bool = False) -> CsvScan:
    """Check the whole CSV without keeping it. Unless ``strict``, invalid rows are
    listed in :func:`reject_path` (written only when there are some; an older list is
    removed when there are none).

    Raises:
        CampaignInputError: The file is missing or unreadable, has no ``email`` column,
            or (``strict``) holds an invalid row; the reject list cannot be written.
    """
    duplicates = DuplicateCount()
    rejected: list[Reject] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            variables = csv_variables(f)
            f.seek(0)
            found = read_recipients(f, str(path), duplicates, None if strict else rejected.append)
            sent = sum(1 for _ in found)
    except OSError as exc:
        raise CampaignInputError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CampaignInputError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    target = reject_path(path)
    try:
        if rejected:
            with target.open("w", encoding="utf-8", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(REJECT_COLUMNS)
                writer.writerows((r.line, r.address, r.reason) for r in rejected)
        else:
            target.unlink(missing_ok=True)
    except OSError as exc:
        raise CampaignInputError(f"{target}: {exc.strerror or exc}") from exc
    return CsvScan(
        recipients=sent,
        duplicates=duplicates.value,
        variables=variables,
        rejected=len(rejected),
        reject_file=target if rejected else None,
    )


def iter_recipients(path: Path, strict: bool = False) -> Iterator[Recipient]:
    """The recipients of the CSV at ``path``, read lazily (one factory call per attempt);
    invalid rows are skipped unless ``strict`` (:func:`scan_csv` listed them)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        yield from read_recipients(f, str(path), rejects=None if strict else _ignore)


def _ignore(reject: Reject) -> None:
    pass


def template_variables(*templates: str) -> set[str]:
    """Names referenced as ``{{ name }}`` in the templates."""
    names: set[str] = set()
    for t in templates:
        names.update(_VARIABLE_RE.findall(t))
    return names


def parse_mailbox(value: str, what: str) -> Address:
    """``"Name <a@b>"`` or ``"a@b"`` as an Address.

    Raises:
        CampaignInputError: Not a mailbox.
    """
    name, addr = email.utils.parseaddr(value)
    if not addr or not _EMAIL_RE.match(addr):
        raise CampaignInputError(f"{what}: not a mailbox: {value!r}")
    return Address(email=addr, name=name)


def parse_header(value: str) -> Header:
    """``"Name: value"`` as a Header.

    Raises:
        CampaignInputError: No colon or an empty name.
    """
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise CampaignInputError(f"--header: expected 'Name: value', got {value!r}")
    return Header(name=name.strip(), value=rest.strip())


def parse_time(value: str, what: str) -> datetime:
    """An ISO 8601 time; naive times are local.

    Raises:
        CampaignInputError: Not ISO 8601.
    """
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CampaignInputError(f"{what}: not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.astimezone()


@dataclasses.dataclass(frozen=True)
class SendArgs:
    """Everything ``mailers send`` needs, parsed and checked."""

    csv_path: Path
    content: MessageContent
    coordinators: tuple[str, ...]
    options: JobOptions = JobOptions()
    idempotency_key: str | None = None
    """None: the SDK makes one (printed, so a rerun can reuse it)."""
    wait: bool = True
    """False: submit, print the job id and return."""
    submit_timeout: timedelta = timedelta(minutes=10)
    top_failures: int = 5
    token: str | None = dataclasses.field(default=None, repr=False)
    """API token (``MAILER_TOKEN`` or the context's token file; never a flag: flags show
    in ``ps``)."""
    tls: ClientTls | None = None
    """TLS towards the coordinators (see :mod:`mailers.config`); None: plaintext."""
    strict: bool = False
    """Refuse the whole CSV at its first invalid row instead of skipping such rows."""


@dataclasses.dataclass(frozen=True)
class Summary:
    """The outcome of a send."""

    job_id: str
    state: JobState
    total: int
    delivered: int
    failed: int
    cancelled: int
    deferred: int
    top_failures: Sequence[tuple[str, int]]
    """Most frequent failure replies with their counts, most frequent first."""
    per_node: Mapping[str, int]
    """Results by the node that produced them (``""``: none, e.g. cancelled)."""
    elapsed_s: float
    """Wall time from the start of the upload to the final state."""
    duplicates_skipped: int = 0
    suppressed: int = 0
    """On the tenant's suppression list; never sent."""
    rejected: int = 0
    """Invalid rows skipped (listed in ``reject_file``)."""
    reject_file: Path | None = None

    def to_json(self) -> dict[str, object]:
        """The summary as ``mailers send --json`` prints it."""
        return {
            "job_id": self.job_id,
            "state": self.state.value,
            "total": self.total,
            "delivered": self.delivered,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "deferred": self.deferred,
            "suppressed": self.suppressed,
            "duplicate_rows_skipped": self.duplicates_skipped,
            "rejected_rows": self.rejected,
            "reject_file": str(self.reject_file) if self.reject_file else None,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_per_s": round(self.rate_per_s, 1),
            "top_failures": [{"reply": r, "count": n} for r, n in self.top_failures],
            "per_node": dict(self.per_node),
        }

    @property
    def rate_per_s(self) -> float:
        """Delivered messages per second of elapsed time."""
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0


def failure_key(result: RecipientResult) -> str:
    """A failure's reply with the recipient's address masked, so equal bounces group."""
    reply = result.reply
    if reply is None or not (reply.code or reply.text):
        return _ADDRESS_RE.sub("<address>", result.reason) or "no reply"
    text = reply.text.strip()
    if reply.enhanced_code and text.startswith(reply.enhanced_code):
        text = text[len(reply.enhanced_code) :].lstrip()
    text = _ADDRESS_RE.sub("<address>", text)
    parts = [str(reply.code) if reply.code else "no reply", reply.enhanced_code, text]
    return " ".join(p for p in parts if p)


class SummaryBuilder:
    """Folds recipient results into the counts of a :class:`Summary`."""

    def __init__(self) -> None:
        self._failures: collections.Counter[str] = collections.Counter()
        self._nodes: collections.Counter[str] = collections.Counter()

    def add(self, result: RecipientResult) -> None:
        """Count one recipient result."""
        self._nodes[result.node_id] += 1
        if result.status is RecipientStatus.FAILED:
            self._failures[failure_key(result)] += 1

    def build(
        self,
        final: JobProgress,
        elapsed_s: float,
        top_failures: int = 5,
        duplicates_skipped: int = 0,
    ) -> Summary:
        """The summary of a job whose last progress is ``final``."""
        return Summary(
            job_id=final.job_id,
            state=final.state,
            total=final.total,
            delivered=final.delivered,
            failed=final.failed,
            cancelled=final.cancelled,
            deferred=final.deferred,
            top_failures=self._failures.most_common(top_failures),
            per_node=dict(sorted(self._nodes.items(), key=lambda kv: (-kv[1], kv[0]))),
            elapsed_s=elapsed_s,
            duplicates_skipped=duplicates_skipped,
            suppressed=final.suppressed,
        )


def summarize(
    final: JobProgress,
    results: Iterable[RecipientResult],
    elapsed_s: float,
    top_failures: int = 5,
) -> Summary:
    """The summary of a job from its final progress and every recipient result."""
    builder = SummaryBuilder()
    for r in results:
        builder.add(r)
    return builder.build(final, elapsed_s, top_failures)


def render_summary(summary: Summary, console: Console) -> None:
    """Print the summary as tables."""
    console.print(f"[bold]Job {summary.job_id}[/]: {summary.state.value}")
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("recipients", str(summary.total))
    table.add_row("[green]delivered", str(summary.delivered))
    table.add_row("[red]failed", str(summary.failed))
    table.add_row("[yellow]cancelled", str(summary.cancelled))
    if summary.suppressed:
        table.add_row("[dim]suppressed", str(summary.suppressed))
    if summary.deferred:
        table.add_row("deferred", str(summary.deferred))
    if summary.duplicates_skipped:
        table.add_row("duplicate rows skipped", str(summary.duplicates_skipped))
    if summary.rejected:
        table.add_row("invalid rows skipped", f"{summary.rejected} ({summary.reject_file})")
    table.add_row("elapsed", f"{summary.elapsed_s:.1f} s")
    table.add_row("throughput", f"{summary.rate_per_s:.1f} msg/s")
    console.print(table)
    if summary.per_node:
        nodes = Table(title="Per node")
        nodes.add_column("node")
        nodes.add_column("results", justify="right")
        nodes.add_column("share", justify="right")
        counted = sum(summary.per_node.values()) or 1
        for node, count in summary.per_node.items():
            nodes.add_row(node or "(none)", str(count), f"{100.0 * count / counted:.1f}%")
        console.print(nodes)
    if summary.top_failures:
        failures = Table(title="Top failure replies")
        failures.add_column("reply")
        failures.add_column("count", justify="right")
        for reply, count in summary.top_failures:
            failures.add_row(reply, str(count))
        console.print(failures)


def _progress_bar(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _counts(p: JobProgress) -> str:
    return (
        f"[green]{p.delivered} delivered[/] [red]{p.failed} failed[/] "
        f"[yellow]{p.deferred} deferred[/]"
        + (f" [dim]{p.cancelled} cancelled[/]" if p.cancelled else "")
        + (f" [dim]{p.suppressed} suppressed[/]" if p.suppressed else "")
    )


def _scan(args: SendArgs, console: Console) -> CsvScan:
    """Scan the CSV before sending; warn of template variables no column fills.

    Raises:
        CampaignInputError: The CSV is invalid or holds no recipient.
    """
    scan = scan_csv(args.csv_path, args.strict)
    if scan.rejected:
        console.print(
            f"[yellow]skipped {scan.rejected} invalid rows[/] (line, address and reason in "
            f"{scan.reject_file}; --strict refuses the file instead)"
        )
    if scan.recipients == 0:
        raise CampaignInputError(f"{args.csv_path}: no recipients")
    c = args.content
    missing = template_variables(c.subject, c.text_body, c.html_body) - scan.variables
    missing -= {"email", "name"}
    if missing:
        console.print(
            f"[yellow]warning:[/] template variables without a CSV column: {sorted(missing)}"
        )
    return scan


async def _watch(
    client: MailerClient, job_id: str, first: JobProgress, progress: Progress, task: TaskID
) -> JobProgress:
    """Follow the job to its end on the progress bar; its last progress."""
    final = first
    async for p in client.watch(job_id):
        final = p
        progress.update(task, completed=p.done, total=p.total or None, counts=_counts(p))
    return final


async def run_send(
    args: SendArgs,
    console: Console,
    *,
    client: MailerClient | None = None,
    out: Console | None = None,
) -> Summary | None:
    """Submit the CSV as one job, watch it to the end and return its summary.

    Args:
        args: What to send and where.
        console: Where progress and messages are printed.
        client: A client to use (tests); else one of its own, closed on return.
        out: Where the summary tables go (``console`` when None; a ``quiet`` one: none).

    Returns:
        The summary; with ``args.wait`` False, of the job as it stood when submitted.

    Raises:
        CampaignInputError: The CSV is invalid (nothing was sent).
        MailerError: The cluster refused or could not be reached.
    """
    scan = _scan(args, console)
    own_client = client is None
    client = client or MailerClient(list(args.coordinators), token=args.token, tls=args.tls)
    try:
        started = time.monotonic()
        with _progress_bar(console) as progress:
            upload = progress.add_task("Uploading", total=scan.recipients, counts="")
            job = await client.submit(
                args.content,
                lambda: iter_recipients(args.csv_path, args.strict),
                idempotency_key=args.idempotency_key,
                options=args.options,
                on_progress=lambda n: progress.update(upload, completed=n),
                timeout=args.submit_timeout,
            )
            progress.update(upload, completed=scan.recipients)
            created = "created" if job.created is not False else "exists"
            key = job.idempotency_key or args.idempotency_key
            console.print(f"job [bold]{job.job_id}[/] {created} (idempotency key {key})")
            if not args.wait:
                return _summary(SummaryBuilder(), job.progress, time.monotonic() - started, scan)
            sending = progress.add_task(
                "Sending",
                total=job.progress.total or scan.recipients,
                counts=_counts(job.progress),
            )
            final = await _watch(client, job.job_id, job.progress, progress, sending)
        elapsed_s = time.monotonic() - started
        builder = SummaryBuilder()
        async for result in client.results(job.job_id):
            builder.add(result)
        summary = _summary(builder, final, elapsed_s, scan, args.top_failures)
        render_summary(summary, out or console)
        return summary
    finally:
        if own_client:
            await client.close()


def _summary(
    builder: SummaryBuilder, final: JobProgress, elapsed_s: float, scan: CsvScan, top: int = 0
) -> Summary:
    return dataclasses.replace(
        builder.build(final, elapsed_s, top, scan.duplicates),
        rejected=scan.rejected,
        reject_file=scan.reject_file,
    )


def add_send_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``send`` on a subparsers object; its handler is in ``func`` (:func:`main_send`)."""
    p = subparsers.add_parser(
        "send",
        help="send a CSV of recipients as one job and watch it",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--csv", required=True, type=Path, help="recipients: email[,name][,vars...]")
    p.add_argument("--from", dest="sender", required=True, help="'Name <addr>' or addr")
    p.add_argument("--subject", default="", help="subject template")
    p.add_argument("--text", type=Path, help="plain text body template file")
    p.add_argument("--html", type=Path, help="HTML body template file")
    p.add_argument("--reply-to", help="'Name <addr>' or addr")
    p.add_argument(
        "--header", action="append", default=[], help="extra header 'Name: value' (repeatable)"
    )
    p.add_argument("--unsubscribe-url", default="", help="adds List-Unsubscribe (RFC 8058)")
    p.add_argument("--name", default="", help="job label shown in listings")
    p.add_argument("--tag", action="append", default=[], help="a label of the job (repeatable)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first")
    p.add_argument("--send-at", help="ISO 8601 time; do not start before")
    p.add_argument("--expires-at", help="ISO 8601 time; deferred recipients fail after")
    p.add_argument("--idempotency-key", help="reuse to make a rerun return the same job")
    p.add_argument(
        "--submit-timeout", type=float, default=600.0, help="seconds for the upload (default 600)"
    )
    p.add_argument("--no-wait", action="store_true", help="submit, print the job id and exit")
    p.add_argument("--top-failures", type=int, default=5, help="failure replies to list")
    p.add_argument(
        "--strict", action="store_true", help="refuse the whole CSV if any row is invalid"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the CSV and templates and print the first message; send nothing",
    )
    add_connection_arguments(p, on_subcommand=True)
    add_output_arguments(p, on_subcommand=True)
    p.set_defaults(func=main_send)


def send_args_from(ns: argparse.Namespace, environ: Mapping[str, str]) -> SendArgs:
    """Check the parsed flags and read the template files.

    Raises:
        CampaignInputError: A flag or file is unusable.
    """
    text = _read_template(ns.text, "--text")
    html = _read_template(ns.html, "--html")
    if not text and not html:
        raise CampaignInputError("give --text or --html (or both)")
    content = MessageContent(
        sender=parse_mailbox(ns.sender, "--from"),
        subject=ns.subject,
        text_body=text,
        html_body=html,
        reply_to=parse_mailbox(ns.reply_to, "--reply-to") if ns.reply_to else None,
        headers=tuple(parse_header(h) for h in ns.header),
        unsubscribe_url=ns.unsubscribe_url,
    )
    options = JobOptions(
        send_at=parse_time(ns.send_at, "--send-at") if ns.send_at else None,
        expires_at=parse_time(ns.expires_at, "--expires-at") if ns.expires_at else None,
        priority=ns.priority,
        name=ns.name or ns.csv.stem,
        tags=tuple(ns.tag),
    )
    if ns.submit_timeout <= 0:
        raise CampaignInputError("--submit-timeout must be positive")
    try:
        connection = resolve(ns, environ)
    except ConfigError as exc:
        raise CampaignInputError(str(exc)) from None
    return SendArgs(
        csv_path=ns.csv,
        content=content,
        coordinators=connection.coordinators,
        options=options,
        idempotency_key=ns.idempotency_key,
        wait=not ns.no_wait,
        submit_timeout=timedelta(seconds=ns.submit_timeout),
        top_failures=ns.top_failures,
        token=connection.token,
        tls=connection.tls,
        strict=ns.strict,
    )


def _read_template(path: Path | None, what: str) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CampaignInputError(f"{what} {path}: {exc.strerror or exc}") from exc


def main_send(ns: argparse.Namespace) -> int:
    """Handler of ``mailers send``: run it and map the outcome to an exit code.

    0 when the job completed (failed recipients included) or was submitted
    (``--no-wait``) or checked (``--dry-run``), 3 when it was cancelled, 2 for unusable
    input, 1 when the cluster refused or was unreachable, 130 when interrupted (the job
    keeps running on the cluster). Progress and errors go to stderr; the summary (or
    with ``--dry-run`` the first message) to stdout.
    """
    # Messages are never wrapped: a path or an address must stay whole to be copied.
    console = stderr()
    fmt = output_format(ns)
    out = Console(quiet=fmt in ("json", "yaml"))
    try:
        args = send_args_from(ns, os.environ)
        if ns.dry_run:
            sys.stdout.write(dry_run(args, console))
            return EXIT_OK
        summary = asyncio.run(run_send(args, console, out=out))
    except CampaignInputError as exc:
        console.print(f"[red]error:[/] {exc}")
        return EXIT_USAGE
    except MailerError as exc:
        console.print(f"[red]error:[/] {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/] a submitted job keeps running on the cluster")
        return EXIT_INTERRUPTED
    if fmt in ("json", "yaml") and summary is not None:
        sys.stdout.write(dump(summary.to_json(), fmt))
    if summary is not None and summary.state is JobState.CANCELLED:
        return EXIT_CANCELLED
    return EXIT_OK


def dry_run(args: SendArgs, console: Console) -> str:
    """Check the CSV (listing invalid rows as a send would) and the templates, and
    render the message of the first recipient, as a sender node would, without any
    signature; nothing is sent.

    Raises:
        CampaignInputError: the CSV or the content is unusable.
    """
    scan = _scan(args, console)
    first = next(iter_recipients(args.csv_path, args.strict))
    c = args.content
    content = Content(
        sender=Mailbox(c.sender.email, c.sender.name),
        subject=c.subject,
        text_body=c.text_body,
        html_body=c.html_body,
        reply_to=Mailbox(c.reply_to.email, c.reply_to.name) if c.reply_to else None,
        headers=tuple(RuntimeHeader(h.name, h.value) for h in c.headers),
        unsubscribe_url=c.unsubscribe_url,
    )
    try:
        message = CompiledMessage("dry-run", content).render(
            index=0,
            email=first.email,
            name=first.name,
            variables=first.variables,
            date=datetime.now().astimezone(),
        )
    except RenderError as exc:
        raise CampaignInputError(f"the message cannot be rendered: {exc}") from None
    console.print(
        f"dry run: {scan.recipients} recipients would be sent"
        + (f", {scan.rejected} invalid rows skipped" if scan.rejected else "")
        + (f", {scan.duplicates} duplicate rows skipped" if scan.duplicates else "")
        + f"; the message of {first.email} follows, nothing was sent"
    )
    return message.decode("utf-8", "replace").replace("\r\n", "\n")
