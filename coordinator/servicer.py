"""gRPC servicers of the coordinator: the client API and the admin API.

Both are served by every coordinator; only the leader answers. A standby answers
FAILED_PRECONDITION with the leader's address in the trailing metadata key
``mailers-leader`` (UNAVAILABLE while no leader is known), so clients find the
leader without a separate discovery call. Failures map to status codes through the
one table in :mod:`coordinator.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from aetcd import rpc as etcd_rpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status  # type: ignore[import-untyped]

from coordinator import _convert
from coordinator.auth import ANONYMOUS_DEV, TENANT_ID, AuthConfig, Principal
from coordinator.batching import batch_range, chunks
from coordinator.dispatcher import Dispatcher, JobRuntime
from coordinator.election import Election
from coordinator.errors import (
    Conflict,
    NotFound,
    NotLeader,
    PermissionDenied,
    Unauthenticated,
    status_for,
)
from coordinator.model import (
    BatchState,
    Content,
    Counts,
    JobOptions,
    JobSpec,
    JobState,
    JobStatus,
    Recipient,
    Result,
    Status,
)
from coordinator.quotas import (
    HourlyWindow,
    QuotaExceeded,
    Quotas,
    check_active_jobs,
    check_job_size,
)
from coordinator.suppression import Suppression, normalize
from coordinator.validation import (
    Collector,
    Limits,
    TemplateCheck,
    ValidationError,
    check_content,
    check_idempotency_key,
    check_job,
    check_recipients,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from mailers.etcd import EtcdTls, connect

log = logging.getLogger(__name__)

LEADER_METADATA_KEY = "mailers-leader"
# Batches are written to etcd in groups this large while a job streams in.
_WRITE_GROUP = 64
# Each etcd endpoint gets this long to answer a status request in GetClusterStatus.
_ETCD_STATUS_DEADLINE_S = 1.5
_T = TypeVar("_T")


class Role:
    """What this coordinator is right now; shared by the servicers and the main loop."""

    def __init__(
        self,
        coordinator_id: str,
        address: str,
        etcd_endpoints: list[str],
        etcd_tls: EtcdTls | None = None,
    ) -> None:
        self.coordinator_id = coordinator_id
        self.address = address
        self.etcd_endpoints = etcd_endpoints
        self.etcd_tls = etcd_tls
        self.dispatcher: Dispatcher | None = None
        self.election: Election | None = None
        self._hint = ""
        self._hint_at = 0.0

    async def leader_hint(self) -> str:
        """The current leader's address as etcd says (cached for a second)."""
        now = time.monotonic()
        if self.election is not None and now - self._hint_at > 1.0:
            try:
                # Short: a coordinator cut off from etcd should redirect (or refuse) fast.
                candidates = await asyncio.wait_for(self.election.candidates(), 0.5)
                self._hint = candidates[0].address if candidates else ""
            except Exception:
                self._hint = ""
            self._hint_at = now
        return self._hint

    async def leader(self) -> Dispatcher:
        """The dispatcher, if we lead. Raises NotLeader otherwise."""
        dispatcher = self.dispatcher
        if dispatcher is not None and not dispatcher.lost.is_set():
            return dispatcher
        hint = await self.leader_hint()
        raise NotLeader(hint if hint != self.address else "")


