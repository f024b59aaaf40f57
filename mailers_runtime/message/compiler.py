"""Compiling a job's content once, then splicing each recipient's message from bytes.

Pure and fast: a job's content is compiled once (:class:`CompiledMessage`, cached by
job id in :class:`TemplateCache`) into sandboxed templates and precomputed bytes (the
static headers, the MIME part headers, every attachment already base64-encoded); each
recipient's message is then spliced together from bytes, without building an
``email.message.EmailMessage``. :func:`check_templates` runs the same compilation and
returns its problems, which is what the coordinator needs at submit.

- ``Message-ID`` is ``<{job_id}.{index}@{domain of From}>``: the same recipient of the
  same job always gets the same id, which lets relays and readers drop duplicates.
- Multipart boundaries start with ``=_``, which neither quoted-printable nor base64
  output ever contains, so they cannot collide with a body.
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from jinja2 import meta, nodes
from jinja2.exceptions import TemplateSyntaxError

from mailers_runtime.message.headers import (
    CONTROL,
    check_address,
    format_mailbox,
    header_name_problem,
    header_text,
)
from mailers_runtime.message.mime import attachment_part
from mailers_runtime.message.model import (
    MAX_RECIPIENTS_PER_MESSAGE,
    SHARED_TO,
    Attachment,
    Content,
    Mailbox,
    MessageSigner,
    RenderError,
    RenderLimits,
)
from mailers_runtime.message.templates import (
    Environments,
    Field,
    Sandbox,
    compile_field,
    escape_html,
    url_quote,
)
from mailers_runtime.message.text import html_to_text, normalize_newlines

_MSGID_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")
_PART_HEAD = (
    b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'
)


def _header(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("ascii")


class _Compiled:
    """Everything compiled from one job's content, with the problems found."""

    def __init__(self, content: Content, limits: RenderLimits) -> None:
        self.problems: list[str] = []
        envs = Environments(limits)
        self.limits = limits
        self.envelope_from = self._try(lambda: check_address(content.sender.email), "from") or ""
        reply_to = content.reply_to.email if content.reply_to is not None else ""
        if reply_to:
            self._try(lambda: check_address(reply_to), "reply_to")
        self.static_head = b"" if self.problems else self._static_head(content)
        self.subject = self._field(envs.text, CONTROL.sub(" ", content.subject), "subject", None)
        text_source = content.text_body
        if not text_source and content.html_body:
            text_source = self._try(lambda: html_to_text(content.html_body), "html_body") or ""
            where = "text part derived from html_body"
        else:
            where = "text_body"
        self.text = self._field(envs.text, normalize_newlines(text_source), where, None)
        self.html = (
            self._field(envs.html, normalize_newlines(content.html_body), "html_body", escape_html)
            if content.html_body
            else None
        )
        self.headers = [
            (name, field)
            for i, (name, value) in enumerate(content.headers)
            if (field := self._header_field(envs.text, i, name, value)) is not None
            and not field.static
        ]
        self.unsubscribe = self._unsubscribe(envs.url, content.unsubscribe_url)
        self.attachments: list[bytes] = []
        self._attachments(content.attachments, limits)
        self._check_shared(content)

    def _check_shared(self, content: Content) -> None:
        if not 1 <= content.recipients_per_message <= MAX_RECIPIENTS_PER_MESSAGE:
            self.problems.append(
                f"recipients_per_message: must be between 1 and {MAX_RECIPIENTS_PER_MESSAGE}"
            )
        elif content.recipients_per_message > 1:
            used = sorted(template_variables(content))
            if used:
                self.problems.append(
                    "recipients_per_message: recipients share one message, so the templates "
                    f"may not use per-recipient values ({', '.join(used)})"
                )

    def _try(self, make: Callable[[], Any], where: str) -> Any:
        try:
            return make()
        except RenderError as exc:
            message = str(exc)
            self.problems.append(message if message.startswith(where) else f"{where}: {message}")
            return None

    def _field(
        self,
        env: Sandbox,
        source: str,
        where: str,
        escape: Callable[[str], str] | None,
        check: Callable[[nodes.Template], list[str]] | None = None,
    ) -> Field | None:
        field: Field | None = self._try(
            lambda: compile_field(env, source, where, escape, self.limits, check), where
        )
        return field

    def _static_head(self, content: Content) -> bytes:
        lines = [_header("From", format_mailbox(content.sender, "From"))]
        if content.reply_to is not None and content.reply_to.email:
            lines.append(_header("Reply-To", format_mailbox(content.reply_to, "Reply-To")))
        lines.append(b"MIME-Version: 1.0\r\n")
        for name, value in content.headers:
            if "{" not in value and header_name_problem(name) is None:
                lines.append(_header(name, header_text(name, value)))
        if content.unsubscribe_url.lower().startswith("https://"):
            lines.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
        return b"".join(lines)

    def _header_field(self, env: Sandbox, i: int, name: str, value: str) -> Field | None:
        where = f"headers[{i}]"
        problem = header_name_problem(name)
        if problem is not None:
            self.problems.append(f"{where}: {problem}")
            return None
        # TAB is whitespace in a header (it becomes a space); every other control is refused.
        if CONTROL.search(value.replace("\t", " ")):
            self.problems.append(f"{where}: header {name!r} has a control character in its value")
            return None
        if "{" not in value:
            # Static: already in the static head.
            return Field(where, (value,), (), None, None, self.limits.max_output_chars)
        return self._field(env, value, where, None)

    def _unsubscribe(self, env: Sandbox, url: str) -> Field | None:
        if not url:
            return None
        where = "unsubscribe_url"
        if not url.lower().startswith(("https://", "http://", "mailto:")):
            self.problems.append(f"{where}: must be an https, http or mailto URL")
            return None

        def literal_text(tree: nodes.Template) -> list[str]:
            for data in tree.find_all(nodes.TemplateData):
                if _URL_UNSAFE.search(data.data) or not data.data.isascii():
                    return ["unsubscribe URL must be ASCII without spaces, controls or <>"]
            return []

        return self._field(env, url, where, url_quote, literal_text)

    def _attachments(self, attachments: Sequence[Attachment], limits: RenderLimits) -> None:
        if len(attachments) > limits.max_attachments:
            self.problems.append(f"attachments: more than {limits.max_attachments}")
            return
        total = sum(len(a.content) for a in attachments)
        if total > limits.max_attachment_bytes:
            self.problems.append(
                f"attachments: {total} bytes in all, more than {limits.max_attachment_bytes}"
            )
            return
        for i, attachment in enumerate(attachments):
            where = f"attachments[{i}]"
            try:
                self.attachments.append(attachment_part(attachment, limits, where))
            except RenderError as exc:
                self.problems.append(str(exc))


