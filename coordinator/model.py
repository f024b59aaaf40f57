"""Plain data the coordinator works with, and the JSON form of a job's spec.

Nothing here does I/O. Servicers convert protobuf to these types at the edge
(`_convert.py`); everything inside the coordinator speaks these.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

# A job's content is the message model the sender node compiles (one owner).
from mailers_runtime.message.model import Attachment as Attachment
from mailers_runtime.message.model import Content as Content
from mailers_runtime.message.model import Header as Header
from mailers_runtime.message.model import Mailbox

Address = Mailbox
"""A sender, reply-to or recipient mailbox: the message model's :class:`Mailbox`."""


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.CANCELLED)


class Status(enum.StrEnum):
    """Where one recipient stands. DELIVERED, FAILED, CANCELLED and SUPPRESSED are final."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEFERRED = "deferred"
    CANCELLED = "cancelled"
    SUPPRESSED = "suppressed"
    """On the tenant's suppression list at dispatch; never sent."""

    @property
    def final(self) -> bool:
        return self in (Status.DELIVERED, Status.FAILED, Status.CANCELLED, Status.SUPPRESSED)


_NONE: Mapping[str, str] = MappingProxyType({})
"""The default variables and metadata: empty, and shared, so read-only."""


class Recipient(NamedTuple):
    """A recipient of a job. A named tuple, not a frozen dataclass: the leader makes one
    per recipient at submit and again when it loads a batch, and a frozen dataclass sets
    each field through ``object.__setattr__`` (8.6k instructions to build one, by
    callgrind; see ``PendingRecipient``)."""

    email: str
    name: str = ""
    variables: Mapping[str, str] = _NONE
    metadata: Mapping[str, str] = _NONE
    """The caller's own data, returned with the recipient's results; never sent."""


@dataclasses.dataclass(frozen=True)
class JobOptions:
    send_at: float | None = None
    """Unix seconds before which nothing is sent."""
    expires_at: float | None = None
    """Unix seconds after which deferred recipients fail."""
    priority: int = 0
    name: str = ""
    tags: tuple[str, ...] = ()
    """The caller's labels of the job."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a job is; written once at submit and never changed."""

    job_id: str
    idempotency_key: str
    content: Content
    options: JobOptions
    total: int
    batch_size: int
    created_at: float
    tenant: str = ""
    """Owner of the job; "" for jobs submitted with auth off (and records from before
    tenants existed)."""
    bounce_domain: str = ""
    """The tenant's bounce domain at submit ("": the nodes' own)."""

    @property
    def batch_count(self) -> int:
        return (self.total + self.batch_size - 1) // self.batch_size


@dataclasses.dataclass
class Counts:
    """Recipients of a job by status; queued is whatever is not counted elsewhere."""

    total: int = 0
    delivered: int = 0
    failed: int = 0
    deferred: int = 0
    cancelled: int = 0
    suppressed: int = 0

    @property
    def queued(self) -> int:
        return self.total - self.done - self.deferred

    @property
    def done(self) -> int:
        return self.delivered + self.failed + self.cancelled + self.suppressed

    def add(self, status: Status, delta: int = 1) -> None:
        if status is Status.DELIVERED:
            self.delivered += delta
        elif status is Status.FAILED:
            self.failed += delta
        elif status is Status.DEFERRED:
            self.deferred += delta
        elif status is Status.CANCELLED:
            self.cancelled += delta
        elif status is Status.SUPPRESSED:
            self.suppressed += delta


@dataclasses.dataclass
class JobStatus:
    """The mutable part of a job."""

    state: JobState
    counts: Counts
    updated_at: float
    finished_at: float | None = None


@dataclasses.dataclass
class Result:
    """The latest outcome of one recipient."""

    status: Status
    code: int = 0
    enhanced_code: str = ""
    text: str = ""
    reason: str = ""
    attempts: int = 0
    node_id: str = ""
    ambiguous: bool = False
    updated_at: float = 0.0
    message_id: str = ""
    relay: str = ""


class RecipientOutcome(NamedTuple):
    """A node's report on one recipient: which job (by id), which recipient, the result
    (a named tuple: one is made per recipient reported). ``index`` hides the tuple's
    ``index()``, which nothing calls."""

    job_id: str
    index: int  # type: ignore[assignment]
    result: Result
    hard_bounce: bool = False
    """The result puts the address on its tenant's suppression list."""