def retry_info_status(code: grpc.StatusCode, message: str, retry_after_s: float) -> grpc.Status:
    """A status whose ``grpc-status-details-bin`` carries ``google.rpc.RetryInfo``."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(0.0, retry_after_s) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.Code.Value(code.name), message=message, details=[detail])
    )
    return status


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    if isinstance(exc, NotLeader) and exc.leader:
        context.set_trailing_metadata(((LEADER_METADATA_KEY, exc.leader),))
    if isinstance(exc, QuotaExceeded) and exc.retry_after_s is not None:
        await context.abort_with_status(retry_info_status(code, message, exc.retry_after_s))
    await context.abort(code, message)


async def _handle(
    context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[_T]]
) -> _T:
    try:
        return await call()
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except Exception as exc:
        await _abort(context, exc)
        raise AssertionError("unreachable: abort raises") from exc


async def _until_settled(
    d: Dispatcher, job: JobRuntime, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    """Wait (within the call's deadline, 30 s at most) until every node holding one of
    the job's batches has stopped it and said so."""
    remaining = context.time_remaining()
    limit = 30.0 if remaining is None else max(0.0, min(30.0, remaining - 0.5))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            await d.settled(job)


def new_job_id(now: float) -> str:
    """Sortable by creation time (hex milliseconds), then random."""
    return f"{int(now * 1000):012x}-{secrets.token_hex(4)}"


class JobWriter:
    """Writes a job's batches to etcd as its recipients arrive, then commits it.

    Nothing is visible until :meth:`commit`; on any failure :meth:`discard` removes
    what was written, so a job is accepted whole or not at all.
    """

    def __init__(self, dispatcher: Dispatcher, job_id: str, batch_size: int) -> None:
        self._d = dispatcher
        self.job_id = job_id
        self._batch_size = batch_size
        self._pending: list[Recipient] = []
        self._group: list[tuple[int, int, list[Recipient]]] = []
        self.total = 0
        self._seq = 0

    async def add(self, recipients: list[Recipient]) -> None:
        self._pending.extend(recipients)
        while len(self._pending) >= self._batch_size:
            self._cut(self._batch_size)
        if len(self._group) >= _WRITE_GROUP:
            await self._write()

    def _cut(self, size: int) -> None:
        batch, self._pending = self._pending[:size], self._pending[size:]
        self._group.append((self._seq, self.total, batch))
        self._seq += 1
        self.total += len(batch)

    async def _write(self) -> None:
        group, self._group = self._group, []
        await self._d.store.write_batches(self.job_id, group)

    async def finish(self) -> None:
        if self._pending:
            self._cut(len(self._pending))
        if self._group:
            await self._write()

    async def discard(self) -> None:
        await self._d.store.discard_batches(self.job_id)


async def etcd_member(
    endpoint: str, deadline_s: float, tls: EtcdTls | None = None
) -> coordinator_pb2.EtcdMember:
    """Ask one etcd endpoint for its status through a client of its own (the shared
    client fails over and so cannot tell which member answered). Never raises; the
    client is closed whatever happens."""
    member = coordinator_pb2.EtcdMember(endpoint=endpoint)
    client = connect([endpoint], timeout_s=max(1, int(deadline_s)), tls=tls)
    try:
        async with asyncio.timeout(deadline_s):
            await client.connect()
            # aetcd's status() drops the answering member's id and revision; the raw
            # Maintenance.Status reply has both (header.member_id, header.revision).
            reply = await client.maintenancestub.Status(
                etcd_rpc.StatusRequest(), timeout=deadline_s
            )
        member.healthy = True
        member.is_leader = reply.leader != 0 and reply.leader == reply.header.member_id
        member.db_size_bytes = reply.dbSize
        member.revision = reply.header.revision
    except Exception as exc:  # any failure or the deadline: this member is unhealthy
        member.error = f"{type(exc).__name__}: {exc}".strip()[:200] or "no answer"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 1.0)
    return member


def suppression_tenant(caller: Principal, requested: str) -> str:
    """Whose suppression list a call acts on: a tenant's own; an admin names any
    (``""`` is the list of jobs submitted with auth off)."""
    if caller.admin:
        if requested and not TENANT_ID.match(requested):
            raise ValidationError([("tenant", "is not a tenant id")])
        return requested
    if requested and requested != caller.tenant:
        raise PermissionDenied("a tenant manages only its own suppression list")
    return caller.tenant


def suppression_email(raw: str) -> str:
    """The normalised address of a suppression request. Raises ValidationError."""
    email = normalize(raw)
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain or len(email) > 320:
        raise ValidationError([("email", "is not an email address")])
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in email):
        raise ValidationError([("email", "contains whitespace or control characters")])
    return email


def job_not_found(job_id: str) -> NotFound:
    """The one error for a job that is missing or another tenant's (existence not leaked)."""
    return NotFound(f"job {job_id!r} not found")


