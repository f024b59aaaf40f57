"""The SDK's operation table against the proto: every RPC declared once, and declared right."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import grpc
import pytest

from client_sdk import _operations as ops
from client_sdk._recipients import Submission
from client_sdk.config import ClientConfig
from client_sdk.types import (
    Address,
    EventType,
    Job,
    JobState,
    MessageContent,
    Page,
    RecipientStatus,
    SuppressionReason,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2

CONTENT = MessageContent(sender=Address("news@example.com"), text_body="Hello")
SUBMISSION = Submission(CONTENT, "key-1", None, None)


def _method(rpc: ops.Rpc) -> Any:
    return coordinator_pb2.DESCRIPTOR.services_by_name[rpc.service.value].methods_by_name[
        rpc.method
    ]


def _sample_request(rpc: ops.Rpc) -> Any:
    """A request each operation builds, from arguments of the right types."""
    if rpc is ops.UPLOAD_JOB:
        return ops.UPLOAD_JOB.header(SUBMISSION)
    if rpc is ops.WATCH_JOB:
        return ops.WATCH_JOB.request(job_id="j1")
    if rpc is ops.STREAM_EVENTS:
        return ops.STREAM_EVENTS.request(41, ["j1"], [EventType.DELIVERED], "acme")
    samples: dict[str, ops.Call[Any]] = {
        "SubmitJob": ops.SUBMIT_JOB(SUBMISSION, []),
        "GetJob": ops.GET_JOB(job_id="j1"),
        "CancelJob": ops.CANCEL_JOB(job_id="j1"),
        "ListJobs": ops.LIST_JOBS(states=[JobState.RUNNING], page_size=5, page_token=""),
        "ListJobResults": ops.LIST_JOB_RESULTS(
            job_id="j1", statuses=[RecipientStatus.FAILED], page_size=5, page_token="t"
        ),
        "RetryFailed": ops.RETRY_FAILED(job_id="j1"),
        "ListSuppressions": ops.LIST_SUPPRESSIONS(tenant="", page_size=5, page_token=""),
        "AddSuppression": ops.ADD_SUPPRESSION(
            tenant="t", email="a@example.com", reason=SuppressionReason.MANUAL
        ),
        "RemoveSuppression": ops.REMOVE_SUPPRESSION(tenant="t", email="a@example.com"),
        "CreateWebhook": ops.CREATE_WEBHOOK(
            url="https://hooks.example/in", types=[EventType.DELIVERED], tenant="t"
        ),
        "ListWebhooks": ops.LIST_WEBHOOKS(tenant="t"),
        "DeleteWebhook": ops.DELETE_WEBHOOK(tenant="t", webhook_id="wh_1"),
        "ReplayWebhook": ops.REPLAY_WEBHOOK(webhook_id="wh_1", from_event_id=7, tenant="t"),
        "GetClusterStatus": ops.GET_CLUSTER_STATUS(),
        "ListNodes": ops.LIST_NODES(),
        "DrainNode": ops.DRAIN_NODE(node_id="n1"),
        "CordonNode": ops.CORDON_NODE(node_id="n1"),
        "UncordonNode": ops.UNCORDON_NODE(node_id="n1"),
        "ResetBreaker": ops.RESET_BREAKER(node_id="n1"),
        "PauseJob": ops.PAUSE_JOB(job_id="j1"),
        "ResumeJob": ops.RESUME_JOB(job_id="j1"),
    }
    return samples[rpc.method].request


def test_the_table_holds_every_rpc_of_the_proto_once() -> None:
    declared = [(rpc.service.value, rpc.method) for rpc in ops.OPERATIONS]
    in_proto = [
        (service.name, method.name)
        for service in coordinator_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    assert len(declared) == len(set(declared)) == len(in_proto)
    assert set(declared) == set(in_proto)


@pytest.mark.parametrize("rpc", ops.OPERATIONS, ids=lambda rpc: rpc.method)
def test_each_operation_matches_its_proto_method(rpc: ops.Rpc) -> None:
    # Given the proto's declaration of the method
    method = _method(rpc)
    # Then the shape, the request built and the response type agree with it
    assert method.client_streaming == isinstance(rpc, ops.Upload)
    assert method.server_streaming == isinstance(rpc, ops.ServerStream)
    assert _sample_request(rpc).DESCRIPTOR.full_name == method.input_type.full_name
    assert isinstance(rpc, ops.Unary | ops.ServerStream | ops.Upload)
    assert rpc.response.DESCRIPTOR.full_name == method.output_type.full_name


class _RecordingChannel:
    """Stands in for a channel: each multi-callable is the kind and path it was made for."""

    def unary_unary(self, path: str, **_: object) -> tuple[str, str]:
        return ("unary_unary", path)

    def unary_stream(self, path: str, **_: object) -> tuple[str, str]:
        return ("unary_stream", path)

    def stream_unary(self, path: str, **_: object) -> tuple[str, str]:
        return ("stream_unary", path)

    def stream_stream(self, path: str, **_: object) -> tuple[str, str]:
        return ("stream_stream", path)


@pytest.mark.parametrize("rpc", ops.OPERATIONS, ids=lambda rpc: rpc.method)
def test_the_stubs_find_each_operation_by_service_and_method(rpc: ops.Rpc) -> None:
    stubs = ops.Stubs(cast(grpc.Channel, _RecordingChannel()))
    kind = {ops.Unary: "unary_unary", ops.ServerStream: "unary_stream", ops.Upload: "stream_unary"}
    assert stubs.method(rpc) == (kind[type(rpc)], f"/mailer.v1.{rpc.service.value}/{rpc.method}")


def test_only_reads_keyed_submits_and_harmless_repeats_are_idempotent() -> None:
    # Cancelling twice, a second endpoint (with a second secret), or a node or job
    # change repeated after the leader acted, is not the caller's intent: those are
    # not retried on UNAVAILABLE.
    not_idempotent = {rpc.method for rpc in ops.OPERATIONS if not rpc.idempotent}
    assert not_idempotent == {
        "CancelJob",
        "CreateWebhook",
        "DrainNode",
        "CordonNode",
        "UncordonNode",
        "ResetBreaker",
        "PauseJob",
        "ResumeJob",
    }


def test_default_timeouts_come_from_the_config() -> None:
    config = ClientConfig(
        default_timeout=timedelta(seconds=1),
        submit_timeout=timedelta(seconds=2),
        drain_timeout=timedelta(seconds=3),
        watch_stream_timeout=timedelta(seconds=4),
    )
    by_method = {rpc.method: rpc.default_timeout(config).total_seconds() for rpc in ops.OPERATIONS}
    assert by_method.pop("SubmitJob") == by_method.pop("UploadJob") == 2
    assert by_method.pop("DrainNode") == 3
    assert by_method.pop("WatchJob") == by_method.pop("StreamEvents") == 4
    assert set(by_method.values()) == {1}


def test_requests_carry_the_wire_values_of_sdk_enums() -> None:
    results = ops.LIST_JOB_RESULTS(
        job_id="j1", statuses=[RecipientStatus.FAILED], page_size=5, page_token="t"
    ).request
    assert isinstance(results, coordinator_pb2.ListJobResultsRequest)
    assert list(results.statuses) == [common_pb2.RECIPIENT_STATUS_FAILED]
    added = ops.ADD_SUPPRESSION(
        tenant="t", email="a@example.com", reason=SuppressionReason.UNSUBSCRIBE
    ).request
    assert isinstance(added, coordinator_pb2.AddSuppressionRequest)
    assert added.reason == coordinator_pb2.SUPPRESSION_REASON_UNSUBSCRIBE


def test_responses_convert_to_sdk_values() -> None:
    job = coordinator_pb2.Job(job_id="j1", progress=common_pb2.JobProgress(total=3, failed=2))
    submitted = ops.SUBMIT_JOB.convert(coordinator_pb2.SubmitJobResponse(job=job, created=True))
    assert isinstance(submitted, Job) and submitted.created is True
    uploaded = ops.UPLOAD_JOB.convert(coordinator_pb2.UploadJobResponse(job=job))
    assert uploaded.job_id == "j1" and uploaded.created is False
    page = ops.LIST_JOBS.convert(coordinator_pb2.ListJobsResponse(jobs=[job], next_page_token="n"))
    assert isinstance(page, Page) and [j.job_id for j in page.items] == ["j1"]
    again, requeued = ops.RETRY_FAILED.convert(
        coordinator_pb2.RetryFailedResponse(job=job, requeued=2)
    )
    assert (again.job_id, requeued) == ("j1", 2)
    assert ops.REMOVE_SUPPRESSION.convert(coordinator_pb2.RemoveSuppressionResponse()) is False
