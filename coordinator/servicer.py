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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from aetcd import rpc as etcd_rpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status  # type: ignore[import-untyped]

from coordinator import _convert
from coordinator.admission import Request
from coordinator.auth import ANONYMOUS_DEV, TENANT_ID, AuthConfig, Principal
from coordinator.batching import chunks
from coordinator.db.store import QuotaRefused, StoreUnavailable
from coordinator.dispatcher import JobRun
from coordinator.election import Election
from coordinator.errors import (
    STORE_RETRY_AFTER_S,
    Conflict,
    NotFound,
    NotLeader,
    PermissionDenied,
    Unauthenticated,
    status_for,
)
from coordinator.leader import Leader
from coordinator.model import EventType, JobRecord, JobState, Recipient
from coordinator.quotas import QuotaExceeded, Quotas, check_job_size
from coordinator.suppression import Suppression, normalize
from coordinator.validation import (
    Collector,
    Limits,
    TemplateCheck,
    ValidationError,
    check_content,
    check_idempotency_key,
    check_job,
    check_options,
)
from coordinator.webhooks import (
    MAX_WEBHOOKS_PER_TENANT,
    Webhook,
    WebhookConfig,
    new_secret,
    new_webhook_id,
    url_problem,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from mailers_runtime.etcd import EtcdTls, connect

log = logging.getLogger(__name__)

LEADER_METADATA_KEY = "mailers-leader"
# Recipients handed to COPY per chunk for a SubmitJob (UploadJob chunks come as sent).
_SUBMIT_CHUNK = 5_000
# Each etcd endpoint gets this long to answer a status request in GetClusterStatus.
_ETCD_STATUS_DEADLINE_S = 1.5
EVENTS_PAGE = 500
"""Events per StreamEvents response (and per query)."""
EVENTS_POLL_S = 0.25
"""How often a caught-up event stream looks for new events."""
MAX_EVENT_JOBS = 100
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
        self.reign: Leader | None = None
        self.election: Election | None = None
        self._hint = ""
        self._hint_at = 0.0

    async def leader_hint(self) -> str:
        """The current leader's address as etcd says (cached for a second)."""
        now = time.monotonic()
        if self.election is not None and now - self._hint_at > 1.0:
            try:
                # Short: a coordinator cut off from etcd should redirect (or refuse) fast.
                async with asyncio.timeout(0.5):
                    candidates = await self.election.candidates()
                self._hint = candidates[0].address if candidates else ""
            except Exception:
                self._hint = ""
            self._hint_at = now
        return self._hint

    async def leader(self) -> Leader:
        """The reign, if we lead. Raises NotLeader otherwise."""
        reign = self.reign
        if reign is not None and not reign.lost.is_set():
            return reign
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
    if isinstance(exc, StoreUnavailable):
        await context.abort_with_status(retry_info_status(code, message, STORE_RETRY_AFTER_S))
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


async def _within_deadline(
    wait: Awaitable[Any], context: grpc.aio.ServicerContext[Any, Any], cap_s: float = 60.0
) -> bool:
    """Wait for something within the call's deadline (at most cap_s); False on timeout."""
    remaining = context.time_remaining()
    limit = cap_s if remaining is None else max(0.0, min(cap_s, remaining - 0.5))
    try:
        async with asyncio.timeout(limit):
            await wait
    except TimeoutError:
        return False
    return True


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
            async with asyncio.timeout(1.0):
                await client.close()
    return member


def acting_tenant(caller: Principal, requested: str, what: str = "suppression list") -> str:
    """Whose suppression list (or events) a call acts on: a tenant's own; an admin
    names any (``""`` is the tenant of jobs submitted with auth off)."""
    if caller.admin:
        if requested and not TENANT_ID.match(requested):
            raise ValidationError([("tenant", "is not a tenant id")])
        return requested
    if requested and requested != caller.tenant:
        raise PermissionDenied(f"a tenant sees only its own {what}")
    return caller.tenant


def event_filter(
    request: coordinator_pb2.StreamEventsRequest,
) -> tuple[int, list[str], list[EventType]]:
    """The cursor, job ids and event types of a StreamEvents request.

    Raises:
        ValidationError: naming each field that is wrong.
    """
    problems: list[tuple[str, str]] = []
    if request.after_event_id < 0:
        problems.append(("after_event_id", "must not be negative"))
    if len(request.job_ids) > MAX_EVENT_JOBS:
        problems.append(("job_ids", f"at most {MAX_EVENT_JOBS} jobs"))
    if any(not job_id or len(job_id) > 200 for job_id in request.job_ids):
        problems.append(("job_ids", "each must be a job id"))
    types = event_types(request.types, problems)
    if problems:
        raise ValidationError(problems)
    return request.after_event_id, list(request.job_ids), types


def event_types(values: Iterable[int], problems: list[tuple[str, str]]) -> list[EventType]:
    """The event types of a request's ``types`` field; an unknown one is a problem."""
    types = [_convert.event_type_from(int(v)) for v in values]
    if any(t is None for t in types):
        problems.append(("types", "each must be a known event type"))
    return [t for t in types if t is not None]


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
        webhooks: WebhookConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._role = role
        self._webhooks = webhooks or WebhookConfig()
        self._batch_size = batch_size
        self._limits = limits
        self._auth = auth
        self._default_quotas = default_quotas or Quotas()
        self._templates = templates
        self._clock = clock

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

    # ---- submit ---------------------------------------------------------------------

    def _request(self, caller: Principal, content: Any, options: Any, key: str) -> Request:
        return Request(
            tenant=caller.tenant,
            content=content,
            options=_convert.options_from(options),
            idempotency_key=key,
            quotas=self._quotas(caller.tenant),
            bounce_domain=self._auth.bounce_domain_for(caller.tenant) if self._auth else "",
        )

    async def SubmitJob(
        self,
        request: coordinator_pb2.SubmitJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.SubmitJobResponse:
        async def call() -> coordinator_pb2.SubmitJobResponse:
            caller = self._caller(context)
            reign = await self._role.leader()
            content = _convert.content_from(request.content)
            recipients = [_convert.recipient_from(r) for r in request.recipients]
            options = _convert.options_from(request.options)
            check_job(
                content, recipients, request.idempotency_key, self._limits, self._templates,
                options,
            )  # fmt: skip
            check_job_size(self._quotas(caller.tenant), len(recipients))

            async def feed() -> AsyncIterator[list[Recipient]]:
                for chunk in chunks(recipients, _SUBMIT_CHUNK):
                    yield chunk

            record, created = await reign.admission.admit(
                self._request(caller, content, request.options, request.idempotency_key),
                feed(),
            )
            return coordinator_pb2.SubmitJobResponse(
                job=_convert.job_to(record.spec, record.status), created=created
            )

        return await _handle(context, call)

    async def UploadJob(
        self,
        request_iterator: AsyncIterator[coordinator_pb2.UploadJobRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.UploadJobResponse:
        async def call() -> coordinator_pb2.UploadJobResponse:
            caller = self._caller(context)
            reign = await self._role.leader()
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("payload") != "header":
                raise ValidationError([("header", "the first message must carry the header")])
            header = first.header
            content = _convert.content_from(header.content)
            out = Collector()
            check_idempotency_key(out, header.idempotency_key)
            check_content(out, content, self._limits, self._templates)
            check_options(out, _convert.options_from(header.options))
            out.raise_if_any()

            async def feed() -> AsyncIterator[list[Recipient]]:
                async for message in request_iterator:
                    if message.WhichOneof("payload") != "recipients":
                        raise ValidationError(
                            [("header", "only the first message may be a header")]
                        )
                    yield [_convert.recipient_from(r) for r in message.recipients.recipients]

            record, created = await reign.admission.admit(
                self._request(caller, content, header.options, header.idempotency_key), feed()
            )
            return coordinator_pb2.UploadJobResponse(
                job=_convert.job_to(record.spec, record.status), created=created
            )

        return await _handle(context, call)

    # ---- reads ----------------------------------------------------------------------

    async def _find(
        self, reign: Leader, job_id: str, caller: Principal
    ) -> tuple[JobRecord, JobRun | None]:
        """The job if it exists and the caller may see it; NotFound otherwise."""
        run = reign.dispatcher.job(job_id)
        record = run.record if run is not None else None
        if record is None and job_id and "/" not in job_id:
            record = await reign.store.job(job_id)
        if record is None or (not caller.sees_all and record.spec.tenant != caller.tenant):
            raise job_not_found(job_id)
        return record, run

    async def GetJob(
        self, request: coordinator_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GetJobResponse:
        async def call() -> coordinator_pb2.GetJobResponse:
            caller = self._caller(context)
            reign = await self._role.leader()
            record, _ = await self._find(reign, request.job_id, caller)
            return coordinator_pb2.GetJobResponse(job=_convert.job_to(record.spec, record.status))

        return await _handle(context, call)

    async def WatchJob(
        self,
        request: coordinator_pb2.WatchJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[coordinator_pb2.WatchJobResponse]:
        try:
            caller = self._caller(context)
            reign = await self._role.leader()
            record, run = await self._find(reign, request.job_id, caller)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(context, exc)
            return
        while True:
            changed = run.changed if run is not None else None
            status = run.status if run is not None else record.status
            yield coordinator_pb2.WatchJobResponse(
                progress=_convert.progress_to(record.spec.job_id, status, record.spec.created_at)
            )
            if run is None and status.finished_at is not None:
                return
            if changed is None or run is None or run.finished.is_set():
                await asyncio.sleep(0.5)
                try:
                    record, run = await self._find(reign, request.job_id, caller)
                except StoreUnavailable:
                    continue
            else:
                lost = asyncio.ensure_future(reign.lost.wait())
                wait = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait({lost, wait}, timeout=10, return_when="FIRST_COMPLETED")
                finally:
                    lost.cancel()
                    wait.cancel()
                if reign.lost.is_set():
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "leadership changed")
                # At most ten updates a second per watcher, however busy the job is.
                await asyncio.sleep(0.1)

    async def StreamEvents(
        self,
        request: coordinator_pb2.StreamEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[coordinator_pb2.StreamEventsResponse]:
        try:
            tenant = acting_tenant(self._caller(context), request.tenant, "events")
            after, job_ids, types = event_filter(request)
            reign = await self._role.leader()
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(context, exc)
            return
        while True:
            try:
                events = await reign.store.events(tenant, after, EVENTS_PAGE, job_ids, types)
            except StoreUnavailable:
                events = []
            if events:
                after = events[-1].event_id
                yield coordinator_pb2.StreamEventsResponse(
                    events=[_convert.event_to(e) for e in events]
                )
                if len(events) == EVENTS_PAGE:
                    continue
            # Caught up: look again shortly, unless the reign ends first.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVENTS_POLL_S):
                    await reign.lost.wait()
            if reign.lost.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE, "leadership changed")

    async def CancelJob(
        self,
        request: coordinator_pb2.CancelJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.CancelJobResponse:
        async def call() -> coordinator_pb2.CancelJobResponse:
            caller = self._caller(context)
            reign = await self._role.leader()
            record, run = await self._find(reign, request.job_id, caller)
            if run is not None:
                await reign.dispatcher.cancel(run)
                # Returns once every holder stopped and the rest is marked cancelled.
                await _within_deadline(run.finished.wait(), context)
                record = run.record
            return coordinator_pb2.CancelJobResponse(
                job=_convert.job_to(record.spec, record.status)
            )

        return await _handle(context, call)

    async def ListJobs(
        self, request: coordinator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListJobsResponse:
        async def call() -> coordinator_pb2.ListJobsResponse:
            caller = self._caller(context)
            reign = await self._role.leader()
            page_size = min(request.page_size or 100, 1000)
            states = [s for s in map(_convert.job_state_from, request.states) if s is not None]
            tenant = None if caller.sees_all else caller.tenant
            records = await reign.store.list_jobs(tenant, states, request.page_token, page_size + 1)
            page = records[:page_size]
            next_token = page[-1].spec.job_id if len(records) > page_size else ""
            jobs = []
            for record in page:
                run = reign.dispatcher.job(record.spec.job_id)
                status = run.status if run is not None else record.status
                jobs.append(_convert.job_to(record.spec, status, with_content=False))
            return coordinator_pb2.ListJobsResponse(jobs=jobs, next_page_token=next_token)

        return await _handle(context, call)

    async def RetryFailed(
        self,
        request: coordinator_pb2.RetryFailedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.RetryFailedResponse:
        async def call() -> coordinator_pb2.RetryFailedResponse:
            caller = self._caller(context)
            reign = await self._role.leader()
            # Ownership first: another tenant's job is "not found" like a missing one.
            await self._find(reign, request.job_id, caller)
            record, requeued = await reign.dispatcher.retry_failed(request.job_id)
            return coordinator_pb2.RetryFailedResponse(
                job=_convert.job_to(record.spec, record.status), requeued=requeued
            )

        return await _handle(context, call)

    async def ListJobResults(
        self,
        request: coordinator_pb2.ListJobResultsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ListJobResultsResponse:
        async def call() -> coordinator_pb2.ListJobResultsResponse:
            caller = self._caller(context)
            reign = await self._role.leader()
            record, _ = await self._find(reign, request.job_id, caller)
            page_size = min(request.page_size or 500, 5000)
            wanted = [s for s in map(_convert.status_from, request.statuses) if s is not None]
            try:
                after = int(request.page_token) if request.page_token else -1
            except ValueError:
                raise ValidationError([("page_token", "is not a token from this API")]) from None
            rows = await reign.store.results(record.job_no, after, wanted, page_size + 1)
            page = rows[:page_size]
            next_token = str(page[-1].cursor) if len(rows) > page_size else ""
            return coordinator_pb2.ListJobResultsResponse(
                results=[
                    _convert.result_to(r.index, r.email, r.result, r.metadata, r.feedback)
                    for r in page
                ],
                next_page_token=next_token,
            )

        return await _handle(context, call)

    # ---- suppression lists ----------------------------------------------------------

    async def ListSuppressions(
        self,
        request: coordinator_pb2.ListSuppressionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ListSuppressionsResponse:
        async def call() -> coordinator_pb2.ListSuppressionsResponse:
            tenant = acting_tenant(self._caller(context), request.tenant)
            reign = await self._role.leader()
            page_size = min(request.page_size or 100, 1000)
            listed = await reign.store.suppressions(tenant, request.page_token, page_size + 1)
            page = listed[:page_size]
            next_token = page[-1].email if len(listed) > page_size else ""
            return coordinator_pb2.ListSuppressionsResponse(
                suppressions=[_convert.suppression_to(tenant, s) for s in page],
                next_page_token=next_token,
            )

        return await _handle(context, call)

    async def AddSuppression(
        self,
        request: coordinator_pb2.AddSuppressionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.AddSuppressionResponse:
        async def call() -> coordinator_pb2.AddSuppressionResponse:
            tenant = acting_tenant(self._caller(context), request.tenant)
            email = suppression_email(request.email)
            reason = _convert.reason_from(request.reason)
            if reason is None:
                raise ValidationError([("reason", "is not a suppression reason")])
            reign = await self._role.leader()
            entry = await reign.store.put_suppression(
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
            tenant = acting_tenant(self._caller(context), request.tenant)
            email = suppression_email(request.email)
            reign = await self._role.leader()
            removed = await reign.store.delete_suppression(tenant, email)
            return coordinator_pb2.RemoveSuppressionResponse(removed=removed)

        return await _handle(context, call)

    # ---- webhooks -------------------------------------------------------------------

    async def CreateWebhook(
        self,
        request: coordinator_pb2.CreateWebhookRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.CreateWebhookResponse:
        async def call() -> coordinator_pb2.CreateWebhookResponse:
            tenant = acting_tenant(self._caller(context), request.tenant, "webhooks")
            problems: list[tuple[str, str]] = []
            if (problem := url_problem(request.url, self._webhooks.allow_http)) is not None:
                problems.append(("url", problem))
            types = event_types(request.types, problems)
            if problems:
                raise ValidationError(problems)
            reign = await self._role.leader()
            hook = Webhook(
                webhook_id=new_webhook_id(), tenant=tenant, url=request.url,
                types=tuple(sorted(set(types))),
                created_at=self._clock(), cursor=0,
            )  # fmt: skip
            secret = new_secret()
            try:
                hook = await reign.store.create_webhook(hook, secret, MAX_WEBHOOKS_PER_TENANT)
            except QuotaRefused as exc:
                raise QuotaExceeded(str(exc), None) from exc
            log.info("webhook %s created for tenant %r: %s", hook.webhook_id, tenant, hook.url)
            return coordinator_pb2.CreateWebhookResponse(
                webhook=_convert.webhook_to(hook), secret=secret
            )

        return await _handle(context, call)

    async def ListWebhooks(
        self,
        request: coordinator_pb2.ListWebhooksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ListWebhooksResponse:
        async def call() -> coordinator_pb2.ListWebhooksResponse:
            tenant = acting_tenant(self._caller(context), request.tenant, "webhooks")
            reign = await self._role.leader()
            hooks = await reign.store.webhooks(tenant)
            return coordinator_pb2.ListWebhooksResponse(
                webhooks=[_convert.webhook_to(h) for h in hooks]
            )

        return await _handle(context, call)

    async def DeleteWebhook(
        self,
        request: coordinator_pb2.DeleteWebhookRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.DeleteWebhookResponse:
        async def call() -> coordinator_pb2.DeleteWebhookResponse:
            tenant = acting_tenant(self._caller(context), request.tenant, "webhooks")
            reign = await self._role.leader()
            if await reign.store.delete_webhook(tenant, request.webhook_id):
                log.info("webhook %s of tenant %r deleted", request.webhook_id, tenant)
            return coordinator_pb2.DeleteWebhookResponse()

        return await _handle(context, call)

    async def ReplayWebhook(
        self,
        request: coordinator_pb2.ReplayWebhookRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ReplayWebhookResponse:
        async def call() -> coordinator_pb2.ReplayWebhookResponse:
            tenant = acting_tenant(self._caller(context), request.tenant, "webhooks")
            if request.from_event_id < 0:
                raise ValidationError([("from_event_id", "must not be negative")])
            reign = await self._role.leader()
            hook = await reign.store.replay_webhook(
                tenant, request.webhook_id, request.from_event_id
            )
            if hook is None:
                raise NotFound(f"webhook {request.webhook_id!r} not found")
            log.info("webhook %s of tenant %r replayed", hook.webhook_id, tenant)
            return coordinator_pb2.ReplayWebhookResponse(webhook=_convert.webhook_to(hook))

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
            reign = await self._role.leader()
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
                active_jobs=len(reign.dispatcher.jobs),
                etcd_members=members,
            )

        return await _handle(context, call)

    async def _node_info(self, reign: Leader, node_id: str) -> coordinator_pb2.NodeInfo:
        d = reign.dispatcher
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
            async with asyncio.timeout(2):
                info = await reign.client.get_lease_info(node.lease_id, keys=False)
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

    async def _cordon(
        self, node_id: str, cordoned: bool, *, drain: bool = False
    ) -> coordinator_pb2.NodeInfo:
        """Cordon (or uncordon) a registered node, wait for its batches if draining,
        and return how it stands. Raises NotFound for an unknown node."""
        reign = await self._role.leader()
        await self._node_info(reign, node_id)
        await reign.set_cordon(node_id, cordoned)
        if drain:
            await reign.dispatcher.wait_idle(node_id)
        return await self._node_info(reign, node_id)

    async def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListNodesResponse:
        async def call() -> coordinator_pb2.ListNodesResponse:
            reign = await self._role.leader()
            nodes = [await self._node_info(reign, n) for n in sorted(reign.dispatcher.nodes)]
            return coordinator_pb2.ListNodesResponse(nodes=nodes)

        return await _handle(context, call)

    async def CordonNode(
        self,
        request: coordinator_pb2.CordonNodeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.CordonNodeResponse:
        async def call() -> coordinator_pb2.CordonNodeResponse:
            node = await self._cordon(request.node_id, True)
            return coordinator_pb2.CordonNodeResponse(node=node)

        return await _handle(context, call)

    async def UncordonNode(
        self,
        request: coordinator_pb2.UncordonNodeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.UncordonNodeResponse:
        async def call() -> coordinator_pb2.UncordonNodeResponse:
            node = await self._cordon(request.node_id, False)
            return coordinator_pb2.UncordonNodeResponse(node=node)

        return await _handle(context, call)

    async def DrainNode(
        self, request: coordinator_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.DrainNodeResponse:
        async def call() -> coordinator_pb2.DrainNodeResponse:
            # The client's deadline bounds the wait; batches finish or move meanwhile.
            node = await self._cordon(request.node_id, True, drain=True)
            return coordinator_pb2.DrainNodeResponse(node=node)

        return await _handle(context, call)

    async def ResetBreaker(
        self,
        request: coordinator_pb2.ResetBreakerRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.ResetBreakerResponse:
        async def call() -> coordinator_pb2.ResetBreakerResponse:
            reign = await self._role.leader()
            node = reign.dispatcher.nodes.get(request.node_id)
            if node is None:
                raise NotFound(f"node {request.node_id!r} is not registered")
            node.breaker.reset()
            return coordinator_pb2.ResetBreakerResponse(
                node=await self._node_info(reign, request.node_id)
            )

        return await _handle(context, call)

    async def _job_control(
        self,
        job_id: str,
        action: Callable[[Leader, JobRun], Awaitable[None]],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.Job:
        reign = await self._role.leader()
        run = reign.dispatcher.job(job_id)
        if run is None:
            record = await reign.store.job(job_id) if job_id and "/" not in job_id else None
            if record is None:
                raise NotFound(f"job {job_id!r} not found")
            raise Conflict(f"job {job_id!r} has finished")
        await action(reign, run)
        if run.status.state is JobState.PAUSED:
            # Returns once every holder stopped its batches and its results are written.
            await _within_deadline(reign.dispatcher.settled_holds(run), context)
        return _convert.job_to(run.record.spec, run.status)

    async def PauseJob(
        self, request: coordinator_pb2.PauseJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.PauseJobResponse:
        async def call() -> coordinator_pb2.PauseJobResponse:
            job = await self._job_control(
                request.job_id, lambda r, j: r.dispatcher.pause(j), context
            )
            return coordinator_pb2.PauseJobResponse(job=job)

        return await _handle(context, call)

    async def ResumeJob(
        self, request: coordinator_pb2.ResumeJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ResumeJobResponse:
        async def call() -> coordinator_pb2.ResumeJobResponse:
            job = await self._job_control(
                request.job_id, lambda r, j: r.dispatcher.resume(j), context
            )
            return coordinator_pb2.ResumeJobResponse(job=job)

        return await _handle(context, call)
