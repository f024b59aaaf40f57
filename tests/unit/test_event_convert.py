"""Delivery events on the client side, without a server: the wire conversion, the
cursor a resumed stream continues from, when a subscription re-opens and what counts
as a reconnect, and how ``mailers events`` prints them."""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from client_sdk import (
    DeliveryEvent,
    EventType,
    FailedPreconditionError,
    NotFoundError,
    RetryPolicy,
    SmtpReply,
    UnavailableError,
    _convert,
)
from client_sdk import _operations as ops
from client_sdk._events import EventCursor
from client_sdk.errors import DeadlineExceededError
from client_sdk.retry import SETTLED_STREAM_S, LeaderRouter
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2
from mailers.events import EVENT_COLUMNS, EventPrinter, event_row, follow_line

AT = datetime(2026, 12, 6, 9, 30, 15, tzinfo=UTC)
JOB_ID = "0193a8c0f1d2-9f8e7d6c"


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _event(event_id: int, **kw: object) -> DeliveryEvent:
    base: dict[str, object] = {
        "event_id": event_id,
        "type": EventType.DELIVERED,
        "time": AT,
        "job_id": JOB_ID,
        "index": 3,
        "email": "ann@example.org",
    }
    return DeliveryEvent(**{**base, **kw})  # type: ignore[arg-type]


def test_an_event_converts_with_every_field() -> None:
    # Given a deferred event as the coordinator sends it
    msg = coordinator_pb2.DeliveryEvent(
        event_id=42,
        type=coordinator_pb2.EVENT_TYPE_DEFERRED,
        time=_timestamp(AT),
        tenant="acme",
        job_id=JOB_ID,
        index=7,
        email="bob@example.org",
        message_id=f"<{JOB_ID}.7@example.com>",
        attempt=2,
        node_id="node1",
        relay="127.0.0.1:2525",
        reply=common_pb2.SmtpReply(code=451, enhanced_code="4.7.1", text="try later"),
        reason="greylisted",
        next_attempt_time=_timestamp(AT + timedelta(minutes=5)),
        metadata={"crm": "c7"},
        tags=["news", "2026-12"],
    )
    # When it is converted
    event = _convert.event_from_pb(msg)
    # Then every field comes through, times UTC-aware
    assert event == DeliveryEvent(
        event_id=42,
        type=EventType.DEFERRED,
        time=AT,
        job_id=JOB_ID,
        index=7,
        email="bob@example.org",
        tenant="acme",
        message_id=f"<{JOB_ID}.7@example.com>",
        attempt=2,
        node_id="node1",
        relay="127.0.0.1:2525",
        reply=SmtpReply(451, "4.7.1", "try later"),
        reason="greylisted",
        next_attempt_at=AT + timedelta(minutes=5),
        metadata={"crm": "c7"},
        tags=("news", "2026-12"),
    )


def test_unset_reply_and_times_stay_none() -> None:
    event = _convert.event_from_pb(coordinator_pb2.DeliveryEvent(event_id=1))
    assert (event.reply, event.time, event.next_attempt_at) == (None, None, None)
    assert event.type is EventType.UNSPECIFIED


def test_every_wire_event_type_maps_to_its_own_member_and_back() -> None:
    values = coordinator_pb2.EventType.values()
    assert {_convert.event_type_from_pb(v) for v in values} == set(EventType)
    for value in values:
        assert _convert.event_type_to_pb(_convert.event_type_from_pb(value)) == value
    # A type a newer server adds is UNSPECIFIED, not an error
    assert _convert.event_type_from_pb(99) is EventType.UNSPECIFIED


def test_the_request_carries_cursor_filters_and_wire_types() -> None:
    request = ops.STREAM_EVENTS.request(
        17, ("j1", "j2"), (EventType.DELIVERED, EventType.FAILED), "acme"
    )
    assert request == coordinator_pb2.StreamEventsRequest(
        tenant="acme",
        after_event_id=17,
        job_ids=["j1", "j2"],
        types=[coordinator_pb2.EVENT_TYPE_DELIVERED, coordinator_pb2.EVENT_TYPE_FAILED],
    )
    response = coordinator_pb2.StreamEventsResponse(
        events=[coordinator_pb2.DeliveryEvent(event_id=i) for i in (18, 20)]
    )
    assert [e.event_id for e in ops.STREAM_EVENTS.convert(response)] == [18, 20]


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _cursor(
    after: int = 0, stream_s: float = 60.0
) -> tuple[EventCursor[None], LeaderRouter, Clock]:
    """A started subscription of job j1's deliveries, at a:1 then b:1, on a test clock."""
    clock, router = Clock(), LeaderRouter(["a:1", "b:1"])
    cursor = EventCursor(after, lambda c: None, job_ids=["j1"], types=[EventType.DELIVERED],
                         tenant="acme", stream_s=stream_s, clock=clock)  # fmt: skip
    cursor.start(router, RetryPolicy(max_elapsed=timedelta(seconds=30)), random.Random(1))
    return cursor, router, clock