def check_templates(content: Content, limits: RenderLimits | None = None) -> list[str]:
    """Every reason ``content`` cannot be compiled, or an empty list when it can.

    Pure and cheap enough to call at submit: it compiles the templates (syntax, the
    sandbox policy, unknown filters), and checks the addresses, header names and
    values, the unsubscribe URL and the attachments. Each problem names its field,
    e.g. ``"subject: line 1: unexpected '}'"``.
    """
    return _Compiled(content, limits or RenderLimits()).problems


def template_variables(content: Content) -> frozenset[str]:
    """The variable names the templates of ``content`` read (``email`` and ``name``
    included); empty for templates that do not parse."""
    env = Sandbox(RenderLimits())
    found: set[str] = set()
    sources = [content.subject, content.text_body, content.html_body, content.unsubscribe_url]
    sources.extend(value for _, value in content.headers)
    for source in sources:
        if source:
            try:
                found |= meta.find_undeclared_variables(env.parse(source))
            except TemplateSyntaxError:
                continue
    return frozenset(found)


class CompiledMessage:
    """A job's content compiled for fast per-recipient rendering.

    Args:
        job_id: The job; part of every Message-ID and the source of the boundaries.
        content: What every recipient receives.
        limits: Resource bounds of the templates and attachments.
        signer: Signs every message whose From domain it has a key for (DKIM).

    Raises:
        RenderError: the content is invalid; the message lists every problem
            :func:`check_templates` finds.
    """

    def __init__(
        self,
        job_id: str,
        content: Content,
        *,
        limits: RenderLimits | None = None,
        signer: MessageSigner | None = None,
    ) -> None:
        compiled = _Compiled(content, limits or RenderLimits())
        if compiled.problems:
            raise RenderError("; ".join(compiled.problems))
        assert compiled.subject is not None and compiled.text is not None
        self.job_id = job_id
        self.content = content
        self.envelope_from = compiled.envelope_from
        self.domain = self.envelope_from.rpartition("@")[2].lower()
        self._signer = signer if signer is not None and signer.can_sign(self.domain) else None
        self._msgid_prefix = _MSGID_UNSAFE.sub("-", job_id) or "job"
        self._subject = compiled.subject
        self._text = compiled.text
        self._html = compiled.html
        self._headers = [(name, field) for name, field in compiled.headers]
        self._unsubscribe = compiled.unsubscribe
        self._static_head = compiled.static_head
        digest = hashlib.sha256(job_id.encode("utf-8", "replace")).hexdigest()[:24].encode()
        self._date_key: int | None = None
        self._date_value = b""
        self._body_head, self._between, self._tail = self._skeleton(digest, compiled.attachments)
        # Bodies that do not depend on the recipient are encoded once.
        text = self._text
        self._text_qp = self._text_part(text.render_qp({})) if text.static else None
        html = self._html
        self._html_qp = html.render_qp({}) if html is not None and html.static else None

    def _skeleton(self, digest: bytes, attachments: list[bytes]) -> tuple[bytes, bytes, bytes]:
        """The bytes before the text body, between text and HTML, and after the last body."""
        alternative = b"=_mailers_a" + digest
        mixed = b"=_mailers_m" + digest
        if self._html is None:
            head = _PART_HEAD % b"plain" + b"\r\n"
            between = b""
            tail = b""
        else:
            # The CRLF before a boundary line belongs to the delimiter, not to the part,
            # so each part gets one of its own: decoded bodies end exactly as their
            # templates.
            head = (
                b'Content-Type: multipart/alternative;\r\n boundary="'
                + alternative
                + b'"\r\n\r\n--'
                + alternative
                + b"\r\n"
                + _PART_HEAD % b"plain"
                + b"\r\n"
            )
            between = b"\r\n--" + alternative + b"\r\n" + _PART_HEAD % b"html" + b"\r\n"
            tail = b"\r\n--" + alternative + b"--\r\n"
        if not attachments:
            return head, between, tail
        mixed_head = (
            b'Content-Type: multipart/mixed;\r\n boundary="'
            + mixed
            + b'"\r\n\r\n--'
            + mixed
            + b"\r\n"
        )
        if self._html is None:
            # A text/plain entity inside multipart/mixed: its CRLF is the delimiter's.
            tail = b"\r\n"
        parts = b"".join(b"\r\n--" + mixed + b"\r\n" + part for part in attachments)
        return (
            mixed_head + head,
            between,
            tail.removesuffix(b"\r\n") + parts + (b"\r\n--" + mixed + b"--\r\n"),
        )

    def _text_part(self, encoded: bytes) -> bytes:
        """The encoded text body as it goes into the message."""
        if self._html is None and not self._tail and not encoded.endswith(b"\r\n"):
            # A single-part message should end in CRLF.
            encoded += b"\r\n"
        return encoded

    def message_id(self, index: int, *, shared: bool = False) -> str:
        """The Message-ID, with angle brackets, of the message of the recipient at
        ``index`` in the job, or (``shared``) of the shared message of the group that
        starts at ``index`` (see :meth:`render_shared`)."""
        return f"<{self._msgid_prefix}.{'g' if shared else ''}{index}@{self.domain}>"

    @property
    def recipients_per_message(self) -> int:
        """How many recipients may share one message and transaction (1: none share)."""
        return self.content.recipients_per_message

    def render_shared(self, *, first_index: int, date: datetime) -> bytes:
        """The one message a group of recipients shares (``recipients_per_message`` > 1).

        The templates use no per-recipient values (checked at compile time), To is
        :data:`SHARED_TO`, and the Message-ID is ``<{job_id}.g{first_index}@{domain}>``:
        deterministic for the group that starts at ``first_index``.

        Raises:
            RenderError: the job does not share messages.
        """
        if self.recipients_per_message <= 1:
            raise RenderError("this job renders one message per recipient")
        return self._assemble(
            {},
            date,
            to=_header("To", SHARED_TO),
            message_id=self.message_id(first_index, shared=True),
        )

    def _date(self, date: datetime) -> bytes:
        key = int(date.timestamp())
        if key != self._date_key:
            self._date_key = key
            self._date_value = _header("Date", format_datetime(date.replace(microsecond=0)))
        return self._date_value

    def render(
        self,
        *,
        index: int,
        email: str,
        name: str,
        variables: Mapping[str, str],
        date: datetime,
        unsubscribe: str = "",
    ) -> bytes:
        """The full message for one recipient, ready for SMTP DATA (before dot-stuffing).

        Args:
            index: The recipient's position in the job (goes into the Message-ID).
            email: The recipient's address.
            name: The recipient's display name, possibly empty.
            variables: The recipient's template variables.
            date: The Date header; must be timezone-aware.
            unsubscribe: The cluster's own one-click ``List-Unsubscribe`` value for this
                recipient (``<https://...>, <mailto:...>``, ASCII), used when the job
                gives no ``unsubscribe_url``; with it goes ``List-Unsubscribe-Post``.

        Raises:
            RenderError: the recipient's address is invalid, or a template failed for
                this recipient's values (see
                :class:`~mailers_runtime.message.templates.Field`).
        """
        values = {"email": email, "name": name}
        values.update(variables)
        return self._assemble(
            values,
            date,
            to=_header("To", format_mailbox(Mailbox(email, name))),
            message_id=self.message_id(index),
            unsubscribe=unsubscribe,
        )

    def _assemble(
        self,
        values: Mapping[str, str],
        date: datetime,
        *,
        to: bytes,
        message_id: str,
        unsubscribe: str = "",
    ) -> bytes:
        head = [
            self._date(date),
            self._static_head,
            to,
            _header("Subject", header_text("Subject", self._subject.render(values))),
            _header("Message-ID", message_id),
        ]
        for header_name, field in self._headers:
            head.append(_header(header_name, header_text(header_name, field.render(values))))
        if self._unsubscribe is not None:
            url = self._unsubscribe.render(values)
            if _URL_UNSAFE.search(url) or not url.isascii():
                raise RenderError("unsubscribe URL renders with spaces, controls or <>")
            head.append(_header("List-Unsubscribe", f"<{url}>"))
        elif unsubscribe:
            head.append(_header("List-Unsubscribe", unsubscribe))
            head.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
        text = self._text_qp
        head.append(self._body_head)
        head.append(text if text is not None else self._text_part(self._text.render_qp(values)))
        if self._html is not None:
            head.append(self._between)
            markup = self._html_qp
            head.append(markup if markup is not None else self._html.render_qp(values))
        head.append(self._tail)
        message = b"".join(head)
        if self._signer is not None:
            return self._signer.sign(message, self.domain)
        return message


