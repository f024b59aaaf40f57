"""A batch on its way from the leader to a node: what the node reads is what the
leader meant to send, recipient by recipient."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator._convert import BatchEncoder
from coordinator.model import Address, Content, PendingRecipient, Recipient
from coordinator.node_messages import OutboundBatch
from mailerpb.mailer.v1 import sender_pb2
from sender_node._convert import work_from_proto

CONTENT = Content(sender=Address("news@example.com", "News"), subject="Hi", text_body="Hi")

_PENDING = st.builds(
    lambda index, name, variables, attempts: PendingRecipient(
        index=index,
        recipient=Recipient(f"user{index}@example.org", name, variables),
        attempts=attempts,
    ),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["", "Ada Lovelace", "Zoë"]),
    st.dictionaries(st.sampled_from(["code", "city", ""]), st.text(max_size=5), max_size=3),
    st.integers(0, 5),
)


@given(st.lists(_PENDING, max_size=10))
def test_a_node_reads_each_recipient_as_the_leader_sent_it(
    pending: list[PendingRecipient],
) -> None:
    # Given a batch of recipients, with and without names and variables
    batch = OutboundBatch("j1:4", "j1", 7, 2, CONTENT, tuple(pending), priority=3)
    # When the leader encodes it and a node reads the bytes
    wire = BatchEncoder().encode(batch).SerializeToString()
    work = work_from_proto(sender_pb2.Batch.FromString(wire))
    # Then the node has every recipient, in order, with all it needs to send
    assert (work.ref.batch_id, work.ref.attempt, work.job_id, work.epoch) == ("j1:4", 2, "j1", 7)
    assert work.priority == 3
    assert [(r.index, r.email, r.name, r.variables, r.attempts) for r in work.recipients] == [
        (p.index, p.recipient.email, p.recipient.name, p.recipient.variables, p.attempts)
        for p in pending
    ]