class EventType(enum.IntEnum):
    """What happened to a recipient; the numbers are the store's and the API's."""

    ACCEPTED = 1
    DEFERRED = 2
    DELIVERED = 3
    FAILED = 4
    SUPPRESSED = 5
    CANCELLED = 6
    BOUNCED = 7
    COMPLAINED = 8
    UNSUBSCRIBED = 9


@dataclasses.dataclass(frozen=True)
class Event:
    """One state change of one recipient, as ``StreamEvents`` gives it."""

    event_id: int
    type: EventType
    at: float
    tenant: str
    job_id: str
    index: int
    """The recipient's place in the submitted list."""
    email: str
    attempt: int = 0
    code: int = 0
    enhanced_code: str = ""
    text: str = ""
    reason: str = ""
    node_id: str = ""
    relay: str = ""
    message_id: str = ""
    next_attempt_at: float | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """A job as the store holds it."""

    job_no: int
    """The store's own number for the job (recipient and batch rows refer to it)."""
    spec: JobSpec
    status: JobStatus
    cursor: int = 0
    """Batches below this seq have been handed out at least once."""
    duplicates: int = 0
    """Deliveries reported more than once (each one a message the relay got twice)."""


class PendingRecipient(NamedTuple):
    """A recipient still to be sent, as a batch is loaded for dispatch (a named tuple:
    one is made per recipient, 8.2k instructions as a frozen dataclass against about
    4k, by callgrind). ``index`` hides the tuple's ``index()``, which nothing calls."""

    index: int  # type: ignore[assignment]
    recipient: Recipient
    attempts: int
    suppressed: str | None = None
    """The tenant's suppression reason when the address is listed (never sent)."""


@dataclasses.dataclass(frozen=True)
class OpenBatch:
    """A batch handed out before and not done, as a new leader reads it."""

    seq: int
    node_id: str | None
    """Who holds it (None: nobody)."""
    attempt: int
    lost: int
    retry_at: float | None


# ---- JSON forms -------------------------------------------------------------------------


def _address_json(a: Address | None) -> list[str] | None:
    return None if a is None else [a.email, a.name]


def _address_from(v: Any) -> Address | None:
    return None if v is None else Address(email=v[0], name=v[1])


def dump_spec(spec: JobSpec) -> bytes:
    c = spec.content
    o = spec.options
    return json.dumps(
        {
            "job_id": spec.job_id,
            "idem": spec.idempotency_key,
            "content": {
                "from": _address_json(c.sender),
                "reply_to": _address_json(c.reply_to),
                "subject": c.subject,
                "text": c.text_body,
                "html": c.html_body,
                "headers": [[h.name, h.value] for h in c.headers],
                "unsubscribe_url": c.unsubscribe_url,
                "attachments": [
                    [a.filename, a.content_type, base64.b64encode(a.content).decode()]
                    for a in c.attachments
                ],
                "rpm": c.recipients_per_message,
            },
            "options": {
                "send_at": o.send_at,
                "expires_at": o.expires_at,
                "priority": o.priority,
                "name": o.name,
                "tags": list(o.tags),
            },
            "total": spec.total,
            "batch_size": spec.batch_size,
            "created_at": spec.created_at,
            "tenant": spec.tenant,
            "bounce_domain": spec.bounce_domain,
        },
        separators=(",", ":"),
    ).encode()


def load_spec(raw: bytes) -> JobSpec:
    d = json.loads(raw)
    c = d["content"]
    o = d["options"]
    sender = _address_from(c["from"])
    assert sender is not None
    return JobSpec(
        job_id=d["job_id"],
        idempotency_key=d["idem"],
        content=Content(
            sender=sender,
            reply_to=_address_from(c["reply_to"]),
            subject=c["subject"],
            text_body=c["text"],
            html_body=c["html"],
            headers=tuple(Header(n, v) for n, v in c["headers"]),
            unsubscribe_url=c["unsubscribe_url"],
            attachments=tuple(
                Attachment(f, t, base64.b64decode(b)) for f, t, b in c.get("attachments", [])
            ),
            recipients_per_message=c.get("rpm", 1),
        ),
        options=JobOptions(
            send_at=o["send_at"],
            expires_at=o["expires_at"],
            priority=o["priority"],
            name=o["name"],
            tags=tuple(o.get("tags", ())),
        ),
        total=d["total"],
        batch_size=d["batch_size"],
        created_at=d["created_at"],
        tenant=d.get("tenant", ""),
        bounce_domain=d.get("bounce_domain", ""),
    )
