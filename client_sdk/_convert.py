"""Translation between the SDK's dataclasses and the ``mailer.v1`` protobuf messages.

One of the SDK's two modules that import ``mailerpb``, with
:mod:`client_sdk._operations`, which declares the calls these messages travel in. Pure
functions; values a newer server may add (unknown enum numbers) map to
``UNSPECIFIED`` instead of failing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from client_sdk.types import (
    Address,
    Attachment,
    BreakerState,
    ClusterStatus,
    CoordinatorInfo,
    CreatedWebhook,
    DeliveryEvent,
    EtcdMember,
    EventType,
    Header,
    Job,
    JobOptions,
    JobProgress,
    JobState,
    MessageContent,
    NodeInfo,
    NodeLoad,
    NodeState,
    Recipient,
    RecipientResult,
    RecipientStatus,
    RelayStatus,
    SmtpReply,
    Suppression,
    SuppressionReason,
    Webhook,
    WebhookState,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2

E = TypeVar("E")

_JOB_STATES: Mapping[int, JobState] = {
    common_pb2.JOB_STATE_UNSPECIFIED: JobState.UNSPECIFIED,
    common_pb2.JOB_STATE_QUEUED: JobState.QUEUED,
    common_pb2.JOB_STATE_RUNNING: JobState.RUNNING,
    common_pb2.JOB_STATE_PAUSED: JobState.PAUSED,
    common_pb2.JOB_STATE_COMPLETED: JobState.COMPLETED,
    common_pb2.JOB_STATE_CANCELLED: JobState.CANCELLED,
}
_RECIPIENT_STATUSES: Mapping[int, RecipientStatus] = {
    common_pb2.RECIPIENT_STATUS_UNSPECIFIED: RecipientStatus.UNSPECIFIED,
    common_pb2.RECIPIENT_STATUS_QUEUED: RecipientStatus.QUEUED,
    common_pb2.RECIPIENT_STATUS_DELIVERED: RecipientStatus.DELIVERED,
    common_pb2.RECIPIENT_STATUS_FAILED: RecipientStatus.FAILED,
    common_pb2.RECIPIENT_STATUS_DEFERRED: RecipientStatus.DEFERRED,
    common_pb2.RECIPIENT_STATUS_CANCELLED: RecipientStatus.CANCELLED,
    common_pb2.RECIPIENT_STATUS_SUPPRESSED: RecipientStatus.SUPPRESSED,
}
_SUPPRESSION_REASONS: Mapping[int, SuppressionReason] = {
    coordinator_pb2.SUPPRESSION_REASON_UNSPECIFIED: SuppressionReason.UNSPECIFIED,
    coordinator_pb2.SUPPRESSION_REASON_HARD_BOUNCE: SuppressionReason.HARD_BOUNCE,
    coordinator_pb2.SUPPRESSION_REASON_UNSUBSCRIBE: SuppressionReason.UNSUBSCRIBE,
    coordinator_pb2.SUPPRESSION_REASON_MANUAL: SuppressionReason.MANUAL,
    coordinator_pb2.SUPPRESSION_REASON_COMPLAINT: SuppressionReason.COMPLAINT,
}
_BREAKER_STATES: Mapping[int, BreakerState] = {
    common_pb2.BREAKER_STATE_UNSPECIFIED: BreakerState.UNSPECIFIED,
    common_pb2.BREAKER_STATE_CLOSED: BreakerState.CLOSED,
    common_pb2.BREAKER_STATE_OPEN: BreakerState.OPEN,
    common_pb2.BREAKER_STATE_HALF_OPEN: BreakerState.HALF_OPEN,
}
_NODE_STATES: Mapping[int, NodeState] = {
    coordinator_pb2.NODE_STATE_UNSPECIFIED: NodeState.UNSPECIFIED,
    coordinator_pb2.NODE_STATE_ACTIVE: NodeState.ACTIVE,
    coordinator_pb2.NODE_STATE_CORDONED: NodeState.CORDONED,
    coordinator_pb2.NODE_STATE_DRAINING: NodeState.DRAINING,
    coordinator_pb2.NODE_STATE_DISCONNECTED: NodeState.DISCONNECTED,
}
_EVENT_TYPES: Mapping[int, EventType] = {
    coordinator_pb2.EVENT_TYPE_UNSPECIFIED: EventType.UNSPECIFIED,
    coordinator_pb2.EVENT_TYPE_ACCEPTED: EventType.ACCEPTED,
    coordinator_pb2.EVENT_TYPE_DEFERRED: EventType.DEFERRED,
    coordinator_pb2.EVENT_TYPE_DELIVERED: EventType.DELIVERED,
    coordinator_pb2.EVENT_TYPE_FAILED: EventType.FAILED,
    coordinator_pb2.EVENT_TYPE_SUPPRESSED: EventType.SUPPRESSED,
    coordinator_pb2.EVENT_TYPE_CANCELLED: EventType.CANCELLED,
    coordinator_pb2.EVENT_TYPE_BOUNCED: EventType.BOUNCED,
    coordinator_pb2.EVENT_TYPE_COMPLAINED: EventType.COMPLAINED,
    coordinator_pb2.EVENT_TYPE_UNSUBSCRIBED: EventType.UNSUBSCRIBED,
}
_WEBHOOK_STATES: Mapping[int, WebhookState] = {
    coordinator_pb2.WEBHOOK_STATE_UNSPECIFIED: WebhookState.UNSPECIFIED,
    coordinator_pb2.WEBHOOK_STATE_ACTIVE: WebhookState.ACTIVE,
    coordinator_pb2.WEBHOOK_STATE_FAILING: WebhookState.FAILING,
    coordinator_pb2.WEBHOOK_STATE_DISABLED: WebhookState.DISABLED,
}


def _enum_from(table: Mapping[int, E], value: int, unknown: E) -> E:
    return table.get(value, unknown)


def _enum_to(table: Mapping[int, E], value: E) -> int:
    for number, member in table.items():
        if member == value:
            return number
    raise ValueError(f"no wire value for {value!r}")


def job_state_to_pb(state: JobState) -> common_pb2.JobState.ValueType:
    """The wire number of a job state."""
    return common_pb2.JobState.ValueType(_enum_to(_JOB_STATES, state))


def job_state_from_pb(value: int) -> JobState:
    """The job state of a wire number."""
    return _enum_from(_JOB_STATES, value, JobState.UNSPECIFIED)


def recipient_status_to_pb(status: RecipientStatus) -> common_pb2.RecipientStatus.ValueType:
    """The wire number of a recipient status."""
    return common_pb2.RecipientStatus.ValueType(_enum_to(_RECIPIENT_STATUSES, status))


def recipient_status_from_pb(value: int) -> RecipientStatus:
    """The recipient status of a wire number."""
    return _enum_from(_RECIPIENT_STATUSES, value, RecipientStatus.UNSPECIFIED)


def event_type_to_pb(event_type: EventType) -> coordinator_pb2.EventType.ValueType:
    """The wire number of an event type."""
    return coordinator_pb2.EventType.ValueType(_enum_to(_EVENT_TYPES, event_type))


def event_type_from_pb(value: int) -> EventType:
    """The event type of a wire number."""
    return _enum_from(_EVENT_TYPES, value, EventType.UNSPECIFIED)


def timestamp_to_pb(value: datetime) -> Timestamp:
    """A protobuf Timestamp; naive datetimes are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def _timestamp_from_pb(msg: Message, field: str) -> datetime | None:
    if not msg.HasField(field):
        return None
    ts: Timestamp = getattr(msg, field)
    return ts.ToDatetime(tzinfo=UTC)


