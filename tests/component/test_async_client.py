"""MailerClient against real grpc.aio servers on port 0 running a scripted fake coordinator.

Each fake is a leader, a standby (FAILED_PRECONDITION + ``mailers-leader``) or
leaderless (UNAVAILABLE), switchable while a test runs to imitate a failover.
"""

from __future__ import annotations

import asyncio
import collections
import io
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from rich.console import Console

from client_sdk import (
    Address,
    ClientConfig,
    DeadlineExceededError,
    JobOptions,
    JobProgress,
    JobState,
    MailerClient,
    MessageContent,
    NodeState,
    NotFoundError,
    Recipient,
    RecipientStatus,
    RetryPolicy,
    SuppressionReason,
    UnavailableError,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from mailers.campaign import SendArgs, run_send
from mailers_dev.procs import free_port
from tests.helpers import assert_eventually

Ctx = aio.ServicerContext[Any, Any]
CONTENT = MessageContent(sender=Address("news@example.com"), subject="Hi", text_body="Hello")
FAST = ClientConfig(
    retry=RetryPolicy(
        initial_backoff=timedelta(milliseconds=5), max_backoff=timedelta(milliseconds=50)
    )
)
_CLOSE = object()  # ends a scripted watch stream with UNAVAILABLE


class FakeCoordinator(
    coordinator_pb2_grpc.MailerServiceServicer, coordinator_pb2_grpc.AdminServiceServicer
):
    """An in-memory coordinator whose role and answers the test controls."""

    def __init__(self) -> None:
        self.role = "leader"
        self.leader_hint = ""
        self.calls: collections.Counter[str] = collections.Counter()
        self.jobs: dict[str, coordinator_pb2.Job] = {}
        self.by_key: dict[str, str] = {}
        self.recipients: dict[str, list[common_pb2.Recipient]] = {}
        self.upload_chunks: list[int] = []
        self.results: list[common_pb2.RecipientResult] = []
        self.result_requests: list[coordinator_pb2.ListJobResultsRequest] = []
        self.watch_events: asyncio.Queue[object] = asyncio.Queue()
        self.suppressed: dict[str, coordinator_pb2.Suppression] = {}
        self.time_remaining: list[float | None] = []

    async def _gate(self, name: str, context: Ctx) -> None:
        self.calls[name] += 1
        self.time_remaining.append(context.time_remaining())
        if self.role == "standby":
            context.set_trailing_metadata((("mailers-leader", self.leader_hint),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not the leader")
        if self.role == "leaderless":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no leader yet")

    def _create(
        self, key: str, recipients: list[common_pb2.Recipient]
    ) -> tuple[coordinator_pb2.Job, bool]:
        if key in self.by_key:
            return self.jobs[self.by_key[key]], False
        job_id = f"job-{len(self.jobs) + 1}"
        job = coordinator_pb2.Job(
            job_id=job_id,
            idempotency_key=key,
            progress=common_pb2.JobProgress(
                job_id=job_id,
                state=common_pb2.JOB_STATE_QUEUED,
                total=len(recipients),
                queued=len(recipients),
            ),
        )
        self.jobs[job_id] = job
        self.by_key[key] = job_id
        self.recipients[job_id] = recipients
        return job, True

    async def SubmitJob(
        self, request: coordinator_pb2.SubmitJobRequest, context: Ctx
    ) -> coordinator_pb2.SubmitJobResponse:
        await self._gate("SubmitJob", context)
        job, created = self._create(request.idempotency_key, list(request.recipients))
        return coordinator_pb2.SubmitJobResponse(job=job, created=created)

    async def UploadJob(
        self, request_iterator: Any, context: Ctx
    ) -> coordinator_pb2.UploadJobResponse:
        await self._gate("UploadJob", context)
        key = ""
        recipients: list[common_pb2.Recipient] = []
        async for msg in request_iterator:
            if msg.WhichOneof("payload") == "header":
                key = msg.header.idempotency_key
            else:
                self.upload_chunks.append(len(msg.recipients.recipients))
                recipients.extend(msg.recipients.recipients)
        job, created = self._create(key, recipients)
        return coordinator_pb2.UploadJobResponse(job=job, created=created)

    async def GetJob(
        self, request: coordinator_pb2.GetJobRequest, context: Ctx
    ) -> coordinator_pb2.GetJobResponse:
        await self._gate("GetJob", context)
        if request.job_id == "hang":
            await asyncio.Event().wait()
        if request.job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} not found")
        return coordinator_pb2.GetJobResponse(job=self.jobs[request.job_id])

    async def WatchJob(
        self, request: coordinator_pb2.WatchJobRequest, context: Ctx
    ) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        await self._gate("WatchJob", context)
        while True:
            event = await self.watch_events.get()
            if event is _CLOSE:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "leadership changed")
            assert isinstance(event, common_pb2.JobProgress)
            yield coordinator_pb2.WatchJobResponse(progress=event)
            if event.state in (common_pb2.JOB_STATE_COMPLETED, common_pb2.JOB_STATE_CANCELLED):
                return

    async def CancelJob(
        self, request: coordinator_pb2.CancelJobRequest, context: Ctx
    ) -> coordinator_pb2.CancelJobResponse:
        await self._gate("CancelJob", context)
        job = self.jobs[request.job_id]
        job.progress.state = common_pb2.JOB_STATE_CANCELLED
        return coordinator_pb2.CancelJobResponse(job=job)

    async def RetryFailed(
        self, request: coordinator_pb2.RetryFailedRequest, context: Ctx
    ) -> coordinator_pb2.RetryFailedResponse:
        await self._gate("RetryFailed", context)
        job = self.jobs[request.job_id]
        job.progress.state = common_pb2.JOB_STATE_RUNNING
        return coordinator_pb2.RetryFailedResponse(job=job, requeued=job.progress.failed)

    async def ListSuppressions(
        self, request: coordinator_pb2.ListSuppressionsRequest, context: Ctx
    ) -> coordinator_pb2.ListSuppressionsResponse:
        await self._gate("ListSuppressions", context)
        emails = sorted(e for e in self.suppressed if e > request.page_token)
        page = emails[: request.page_size]
        return coordinator_pb2.ListSuppressionsResponse(
            suppressions=[self.suppressed[e] for e in page],
            next_page_token=page[-1] if len(emails) > request.page_size else "",
        )

    async def AddSuppression(
        self, request: coordinator_pb2.AddSuppressionRequest, context: Ctx
    ) -> coordinator_pb2.AddSuppressionResponse:
        await self._gate("AddSuppression", context)
        entry = coordinator_pb2.Suppression(
            email=request.email.lower(), reason=request.reason, tenant=request.tenant
        )
        self.suppressed[entry.email] = entry
        return coordinator_pb2.AddSuppressionResponse(suppression=entry)

    async def RemoveSuppression(
        self, request: coordinator_pb2.RemoveSuppressionRequest, context: Ctx
    ) -> coordinator_pb2.RemoveSuppressionResponse:
        await self._gate("RemoveSuppression", context)
        removed = self.suppressed.pop(request.email.lower(), None) is not None
        return coordinator_pb2.RemoveSuppressionResponse(removed=removed)

    async def ListJobResults(
        self, request: coordinator_pb2.ListJobResultsRequest, context: Ctx
    ) -> coordinator_pb2.ListJobResultsResponse:
        await self._gate("ListJobResults", context)
        self.result_requests.append(request)
        start = int(request.page_token or 0)
        end = start + request.page_size
        token = str(end) if end < len(self.results) else ""
        return coordinator_pb2.ListJobResultsResponse(
            results=self.results[start:end], next_page_token=token
        )

    async def CordonNode(
        self, request: coordinator_pb2.CordonNodeRequest, context: Ctx
    ) -> coordinator_pb2.CordonNodeResponse:
        await self._gate("CordonNode", context)
        return coordinator_pb2.CordonNodeResponse(
            node=coordinator_pb2.NodeInfo(
                node_id=request.node_id, state=coordinator_pb2.NODE_STATE_CORDONED
            )
        )

    # The rest of the API is not scripted; calling it is a test bug.
    async def ListJobs(
        self, request: coordinator_pb2.ListJobsRequest, context: Ctx
    ) -> coordinator_pb2.ListJobsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def GetClusterStatus(
        self, request: coordinator_pb2.GetClusterStatusRequest, context: Ctx
    ) -> coordinator_pb2.GetClusterStatusResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: Ctx
    ) -> coordinator_pb2.ListNodesResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def DrainNode(
        self, request: coordinator_pb2.DrainNodeRequest, context: Ctx
    ) -> coordinator_pb2.DrainNodeResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def UncordonNode(
        self, request: coordinator_pb2.UncordonNodeRequest, context: Ctx
    ) -> coordinator_pb2.UncordonNodeResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ResetBreaker(
        self, request: coordinator_pb2.ResetBreakerRequest, context: Ctx
    ) -> coordinator_pb2.ResetBreakerResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def PauseJob(
        self, request: coordinator_pb2.PauseJobRequest, context: Ctx
    ) -> coordinator_pb2.PauseJobResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ResumeJob(
        self, request: coordinator_pb2.ResumeJobRequest, context: Ctx
    ) -> coordinator_pb2.ResumeJobResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def StreamEvents(
        self, request: coordinator_pb2.StreamEventsRequest, context: Ctx
    ) -> AsyncIterator[coordinator_pb2.StreamEventsResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        yield coordinator_pb2.StreamEventsResponse()  # unreachable: makes it a stream

    async def CreateWebhook(
        self, request: coordinator_pb2.CreateWebhookRequest, context: Ctx
    ) -> coordinator_pb2.CreateWebhookResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ListWebhooks(
        self, request: coordinator_pb2.ListWebhooksRequest, context: Ctx
    ) -> coordinator_pb2.ListWebhooksResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def DeleteWebhook(
        self, request: coordinator_pb2.DeleteWebhookRequest, context: Ctx
    ) -> coordinator_pb2.DeleteWebhookResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ReplayWebhook(
        self, request: coordinator_pb2.ReplayWebhookRequest, context: Ctx
    ) -> coordinator_pb2.ReplayWebhookResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")


Cluster = list[tuple[FakeCoordinator, str]]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """Two fake coordinators: the first a standby pointing at the second, the leader."""
    servers: list[aio.Server] = []
    nodes: Cluster = []
    for _ in range(2):
        fake = FakeCoordinator()
        server = aio.server()
        coordinator_pb2_grpc.add_MailerServiceServicer_to_server(fake, server)
        coordinator_pb2_grpc.add_AdminServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        nodes.append((fake, f"127.0.0.1:{port}"))
    nodes[0][0].role = "standby"
    nodes[0][0].leader_hint = nodes[1][1]
    yield nodes
    for server in servers:
        await server.stop(None)


def progress(
    state: common_pb2.JobState.ValueType, delivered: int, total: int = 3
) -> common_pb2.JobProgress:
    return common_pb2.JobProgress(job_id="job-1", state=state, total=total, delivered=delivered)


async def test_leader_discovery_through_a_standby(cluster: Cluster) -> None:
    (standby, standby_addr), (leader, leader_addr) = cluster
    async with MailerClient([standby_addr, leader_addr], FAST) as client:
        # When a small job is submitted to a client that starts at the standby
        job = await client.submit(
            CONTENT,
            [Recipient("a@example.com"), Recipient("b@example.com")],
            timeout=timedelta(seconds=5),
        )
        # Then the standby redirected it and the leader created the job
        assert job.created is True and job.progress.total == 2
        assert standby.calls["SubmitJob"] == 1 and leader.calls["SubmitJob"] == 1
        assert client.leader == leader_addr
        # And the call's deadline reached the server
        remaining = leader.time_remaining[-1]
        assert remaining is not None and 0 < remaining <= 5
        # And later calls go straight to the leader
        assert (await client.get(job.job_id)).job_id == job.job_id
        assert standby.calls["GetJob"] == 0


async def test_large_submit_uploads_in_chunks_with_one_key(cluster: Cluster) -> None:
    _, (leader, leader_addr) = cluster

    async def recipients() -> AsyncIterator[Recipient]:
        for i in range(1234):
            yield Recipient(f"r{i}@example.com", variables={"i": str(i)})

    sent: list[int] = []
    async with MailerClient([leader_addr], FAST) as client:
        job = await client.submit(CONTENT, recipients(), on_progress=sent.append)
    assert leader.calls["UploadJob"] == 1 and leader.calls["SubmitJob"] == 0
    assert leader.upload_chunks == [500, 500, 234]
    stored = leader.recipients[job.job_id]
    assert [r.email for r in stored] == [f"r{i}@example.com" for i in range(1234)]
    assert uuid.UUID(job.idempotency_key).version == 4
    assert sent[-1] == 1234


class _RacedUpload:
    """An upload call that loses gRPC's race between a failed write and the server's
    status: every write fails, and the call ends with INTERNAL "Internal error from
    Core" instead of what the server sent (it happens under load with a standby)."""

    def __init__(self, real: Any, ends_after_s: float = 0.0) -> None:
        self._real = real
        self._ends_after_s = ends_after_s

    def _lost(self) -> aio.AioRpcError:
        self._real.cancel()
        return aio.AioRpcError(
            grpc.StatusCode.INTERNAL, aio.Metadata(), aio.Metadata(), "Internal error from Core"
        )

    async def write(self, message: object) -> None:
        raise self._lost()

    async def done_writing(self) -> None:
        raise self._lost()

    def cancel(self) -> None:
        self._real.cancel()

    def __await__(self) -> Any:
        async def ended() -> None:
            await asyncio.sleep(self._ends_after_s)
            raise self._lost()

        return ended().__await__()


def race_uploads_at(
    client: MailerClient, address: str, monkeypatch: pytest.MonkeyPatch, ends_after_s: float
) -> None:
    """Uploads to ``address`` lose gRPC's race (see :class:`_RacedUpload`)."""
    real_stubs = client._channels.stubs

    def stubs(at: str) -> Any:
        found = real_stubs(at)
        if at != address:
            return found

        class Raced:
            def method(self, rpc: Any) -> Any:
                real = found.method(rpc)
                if rpc.method != "UploadJob":
                    return real
                return lambda **kw: _RacedUpload(real(**kw), ends_after_s)

        return Raced()

    monkeypatch.setattr(client._channels, "stubs", stubs)


@pytest.mark.parametrize("late", [False, True], ids=["in-time", "after-its-deadline"])
async def test_an_upload_whose_status_grpc_lost(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, late: bool
) -> None:
    (standby, standby_addr), (leader, leader_addr) = cluster
    people = [Recipient(f"r{i}@example.com") for i in range(1234)]
    async with MailerClient([standby_addr, leader_addr], FAST) as client:
        # Given a standby whose refusal of an upload reaches the client only as gRPC's
        # "Internal error from Core" (late: only after the call's deadline)
        race_uploads_at(client, standby_addr, monkeypatch, ends_after_s=0.5 if late else 0)
        if late:
            # When a large job is submitted with 0.3 s to go, Then the caller hears that
            # its deadline passed (the key may be tried again), not that no leader exists
            with pytest.raises(DeadlineExceededError):
                await client.submit(CONTENT, people, timeout=timedelta(seconds=0.3))
            return
        # When a large job is submitted
        job = await client.submit(CONTENT, people, timeout=timedelta(seconds=10))
        # Then the client tried the next address, and the leader took the whole upload
        assert job.created is True and job.progress.total == 1234
        assert client.leader == leader_addr
        assert sum(leader.upload_chunks) == 1234


async def test_upload_redirected_by_a_standby_resends_a_one_shot_stream_whole(
    cluster: Cluster,
) -> None:
    # Given a client starting at the standby, and recipients that can be read only once
    (standby, standby_addr), (leader, leader_addr) = cluster
    recipients = (Recipient(f"r{i}@example.com") for i in range(1500))
    async with MailerClient([standby_addr, leader_addr], FAST) as client:
        # When the standby refuses the upload after part of it may have been read
        job = await client.submit(CONTENT, recipients, idempotency_key="once")
    # Then the leader still got every recipient, in order, exactly once
    assert standby.calls["UploadJob"] == 1 and leader.calls["UploadJob"] == 1
    assert [r.email for r in leader.recipients[job.job_id]] == [
        f"r{i}@example.com" for i in range(1500)
    ]


async def test_repeating_a_submit_with_the_same_key_returns_the_first_job(cluster: Cluster) -> None:
    _, (leader, leader_addr) = cluster
    async with MailerClient([leader_addr], FAST) as client:
        first = await client.submit(CONTENT, [Recipient("a@example.com")], idempotency_key="k-1")
        again = await client.submit(CONTENT, [Recipient("a@example.com")], idempotency_key="k-1")
    assert (first.created, again.created) == (True, False)
    assert again.job_id == first.job_id and len(leader.jobs) == 1


async def test_watch_yields_progress_events_and_ends(cluster: Cluster) -> None:
    _, (leader, leader_addr) = cluster
    for ev in (
        progress(common_pb2.JOB_STATE_RUNNING, 0),
        progress(common_pb2.JOB_STATE_RUNNING, 2),
        progress(common_pb2.JOB_STATE_COMPLETED, 3),
    ):
        leader.watch_events.put_nowait(ev)
    async with MailerClient([leader_addr], FAST) as client:
        events = [p async for p in client.watch("job-1")]
    assert [(p.state, p.delivered) for p in events] == [
        (JobState.RUNNING, 0),
        (JobState.RUNNING, 2),
        (JobState.COMPLETED, 3),
    ]
    assert events[-1].is_final and leader.calls["WatchJob"] == 1


async def test_watch_continues_at_the_new_leader_after_failover(cluster: Cluster) -> None:
    (first, first_addr), (second, second_addr) = cluster
    # Given the first coordinator leads and the second is its standby
    first.role, second.role = "leader", "standby"
    second.leader_hint = first_addr
    events: list[JobProgress] = []
    async with MailerClient([first_addr, second_addr], FAST) as client:

        async def consume() -> None:
            async for p in client.watch("job-1"):
                events.append(p)

        task = asyncio.create_task(consume())
        first.watch_events.put_nowait(progress(common_pb2.JOB_STATE_RUNNING, 1))
        await assert_eventually(lambda: len(events) == 1, timeout_s=5, message="first event")
        # When leadership moves to the second and the first drops the stream
        second.role = "leader"
        first.role, first.leader_hint = "standby", second_addr
        for ev in (
            progress(common_pb2.JOB_STATE_RUNNING, 1),  # the current counts, seen already
            progress(common_pb2.JOB_STATE_RUNNING, 2),
            progress(common_pb2.JOB_STATE_COMPLETED, 3),
        ):
            second.watch_events.put_nowait(ev)
        first.watch_events.put_nowait(_CLOSE)
        # Then the watch goes on at the second and ends with the final state
        await asyncio.wait_for(task, timeout=5)
    assert [p.delivered for p in events] == [1, 2, 3]
    assert events[-1].state is JobState.COMPLETED
    assert second.calls["WatchJob"] >= 1


async def test_unavailable_address_fails_over_to_the_next(cluster: Cluster) -> None:
    (standby, standby_addr), (leader, leader_addr) = cluster
    leader.jobs["job-7"] = coordinator_pb2.Job(job_id="job-7")
    # Given a dead address, then a leaderless coordinator, then the leader
    standby.role = "leaderless"
    dead_addr = f"127.0.0.1:{free_port()}"
    async with MailerClient([dead_addr, standby_addr, leader_addr], FAST) as client:
        job = await client.get("job-7", timeout=timedelta(seconds=10))
        assert client.leader == leader_addr
    assert job.job_id == "job-7"
    assert standby.calls["GetJob"] == 1 and leader.calls["GetJob"] == 1


async def test_no_leader_anywhere_gives_unavailable_within_the_budget(cluster: Cluster) -> None:
    (a, a_addr), (b, b_addr) = cluster
    a.role = b.role = "leaderless"
    config = ClientConfig(
        retry=RetryPolicy(
            initial_backoff=timedelta(milliseconds=1),
            max_backoff=timedelta(milliseconds=5),
            max_attempts=6,
        )
    )
    async with MailerClient([a_addr, b_addr], config) as client:
        with pytest.raises(UnavailableError, match="no leader reachable"):
            await client.get("job-1")
    assert a.calls["GetJob"] + b.calls["GetJob"] == 6


async def test_cancel_is_not_retried_when_the_leader_is_unavailable(cluster: Cluster) -> None:
    _, (leader, leader_addr) = cluster
    leader.jobs["job-1"] = coordinator_pb2.Job(job_id="job-1")
    async with MailerClient([leader_addr], FAST) as client:
        await client.get("job-1")  # the leader is now known
        leader.role = "leaderless"
        with pytest.raises(UnavailableError):
            await client.cancel("job-1")
    assert leader.calls["CancelJob"] == 1


async def test_results_are_paged_with_tokens(cluster: Cluster) -> None:
    _, (leader, leader_addr) = cluster
    leader.results = [
        common_pb2.RecipientResult(
            index=i,
            email=f"r{i}@example.com",
            status=common_pb2.RECIPIENT_STATUS_DELIVERED,
            node_id=f"n{i % 2}",
        )
        for i in range(7)
    ]
    async with MailerClient([leader_addr], FAST) as client:
        results = [
            r
            async for r in client.results(
                "job-1", statuses=[RecipientStatus.DELIVERED], page_size=3
            )
        ]
    assert [r.index for r in results] == list(range(7))
    assert all(r.status is RecipientStatus.DELIVERED for r in results)
    assert [req.page_token for req in leader.result_requests] == ["", "3", "6"]
    assert list(leader.result_requests[0].statuses) == [common_pb2.RECIPIENT_STATUS_DELIVERED]


async def test_deadline_and_not_found_surface_as_typed_errors(cluster: Cluster) -> None:
    _, (leader, leader_addr) = cluster
    async with MailerClient([leader_addr], FAST) as client:
        with pytest.raises(DeadlineExceededError):
            await client.get("hang", timeout=timedelta(milliseconds=200))
        with pytest.raises(NotFoundError, match="job nope not found"):
            await client.get("nope")
    assert leader.calls["GetJob"] == 2  # neither was retried


async def test_admin_calls_return_typed_results(cluster: Cluster) -> None:
    (_, standby_addr), (_, leader_addr) = cluster
    async with MailerClient([standby_addr, leader_addr], FAST) as client:
        node = await client.cordon("node-a")
    assert node.node_id == "node-a" and node.state is NodeState.CORDONED


async def test_run_send_submits_a_csv_watches_it_and_summarises(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Given a CSV of three recipients and a cluster that will deliver two of them
    (_, standby_addr), (leader, leader_addr) = cluster
    csv_path = tmp_path / "spring.csv"
    csv_path.write_text("email,name,plan\na@example.com,A,pro\nb@example.com,B,free\nc@x.org,C,\n")
    for ev in (
        progress(common_pb2.JOB_STATE_RUNNING, 1),
        common_pb2.JobProgress(
            job_id="job-1", state=common_pb2.JOB_STATE_COMPLETED, total=3, delivered=2, failed=1
        ),
    ):
        leader.watch_events.put_nowait(ev)
    leader.results = [
        common_pb2.RecipientResult(
            index=0, status=common_pb2.RECIPIENT_STATUS_DELIVERED, node_id="n1"
        ),
        common_pb2.RecipientResult(
            index=1, status=common_pb2.RECIPIENT_STATUS_DELIVERED, node_id="n2"
        ),
        common_pb2.RecipientResult(
            index=2,
            status=common_pb2.RECIPIENT_STATUS_FAILED,
            reply=common_pb2.SmtpReply(code=550, enhanced_code="5.1.1", text="unknown user"),
            node_id="n2",
        ),
    ]
    out = io.StringIO()
    args = SendArgs(
        csv_path=csv_path,
        content=CONTENT,
        coordinators=(standby_addr, leader_addr),
        options=JobOptions(name="spring"),
    )
    # When it is sent through a client run_send makes itself
    summary = await run_send(args, Console(file=out, width=120))
    # Then the leader got every row, and the summary has counts, failures and node shares
    assert summary is not None
    assert [r.email for r in leader.recipients["job-1"]] == [
        "a@example.com",
        "b@example.com",
        "c@x.org",
    ]
    assert dict(leader.recipients["job-1"][0].variables) == {"plan": "pro"}
    assert (summary.state, summary.delivered, summary.failed) == (JobState.COMPLETED, 2, 1)
    assert list(summary.top_failures) == [("550 5.1.1 unknown user", 1)]
    assert dict(summary.per_node) == {"n2": 2, "n1": 1}
    assert summary.elapsed_s > 0
    printed = out.getvalue()
    assert "job-1" in printed and "550 5.1.1 unknown user" in printed and "msg/s" in printed


async def test_suppression_calls_page_and_convert(cluster: Cluster) -> None:
    (_, standby_addr), (leader, leader_addr) = cluster
    async with MailerClient([standby_addr, leader_addr], FAST) as client:
        # Given five addresses added, one as an unsubscribe
        for i in range(5):
            reason = SuppressionReason.UNSUBSCRIBE if i == 0 else SuppressionReason.MANUAL
            added = await client.suppress(f"U{i}@x.example", reason, tenant="acme")
            assert added.email == f"u{i}@x.example" and added.reason is reason
        # When the list is read two at a time, Then every address comes once, in order
        listed = [s async for s in client.suppressions(page_size=2)]
        assert [s.email for s in listed] == [f"u{i}@x.example" for i in range(5)]
        assert listed[0].reason is SuppressionReason.UNSUBSCRIBE and listed[0].tenant == "acme"
        assert leader.calls["ListSuppressions"] == 3
        # And removal reports whether the address was listed
        assert await client.unsuppress("u1@x.example") is True
        assert await client.unsuppress("u1@x.example") is False
