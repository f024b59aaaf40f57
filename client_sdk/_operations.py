"""Every RPC the SDK makes, declared once and called by both clients.

An operation names its service and method (the attribute of the generated stub),
builds its request, converts its response into the SDK's types, says whether
repeating it is safe, and names the :class:`~client_sdk.config.ClientConfig`
timeout that bounds it when the caller gives none. :class:`client_sdk.MailerClient`
calls these through ``grpc.aio`` stubs, :class:`client_sdk.SyncMailerClient`
through blocking ones; neither holds per-RPC code of its own.

Idempotency decides retries (see :mod:`client_sdk.retry`): an idempotent call is
retried on UNAVAILABLE even from the leader, which may have acted before the
connection broke. Idempotent are the reads; the submits, which always carry an
idempotency key; and calls whose repeat finds nothing left to do (retry_failed,
suppress, unsuppress, delete_webhook) or leaves things as one call would
(replay_webhook). Cancelling a job, creating a webhook (a repeat would make a
second endpoint, with a second secret) and the admin changes to nodes and jobs are
not retried once the leader is known.

With :mod:`client_sdk._convert`, the only SDK module that imports ``mailerpb``.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from client_sdk import _convert
from client_sdk._recipients import Submission
from client_sdk.config import ClientConfig
from client_sdk.types import (
    DeliveryEvent,
    Job,
    JobState,
    Page,
    RecipientStatus,
    SuppressionReason,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

P = ParamSpec("P")
Resp = TypeVar("Resp", bound=Message)
T = TypeVar("T")
C = TypeVar("C", bound=grpc.Channel | aio.Channel)


RecipientMessage = common_pb2.Recipient
"""The wire message of one recipient, as submits and uploads carry it."""


class Service(enum.Enum):
    """The coordinator's gRPC services (``mailer.v1``)."""

    MAILER = "MailerService"
    ADMIN = "AdminService"


def _call_timeout(config: ClientConfig) -> timedelta:
    return config.default_timeout


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rpc:
    """What every operation declares, whatever its shape."""

    service: Service
    """The service the method belongs to."""
    method: str
    """The method's name, as in the proto and on the generated stub."""
    idempotent: bool
    """Whether repeating the call cannot do harm: then it is retried on UNAVAILABLE."""
    default_timeout: Callable[[ClientConfig], timedelta] = _call_timeout
    """The deadline of the whole call, retries included, when the caller gives none
    (for a watch: how long each stream lasts before it is re-opened)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unary(Rpc, Generic[P, Resp, T]):
    """An operation with one request and one response; call it to bind a request."""

    request: Callable[P, Message]
    """Builds the request from the client method's arguments."""
    response: type[Resp]
    """The response message."""
    convert: Callable[[Resp], T]
    """The SDK value of a response."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Call[T]:
        """This operation with its request built from the arguments."""
        return Call(self, self.request(*args, **kwargs))


@dataclasses.dataclass(frozen=True)
class Call(Generic[T]):
    """A unary operation bound to its request, ready to be sent (and sent again)."""

    rpc: Unary[..., Any, T]
    request: Message


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerStream(Rpc, Generic[P, Resp, T]):
    """An operation with one request and a stream of responses."""

    request: Callable[P, Message]
    """Builds the request from the client method's arguments."""
    response: type[Resp]
    """Each message of the stream."""
    convert: Callable[[Resp], T]
    """The SDK value of each message."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Upload(Rpc, Generic[Resp, T]):
    """A stream of requests, a header then chunks of recipients, and one response."""

    header: Callable[[Submission], Message]
    """Builds the first request: the content, idempotency key and options."""
    chunk: Callable[[list[RecipientMessage]], Message]
    """Builds a request of converted recipients."""
    response: type[Resp]
    """The response message."""
    convert: Callable[[Resp], T]
    """The SDK value of the response."""


class Stubs:
    """The generated stubs of one channel, found by an operation's service and method."""

    def __init__(self, channel: grpc.Channel | aio.Channel) -> None:
        self._by_service: dict[Service, object] = {
            Service.MAILER: coordinator_pb2_grpc.MailerServiceStub(channel),
            Service.ADMIN: coordinator_pb2_grpc.AdminServiceStub(channel),
        }

    def method(self, rpc: Rpc) -> Any:
        """The stub's multi-callable of ``rpc`` (awaitable calls on an aio channel)."""
        return getattr(self._by_service[rpc.service], rpc.method)


