"""SyncMailerClient driven by grpcio-testing: each test scripts the servers' answers.

The client call runs in a background thread; the test thread takes each RPC the
client makes from a testing channel (one per coordinator address) and answers it.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Generic, TypeVar

import grpc
import grpc_testing
import pytest

from client_sdk import (
    Address,
    ClientConfig,
    DeadlineExceededError,
    InvalidArgumentError,
    JobState,
    MessageContent,
    PermanentError,
    Recipient,
    RetryPolicy,
    SyncMailerClient,
    TransientError,
    UnavailableError,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2

T = TypeVar("T")

_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["MailerService"]
SUBMIT = _SERVICE.methods_by_name["SubmitJob"]
UPLOAD = _SERVICE.methods_by_name["UploadJob"]
GET = _SERVICE.methods_by_name["GetJob"]
WATCH = _SERVICE.methods_by_name["WatchJob"]
CANCEL = _SERVICE.methods_by_name["CancelJob"]
OK = grpc.StatusCode.OK
WAIT_S = 5.0

CONTENT = MessageContent(sender=Address("news@example.com"), subject="Hi", text_body="Hello")


class Background(Generic[T]):
    """A call running in a daemon thread (a stuck call cannot hang the test run)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._box: queue.Queue[tuple[bool, Any]] = queue.Queue()

        def run() -> None:
            try:
                self._box.put((True, fn()))
            except BaseException as exc:
                self._box.put((False, exc))

        threading.Thread(target=run, daemon=True).start()

    def result(self, timeout_s: float = WAIT_S) -> T:
        ok, value = self._box.get(timeout=timeout_s)
        if not ok:
            raise value
        result: T = value
        return result


def take(fn: Callable[[], T]) -> T:
    """A blocking grpc_testing take, bounded so a missing RPC fails the test fast."""
    return Background(fn).result()


def job_pb(
    job_id: str,
    state: common_pb2.JobState.ValueType = common_pb2.JOB_STATE_QUEUED,
    total: int = 2,
) -> coordinator_pb2.Job:
    return coordinator_pb2.Job(
        job_id=job_id,
        idempotency_key="k",
        progress=common_pb2.JobProgress(job_id=job_id, state=state, total=total),
    )


@pytest.fixture
def channels() -> dict[str, grpc_testing.Channel]:
    real_time = grpc_testing.strict_real_time()
    return {addr: grpc_testing.channel([_SERVICE], real_time) for addr in ("a:1", "b:2")}


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(
    channels: dict[str, grpc_testing.Channel], sleeps: list[float]
) -> Iterator[SyncMailerClient]:
    config = ClientConfig(
        retry=RetryPolicy(initial_backoff=timedelta(milliseconds=10), max_attempts=5)
    )
    with SyncMailerClient(
        ["a:1", "b:2"], config, channel_factory=channels.__getitem__, sleep=sleeps.append
    ) as c:
        yield c


def test_standby_redirect_via_trailing_metadata(
    client: SyncMailerClient, channels: dict[str, grpc_testing.Channel], sleeps: list[float]
) -> None:
    # Given a client that starts at a:1, a standby
    call = Background(lambda: client.get("j1"))
    # When a:1 answers FAILED_PRECONDITION naming b:2 as the leader
    _, request, rpc = take(lambda: channels["a:1"].take_unary_unary(GET))
    assert request.job_id == "j1"
    rpc.terminate(
        None, (("mailers-leader", "b:2"),), grpc.StatusCode.FAILED_PRECONDITION, "not the leader"
    )
    # Then the same request goes to b:2 at once, and its answer is returned
    _, request2, rpc2 = take(lambda: channels["b:2"].take_unary_unary(GET))
    assert request2 == request
    rpc2.terminate(coordinator_pb2.GetJobResponse(job=job_pb("j1")), (), OK, "")
    job = call.result()
    assert job.job_id == "j1" and job.state is JobState.QUEUED
    assert sleeps == []
    # And later calls go straight to the leader
    assert client.leader == "b:2"
    call = Background(lambda: client.get("j2"))
    _, request3, rpc3 = take(lambda: channels["b:2"].take_unary_unary(GET))
    rpc3.terminate(coordinator_pb2.GetJobResponse(job=job_pb("j2")), (), OK, "")
    assert call.result().job_id == "j2"


def test_unavailable_then_success_retries_submit_with_the_same_key(
    channels: dict[str, grpc_testing.Channel], sleeps: list[float]
) -> None:
    # Given a single coordinator and a submit without an idempotency key
    with SyncMailerClient(
        "a:1",
        ClientConfig(retry=RetryPolicy(initial_backoff=timedelta(milliseconds=10))),
        channel_factory=channels.__getitem__,
        sleep=sleeps.append,
    ) as client:
        recipients = [Recipient("x@example.com", "X", {"plan": "pro"}), Recipient("y@example.com")]
        call = Background(lambda: client.submit(CONTENT, recipients))
        # When the first attempt meets UNAVAILABLE
        _, first, rpc = take(lambda: channels["a:1"].take_unary_unary(SUBMIT))
        rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "no leader yet")
        # Then it is retried after a backoff, with the same generated key and recipients
        _, second, rpc2 = take(lambda: channels["a:1"].take_unary_unary(SUBMIT))
        assert uuid.UUID(first.idempotency_key).version == 4
        assert second.idempotency_key == first.idempotency_key
        assert [r.email for r in second.recipients] == ["x@example.com", "y@example.com"]
        assert dict(second.recipients[0].variables) == {"plan": "pro"}
        assert getattr(second.content, "from").email == "news@example.com"
        rpc2.terminate(
            coordinator_pb2.SubmitJobResponse(job=job_pb("j9"), created=True), (), OK, ""
        )
        job = call.result()
    assert job.job_id == "j9" and job.created is True
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 0.1