def address_to_pb(address: Address) -> common_pb2.Address:
    """An Address message."""
    return common_pb2.Address(email=address.email, name=address.name)


def address_from_pb(msg: common_pb2.Address) -> Address | None:
    """An Address, or None when the message is empty."""
    if not msg.email:
        return None
    return Address(email=msg.email, name=msg.name)


def recipient_to_pb(recipient: Recipient) -> common_pb2.Recipient:
    """A Recipient message."""
    message = common_pb2.Recipient(email=recipient.email, name=recipient.name)
    # Maps are filled key by key: given to the constructor, a dict goes through the
    # Mapping ABC's update(), twice the cost, and a submit converts every recipient.
    if recipient.variables:
        variables = message.variables
        for key, value in recipient.variables.items():
            variables[key] = value
    if recipient.metadata:
        metadata = message.metadata
        for key, value in recipient.metadata.items():
            metadata[key] = value
    return message


def recipient_from_pb(msg: common_pb2.Recipient) -> Recipient:
    """A Recipient."""
    return Recipient(
        email=msg.email, name=msg.name, variables=dict(msg.variables), metadata=dict(msg.metadata)
    )


def content_to_pb(content: MessageContent) -> common_pb2.MessageContent:
    """A MessageContent message."""
    msg = common_pb2.MessageContent(
        subject=content.subject,
        text_body=content.text_body,
        html_body=content.html_body,
        headers=[common_pb2.Header(name=h.name, value=h.value) for h in content.headers],
        unsubscribe_url=content.unsubscribe_url,
        attachments=[
            common_pb2.Attachment(
                filename=a.filename, content_type=a.content_type, content=a.content
            )
            for a in content.attachments
        ],
        recipients_per_message=content.recipients_per_message,
    )
    # "from" is a Python keyword, so the generated class has no typed accessor.
    getattr(msg, "from").CopyFrom(address_to_pb(content.sender))
    if content.reply_to is not None:
        msg.reply_to.CopyFrom(address_to_pb(content.reply_to))
    return msg