class TemplateCache:
    """Compiled messages by job id, least recently used evicted first.

    A job's content never changes, but the cache still compares it so a reused job
    id can never render stale content.

    Args:
        max_jobs: How many jobs' compiled messages to keep.
        limits: Passed to every :class:`CompiledMessage`.
        signer: Passed to every :class:`CompiledMessage` (DKIM), None to not sign.
    """

    def __init__(
        self,
        max_jobs: int = 64,
        *,
        limits: RenderLimits | None = None,
        signer: MessageSigner | None = None,
    ) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self._max_jobs = max_jobs
        self._limits = limits or RenderLimits()
        self._signer = signer
        self._entries: collections.OrderedDict[str, CompiledMessage] = collections.OrderedDict()

    def get(self, job_id: str, content: Content) -> CompiledMessage:
        """The compiled message for ``job_id``, compiling it on first use.

        Raises:
            RenderError: the content is invalid (see :class:`CompiledMessage`).
        """
        compiled = self._entries.get(job_id)
        if compiled is not None and compiled.content == content:
            self._entries.move_to_end(job_id)
            return compiled
        compiled = CompiledMessage(job_id, content, limits=self._limits, signer=self._signer)
        self._entries[job_id] = compiled
        self._entries.move_to_end(job_id)
        while len(self._entries) > self._max_jobs:
            self._entries.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._entries)
