"""Plain values a sender node works with, free of protobuf.

The servicer converts wire messages to these at its edge (``_convert.py``) and back;
everything between (the batch worker, the result bookkeeping, the journal) sees only
these. Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import NamedTuple

from mailers_runtime.message import Content


class Status(enum.Enum):
    """What the node reports for a recipient (the wire's ``RecipientStatus``)."""

    DELIVERED = "delivered"
    FAILED = "failed"
    DEFERRED = "deferred"


class Reply(NamedTuple):
    """The SMTP reply that decided a recipient."""

    code: int
    enhanced_code: str
    text: str


class Result(NamedTuple):
    """The outcome of one recipient, as reported to the leader.

    A named tuple, not a frozen dataclass: one is made per recipient and transaction, and
    a frozen dataclass sets each of its eleven fields through ``object.__setattr__``
    (17.3k instructions to build one against 3.5k, by callgrind). Its ``index`` field
    hides the tuple's ``index()`` method, which nothing calls."""

    index: int  # type: ignore[assignment]
    email: str
    status: Status
    reason: str
    attempts: int
    """Attempts made for the recipient, this one included when it counted."""
    node_id: str
    updated_at_ns: int
    """Unix time, nanoseconds."""
    ambiguous: bool = False
    reply: Reply | None = None
    relay: str = ""
    message_id: str = ""
    """The Message-ID of the message sent (with angle brackets); empty when none was."""


class Recipient(NamedTuple):
    """A recipient of a batch with its position in the job (a named tuple, as
    :class:`Result`: one is made per recipient of every batch)."""

    index: int  # type: ignore[assignment]
    email: str
    name: str
    variables: Mapping[str, str]
    attempts: int
    """Attempts already made by earlier dispatches."""


@dataclasses.dataclass(frozen=True)
class BatchRef:
    """A batch as dispatched: its id and the dispatch attempt it came with."""

    batch_id: str
    attempt: int

    def key(self) -> str:
        """The journal's grouping key of the batch's records (see :meth:`from_key`)."""
        return f"{self.attempt}:{self.batch_id}"

    @classmethod
    def from_key(cls, key: str) -> BatchRef:
        """The ref a :meth:`key` was made from.

        Raises:
            ValueError: ``key`` was not made by :meth:`key`.
        """
        attempt, sep, batch_id = key.partition(":")
        if not sep or not attempt.lstrip("-").isdigit():
            raise ValueError(f"not a batch key: {key!r}")
        return cls(batch_id, int(attempt))


@dataclasses.dataclass(frozen=True)
class Work:
    """A batch to send: what ``Batch`` says, converted."""

    ref: BatchRef
    job_id: str
    epoch: int
    priority: int
    content: Content
    recipients: tuple[Recipient, ...]
    bounce_domain: str = ""
    """The job's tenant's bounce domain ("": the node's own)."""

    @property
    def batch_id(self) -> str:
        return self.ref.batch_id


@dataclasses.dataclass(frozen=True)
class Release:
    """A batch the node gives back: every recipient it attempted has a result; the
    ``unattempted`` others were never handed to a relay."""

    ref: BatchRef
    epoch: int
    unattempted: int
