"""The values a message is made from: mailboxes, attachments, a job's content, the
resource limits, the signer protocol, and :class:`RenderError`.

Plain frozen data that imports nothing but the standard library, so the coordinator
(checking a job at submit) and the sender node (rendering it) build the same inputs
without depending on each other or on the compiler's internals.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

from mailers_runtime.errors import PermanentError


class RenderError(PermanentError, ValueError):
    """A message cannot be rendered: a bad header, address, or template.

    Raised per job (bad content) or per recipient (bad address); either way the
    affected recipients fail permanently, since retrying renders the same bytes.
    """


# Attachment types a job may carry. Binary types are also checked by their magic bytes.
ATTACHMENT_TYPES = frozenset(
    (
        "application/pdf", "image/png", "image/jpeg", "image/gif", "image/webp",
        "text/plain", "text/csv", "text/calendar", "application/json",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
    )
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Mailbox:
    """An address with an optional display name."""

    email: str
    name: str = ""


class Header(NamedTuple):
    """An extra header a job sets (``X-Campaign: spring``); a ``(name, value)`` pair."""

    name: str
    value: str


@dataclasses.dataclass(frozen=True)
class Attachment:
    """A file every recipient receives, unchanged.

    Args:
        filename: Shown to the reader; non-ASCII is RFC 2231 encoded.
        content_type: ``type/subtype`` from :data:`ATTACHMENT_TYPES`.
        content: The raw bytes.
    """

    filename: str
    content_type: str
    content: bytes


@dataclasses.dataclass(frozen=True)
class Content:
    """A job's message before personalisation (the pure twin of ``MessageContent``).

    The one content model of the servers: the coordinator validates and stores it, the
    sender node compiles it. (The SDK has its own, ``client_sdk.MessageContent``: it
    ships apart.)
    """

    sender: Mailbox
    subject: str = ""
    text_body: str = ""
    html_body: str = ""
    reply_to: Mailbox | None = None
    headers: tuple[Header, ...] = ()
    unsubscribe_url: str = ""
    attachments: tuple[Attachment, ...] = ()
    recipients_per_message: int = 1
    """Above 1, every recipient gets the same message (see
    :meth:`~mailers_runtime.message.compiler.CompiledMessage.render_shared`), so the
    templates may not read per-recipient values."""


MAX_RECIPIENTS_PER_MESSAGE = 100
"""RFC 5321 §4.5.3.1.8: a relay must accept at least 100 recipients per transaction."""

SHARED_TO = "undisclosed-recipients:;"
"""The To header of a message several recipients share (their addresses stay private)."""


@dataclasses.dataclass(frozen=True)
class RenderLimits:
    """Resource bounds of compiling and rendering one job."""

    max_output_chars: int = 4_000_000
    """A rendered field (subject, a body, a header) longer than this fails the recipient."""
    max_value_chars: int = 100_000
    """Largest string a template may build with ``*``, ``join`` or ``replace``."""
    max_attachments: int = 10
    """Attachments per job."""
    max_attachment_bytes: int = 1_000_000
    """Total size of a job's attachments before base64; the job travels through etcd
    and in every batch, so keep it well below etcd's request limit (1.5 MiB)."""
    attachment_types: frozenset[str] = ATTACHMENT_TYPES
    """Allowed attachment content types."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{field.name} must be at least 1")


class MessageSigner(Protocol):
    """Signs a rendered message, e.g. :class:`sender_node.dkim.DkimSigner`."""

    def can_sign(self, domain: str) -> bool:
        """Whether there is a key for ``domain``."""
        ...

    def sign(self, message: bytes, domain: str) -> bytes:
        """``message`` with a signature header prepended."""
        ...