def content_from_pb(msg: common_pb2.MessageContent) -> MessageContent:
    """A MessageContent."""
    sender = address_from_pb(getattr(msg, "from"))
    if sender is None:
        raise ValueError("message content without a From address")
    return MessageContent(
        sender=sender,
        subject=msg.subject,
        text_body=msg.text_body,
        html_body=msg.html_body,
        reply_to=address_from_pb(msg.reply_to) if msg.HasField("reply_to") else None,
        headers=tuple(Header(name=h.name, value=h.value) for h in msg.headers),
        unsubscribe_url=msg.unsubscribe_url,
        attachments=tuple(
            Attachment(filename=a.filename, content_type=a.content_type, content=a.content)
            for a in msg.attachments
        ),
        recipients_per_message=max(1, msg.recipients_per_message),
    )


def options_to_pb(options: JobOptions) -> coordinator_pb2.JobOptions:
    """A JobOptions message."""
    msg = coordinator_pb2.JobOptions(
        priority=options.priority, name=options.name, tags=list(options.tags)
    )
    if options.send_at is not None:
        msg.send_at.CopyFrom(timestamp_to_pb(options.send_at))
    if options.expires_at is not None:
        msg.expires_at.CopyFrom(timestamp_to_pb(options.expires_at))
    return msg


def options_from_pb(msg: coordinator_pb2.JobOptions) -> JobOptions:
    """A JobOptions."""
    return JobOptions(
        send_at=_timestamp_from_pb(msg, "send_at"),
        expires_at=_timestamp_from_pb(msg, "expires_at"),
        priority=msg.priority,
        name=msg.name,
        tags=tuple(msg.tags),
    )


def progress_from_pb(msg: common_pb2.JobProgress) -> JobProgress:
    """A JobProgress."""
    return JobProgress(
        job_id=msg.job_id,
        state=job_state_from_pb(msg.state),
        total=msg.total,
        queued=msg.queued,
        delivered=msg.delivered,
        failed=msg.failed,
        deferred=msg.deferred,
        cancelled=msg.cancelled,
        suppressed=msg.suppressed,
        created_at=_timestamp_from_pb(msg, "created_at"),
        updated_at=_timestamp_from_pb(msg, "updated_at"),
        finished_at=_timestamp_from_pb(msg, "finished_at"),
    )


def job_from_pb(msg: coordinator_pb2.Job, created: bool | None = None) -> Job:
    """A Job; ``created`` comes from a submit response."""
    progress = progress_from_pb(msg.progress)
    if not progress.job_id:
        progress = dataclasses.replace(progress, job_id=msg.job_id)
    return Job(
        job_id=msg.job_id,
        idempotency_key=msg.idempotency_key,
        progress=progress,
        options=options_from_pb(msg.options),
        content=content_from_pb(msg.content) if msg.HasField("content") else None,
        created=created,
    )


