"""Unit tests of the SDK's pure parts: wire conversion, the error table, retry decisions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_sdk import _convert
from client_sdk._recipients import recipient_chunks
from client_sdk.config import ClientConfig
from client_sdk.errors import (
    AlreadyExistsError,
    AuthError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermanentError,
    ResourceExhaustedError,
    RpcError,
    TransientError,
    UnavailableError,
    error_for_status,
    retry_after_from_status_details,
    status_details_with_retry_info,
)
from client_sdk.retry import LeaderRouter, RetryBudget, RetryPolicy, Step, next_step
from client_sdk.types import (
    Address,
    BreakerState,
    Header,
    JobOptions,
    JobState,
    MessageContent,
    NodeState,
    Recipient,
    RecipientStatus,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2

# ----- conversion ---------------------------------------------------------------------


def test_content_round_trips_including_the_from_keyword_field() -> None:
    # Given content with every field set
    content = MessageContent(
        sender=Address("news@example.com", "Exämple News"),
        subject="Hi {{ name }}",
        text_body="text",
        html_body="<p>html</p>",
        reply_to=Address("reply@example.com"),
        headers=(Header("X-Campaign", "spring"),),
        unsubscribe_url="https://example.com/u",
    )
    # When it goes to the wire and back
    msg = _convert.content_to_pb(content)
    # Then the keyword field "from" is set, and nothing is lost
    assert getattr(msg, "from").email == "news@example.com"
    assert _convert.content_from_pb(msg) == content


def test_content_without_reply_to_stays_without() -> None:
    content = MessageContent(sender=Address("a@example.com"), text_body="t")
    assert not _convert.content_to_pb(content).HasField("reply_to")
    assert _convert.content_from_pb(_convert.content_to_pb(content)).reply_to is None


@given(
    email=st.emails(),
    name=st.text(max_size=20),
    variables=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=5),
    metadata=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=5),
)
def test_recipient_round_trips(
    email: str, name: str, variables: dict[str, str], metadata: dict[str, str]
) -> None:
    recipient = Recipient(email=email, name=name, variables=variables, metadata=metadata)
    assert _convert.recipient_from_pb(_convert.recipient_to_pb(recipient)) == recipient


def test_every_wire_enum_value_maps_to_a_distinct_member() -> None:
    # Given the enums as generated from the proto
    job_values = common_pb2.JobState.values()
    status_values = common_pb2.RecipientStatus.values()
    # Then each maps to its own SDK member, and back to the same number
    assert {_convert.job_state_from_pb(v) for v in job_values} == set(JobState)
    assert {_convert.recipient_status_from_pb(v) for v in status_values} == set(RecipientStatus)
    for jv in job_values:
        assert _convert.job_state_to_pb(_convert.job_state_from_pb(jv)) == jv
    for sv in status_values:
        assert _convert.recipient_status_to_pb(_convert.recipient_status_from_pb(sv)) == sv


def test_unknown_enum_values_from_a_newer_server_map_to_unspecified() -> None:
    assert _convert.job_state_from_pb(99) is JobState.UNSPECIFIED
    assert _convert.recipient_status_from_pb(99) is RecipientStatus.UNSPECIFIED


def test_options_times_are_utc_aware_and_naive_input_is_taken_as_utc() -> None:
    # Given a naive send_at and an aware expires_at in another zone
    options = JobOptions(
        send_at=datetime(2030, 1, 2, 3, 4, 5),
        expires_at=datetime(2030, 1, 2, 12, 0, tzinfo=timezone(timedelta(hours=2))),
        priority=7,
        name="spring",
    )
    # When converted there and back
    back = _convert.options_from_pb(_convert.options_to_pb(options))
    # Then both are the same instants, in UTC
    assert back.send_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert back.expires_at == datetime(2030, 1, 2, 10, 0, tzinfo=UTC)
    assert (back.priority, back.name) == (7, "spring")


def test_unset_options_times_stay_none() -> None:
    back = _convert.options_from_pb(_convert.options_to_pb(JobOptions()))
    assert back.send_at is None and back.expires_at is None


def test_job_from_pb_takes_progress_and_flags_created() -> None:
    # Given a stored job whose progress lacks the job id
    msg = coordinator_pb2.Job(
        job_id="j1",
        idempotency_key="k1",
        progress=common_pb2.JobProgress(
            state=common_pb2.JOB_STATE_RUNNING,
            total=10,
            delivered=4,
            failed=1,
            cancelled=2,
            deferred=3,
        ),
    )
    msg.progress.created_at.FromDatetime(datetime(2030, 1, 1, tzinfo=UTC))
    # When converted as a submit response that found an existing job
    job = _convert.job_from_pb(msg, created=False)
    # Then
    assert job.job_id == "j1" and job.progress.job_id == "j1"
    assert job.state is JobState.RUNNING
    assert job.progress.done == 7
    assert not job.progress.is_final
    assert job.created is False
    assert job.content is None
    assert job.progress.created_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert job.progress.finished_at is None


def test_result_from_pb_with_and_without_reply() -> None:
    failed = common_pb2.RecipientResult(
        index=3,
        email="x@example.com",
        status=common_pb2.RECIPIENT_STATUS_FAILED,
        reply=common_pb2.SmtpReply(code=550, enhanced_code="5.1.1", text="no such user"),
        attempts=1,
        node_id="n1",
        ambiguous=True,
    )
    result = _convert.result_from_pb(failed)
    assert result.status is RecipientStatus.FAILED
    assert result.reply is not None and str(result.reply) == "550 5.1.1 no such user"
    assert (result.index, result.node_id, result.ambiguous) == (3, "n1", True)
    cancelled = _convert.result_from_pb(
        common_pb2.RecipientResult(
            email="y@example.com", status=common_pb2.RECIPIENT_STATUS_CANCELLED
        )
    )
    assert cancelled.reply is None and cancelled.updated_at is None


def test_node_and_cluster_status_from_pb() -> None:
    node = _convert.node_from_pb(
        coordinator_pb2.NodeInfo(
            node_id="n1",
            address="127.0.0.1:9000",
            state=coordinator_pb2.NODE_STATE_CORDONED,
            load=common_pb2.NodeLoad(in_flight=5, capacity=100, recent_latency_ms=2.5),
            breaker_state=common_pb2.BREAKER_STATE_HALF_OPEN,
            relays=[
                common_pb2.RelayStatus(address="r:25", breaker_state=common_pb2.BREAKER_STATE_OPEN)
            ],
            recipients_done=42,
        )
    )
    assert node.state is NodeState.CORDONED
    assert node.breaker_state is BreakerState.HALF_OPEN
    assert node.relays[0].breaker_state is BreakerState.OPEN
    assert (node.load.in_flight, node.load.capacity, node.recipients_done) == (5, 100, 42)
    status = _convert.cluster_status_from_pb(
        coordinator_pb2.GetClusterStatusResponse(
            leader=coordinator_pb2.CoordinatorInfo(coordinator_id="c1", address="a:1", epoch=9),
            standbys=[coordinator_pb2.CoordinatorInfo(coordinator_id="c2", address="a:2")],
            active_jobs=3,
        )
    )
    assert status.leader is not None and status.leader.epoch == 9
    assert [s.address for s in status.standbys] == ["a:2"]
    assert (
        _convert.cluster_status_from_pb(coordinator_pb2.GetClusterStatusResponse()).leader is None
    )


def test_retry_info_round_trips_through_status_details() -> None:
    data = status_details_with_retry_info(8, "busy", timedelta(milliseconds=1500))
    assert retry_after_from_status_details(data) == timedelta(milliseconds=1500)
    assert retry_after_from_status_details(None) is None
    assert retry_after_from_status_details(b"\xff\xff garbage") is None


def test_recipient_chunks_respect_count_and_size() -> None:
    recipients = [common_pb2.Recipient(email=f"r{i}@example.com") for i in range(1201)]
    chunks = list(recipient_chunks(recipients, chunk_size=500, chunk_max_bytes=10**9))
    assert [len(c) for c in chunks] == [500, 500, 201]
    big = [common_pb2.Recipient(email="a@b.c", variables={"v": "x" * 1000}) for _ in range(10)]
    assert all(len(c) <= 2 for c in recipient_chunks(big, chunk_size=500, chunk_max_bytes=2000))


def test_types_reject_obvious_mistakes() -> None:
    with pytest.raises(ValueError, match="not an email"):
        Address("nobody")
    with pytest.raises(ValueError, match="text_body or html_body"):
        MessageContent(sender=Address("a@example.com"), subject="only a subject")
    with pytest.raises(ValueError):
        ClientConfig(default_timeout=timedelta(0))


# ----- the error table -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls", "branch"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError, PermanentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError, PermanentError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError, PermanentError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError, PermanentError),
        (grpc.StatusCode.UNAUTHENTICATED, AuthError, PermanentError),
        (grpc.StatusCode.PERMISSION_DENIED, AuthError, PermanentError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError, TransientError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError, TransientError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError, TransientError),
    ],
)
def test_status_codes_map_to_typed_errors(
    code: grpc.StatusCode, cls: type[Exception], branch: type[Exception]
) -> None:
    error = error_for_status(code, "details here")
    assert type(error) is cls
    assert isinstance(error, branch)
    assert error.code is code and error.details == "details here"


def test_other_codes_surface_as_rpc_error_with_the_code() -> None:
    error = error_for_status(grpc.StatusCode.INTERNAL, "boom")
    assert type(error) is RpcError and error.code is grpc.StatusCode.INTERNAL
    assert not isinstance(error, TransientError | PermanentError)


def test_invalid_argument_names_the_field() -> None:
    error = error_for_status(
        grpc.StatusCode.INVALID_ARGUMENT, "recipients[3].email: not an address"
    )
    assert isinstance(error, InvalidArgumentError)
    assert error.field == "recipients[3].email"
    plain = error_for_status(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    assert isinstance(plain, InvalidArgumentError) and plain.field is None


def test_failed_precondition_carries_the_leader_hint() -> None:
    standby = error_for_status(
        grpc.StatusCode.FAILED_PRECONDITION, "not leader", [("mailers-leader", "h:2")]
    )
    unknown = error_for_status(
        grpc.StatusCode.FAILED_PRECONDITION, "not leader", [("mailers-leader", "")]
    )
    leader_said = error_for_status(grpc.StatusCode.FAILED_PRECONDITION, "job is final")
    assert isinstance(standby, FailedPreconditionError) and standby.leader == "h:2"
    assert isinstance(unknown, FailedPreconditionError) and unknown.leader == ""
    assert isinstance(leader_said, FailedPreconditionError) and leader_said.leader is None


def test_resource_exhausted_keeps_retry_after() -> None:
    error = error_for_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_after=timedelta(seconds=2)
    )
    assert isinstance(error, ResourceExhaustedError) and error.retry_after == timedelta(seconds=2)


# ----- retry decisions -------------------------------------------------------------------


@given(retry=st.integers(min_value=0, max_value=60), seed=st.integers())
def test_backoff_stays_within_bounds(retry: int, seed: int) -> None:
    policy = RetryPolicy()
    delay = policy.backoff(retry, random.Random(seed))
    assert timedelta(0) <= delay <= policy.max_backoff
    nominal_s = min(
        policy.max_backoff.total_seconds(),
        policy.initial_backoff.total_seconds() * policy.multiplier**retry,
    )
    assert delay.total_seconds() >= nominal_s * (1 - policy.jitter) - 1e-6


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(ValueError):
        RetryPolicy(max_backoff=timedelta(milliseconds=1))
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def _standby(leader: str) -> FailedPreconditionError:
    error = error_for_status(
        grpc.StatusCode.FAILED_PRECONDITION, "not leader", [("mailers-leader", leader)]
    )
    assert isinstance(error, FailedPreconditionError)
    return error


def test_next_step_table() -> None:
    unavailable = error_for_status(grpc.StatusCode.UNAVAILABLE, "down")
    # A standby's answer is safe to redirect for any call.
    assert next_step(_standby("h:2"), idempotent=False, believed_leader=True) is Step.REDIRECT
    assert next_step(_standby(""), idempotent=False, believed_leader=True) is Step.NEXT_ADDRESS
    # UNAVAILABLE: idempotent calls move on; others only while still looking for the leader.
    assert next_step(unavailable, idempotent=True, believed_leader=True) is Step.NEXT_ADDRESS
    assert next_step(unavailable, idempotent=False, believed_leader=False) is Step.NEXT_ADDRESS
    assert next_step(unavailable, idempotent=False, believed_leader=True) is Step.RAISE
    # Everything else is the caller's.
    for code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        assert (
            next_step(error_for_status(code, "x"), idempotent=True, believed_leader=False)
            is Step.RAISE
        )


def test_router_follows_redirects_and_skips_failed_addresses() -> None:
    # Given two configured addresses
    router = LeaderRouter(["a:1", " b:2 ", "a:1", ""])
    assert router.addresses == ("a:1", "b:2") and router.current == "a:1"
    # When a standby at a:1 names an address we did not know
    router.route_after("a:1", _standby("c:3"))
    # Then it is added, current, and believed
    assert router.current == "c:3" and router.is_believed_leader("c:3")
    # When it becomes unreachable, the next address (wrapping) is tried
    router.route_after("c:3", error_for_status(grpc.StatusCode.UNAVAILABLE, "x"))
    assert router.current == "a:1" and not router.is_believed_leader("a:1")
    # A stale failure for an address no longer current moves nothing
    router.route_after("c:3", error_for_status(grpc.StatusCode.UNAVAILABLE, "x"))
    assert router.current == "a:1"
    # A domain error leaves the route alone; a success confirms the leader
    router.route_after("a:1", error_for_status(grpc.StatusCode.NOT_FOUND, "x"))
    router.succeeded("a:1")
    assert router.is_believed_leader("a:1")
    with pytest.raises(ValueError):
        LeaderRouter([" ", ""])


def test_budget_redirects_at_once_then_backs_off_and_ends() -> None:
    policy = RetryPolicy(max_attempts=4, max_elapsed=timedelta(seconds=30))
    rng = random.Random(1)
    budget = RetryBudget.start(policy, now_s=0.0, call_deadline_s=100.0)
    assert budget.retry_deadline_s == 30.0
    assert budget.delay_s(Step.REDIRECT, 0.0, rng) == 0.0
    second = budget.delay_s(Step.REDIRECT, 0.0, rng)
    assert second is not None and second > 0
    assert budget.delay_s(Step.NEXT_ADDRESS, 0.0, rng) is not None
    assert budget.delay_s(Step.NEXT_ADDRESS, 0.0, rng) is None  # fourth attempt was the last
    late = RetryBudget.start(policy, now_s=0.0, call_deadline_s=100.0)
    assert late.delay_s(Step.NEXT_ADDRESS, 29.99, rng) is None  # would start after the deadline
    assert late.delay_s(Step.RAISE, 0.0, rng) is None
    late.progressed(50.0)
    assert late.attempts == 0 and late.retry_deadline_s == 80.0
