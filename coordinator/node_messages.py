"""What the leader and a sender node tell each other, as the dispatcher sees it. Pure.

The node's stream (:mod:`coordinator.node_link`) and the registry's hand-back watch turn
the wire messages into these (:mod:`coordinator._convert`), and an :class:`OutboundBatch`
into the wire form, so the dispatcher works on plain data only.
"""

from __future__ import annotations

import dataclasses

from coordinator.model import Content, PendingRecipient, Result
from coordinator.timeouts import NodeLimits

ReportedResult = tuple[int, Result]
"""One recipient's outcome as a node reports it: (index, result)."""

HeldRef = tuple[str, int]
"""A batch attempt a node holds or releases: (batch id, attempt)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ResultsMessage:
    """Outcomes of recipients of one batch; seq orders a node's messages (0: none)."""

    batch_id: str
    seq: int
    results: tuple[ReportedResult, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class HelloMessage:
    """What a node says first on a stream: who it is, its limits, what it still holds."""

    node_id: str
    """As the node says it ("" when it did not)."""
    limits: NodeLimits
    replay: tuple[ResultsMessage, ...]
    """Results it sent before and that were not acknowledged."""
    held: frozenset[HeldRef]
    """The batch attempts it still holds; any other it was given is released."""


@dataclasses.dataclass(frozen=True, slots=True)
class AckMessage:
    """The node is done with a batch attempt (attempt 0: the one the leader knows)."""

    batch_id: str
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True)
class RejectedMessage:
    """The node refused a batch."""

    batch_id: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class HandbackMessage:
    """Results and released batches a node that could not reach the leader left in etcd."""

    results: tuple[ResultsMessage, ...]
    released: tuple[HeldRef, ...]
    held: frozenset[HeldRef] = frozenset()
    ended: tuple[int, int] | None = None
    """(epoch, stream_no): the node ended that stream and every earlier one, and the
    hand-back is complete, so what the leader sent on them and is in no list never
    reached the node (see ``NodeHandback`` in sender.proto)."""


@dataclasses.dataclass(frozen=True, slots=True)
class OutboundBatch:
    """A batch the leader hands to a node."""

    batch_id: str
    job_id: str
    epoch: int
    attempt: int
    content: Content
    """The job's content; the same object for every batch of a job."""
    recipients: tuple[PendingRecipient, ...]
    """Each with its index, recipient and attempts so far."""
    priority: int
    bounce_domain: str = ""
