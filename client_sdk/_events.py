"""An event subscription's state, shared by the async and the blocking event iterators.

The clients open the streams and sleep between them; :class:`EventCursor` builds each
stream's request (resuming after the last event yielded), drops what a resumed stream
repeats, counts the streams lost, and asks
:meth:`client_sdk.retry.CallAttempts.subscription_ended` when to re-open. No I/O; the
clock can be replaced (tests).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from google.protobuf.message import Message

from client_sdk import _operations as ops
from client_sdk.errors import MailerError
from client_sdk.retry import CallAttempts, LeaderRouter, RetryPolicy
from client_sdk.types import DeliveryEvent, EventType

G = TypeVar("G")


class EventCursor(Generic[G]):
    """Where an event subscription stands.

    Attributes:
        last_event_id: The id of the last event yielded (``after`` before the first).
            Each new stream resumes after it; so can a new subscription, e.g. in another
            process (``events(after=last_event_id)``).
        reconnects: How many times a stream that the leader had accepted was lost (a
            failover, a broken connection, the server ending it) and opened again. The
            periodic re-open (:attr:`ClientConfig.watch_stream_timeout`) is not counted,
            nor are redirects while the first stream looks for the leader.
        address: The coordinator the stream in flight is open at; "" between streams
            (while the leader is looked for, or during a backoff).
        open_since_s: When the stream in flight was opened (by the clock given); None
            between streams.
        stream_s: How long each stream lasts before it is re-opened.
    """

    def __init__(
        self,
        after: int,
        run: Callable[[EventCursor[G]], G],
        *,
        job_ids: Iterable[str],
        types: Iterable[EventType],
        tenant: str,
        stream_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start after event ``after`` (0: the oldest event kept); the filters are those
        of :meth:`client_sdk.MailerClient.events`. ``run(self)`` makes the generator of
        the events, which the iterator classes step.

        Raises:
            ValueError: ``after`` is negative.
        """
        if after < 0:
            raise ValueError(f"after must not be negative, not {after}")
        self.last_event_id = after
        self.reconnects = 0
        self.address = ""
        self.open_since_s: float | None = None
        self.stream_s = stream_s
        self._filters = (tuple(job_ids), tuple(types), tenant)
        self._clock = clock
        self._attempts: CallAttempts | None = None
        self._events = run(self)

    def start(self, router: LeaderRouter, policy: RetryPolicy, rng: random.Random) -> None:
        """The iteration begins: its retries are decided from now on, by ``policy``."""
        self._attempts = CallAttempts.subscription(
            router, policy, rng, self._clock(), self.stream_s
        )

    def request(self, address: str) -> Message:
        """The request of a stream opening now at ``address``: it resumes after the cursor."""
        self.address = address
        self.open_since_s = self._clock()
        return ops.STREAM_EVENTS.request(self.last_event_id, *self._filters)

    def received(self, address: str, events: Iterable[DeliveryEvent]) -> Iterator[DeliveryEvent]:
        """The events of a message of the stream at ``address`` that are above the cursor,
        moving the cursor to each as it is taken.

        A stream resumed after a failover starts after the cursor, so nothing is yielded
        twice; an event at or below it (which a server may repeat) is dropped.
        """
        self._started().progressed(address, self._clock())
        for event in events:
            if event.event_id > self.last_event_id:
                self.last_event_id = event.event_id
                yield event

    def ended(self, address: str, error: MailerError | None, received: int, open_s: float) -> float:
        """Seconds to wait before re-opening after the stream at ``address`` ended (see
        :data:`client_sdk.retry.StreamEnded`), counting a reconnect when it was lost.

        Raises:
            MailerError: The subscription cannot go on (see
                :meth:`CallAttempts.subscription_ended`).
        """
        self.address = ""
        self.open_since_s = None
        delay_s, lost = self._started().subscription_ended(
            address, error, received, open_s, self._clock()
        )
        if lost:
            self.reconnects += 1
        return delay_s

    def _started(self) -> CallAttempts:
        if self._attempts is None:
            raise RuntimeError("the subscription has not started")
        return self._attempts
