"""Protobuf at the node's edge: wire messages to ``model`` values and back.

With ``servicer.py``, the only node module that imports ``mailerpb``. Results are
serialized once, when journaled (:func:`results_payload`); what goes on the wire later
is parsed back from those bytes (:func:`results_message`), so the journal, the wire
and a hand-back carry the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mailerpb.mailer.v1 import common_pb2, sender_pb2
from mailers_runtime import protomap
from mailers_runtime.breaker import BreakerState
from mailers_runtime.message import Attachment, Content, Header, Mailbox
from sender_node.classify import LoadSnapshot
from sender_node.config import NodeTimings
from sender_node.model import BatchRef, Recipient, Release, Result, Status, Work
from sender_node.outbox import Handback, ResultsMessage
from sender_node.smtp_client import RelayInfo

_STATUS = {
    Status.DELIVERED: common_pb2.RECIPIENT_STATUS_DELIVERED,
    Status.FAILED: common_pb2.RECIPIENT_STATUS_FAILED,
    Status.DEFERRED: common_pb2.RECIPIENT_STATUS_DEFERRED,
}

_BREAKER_STATE = {
    BreakerState.CLOSED: common_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: common_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: common_pb2.BREAKER_STATE_HALF_OPEN,
}


def content_from_proto(content: common_pb2.MessageContent) -> Content:
    """The pure rendering input for a job's ``MessageContent``."""
    reply_to = None
    if content.HasField("reply_to") and content.reply_to.email:
        reply_to = Mailbox(content.reply_to.email, content.reply_to.name)
    sender = getattr(content, "from")  # "from" is a Python keyword
    return Content(
        sender=Mailbox(sender.email, sender.name),
        subject=content.subject,
        text_body=content.text_body,
        html_body=content.html_body,
        reply_to=reply_to,
        headers=tuple(Header(h.name, h.value) for h in content.headers),
        unsubscribe_url=content.unsubscribe_url,
        attachments=tuple(
            Attachment(a.filename, a.content_type, a.content) for a in content.attachments
        ),
        recipients_per_message=max(1, content.recipients_per_message),
    )


def work_from_proto(batch: sender_pb2.Batch) -> Work:
    """The batch as the worker sees it."""
    return Work(
        ref=BatchRef(batch.batch_id, batch.attempt),
        job_id=batch.job_id,
        epoch=batch.epoch,
        priority=batch.priority,
        content=content_from_proto(batch.content),
        recipients=tuple(map(_recipient, batch.recipients)),
        bounce_domain=batch.bounce_domain,
    )


def _recipient(item: sender_pb2.BatchRecipient) -> Recipient:
    recipient = item.recipient
    # Positional, in Recipient's field order: keywords cost more, and this runs for
    # every recipient of every batch.
    return Recipient(
        item.index,
        recipient.email,
        recipient.name,
        protomap.to_dict(recipient.variables),
        item.attempts,
    )


def result_to_proto(result: Result) -> common_pb2.RecipientResult:
    return fill_result(common_pb2.RecipientResult(), result)


def fill_result(message: common_pb2.RecipientResult, result: Result) -> common_pb2.RecipientResult:
    """Set ``result``'s fields on ``message`` (an empty one, e.g. fresh from
    ``results.add()``: filled in place, nothing is copied) and return it."""
    message.index = result.index
    message.email = result.email
    message.status = _STATUS[result.status]
    message.reason = result.reason
    message.attempts = result.attempts
    message.node_id = result.node_id
    message.ambiguous = result.ambiguous
    message.relay = result.relay
    message.message_id = result.message_id
    reply = result.reply
    if reply is not None:
        message.reply.code = reply.code
        message.reply.enhanced_code = reply.enhanced_code
        message.reply.text = reply.text
    message.updated_at.FromNanoseconds(result.updated_at_ns)
    return message