def test_each_stream_resumes_after_the_last_event_taken_and_drops_repeats() -> None:
    # Given a cursor after event 10, whose first stream opens at a:1
    cursor, _, clock = _cursor(10)
    clock.now_s = 5.0
    assert cursor.request("a:1") == coordinator_pb2.StreamEventsRequest(
        tenant="acme", after_event_id=10, job_ids=["j1"],
        types=[coordinator_pb2.EVENT_TYPE_DELIVERED],
    )  # fmt: skip
    assert (cursor.address, cursor.open_since_s) == ("a:1", 5.0)
    # When a resumed stream repeats 9 and 10, then goes on with gaps
    taken = []
    for event in cursor.received("a:1", [_event(9), _event(10), _event(12), _event(15)]):
        taken.append(event.event_id)
        # Then the cursor is at each event as it is handed out, not ahead of it
        assert cursor.last_event_id == event.event_id
    assert taken == [12, 15]
    # And the next stream asks for what comes after the last one taken
    assert cursor.request("b:1").after_event_id == 15  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="negative"):
        _cursor(-1)


def _unavailable() -> UnavailableError:
    return UnavailableError("leadership changed", grpc.StatusCode.UNAVAILABLE)


def test_a_silent_stream_reaching_its_deadline_reopens_at_once_where_it_was() -> None:
    # Given a subscription open at a:1 for its whole deadline, without an event
    cursor, router, clock = _cursor(5)
    clock.now_s = 100.0
    cursor.request("a:1")
    deadline = DeadlineExceededError("deadline", grpc.StatusCode.DEADLINE_EXCEEDED)
    # When the stream ends by its deadline, long after the retry budget began
    clock.now_s = 160.0
    delay_s = cursor.ended("a:1", deadline, 0, 60.0)
    # Then it re-opens at once at the same address, counting no reconnect
    assert (delay_s, cursor.reconnects, router.current) == (0.0, 0, "a:1")
    assert (cursor.address, cursor.open_since_s) == ("", None)


def test_losing_an_accepted_stream_counts_a_reconnect_with_a_fresh_budget() -> None:
    # Given a stream that stayed open (silent) far longer than the retry budget
    cursor, router, clock = _cursor()
    clock.now_s = 1000.0
    # When it breaks with UNAVAILABLE (the leader died)
    delay_s = cursor.ended("a:1", _unavailable(), 0, 45.0)
    # Then it is a reconnect, retried after a backoff at the next address
    assert cursor.reconnects == 1
    assert 0 < delay_s <= 0.2 and router.current == "b:1"
    # And the refusals while no leader is known count against the budget, not as reconnects
    while True:
        clock.now_s += 1.0
        try:
            cursor.ended(router.current, _unavailable(), 0, 0.01)
        except UnavailableError:
            break
    assert cursor.reconnects == 1
    assert 1000.0 + 29 <= clock.now_s <= 1000.0 + 31


def test_a_standby_redirect_is_followed_at_once_without_a_reconnect() -> None:
    cursor, router, _ = _cursor()
    standby = FailedPreconditionError(
        "not the leader", grpc.StatusCode.FAILED_PRECONDITION, leader="c:1"
    )
    assert cursor.ended("a:1", standby, 0, 0.02) == 0.0
    assert (router.current, cursor.reconnects) == ("c:1", 0)


def test_a_permanent_error_ends_the_subscription() -> None:
    cursor, _, _ = _cursor()
    with pytest.raises(NotFoundError):
        cursor.ended("a:1", NotFoundError("no", grpc.StatusCode.NOT_FOUND), 0, 0.01)


def test_short_streams_count_as_accepted_after_their_whole_deadline() -> None:
    # Given streams shorter than the settling time (a test's short stream timeout)
    cursor, router, clock = _cursor(stream_s=1.0)
    deadline = DeadlineExceededError("deadline", grpc.StatusCode.DEADLINE_EXCEEDED)
    clock.now_s = 50.0
    # Then one that lasted its deadline is the periodic re-open, not a hung coordinator
    assert cursor.ended("a:1", deadline, 0, 1.0) == 0.0
    assert router.current == "a:1" and SETTLED_STREAM_S > 1.0
    # And one cut short by a deadline is a hung coordinator: the next address is tried
    assert cursor.ended("a:1", deadline, 0, 0.5) > 0 and router.current == "b:1"


def test_event_rows_keep_every_identifier_whole() -> None:
    # Given an event with a long address and a delivered reply
    event = _event(123456789, email="a.very.long.mailbox.name@subdomain.example.org",
                   reply=SmtpReply(250, "2.0.0", "Ok: queued"), metadata={"crm": "c3"},
                   tags=("news",))  # fmt: skip
    row = event_row(event)
    assert len(row) == len(EVENT_COLUMNS)
    # When it is printed as a --follow line, narrow or wide
    for wide in (False, True):
        line = follow_line(row, wide)
        # Then the id, job, address and code are whole, the reply text is the reason
        for cell in ("123456789", JOB_ID, event.email, "250", "Ok: queued"):
            assert cell in line
        assert ("crm=c3" in line) is wide
    header = follow_line([c.header for c in EVENT_COLUMNS], False)
    assert header.split() == ["id", "time", "type", "job", "#", "email", "code", "reason"]


def test_json_output_is_one_flushed_object_a_line() -> None:
    out = io.StringIO()
    printer = EventPrinter("json", follow=False, out=out)
    printer.start()
    for i in (1, 2):
        printer.event(_event(i, metadata={"crm": f"c{i}"}))
    printer.finish()
    lines = out.getvalue().splitlines()
    docs = [json.loads(line) for line in lines]
    assert [d["event_id"] for d in docs] == [1, 2]
    assert docs[0]["type"] == "delivered" and docs[0]["time"] == AT.isoformat()
    assert docs[1]["metadata"] == {"crm": "c2"} and docs[1]["job_id"] == JOB_ID
