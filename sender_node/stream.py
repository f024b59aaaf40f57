"""One ``Dispatch`` stream from a leader: its authority window and its outbound queue.

The servicer owns streams (``servicer.py`` states the protocol). A stream queues what
goes out as plain values (:data:`Outgoing`); the servicer converts them to protobuf as
it writes them. A stream is also the outbox's ``Link``: results and releases for the
current leader are queued here.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc

from sender_node.fencing import authority_until
from sender_node.model import BatchRef, Release
from sender_node.outbox import Greeting, ResultsMessage


@dataclasses.dataclass(frozen=True)
class Hello:
    """The stream's first message (``greeting``), or a refresh (``greeting`` None:
    relay states changed; it lists the held batches but replays nothing)."""

    greeting: Greeting | None
    held: tuple[BatchRef, ...] = ()


@dataclasses.dataclass(frozen=True)
class Load:
    """A load report, taken when it is written."""


@dataclasses.dataclass(frozen=True)
class Rejected:
    batch_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Results:
    message: ResultsMessage


@dataclasses.dataclass(frozen=True)
class Ack:
    release: Release


@dataclasses.dataclass(frozen=True)
class End:
    """The stream ends: with this status (None: OK)."""

    code: grpc.StatusCode | None
    details: str = ""


Outgoing = Hello | Load | Rejected | Results | Ack | End


class Stream:
    """A leader's stream: epoch, authority, the batches that came on it, the queue out.

    Args:
        epoch: The leader's epoch from ``open``.
        coordinator_id: Who opened it (for logs).
        max_authority_s: Upper bound of one grant of authority.
    """

    def __init__(self, epoch: int, coordinator_id: str, *, max_authority_s: float) -> None:
        self.epoch = epoch
        self.coordinator_id = coordinator_id
        self._max_authority_s = max_authority_s
        self.authority_until_s = 0.0
        self.renewed = asyncio.Event()
        """Set by every grant of authority."""
        self.out: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.batches: dict[str, BatchRef] = {}
        """Batches that came on this stream and are not released yet, by id."""
        self.current = True
        """No newer stream has replaced it."""
        self.ended = False
        self.half_closed = False
        """The leader sent all it will send (EOF); the stream ends once its batches are
        released."""

    def grant(self, now_s: float, authority_ms: int) -> None:
        """Authority from ``open`` or a heartbeat received at ``now_s``."""
        self.authority_until_s = max(
            self.authority_until_s, authority_until(now_s, authority_ms, self._max_authority_s)
        )
        self.renewed.set()

    def authorized(self, now_s: float) -> bool:
        return now_s < self.authority_until_s

    @property
    def open(self) -> bool:
        """It has not ended and the leader has not half-closed it."""
        return not (self.ended or self.half_closed)

    def send(self, item: Outgoing) -> None:
        if not self.ended:
            self.out.put_nowait(item)

    def end(self, code: grpc.StatusCode | None, details: str = "") -> None:
        """Queue the end (after what is queued already); idempotent."""
        if not self.ended:
            self.ended = True
            self.current = False
            self.out.put_nowait(End(code, details))

    # -- outbox.Link -----------------------------------------------------------------

    def send_results(self, message: ResultsMessage) -> None:
        self.send(Results(message))

    def send_release(self, release: Release) -> None:
        self.send(Ack(release))