def results_payload(seq: int, ref: BatchRef, results: Sequence[Result]) -> bytes:
    """The serialized ``BatchResults`` of one journal record.

    The recipients of a shared message share all but their index, address and attempts:
    each distinct rest is converted once and copied (a copy costs a quarter of a
    conversion)."""
    batch = sender_pb2.BatchResults(batch_id=ref.batch_id, attempt=ref.attempt, seq=seq)
    if len(results) == 1:  # a personalised message: nothing to share
        fill_result(batch.results.add(), results[0])
        return batch.SerializeToString()
    converted: dict[tuple[object, ...], common_pb2.RecipientResult] = {}
    for result in results:
        key = (
            result.status, result.reason, result.node_id, result.updated_at_ns,
            result.ambiguous, result.reply, result.relay, result.message_id,
        )  # fmt: skip
        template = converted.get(key)
        if template is None:
            template = converted[key] = result_to_proto(result)
        message = batch.results.add()
        message.CopyFrom(template)
        message.index = result.index
        message.email = result.email
        message.attempts = result.attempts
    return batch.SerializeToString()


def results_message(message: ResultsMessage) -> sender_pb2.BatchResults:
    """One wire message from consecutive records of a batch (concatenated protobuf
    merges: results append, the last record's seq wins)."""
    return sender_pb2.BatchResults.FromString(b"".join(message.payloads))


def batch_ack(release: Release) -> sender_pb2.BatchAck:
    return sender_pb2.BatchAck(
        batch_id=release.ref.batch_id,
        epoch=release.epoch,
        attempt=release.ref.attempt,
        unattempted=release.unattempted,
    )


def held_batches(refs: Sequence[BatchRef]) -> list[sender_pb2.HeldBatch]:
    return [sender_pb2.HeldBatch(batch_id=r.batch_id, attempt=r.attempt) for r in refs]


def node_timeouts(timings: NodeTimings) -> sender_pb2.NodeTimeouts:
    """The node's bounds in whole milliseconds, rounded up (the leader waits longer)."""
    return sender_pb2.NodeTimeouts(
        final_reply_ms=math.ceil(timings.final_reply_s * 1000),
        transaction_ms=math.ceil(timings.transaction_s * 1000),
    )


def node_load(in_flight: int, capacity: int, snapshot: LoadSnapshot) -> common_pb2.NodeLoad:
    return common_pb2.NodeLoad(
        in_flight=in_flight,
        capacity=capacity,
        recent_latency_ms=snapshot.latency_ms,
        recent_error_rate=snapshot.error_rate,
    )


def relay_statuses(relays: Sequence[RelayInfo]) -> list[common_pb2.RelayStatus]:
    return [
        common_pb2.RelayStatus(
            address=relay.address,
            breaker_state=_BREAKER_STATE[relay.breaker_state],
            open_connections=relay.open_connections,
        )
        for relay in relays
    ]


def hello(
    *,
    node_id: str,
    lease_id: int,
    load: common_pb2.NodeLoad,
    relays: Sequence[RelayInfo],
    timings: NodeTimings,
    replay: Sequence[ResultsMessage],
    held: Sequence[BatchRef],
) -> sender_pb2.NodeHello:
    """The node's hello (``replay`` is empty in one repeated mid-stream)."""
    return sender_pb2.NodeHello(
        node_id=node_id,
        lease_id=lease_id,
        load=load,
        relays=relay_statuses(relays),
        timeouts=node_timeouts(timings),
        replay=[results_message(m) for m in replay],
        held=held_batches(held),
    )


def handback(
    node_id: str, content: Handback, ended: tuple[int, int] | None
) -> sender_pb2.NodeHandback:
    """``ended`` is (epoch, stream_no) of the last stream opened, when every stream is
    ended and ``content`` is complete (see ``NodeHandback`` in sender.proto)."""
    message = sender_pb2.NodeHandback(
        node_id=node_id,
        results=[results_message(m) for m in content.results],
        released=held_batches(content.released),
        held=held_batches(content.held),
    )
    if ended is not None:
        message.ended.epoch, message.ended.stream_no = ended
    return message
