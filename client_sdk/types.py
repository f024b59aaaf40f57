"""Typed values of the client API: what callers build and what the SDK returns.

Plain frozen dataclasses and enums, so no protobuf type leaks into user code;
``_convert`` is the only place that translates them to and from the wire.
Timestamps are timezone-aware ``datetime`` values in UTC, or ``None`` when unset.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


class JobState(enum.Enum):
    """Lifecycle of a job."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    """Accepted and durable; no recipient attempted yet."""
    RUNNING = "running"
    PAUSED = "paused"
    """Paused by an operator: no new SMTP transactions start."""
    COMPLETED = "completed"
    """Every recipient has a final outcome."""
    CANCELLED = "cancelled"
    """Recipients not yet sent ended as cancelled."""

    @property
    def is_final(self) -> bool:
        """True for states a job never leaves."""
        return self in (JobState.COMPLETED, JobState.CANCELLED)


class RecipientStatus(enum.Enum):
    """Where one recipient of a job stands."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    DELIVERED = "delivered"
    """The relay accepted the message. Final."""
    FAILED = "failed"
    """Permanently refused, or out of attempts. Final."""
    DEFERRED = "deferred"
    """A transient failure; it will be retried."""
    CANCELLED = "cancelled"
    """The job was cancelled before this recipient was sent. Final."""
    SUPPRESSED = "suppressed"
    """The address is on the tenant's suppression list; never sent. Final."""

    @property
    def is_final(self) -> bool:
        """True for statuses a recipient never leaves."""
        return self in (
            RecipientStatus.DELIVERED,
            RecipientStatus.FAILED,
            RecipientStatus.CANCELLED,
            RecipientStatus.SUPPRESSED,
        )


class SuppressionReason(enum.Enum):
    """Why an address is on a suppression list."""

    UNSPECIFIED = "unspecified"
    HARD_BOUNCE = "hard_bounce"
    """Added automatically after a permanent bad-mailbox refusal (5.1.x, 550/551/553)."""
    UNSUBSCRIBE = "unsubscribe"
    """The recipient unsubscribed (one-click or mailto:)."""
    MANUAL = "manual"
    COMPLAINT = "complaint"
    """The recipient reported the mail as spam (an ARF complaint from its provider)."""


class EventType(enum.Enum):
    """What happened to one recipient, as a :class:`DeliveryEvent` reports it."""

    UNSPECIFIED = "unspecified"
    """A type this SDK does not know (from a newer server)."""
    ACCEPTED = "accepted"
    """The recipient's batch was handed to a sender node for the first time."""
    DEFERRED = "deferred"
    """A transient failure (4xx, connection trouble); it will be retried."""
    DELIVERED = "delivered"
    """The relay accepted the message (250 after DATA)."""
    FAILED = "failed"
    """Permanently refused, out of attempts, expired, or lost too often."""
    SUPPRESSED = "suppressed"
    """On the tenant's suppression list when its turn came; never sent."""
    CANCELLED = "cancelled"
    """The job was cancelled before this recipient was sent."""
    BOUNCED = "bounced"
    """Reported later by the receiving side, as are complaints and unsubscribes."""
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"


class WebhookState(enum.Enum):
    """Where an endpoint's deliveries stand, as :class:`Webhook` reports it."""

    UNSPECIFIED = "unspecified"
    """A state this SDK does not know (from a newer server)."""
    ACTIVE = "active"
    """Delivering, or caught up."""
    FAILING = "failing"
    """The last delivery failed; it is tried again with backoff."""
    DISABLED = "disabled"
    """Failed for longer than the coordinator's retry horizon: nothing is sent until a
    replay (:meth:`MailerClient.replay_webhook`), and the backlog is kept."""


class NodeState(enum.Enum):
    """Scheduling state of a sender node, as operators set it."""

    UNSPECIFIED = "unspecified"
    ACTIVE = "active"
    CORDONED = "cordoned"
    DRAINING = "draining"
    DISCONNECTED = "disconnected"
    """Registered, but the leader has no open stream to it."""


class BreakerState(enum.Enum):
    """Circuit breaker state."""

    UNSPECIFIED = "unspecified"
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass(frozen=True)
class Address:
    """An RFC 5322 mailbox: an address with an optional display name."""

    email: str
    """The addr-spec, e.g. ``news@example.com``."""
    name: str = ""
    """Optional display name; non-ASCII is allowed."""

    def __post_init__(self) -> None:
        if "@" not in self.email:
            raise ValueError(f"not an email address: {self.email!r}")


@dataclasses.dataclass(frozen=True)
class Header:
    """An extra message header; the coordinator checks it against an allow-list."""

    name: str
    value: str