def test_deadline_exceeded_surfaces_typed_and_is_not_retried(
    client: SyncMailerClient, channels: dict[str, grpc_testing.Channel]
) -> None:
    call = Background(lambda: client.get("j1", timeout=timedelta(seconds=3)))
    _, _, rpc = take(lambda: channels["a:1"].take_unary_unary(GET))
    rpc.terminate(None, (), grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    # A retry would wait for an answer nobody gives, so result() returning at all
    # shows there was none.
    with pytest.raises(DeadlineExceededError) as info:
        call.result()
    assert isinstance(info.value, TransientError)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_invalid_argument_maps_to_a_permanent_error_naming_the_field(
    client: SyncMailerClient, channels: dict[str, grpc_testing.Channel]
) -> None:
    call = Background(lambda: client.submit(CONTENT, [Recipient("bad")]))
    _, _, rpc = take(lambda: channels["a:1"].take_unary_unary(SUBMIT))
    rpc.terminate(None, (), grpc.StatusCode.INVALID_ARGUMENT, "recipients[0].email: not an address")
    with pytest.raises(InvalidArgumentError) as info:
        call.result()
    assert isinstance(info.value, PermanentError)
    assert info.value.field == "recipients[0].email"
    assert "not an address" in info.value.details


def test_cancel_is_not_retried_on_unavailable_from_the_leader(
    client: SyncMailerClient, channels: dict[str, grpc_testing.Channel]
) -> None:
    # Given a:1 has proven to be the leader
    call = Background(lambda: client.get("j1"))
    _, _, rpc = take(lambda: channels["a:1"].take_unary_unary(GET))
    rpc.terminate(coordinator_pb2.GetJobResponse(job=job_pb("j1")), (), OK, "")
    call.result()
    # When the leader answers a cancel (no idempotency key) with UNAVAILABLE
    cancel = Background(lambda: client.cancel("j1"))
    _, _, rpc = take(lambda: channels["a:1"].take_unary_unary(CANCEL))
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "leadership lost")
    # Then the caller gets the error, and the next call looks elsewhere
    with pytest.raises(UnavailableError):
        cancel.result()
    assert client.leader == "b:2"


def test_large_submit_streams_chunks_after_a_header(
    client: SyncMailerClient, channels: dict[str, grpc_testing.Channel]
) -> None:
    # Given more recipients than one SubmitJob takes, from a one-shot generator
    progress: list[int] = []
    recipients = (Recipient(f"r{i}@example.com") for i in range(1201))
    call = Background(
        lambda: client.submit(
            CONTENT, recipients, idempotency_key="campaign-1", on_progress=progress.append
        )
    )
    # When the server reads the upload
    _, rpc = take(lambda: channels["a:1"].take_stream_unary(UPLOAD))
    header = take(rpc.take_request)
    chunks = [take(rpc.take_request) for _ in range(3)]
    take(rpc.requests_closed)
    rpc.terminate(coordinator_pb2.UploadJobResponse(job=job_pb("big"), created=True), (), OK, "")
    # Then the header came first, then chunks of at most 500, nothing lost
    assert header.WhichOneof("payload") == "header"
    assert header.header.idempotency_key == "campaign-1"
    sizes = [len(c.recipients.recipients) for c in chunks]
    assert sizes == [500, 500, 201]
    assert chunks[2].recipients.recipients[-1].email == "r1200@example.com"
    assert call.result().job_id == "big"
    assert progress == [500, 1000, 1201]


def test_watch_yields_progress_until_final(
    client: SyncMailerClient, channels: dict[str, grpc_testing.Channel]
) -> None:
    events = Background(lambda: list(client.watch("j1")))
    _, request, rpc = take(lambda: channels["a:1"].take_unary_stream(WATCH))
    assert request.job_id == "j1"
    for delivered, state in [
        (0, common_pb2.JOB_STATE_RUNNING),
        (1, common_pb2.JOB_STATE_RUNNING),
        (2, common_pb2.JOB_STATE_COMPLETED),
    ]:
        rpc.send_response(
            coordinator_pb2.WatchJobResponse(
                progress=common_pb2.JobProgress(
                    job_id="j1",
                    state=state,
                    total=2,
                    delivered=delivered,
                )
            )
        )
    rpc.terminate((), OK, "")
    got = events.result()
    assert [(p.delivered, p.state) for p in got] == [
        (0, JobState.RUNNING),
        (1, JobState.RUNNING),
        (2, JobState.COMPLETED),
    ]