class MailerServicer(coordinator_pb2_grpc.MailerServiceServicer):
    """The client API. Every job belongs to the tenant that submitted it; a tenant
    sees only its own jobs, and another tenant's job is NOT_FOUND like a missing one.
    Tokens are checked before any handler by :class:`coordinator.edge.AuthInterceptor`;
    here the caller is only identified (``auth`` None: auth off, everyone is tenant "").
    """

    def __init__(
        self,
        role: Role,
        batch_size: int,
        limits: Limits,
        *,
        auth: AuthConfig | None = None,
        default_quotas: Quotas | None = None,
        templates: TemplateCheck | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._role = role
        self._batch_size = batch_size
        self._limits = limits
        self._auth = auth
        self._default_quotas = default_quotas or Quotas()
        self._templates = templates
        self._clock = clock
        # In memory on the leader (see coordinator.quotas).
        self._window = HourlyWindow()
        # job id -> tenant; specs never change, so entries never go stale.
        self._owners: dict[str, str] = {}

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        if self._auth is None:
            return ANONYMOUS_DEV
        principal = self._auth.identify(context.invocation_metadata() or ())
        if principal is None:
            raise Unauthenticated("missing or invalid API token")
        return principal

    def _quotas(self, tenant: str) -> Quotas:
        if self._auth is None:
            return self._default_quotas
        return self._auth.quotas_for(tenant, self._default_quotas)

    def _check_active(self, d: Dispatcher, tenant: str, quotas: Quotas) -> None:
        active = sum(
            1 for j in d.jobs.values() if j.spec.tenant == tenant and not j.status.state.final
        )
        check_active_jobs(quotas, active)

    # ---- submit ---------------------------------------------------------------------

    async def _existing(
        self, d: Dispatcher, caller: Principal, idempotency_key: str
    ) -> coordinator_pb2.Job | None:
        job_id = await d.store.find_idempotent(caller.tenant, idempotency_key)
        if job_id is None:
            return None
        return await self._job(d, job_id, caller, with_content=True)

    async def _commit(
        self,
        d: Dispatcher,
        writer: JobWriter,
        content: Content,
        options: JobOptions,
        idempotency_key: str,
        now: float,
        caller: Principal,
    ) -> tuple[coordinator_pb2.Job, bool]:
        spec = JobSpec(
            job_id=writer.job_id,
            idempotency_key=idempotency_key,
            content=content,
            options=options,
            total=writer.total,
            batch_size=self._batch_size,
            created_at=now,
            tenant=caller.tenant,
        )
        status = JobStatus(state=JobState.QUEUED, counts=Counts(total=writer.total), updated_at=now)
        quotas = self._quotas(caller.tenant)
        self._check_active(d, caller.tenant, quotas)
        # Reserved before the commit's await so that concurrent submits cannot both fit.
        self._window.reserve(caller.tenant, quotas, writer.total, now)
        try:
            existing_id = await d.store.commit_job(spec, status)
        except BaseException:
            self._window.release(caller.tenant, writer.total, now)
            raise
        if existing_id is not None:
            self._window.release(caller.tenant, writer.total, now)
            await writer.discard()
            return await self._job(d, existing_id, caller, with_content=True), False
        d.add_job(spec, status)
        log.info("accepted job %s with %d recipients", spec.job_id, spec.total)
        return _convert.job_to(spec, status), True

    async def SubmitJob(
        self,
        request: coordinator_pb2.SubmitJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.SubmitJobResponse:
        async def call() -> coordinator_pb2.SubmitJobResponse:
            caller = self._caller(context)
            d = await self._role.leader()
            content = _convert.content_from(request.content)
            recipients = [_convert.recipient_from(r) for r in request.recipients]
            check_job(content, recipients, request.idempotency_key, self._limits, self._templates)
            existing = await self._existing(d, caller, request.idempotency_key)
            if existing is not None:
                return coordinator_pb2.SubmitJobResponse(job=existing, created=False)
            quotas = self._quotas(caller.tenant)
            check_job_size(quotas, len(recipients))
            self._check_active(d, caller.tenant, quotas)
            now = self._clock()
            writer = JobWriter(d, new_job_id(now), self._batch_size)
            try:
                for chunk in chunks(recipients, self._batch_size * _WRITE_GROUP):
                    await writer.add(chunk)
                await writer.finish()
                job, created = await self._commit(
                    d,
                    writer,
                    content,
                    _convert.options_from(request.options),
                    request.idempotency_key,
                    now,
                    caller,
                )
            except BaseException:
                await writer.discard()
                raise
            return coordinator_pb2.SubmitJobResponse(job=job, created=created)

        return await _handle(context, call)

    async def UploadJob(
        self,
        request_iterator: AsyncIterator[coordinator_pb2.UploadJobRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.UploadJobResponse:
        async def call() -> coordinator_pb2.UploadJobResponse:
            caller = self._caller(context)
            d = await self._role.leader()
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("payload") != "header":
                raise ValidationError([("header", "the first message must carry the header")])
            header = first.header
            content = _convert.content_from(header.content)
            out = Collector()
            check_idempotency_key(out, header.idempotency_key)
            check_content(out, content, self._limits, self._templates)
            out.raise_if_any()
            existing = await self._existing(d, caller, header.idempotency_key)
            if existing is not None:
                return coordinator_pb2.UploadJobResponse(job=existing, created=False)
            quotas = self._quotas(caller.tenant)
            self._check_active(d, caller.tenant, quotas)
            now = self._clock()
            writer = JobWriter(d, new_job_id(now), self._batch_size)
            problems = Collector()
            seen = 0
            try:
                async for message in request_iterator:
                    if message.WhichOneof("payload") != "recipients":
                        raise ValidationError(
                            [("header", "only the first message may be a header")]
                        )
                    chunk = [_convert.recipient_from(r) for r in message.recipients.recipients]
                    check_recipients(problems, chunk, seen, self._limits)
                    seen += len(chunk)
                    if seen > self._limits.max_recipients:
                        raise ValidationError(
                            [("recipients", f"more than {self._limits.max_recipients} recipients")]
                        )
                    check_job_size(quotas, seen)
                    if not problems.problems:
                        await writer.add(chunk)
                if seen == 0:
                    problems.add("recipients", "at least one recipient is required")
                problems.raise_if_any()
                await writer.finish()
                job, created = await self._commit(
                    d,
                    writer,
                    content,
                    _convert.options_from(header.options),
                    header.idempotency_key,
                    now,
                    caller,
                )
            except BaseException:
                await writer.discard()
                raise
            return coordinator_pb2.UploadJobResponse(job=job, created=created)

        return await _handle(context, call)

    # ---- reads ----------------------------------------------------------------------

    async def _runtime_or_load(
        self, d: Dispatcher, job_id: str, caller: Principal
    ) -> tuple[JobSpec, JobStatus, JobRuntime | None]:
        """The job if it exists and the caller may see it; NotFound otherwise."""
        job = d.jobs.get(job_id)
        if job is not None:
            if not caller.sees_all and job.spec.tenant != caller.tenant:
                raise job_not_found(job_id)
            return job.spec, job.status, job
        if not job_id or "/" in job_id:
            raise job_not_found(job_id)
        spec = await d.store.load_spec(job_id)
        if spec is None or (not caller.sees_all and spec.tenant != caller.tenant):
            raise job_not_found(job_id)
        status = await d.store.load_status(job_id)
        if status is None:
            raise job_not_found(job_id)
        return spec, status, None

    async def _job(
        self, d: Dispatcher, job_id: str, caller: Principal, with_content: bool
    ) -> coordinator_pb2.Job:
        spec, status, _ = await self._runtime_or_load(d, job_id, caller)
        return _convert.job_to(spec, status, with_content=with_content)

    async def _owner(self, d: Dispatcher, job_id: str) -> tuple[str, JobSpec | None]:
        """The tenant of a job (from memory, else its spec), and the spec if loaded."""
        job = d.jobs.get(job_id)
        if job is not None:
            return job.spec.tenant, job.spec
        tenant = self._owners.get(job_id)
        if tenant is not None:
            return tenant, None
        spec = await d.store.load_spec(job_id)
        if spec is None:
            return "", None
        self._owners[job_id] = spec.tenant
        return spec.tenant, spec

    async def GetJob(
        self, request: coordinator_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GetJobResponse:
        async def call() -> coordinator_pb2.GetJobResponse:
            caller = self._caller(context)
            d = await self._role.leader()
            job = await self._job(d, request.job_id, caller, True)
            return coordinator_pb2.GetJobResponse(job=job)

        return await _handle(context, call)

    async def WatchJob(
        self,
        request: coordinator_pb2.WatchJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        try:
            caller = self._caller(context)
            d = await self._role.leader()
            spec, status, job = await self._runtime_or_load(d, request.job_id, caller)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(context, exc)
            return
        while True:
            changed = job.changed if job is not None else None
            yield coordinator_pb2.WatchJobResponse(
                progress=_convert.progress_to(spec.job_id, status, spec.created_at)
            )
            if status.state.final and (job is None or not job.inflight):
                return
            if changed is None:
                await asyncio.sleep(1.0)
                spec, status, job = await self._runtime_or_load(d, request.job_id, caller)
            else:
                lost = asyncio.ensure_future(d.lost.wait())
                wait = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait({lost, wait}, timeout=10, return_when="FIRST_COMPLETED")
                finally:
                    lost.cancel()
                    wait.cancel()
                if d.lost.is_set():
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "leadership changed")
                # At most ten updates a second per watcher, however busy the job is.
                await asyncio.sleep(0.1)

    async def CancelJob(
        self,
        request: coordinator_pb2.CancelJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.CancelJobResponse:
        async def call() -> coordinator_pb2.CancelJobResponse:
            caller = self._caller(context)
            d = await self._role.leader()
            spec, status, job = await self._runtime_or_load(d, request.job_id, caller)
            if job is not None:
                d.cancel(job)
                await _until_settled(d, job, context)
                await d.flushed()
            return coordinator_pb2.CancelJobResponse(job=_convert.job_to(spec, status))

        return await _handle(context, call)

    async def ListJobs(
        self, request: coordinator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListJobsResponse:
        async def call() -> coordinator_pb2.ListJobsResponse:
            caller = self._caller(context)
            d = await self._role.leader()
            page_size = min(request.page_size or 100, 1000)
            wanted = {_convert.job_state_from(s) for s in request.states}
            statuses = await d.store.list_statuses()
            for job_id, job in d.jobs.items():
                statuses[job_id] = job.status
            ids = sorted(statuses, reverse=True)
            if request.page_token:
                ids = [i for i in ids if i < request.page_token]
            page: list[coordinator_pb2.Job] = []
            next_token = ""
            for job_id in ids:
                status = statuses[job_id]
                if wanted and status.state not in wanted:
                    continue
                tenant, spec = await self._owner(d, job_id)
                if not caller.sees_all and tenant != caller.tenant:
                    continue
                if len(page) == page_size:
                    next_token = page[-1].job_id
                    break
                if spec is None:
                    spec = await d.store.load_spec(job_id)
                if spec is not None:
                    page.append(_convert.job_to(spec, status, with_content=False))
            return coordinator_pb2.ListJobsResponse(jobs=page, next_page_token=next_token)

        return await _handle(context, call)

    async def RetryFailed(
        self,
        request: coordinator_pb2.RetryFailedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.RetryFailedResponse:
        async def call() -> coordinator_pb2.RetryFailedResponse:
            caller = self._caller(context)
            d = await self._role.leader()
            # Ownership first: another tenant's job is "not found" like a missing one.
            await self._runtime_or_load(d, request.job_id, caller)
            job, requeued = await d.retry_failed(request.job_id)
            await d.flushed()
            return coordinator_pb2.RetryFailedResponse(
                job=_convert.job_to(job.spec, job.status), requeued=requeued
            )

        return await _handle(context, call)

    async def ListJobResults(
        self,
        request: coordinator_pb2.ListJobResultsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ListJobResultsResponse:
        async def call() -> coordinator_pb2.ListJobResultsResponse:
            caller = self._caller(context)
            d = await self._role.leader()
            spec, status, job = await self._runtime_or_load(d, request.job_id, caller)
            page_size = min(request.page_size or 500, 5000)
            wanted = {_convert.status_from(s) for s in request.statuses}
            try:
                start = int(request.page_token or 0)
            except ValueError:
                raise ValidationError([("page_token", "is not a token from this API")]) from None
            results: list[common_pb2.RecipientResult] = []
            index = start
            scanned = 0
            # Bounded work per page: a filter matching nothing still returns promptly
            # with a token to continue from.
            while index < spec.total and len(results) < page_size and scanned < 200:
                seq = index // spec.batch_size
                first, recipients = await d.store.load_batch(spec.job_id, seq)
                state = job.states.get(seq) if job is not None else None
                if state is None:
                    state = await d.store.load_state(spec.job_id, seq) or BatchState()
                end = batch_range(seq, spec.batch_size, spec.total).stop
                while index < end and len(results) < page_size:
                    result = state.results.get(index) or Result(status=Status.QUEUED)
                    if status.state is JobState.CANCELLED and not result.status.final:
                        result = Result(
                            status=Status.CANCELLED,
                            code=result.code,
                            enhanced_code=result.enhanced_code,
                            text=result.text,
                            reason="job cancelled",
                            attempts=result.attempts,
                            node_id=result.node_id,
                        )
                    if not wanted or result.status in wanted:
                        email = recipients[index - first].email
                        results.append(_convert.result_to(index, email, result))
                    index += 1
                scanned += 1
            start = index
            next_token = str(start) if start < spec.total else ""
            return coordinator_pb2.ListJobResultsResponse(
                results=results, next_page_token=next_token
            )

        return await _handle(context, call)

    # ---- suppression lists ----------------------------------------------------------

    async def ListSuppressions(
        self,
        request: coordinator_pb2.ListSuppressionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ListSuppressionsResponse:
        async def call() -> coordinator_pb2.ListSuppressionsResponse:
            tenant = suppression_tenant(self._caller(context), request.tenant)
            d = await self._role.leader()
            page_size = min(request.page_size or 100, 1000)
            listed = await d.suppressions(tenant)
            emails = sorted(e for e in listed if e > request.page_token)
            page = emails[:page_size]
            next_token = page[-1] if len(emails) > page_size else ""
            return coordinator_pb2.ListSuppressionsResponse(
                suppressions=[_convert.suppression_to(tenant, listed[e]) for e in page],
                next_page_token=next_token,
            )

        return await _handle(context, call)

    async def AddSuppression(
        self,
        request: coordinator_pb2.AddSuppressionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.AddSuppressionResponse:
        async def call() -> coordinator_pb2.AddSuppressionResponse:
            tenant = suppression_tenant(self._caller(context), request.tenant)
            email = suppression_email(request.email)
            reason = _convert.reason_from(request.reason)
            if reason is None:
                raise ValidationError([("reason", "is not a suppression reason")])
            d = await self._role.leader()
            entry = await d.add_suppression(
                tenant, Suppression(email=email, reason=reason, created_at=self._clock())
            )
            return coordinator_pb2.AddSuppressionResponse(
                suppression=_convert.suppression_to(tenant, entry)
            )

        return await _handle(context, call)

    async def RemoveSuppression(
        self,
        request: coordinator_pb2.RemoveSuppressionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.RemoveSuppressionResponse:
        async def call() -> coordinator_pb2.RemoveSuppressionResponse:
            tenant = suppression_tenant(self._caller(context), request.tenant)
            email = suppression_email(request.email)
            d = await self._role.leader()
            removed = await d.remove_suppression(tenant, email)
            return coordinator_pb2.RemoveSuppressionResponse(removed=removed)

        return await _handle(context, call)


class AdminServicer(coordinator_pb2_grpc.AdminServiceServicer):
    def __init__(self, role: Role) -> None:
        self._role = role

    async def GetClusterStatus(
        self,
        request: coordinator_pb2.GetClusterStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.GetClusterStatusResponse:
        async def call() -> coordinator_pb2.GetClusterStatusResponse:
            d = await self._role.leader()
            assert self._role.election is not None
            candidates = await self._role.election.candidates()
            infos = [
                coordinator_pb2.CoordinatorInfo(
                    coordinator_id=c.coordinator_id, address=c.address, epoch=c.epoch
                )
                for c in candidates
            ]
            members = await asyncio.gather(
                *(
                    etcd_member(e, _ETCD_STATUS_DEADLINE_S, self._role.etcd_tls)
                    for e in self._role.etcd_endpoints
                )
            )
            return coordinator_pb2.GetClusterStatusResponse(
                leader=infos[0] if infos else None,
                standbys=infos[1:],
                etcd_endpoints=self._role.etcd_endpoints,
                active_jobs=sum(1 for j in d.jobs.values() if not j.status.state.final),
                etcd_members=members,
            )

        return await _handle(context, call)

    async def _node_info(self, d: Dispatcher, node_id: str) -> coordinator_pb2.NodeInfo:
        node = d.nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered")
        if not node.link.connected:
            state = coordinator_pb2.NODE_STATE_DISCONNECTED
        elif node_id in d.cordoned:
            state = coordinator_pb2.NODE_STATE_CORDONED
        else:
            state = coordinator_pb2.NODE_STATE_ACTIVE
        ttl = -1
        try:
            info = await asyncio.wait_for(d.client.get_lease_info(node.lease_id, keys=False), 2)
            ttl = int(info.TTL)
        except Exception:
            ttl = -1
        breaker = {
            "closed": common_pb2.BREAKER_STATE_CLOSED,
            "open": common_pb2.BREAKER_STATE_OPEN,
            "half_open": common_pb2.BREAKER_STATE_HALF_OPEN,
        }[node.breaker.state().value]
        return coordinator_pb2.NodeInfo(
            node_id=node_id,
            address=node.address,
            state=state,
            load=node.link.load,
            lease_ttl_remaining_s=ttl,
            breaker_state=breaker,
            relays=node.link.relays,
            batches_in_flight=d.node_batches(node_id),
            recipients_done=node.recipients_done,
        )

    async def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListNodesResponse:
        async def call() -> coordinator_pb2.ListNodesResponse:
            d = await self._role.leader()
            nodes = [await self._node_info(d, n) for n in sorted(d.nodes)]
            return coordinator_pb2.ListNodesResponse(nodes=nodes)

        return await _handle(context, call)

    async def CordonNode(
        self,
        request: coordinator_pb2.CordonNodeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.CordonNodeResponse:
        async def call() -> coordinator_pb2.CordonNodeResponse:
            d = await self._role.leader()
            await self._node_info(d, request.node_id)
            await d.set_cordon(request.node_id, True)
            return coordinator_pb2.CordonNodeResponse(
                node=await self._node_info(d, request.node_id)
            )

        return await _handle(context, call)

    async def UncordonNode(
        self,
        request: coordinator_pb2.UncordonNodeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.UncordonNodeResponse:
        async def call() -> coordinator_pb2.UncordonNodeResponse:
            d = await self._role.leader()
            await self._node_info(d, request.node_id)
            await d.set_cordon(request.node_id, False)
            return coordinator_pb2.UncordonNodeResponse(
                node=await self._node_info(d, request.node_id)
            )

        return await _handle(context, call)

    async def DrainNode(
        self, request: coordinator_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.DrainNodeResponse:
        async def call() -> coordinator_pb2.DrainNodeResponse:
            d = await self._role.leader()
            await self._node_info(d, request.node_id)
            await d.set_cordon(request.node_id, True)
            # The client's deadline bounds the wait; batches finish or move meanwhile.
            await d.wait_idle(request.node_id)
            return coordinator_pb2.DrainNodeResponse(node=await self._node_info(d, request.node_id))

        return await _handle(context, call)

    async def ResetBreaker(
        self,
        request: coordinator_pb2.ResetBreakerRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ResetBreakerResponse:
        async def call() -> coordinator_pb2.ResetBreakerResponse:
            d = await self._role.leader()
            node = d.nodes.get(request.node_id)
            if node is None:
                raise NotFound(f"node {request.node_id!r} is not registered")
            node.breaker.reset()
            return coordinator_pb2.ResetBreakerResponse(
                node=await self._node_info(d, request.node_id)
            )

        return await _handle(context, call)

    async def _job_control(
        self,
        job_id: str,
        action: Callable[[Dispatcher, JobRuntime], None],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.Job:
        d = await self._role.leader()
        job = d.jobs.get(job_id)
        if job is None:
            spec = await d.store.load_spec(job_id) if job_id and "/" not in job_id else None
            if spec is None:
                raise NotFound(f"job {job_id!r} not found")
            raise Conflict(f"job {job_id!r} has finished")
        action(d, job)
        if job.status.state is JobState.PAUSED:
            await _until_settled(d, job, context)
        await d.flushed()
        return _convert.job_to(job.spec, job.status)

    async def PauseJob(
        self, request: coordinator_pb2.PauseJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.PauseJobResponse:
        async def call() -> coordinator_pb2.PauseJobResponse:
            job = await self._job_control(request.job_id, lambda d, j: d.pause(j), context)
            return coordinator_pb2.PauseJobResponse(job=job)

        return await _handle(context, call)

    async def ResumeJob(
        self, request: coordinator_pb2.ResumeJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ResumeJobResponse:
        async def call() -> coordinator_pb2.ResumeJobResponse:
            job = await self._job_control(request.job_id, lambda d, j: d.resume(j), context)
            return coordinator_pb2.ResumeJobResponse(job=job)

        return await _handle(context, call)