@dataclasses.dataclass(frozen=True)
class Recipient:
    """One recipient with the variables its message is personalised with."""

    email: str
    name: str = ""
    variables: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Template variables, referenced as ``{{ name }}`` in subject and bodies."""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Your own data (e.g. a customer id), returned with the recipient's results and
    never sent: at most 16 keys of letters, digits, ``_ - .`` up to 64 characters,
    values up to 256 characters, 1024 bytes in all."""


@dataclasses.dataclass(frozen=True)
class Attachment:
    """A file attached to every message of a job."""

    filename: str
    content_type: str
    """``type/subtype``, e.g. ``application/pdf``; checked against the content."""
    content: bytes


@dataclasses.dataclass(frozen=True)
class MessageContent:
    """What every recipient of a job receives, before personalisation."""

    sender: Address
    """The From mailbox."""
    subject: str = ""
    """Subject template."""
    text_body: str = ""
    """Plain text body template. At least one of text_body and html_body is required."""
    html_body: str = ""
    """HTML body template."""
    reply_to: Address | None = None
    headers: Sequence[Header] = ()
    unsubscribe_url: str = ""
    """When set, List-Unsubscribe and List-Unsubscribe-Post (RFC 8058) are added."""
    attachments: Sequence[Attachment] = ()
    """Files every recipient receives (type allow-list and size limits apply)."""
    recipients_per_message: int = 1
    """Above 1 (at most 100): every recipient gets the same message, and up to this many
    share one SMTP transaction. The templates may then not use per-recipient values
    (email, name, variables); To shows "undisclosed-recipients:;"."""

    def __post_init__(self) -> None:
        if not self.text_body and not self.html_body:
            raise ValueError("MessageContent needs text_body or html_body")


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """Per-job options."""

    send_at: datetime | None = None
    """Do not start sending before this time."""
    expires_at: datetime | None = None
    """Recipients still deferred at this time fail with the last reply recorded."""
    priority: int = 0
    """Higher runs first."""
    name: str = ""
    """Free-form label shown in listings (at most 200 characters)."""
    tags: Sequence[str] = ()
    """Your labels of the job, returned with it: at most 10, each 1 to 64 characters."""


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """Counts of a job's recipients by status."""

    job_id: str
    state: JobState
    total: int = 0
    queued: int = 0
    delivered: int = 0
    failed: int = 0
    deferred: int = 0
    cancelled: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    suppressed: int = 0

    @property
    def done(self) -> int:
        """Recipients with a final outcome: delivered, failed, cancelled or suppressed."""
        return self.delivered + self.failed + self.cancelled + self.suppressed

    @property
    def is_final(self) -> bool:
        """True once the job is completed, or cancelled and settled: every node that
        held part of it has stopped, and its unsent recipients are counted as cancelled
        (``finished_at`` is set then)."""
        if self.state is JobState.CANCELLED:
            return self.finished_at is not None
        return self.state.is_final


@dataclasses.dataclass(frozen=True)
class Job:
    """A job as the coordinator stores it."""

    job_id: str
    idempotency_key: str
    progress: JobProgress
    options: JobOptions = JobOptions()
    content: MessageContent | None = None
    """Absent in listings, which leave content out."""
    created: bool | None = None
    """Set by submit: False when the idempotency key matched an existing job."""

    @property
    def state(self) -> JobState:
        """The job's state, from its progress."""
        return self.progress.state


@dataclasses.dataclass(frozen=True)
class SmtpReply:
    """The SMTP reply that decided an outcome."""

    code: int
    """Three-digit reply code, 0 when no reply was received."""
    enhanced_code: str = ""
    text: str = ""

    def __str__(self) -> str:
        text = self.text
        if self.enhanced_code and text.startswith(self.enhanced_code):
            text = text[len(self.enhanced_code) :].lstrip()  # relays often repeat it
        parts = [str(self.code) if self.code else "no reply", self.enhanced_code, text]
        return " ".join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class RecipientResult:
    """Outcome of one recipient."""

    index: int
    """Position of the recipient in the job, from 0."""
    email: str
    status: RecipientStatus
    reply: SmtpReply | None = None
    reason: str = ""
    attempts: int = 0
    node_id: str = ""
    ambiguous: bool = False
    """True when the relay may have received the message twice."""
    updated_at: datetime | None = None
    message_id: str = ""
    """The Message-ID header of the message sent, with its angle brackets."""
    relay: str = ""
    """The relay (host:port) that gave the reply, when one did."""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The metadata the recipient was submitted with."""
    feedback: str = ""
    """What came back after the relay took the message: ``hard_bounce``,
    ``soft_bounce``, ``complaint`` or ``unsubscribe`` (the latest); "" when nothing did."""


@dataclasses.dataclass(frozen=True)
class DeliveryEvent:
    """One state change of one recipient, as :meth:`MailerClient.events` yields it."""

    event_id: int
    """Unique and increasing in the order events become visible (with gaps): the
    cursor to resume from (``events(after=event_id)``)."""
    type: EventType
    time: datetime | None
    """When it was recorded."""
    job_id: str
    index: int
    """The recipient's position in the job, from 0 (as in :class:`RecipientResult`)."""
    email: str
    tenant: str = ""
    message_id: str = ""
    """The Message-ID header of the message sent, with its angle brackets."""
    attempt: int = 0
    """SMTP transactions attempted for this recipient so far."""
    node_id: str = ""
    relay: str = ""
    """The relay (host:port) that gave the reply, when one did."""
    reply: SmtpReply | None = None
    """The SMTP reply that caused the event, if any."""
    reason: str = ""
    """Human readable reason, e.g. "job cancelled"."""
    next_attempt_at: datetime | None = None
    """Deferred events: when the recipient's batch may next be sent (as last scheduled)."""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The metadata the recipient was submitted with."""
    tags: Sequence[str] = ()
    """The job's tags."""