class ChannelPool(Generic[C]):
    """A client's channels and stubs, one of each per coordinator address.

    Channels are made on first use; safe for tasks and threads. The lock is held
    while a channel is constructed, which does not dial (gRPC connects lazily).
    """

    def __init__(self, factory: Callable[[str], C]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._channels: dict[str, C] = {}
        self._stubs: dict[str, Stubs] = {}

    def stubs(self, address: str) -> Stubs:
        """The stubs of ``address``'s channel, made now if there is none."""
        with self._lock:
            stubs = self._stubs.get(address)
            if stubs is None:
                channel = self._factory(address)
                self._channels[address] = channel
                stubs = Stubs(channel)
                self._stubs[address] = stubs
            return stubs

    def take_all(self) -> list[C]:
        """Every channel, forgotten here: the caller closes them."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
            return channels


def _submit_timeout(config: ClientConfig) -> timedelta:
    return config.submit_timeout


def _drain_timeout(config: ClientConfig) -> timedelta:
    return config.drain_timeout


def _watch_stream_timeout(config: ClientConfig) -> timedelta:
    return config.watch_stream_timeout


def _events(response: coordinator_pb2.StreamEventsResponse) -> list[DeliveryEvent]:
    return [_convert.event_from_pb(e) for e in response.events]


def _submitted(
    response: coordinator_pb2.SubmitJobResponse | coordinator_pb2.UploadJobResponse,
) -> Job:
    return _convert.job_from_pb(response.job, created=response.created)


def _submit_job(
    submission: Submission, recipients: list[RecipientMessage]
) -> coordinator_pb2.SubmitJobRequest:
    return _convert.submit_request(
        submission.content, recipients, submission.idempotency_key, submission.options
    )


def _upload_header(submission: Submission) -> coordinator_pb2.UploadJobRequest:
    return _convert.upload_header(
        submission.content, submission.idempotency_key, submission.options
    )


def _list_jobs(
    *, states: Iterable[JobState], page_size: int, page_token: str
) -> coordinator_pb2.ListJobsRequest:
    return coordinator_pb2.ListJobsRequest(
        page_size=page_size,
        page_token=page_token,
        states=[_convert.job_state_to_pb(s) for s in states],
    )


def _list_results(
    *, job_id: str, statuses: Iterable[RecipientStatus], page_size: int, page_token: str
) -> coordinator_pb2.ListJobResultsRequest:
    return coordinator_pb2.ListJobResultsRequest(
        job_id=job_id,
        page_size=page_size,
        page_token=page_token,
        statuses=[_convert.recipient_status_to_pb(s) for s in statuses],
    )


def _add_suppression(
    *, tenant: str, email: str, reason: SuppressionReason
) -> coordinator_pb2.AddSuppressionRequest:
    return coordinator_pb2.AddSuppressionRequest(
        tenant=tenant, email=email, reason=_convert.suppression_reason_to_pb(reason)
    )


# ----- MailerService ----------------------------------------------------------------

SUBMIT_JOB = Unary(
    service=Service.MAILER,
    method="SubmitJob",
    request=_submit_job,
    response=coordinator_pb2.SubmitJobResponse,
    convert=_submitted,
    idempotent=True,
    default_timeout=_submit_timeout,
)
UPLOAD_JOB = Upload(
    service=Service.MAILER,
    method="UploadJob",
    header=_upload_header,
    chunk=_convert.upload_chunk,
    response=coordinator_pb2.UploadJobResponse,
    convert=_submitted,
    idempotent=True,
    default_timeout=_submit_timeout,
)
GET_JOB = Unary(
    service=Service.MAILER,
    method="GetJob",
    request=coordinator_pb2.GetJobRequest,
    response=coordinator_pb2.GetJobResponse,
    convert=lambda r: _convert.job_from_pb(r.job),
    idempotent=True,
)
WATCH_JOB = ServerStream(
    service=Service.MAILER,
    method="WatchJob",
    request=coordinator_pb2.WatchJobRequest,
    response=coordinator_pb2.WatchJobResponse,
    convert=lambda r: _convert.progress_from_pb(r.progress),
    idempotent=True,
    default_timeout=_watch_stream_timeout,
)
CANCEL_JOB = Unary(
    service=Service.MAILER,
    method="CancelJob",
    request=coordinator_pb2.CancelJobRequest,
    response=coordinator_pb2.CancelJobResponse,
    convert=lambda r: _convert.job_from_pb(r.job),
    idempotent=False,
)
LIST_JOBS = Unary(
    service=Service.MAILER,
    method="ListJobs",
    request=_list_jobs,
    response=coordinator_pb2.ListJobsResponse,
    convert=lambda r: Page([_convert.job_from_pb(j) for j in r.jobs], r.next_page_token),
    idempotent=True,
)
LIST_JOB_RESULTS = Unary(
    service=Service.MAILER,
    method="ListJobResults",
    request=_list_results,
    response=coordinator_pb2.ListJobResultsResponse,
    convert=lambda r: Page([_convert.result_from_pb(x) for x in r.results], r.next_page_token),
    idempotent=True,
)
RETRY_FAILED = Unary(
    service=Service.MAILER,
    method="RetryFailed",
    request=coordinator_pb2.RetryFailedRequest,
    response=coordinator_pb2.RetryFailedResponse,
    convert=lambda r: (_convert.job_from_pb(r.job), r.requeued),
    idempotent=True,
)
LIST_SUPPRESSIONS = Unary(
    service=Service.MAILER,
    method="ListSuppressions",
    request=coordinator_pb2.ListSuppressionsRequest,
    response=coordinator_pb2.ListSuppressionsResponse,
    convert=lambda r: Page(
        [_convert.suppression_from_pb(s) for s in r.suppressions], r.next_page_token
    ),
    idempotent=True,
)
ADD_SUPPRESSION = Unary(
    service=Service.MAILER,
    method="AddSuppression",
    request=_add_suppression,
    response=coordinator_pb2.AddSuppressionResponse,
    convert=lambda r: _convert.suppression_from_pb(r.suppression),
    idempotent=True,
)
REMOVE_SUPPRESSION = Unary(
    service=Service.MAILER,
    method="RemoveSuppression",
    request=coordinator_pb2.RemoveSuppressionRequest,
    response=coordinator_pb2.RemoveSuppressionResponse,
    convert=lambda r: r.removed,
    idempotent=True,
)
STREAM_EVENTS = ServerStream(
    service=Service.MAILER,
    method="StreamEvents",
    request=_convert.stream_events_request,
    response=coordinator_pb2.StreamEventsResponse,
    convert=_events,
    idempotent=True,
    default_timeout=_watch_stream_timeout,
)
CREATE_WEBHOOK = Unary(
    service=Service.MAILER,
    method="CreateWebhook",
    request=_convert.create_webhook_request,
    response=coordinator_pb2.CreateWebhookResponse,
    convert=_convert.created_webhook_from_pb,
    idempotent=False,
)
LIST_WEBHOOKS = Unary(
    service=Service.MAILER,
    method="ListWebhooks",
    request=coordinator_pb2.ListWebhooksRequest,
    response=coordinator_pb2.ListWebhooksResponse,
    convert=lambda r: [_convert.webhook_from_pb(w) for w in r.webhooks],
    idempotent=True,
)
DELETE_WEBHOOK = Unary(
    service=Service.MAILER,
    method="DeleteWebhook",
    request=coordinator_pb2.DeleteWebhookRequest,
    response=coordinator_pb2.DeleteWebhookResponse,
    convert=lambda r: None,
    idempotent=True,
)
REPLAY_WEBHOOK = Unary(
    service=Service.MAILER,
    method="ReplayWebhook",
    request=_convert.replay_webhook_request,
    response=coordinator_pb2.ReplayWebhookResponse,
    convert=lambda r: _convert.webhook_from_pb(r.webhook),
    idempotent=True,
)

# ----- AdminService -----------------------------------------------------------------

GET_CLUSTER_STATUS = Unary(
    service=Service.ADMIN,
    method="GetClusterStatus",
    request=coordinator_pb2.GetClusterStatusRequest,
    response=coordinator_pb2.GetClusterStatusResponse,
    convert=_convert.cluster_status_from_pb,
    idempotent=True,
)
LIST_NODES = Unary(
    service=Service.ADMIN,
    method="ListNodes",
    request=coordinator_pb2.ListNodesRequest,
    response=coordinator_pb2.ListNodesResponse,
    convert=lambda r: [_convert.node_from_pb(n) for n in r.nodes],
    idempotent=True,
)
DRAIN_NODE = Unary(
    service=Service.ADMIN,
    method="DrainNode",
    request=coordinator_pb2.DrainNodeRequest,
    response=coordinator_pb2.DrainNodeResponse,
    convert=lambda r: _convert.node_from_pb(r.node),
    idempotent=False,
    default_timeout=_drain_timeout,
)
CORDON_NODE = Unary(
    service=Service.ADMIN,
    method="CordonNode",
    request=coordinator_pb2.CordonNodeRequest,
    response=coordinator_pb2.CordonNodeResponse,
    convert=lambda r: _convert.node_from_pb(r.node),
    idempotent=False,
)
UNCORDON_NODE = Unary(
    service=Service.ADMIN,
    method="UncordonNode",
    request=coordinator_pb2.UncordonNodeRequest,
    response=coordinator_pb2.UncordonNodeResponse,
    convert=lambda r: _convert.node_from_pb(r.node),
    idempotent=False,
)
RESET_BREAKER = Unary(
    service=Service.ADMIN,
    method="ResetBreaker",
    request=coordinator_pb2.ResetBreakerRequest,
    response=coordinator_pb2.ResetBreakerResponse,
    convert=lambda r: _convert.node_from_pb(r.node),
    idempotent=False,
)
PAUSE_JOB = Unary(
    service=Service.ADMIN,
    method="PauseJob",
    request=coordinator_pb2.PauseJobRequest,
    response=coordinator_pb2.PauseJobResponse,
    convert=lambda r: _convert.job_from_pb(r.job),
    idempotent=False,
)
RESUME_JOB = Unary(
    service=Service.ADMIN,
    method="ResumeJob",
    request=coordinator_pb2.ResumeJobRequest,
    response=coordinator_pb2.ResumeJobResponse,
    convert=lambda r: _convert.job_from_pb(r.job),
    idempotent=False,
)

OPERATIONS: tuple[Rpc, ...] = (
    SUBMIT_JOB,
    UPLOAD_JOB,
    GET_JOB,
    WATCH_JOB,
    CANCEL_JOB,
    LIST_JOBS,
    LIST_JOB_RESULTS,
    RETRY_FAILED,
    LIST_SUPPRESSIONS,
    ADD_SUPPRESSION,
    REMOVE_SUPPRESSION,
    STREAM_EVENTS,
    CREATE_WEBHOOK,
    LIST_WEBHOOKS,
    DELETE_WEBHOOK,
    REPLAY_WEBHOOK,
    GET_CLUSTER_STATUS,
    LIST_NODES,
    DRAIN_NODE,
    CORDON_NODE,
    UNCORDON_NODE,
    RESET_BREAKER,
    PAUSE_JOB,
    RESUME_JOB,
)
"""The table: every operation, in the order of the proto."""