def _reply_from_pb(
    msg: common_pb2.RecipientResult | coordinator_pb2.Suppression | coordinator_pb2.DeliveryEvent,
) -> SmtpReply | None:
    """The message's ``reply`` field, None when unset."""
    if not msg.HasField("reply"):
        return None
    return SmtpReply(
        code=msg.reply.code, enhanced_code=msg.reply.enhanced_code, text=msg.reply.text
    )


def result_from_pb(msg: common_pb2.RecipientResult) -> RecipientResult:
    """A RecipientResult."""
    return RecipientResult(
        index=msg.index,
        email=msg.email,
        status=recipient_status_from_pb(msg.status),
        reply=_reply_from_pb(msg),
        reason=msg.reason,
        attempts=msg.attempts,
        node_id=msg.node_id,
        ambiguous=msg.ambiguous,
        updated_at=_timestamp_from_pb(msg, "updated_at"),
        message_id=msg.message_id,
        relay=msg.relay,
        metadata=dict(msg.metadata),
        feedback=msg.feedback,
    )


def event_from_pb(msg: coordinator_pb2.DeliveryEvent) -> DeliveryEvent:
    """A DeliveryEvent."""
    return DeliveryEvent(
        event_id=msg.event_id,
        type=event_type_from_pb(msg.type),
        time=_timestamp_from_pb(msg, "time"),
        job_id=msg.job_id,
        index=msg.index,
        email=msg.email,
        tenant=msg.tenant,
        message_id=msg.message_id,
        attempt=msg.attempt,
        node_id=msg.node_id,
        relay=msg.relay,
        reply=_reply_from_pb(msg),
        reason=msg.reason,
        next_attempt_at=_timestamp_from_pb(msg, "next_attempt_time"),
        metadata=dict(msg.metadata),
        tags=tuple(msg.tags),
    )


def stream_events_request(
    after_event_id: int, job_ids: Iterable[str], types: Iterable[EventType], tenant: str
) -> coordinator_pb2.StreamEventsRequest:
    """A StreamEventsRequest resuming after ``after_event_id``."""
    return coordinator_pb2.StreamEventsRequest(
        tenant=tenant,
        after_event_id=after_event_id,
        job_ids=list(job_ids),
        types=[event_type_to_pb(t) for t in types],
    )


def webhook_from_pb(msg: coordinator_pb2.Webhook) -> Webhook:
    """A Webhook (the wire message never holds the secret)."""
    return Webhook(
        webhook_id=msg.webhook_id,
        url=msg.url,
        tenant=msg.tenant,
        types=tuple(event_type_from_pb(t) for t in msg.types),
        state=_enum_from(_WEBHOOK_STATES, msg.state, WebhookState.UNSPECIFIED),
        created_at=_timestamp_from_pb(msg, "created_at"),
        delivered_event_id=msg.delivered_event_id,
        failed_attempts=msg.failed_attempts,
        failing_since=_timestamp_from_pb(msg, "failing_since"),
        next_attempt_at=_timestamp_from_pb(msg, "next_attempt_time"),
        last_error=msg.last_error,
    )


def created_webhook_from_pb(msg: coordinator_pb2.CreateWebhookResponse) -> CreatedWebhook:
    """The endpoint just created, with its secret."""
    return CreatedWebhook(webhook=webhook_from_pb(msg.webhook), secret=msg.secret)


def create_webhook_request(
    *, url: str, types: Iterable[EventType], tenant: str
) -> coordinator_pb2.CreateWebhookRequest:
    """A CreateWebhookRequest; the coordinator checks the URL."""
    return coordinator_pb2.CreateWebhookRequest(
        tenant=tenant, url=url, types=[event_type_to_pb(t) for t in types]
    )


def replay_webhook_request(
    *, webhook_id: str, from_event_id: int, tenant: str
) -> coordinator_pb2.ReplayWebhookRequest:
    """A ReplayWebhookRequest.

    Raises:
        ValueError: ``from_event_id`` is negative.
    """
    if from_event_id < 0:
        raise ValueError(f"from_event_id must not be negative, not {from_event_id}")
    return coordinator_pb2.ReplayWebhookRequest(
        tenant=tenant, webhook_id=webhook_id, from_event_id=from_event_id
    )