@dataclasses.dataclass(frozen=True)
class Webhook:
    """An HTTPS endpoint that receives a tenant's events as signed POSTs (Standard
    Webhooks), and where its deliveries stand. Never holds the signing secret, which
    only :class:`CreatedWebhook` carries, once."""

    webhook_id: str
    url: str
    tenant: str = ""
    types: Sequence[EventType] = ()
    """The event types sent; empty means every type."""
    state: WebhookState = WebhookState.UNSPECIFIED
    created_at: datetime | None = None
    delivered_event_id: int = 0
    """The id of the last event delivered: the endpoint's cursor. It starts at the last
    event recorded when the endpoint was created."""
    failed_attempts: int = 0
    """Failed attempts of the delivery in progress; 0 while deliveries succeed."""
    failing_since: datetime | None = None
    """When the delivery in progress first failed; None unless FAILING or DISABLED."""
    next_attempt_at: datetime | None = None
    """When a failing delivery is tried again."""
    last_error: str = ""
    """Why the last attempt failed (the HTTP status or the connection error)."""


@dataclasses.dataclass(frozen=True)
class CreatedWebhook:
    """What :meth:`MailerClient.create_webhook` returns: the endpoint and its signing
    secret, which the coordinator never shows again. The secret is left out of the
    repr, so logging the value does not leak it."""

    webhook: Webhook
    secret: str = dataclasses.field(repr=False)
    """``whsec_`` and the base64 key: verify each delivery's ``webhook-signature``
    with it (e.g. ``standardwebhooks.Webhook(secret).verify(body, headers)``)."""


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; pass next_page_token to get the next, empty when done."""

    items: Sequence[T]
    next_page_token: str = ""


@dataclasses.dataclass(frozen=True)
class CoordinatorInfo:
    """A coordinator process taking part in the election."""

    coordinator_id: str
    address: str
    epoch: int = 0


@dataclasses.dataclass(frozen=True)
class EtcdMember:
    """One configured etcd endpoint as the leader sees it."""

    endpoint: str
    healthy: bool = False
    """Answered a status request within the leader's short deadline."""
    is_leader: bool = False
    """The member is the etcd cluster's raft leader."""
    db_size_bytes: int = 0
    revision: int = 0
    error: str = ""
    """Why it is unhealthy, when it is."""


@dataclasses.dataclass(frozen=True)
class ClusterStatus:
    """The cluster as the leader sees it."""

    leader: CoordinatorInfo | None
    standbys: Sequence[CoordinatorInfo] = ()
    etcd_endpoints: Sequence[str] = ()
    active_jobs: int = 0
    etcd_members: Sequence[EtcdMember] = ()


@dataclasses.dataclass(frozen=True)
class Suppression:
    """An address a tenant never sends to."""

    email: str
    """Lower-cased."""
    reason: SuppressionReason
    tenant: str = ""
    reply: SmtpReply | None = None
    """The refusal that caused a hard bounce, if any."""
    created_at: datetime | None = None


@dataclasses.dataclass(frozen=True)
class NodeLoad:
    """Load a sender node reports about itself."""

    in_flight: int = 0
    capacity: int = 0
    recent_latency_ms: float = 0.0
    recent_error_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class RelayStatus:
    """One SMTP relay as a node sees it."""

    address: str
    breaker_state: BreakerState = BreakerState.UNSPECIFIED
    open_connections: int = 0


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """A sender node as the leader sees it."""

    node_id: str
    address: str = ""
    state: NodeState = NodeState.UNSPECIFIED
    load: NodeLoad = NodeLoad()
    lease_ttl_remaining_s: int = 0
    breaker_state: BreakerState = BreakerState.UNSPECIFIED
    relays: Sequence[RelayStatus] = ()
    batches_in_flight: int = 0
    recipients_done: int = 0