def _coordinator_from_pb(msg: coordinator_pb2.CoordinatorInfo) -> CoordinatorInfo:
    return CoordinatorInfo(coordinator_id=msg.coordinator_id, address=msg.address, epoch=msg.epoch)


def cluster_status_from_pb(msg: coordinator_pb2.GetClusterStatusResponse) -> ClusterStatus:
    """A ClusterStatus."""
    return ClusterStatus(
        leader=_coordinator_from_pb(msg.leader) if msg.HasField("leader") else None,
        standbys=tuple(_coordinator_from_pb(s) for s in msg.standbys),
        etcd_endpoints=tuple(msg.etcd_endpoints),
        active_jobs=msg.active_jobs,
        etcd_members=tuple(
            EtcdMember(
                endpoint=m.endpoint,
                healthy=m.healthy,
                is_leader=m.is_leader,
                db_size_bytes=m.db_size_bytes,
                revision=m.revision,
                error=m.error,
            )
            for m in msg.etcd_members
        ),
    )


def suppression_reason_to_pb(
    reason: SuppressionReason,
) -> coordinator_pb2.SuppressionReason.ValueType:
    """The wire number of a suppression reason."""
    return coordinator_pb2.SuppressionReason.ValueType(_enum_to(_SUPPRESSION_REASONS, reason))


def suppression_from_pb(msg: coordinator_pb2.Suppression) -> Suppression:
    """A Suppression."""
    return Suppression(
        email=msg.email,
        reason=_enum_from(_SUPPRESSION_REASONS, msg.reason, SuppressionReason.UNSPECIFIED),
        tenant=msg.tenant,
        reply=_reply_from_pb(msg),
        created_at=_timestamp_from_pb(msg, "created_at"),
    )


def node_from_pb(msg: coordinator_pb2.NodeInfo) -> NodeInfo:
    """A NodeInfo."""
    return NodeInfo(
        node_id=msg.node_id,
        address=msg.address,
        state=_enum_from(_NODE_STATES, msg.state, NodeState.UNSPECIFIED),
        load=NodeLoad(
            in_flight=msg.load.in_flight,
            capacity=msg.load.capacity,
            recent_latency_ms=msg.load.recent_latency_ms,
            recent_error_rate=msg.load.recent_error_rate,
        ),
        lease_ttl_remaining_s=msg.lease_ttl_remaining_s,
        breaker_state=_enum_from(_BREAKER_STATES, msg.breaker_state, BreakerState.UNSPECIFIED),
        relays=tuple(
            RelayStatus(
                address=r.address,
                breaker_state=_enum_from(
                    _BREAKER_STATES, r.breaker_state, BreakerState.UNSPECIFIED
                ),
                open_connections=r.open_connections,
            )
            for r in msg.relays
        ),
        batches_in_flight=msg.batches_in_flight,
        recipients_done=msg.recipients_done,
    )


def submit_request(
    content: MessageContent,
    recipients: Iterable[common_pb2.Recipient],
    idempotency_key: str,
    options: JobOptions | None,
) -> coordinator_pb2.SubmitJobRequest:
    """A SubmitJobRequest from already converted recipients."""
    req = coordinator_pb2.SubmitJobRequest(
        content=content_to_pb(content), recipients=recipients, idempotency_key=idempotency_key
    )
    if options is not None:
        req.options.CopyFrom(options_to_pb(options))
    return req


def upload_header(
    content: MessageContent, idempotency_key: str, options: JobOptions | None
) -> coordinator_pb2.UploadJobRequest:
    """The first message of an upload."""
    header = coordinator_pb2.UploadJobHeader(
        content=content_to_pb(content), idempotency_key=idempotency_key
    )
    if options is not None:
        header.options.CopyFrom(options_to_pb(options))
    return coordinator_pb2.UploadJobRequest(header=header)


def upload_chunk(recipients: Iterable[common_pb2.Recipient]) -> coordinator_pb2.UploadJobRequest:
    """A recipients message of an upload."""
    return coordinator_pb2.UploadJobRequest(
        recipients=coordinator_pb2.RecipientChunk(recipients=recipients)
    )
