"""The async client of a Mailers cluster: submit jobs, watch them, read results, operate nodes.

:class:`MailerClient` is given every coordinator address and finds the leader
itself (see :mod:`client_sdk.retry` for when it redirects, fails over and
retries). Every call has a deadline: ``timeout`` bounds the whole call, retries
included, and defaults to :attr:`ClientConfig.default_timeout`. Cancelling the
awaiting task cancels the RPC in flight. Errors are the typed ones of
:mod:`client_sdk.errors`. (``timeout`` stays a parameter, against ruff's ASYNC109,
because it becomes the gRPC deadline the server sees, which ``asyncio.timeout``
would not.)

Example::

    tls = ClientTls.from_files("ca.crt", "client.crt", "client.key")
    async with MailerClient(["127.0.0.1:7701", "127.0.0.1:7702"], tls=tls) as client:
        job = await client.submit(content, recipients)
        async for progress in client.watch(job.job_id):
            print(progress.done, "/", progress.total)
        async for event in client.events(after=cursor):  # never ends by itself
            cursor = event.event_id

Without ``tls`` the client dials in plaintext, for clusters started with
``MAILER_PLAINTEXT=1`` (local development); it cannot reach a TLS cluster.

Each method sends an operation of :mod:`client_sdk._operations` (request,
response conversion, idempotency, default timeout) through ``grpc.aio``; the
retry loop's decisions are :class:`client_sdk.retry.CallAttempts`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from client_sdk import _convert
from client_sdk import _operations as ops
from client_sdk._events import EventCursor
from client_sdk._recipients import (
    ProgressCallback,
    RecipientFeed,
    RecipientSource,
    Submission,
    arecipient_chunks,
    asplit_head,
)
from client_sdk.config import (
    ClientConfig,
    ClientTls,
    auth_metadata,
    channel_options,
    parse_addresses,
    resolve_channel_factory,
)
from client_sdk.errors import DeadlineExceededError, MailerError, error_from_rpc, error_of
from client_sdk.retry import CallAttempts, LeaderRouter, StreamEnded, timeout_s
from client_sdk.types import (
    ClusterStatus,
    CreatedWebhook,
    DeliveryEvent,
    EventType,
    Job,
    JobOptions,
    JobProgress,
    JobState,
    MessageContent,
    NodeInfo,
    Page,
    RecipientResult,
    RecipientStatus,
    Suppression,
    SuppressionReason,
    Webhook,
)

__all__ = [
    "ClientConfig",
    "ClientTls",
    "EventStream",
    "MailerClient",
    "ProgressCallback",
    "RecipientSource",
    "auth_metadata",
    "channel_options",
    "error_from_rpc",
    "parse_addresses",
]

T = TypeVar("T")

_DEADLINE_MASKS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED})
"""Codes gRPC's core reports for a call whose deadline ran out mid-stream."""
_CORE_INTERNAL = "Internal error from Core"
"""What gRPC's core reports when a write fails because the call already ended; the
status the server sent may then be lost."""


class _EndedEarly(aio.AioRpcError):
    """A stream the server ended while we wrote, whose status gRPC lost (INTERNAL
    :data:`_CORE_INTERNAL`): most often a standby refusing at once. UNAVAILABLE, so that
    an idempotent call tries the next address (the upload is keyed: a job already
    created is returned, not made twice); past the call's deadline :meth:`_call` takes
    it, like the codes in :data:`_DEADLINE_MASKS`, for the deadline it may have been."""

    def __init__(self, lost: aio.AioRpcError) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            lost.initial_metadata(),
            lost.trailing_metadata(),
            details="the coordinator ended the upload while it was being written, and "
            f"gRPC kept no status but {_CORE_INTERNAL!r}",
        )

    @staticmethod
    def lost(exc: aio.AioRpcError) -> bool:
        """Whether ``exc`` is gRPC's lost status."""
        return exc.code() is grpc.StatusCode.INTERNAL and exc.details() == _CORE_INTERNAL


class EventStream(EventCursor[AsyncGenerator[DeliveryEvent, None]]):
    """The events :meth:`MailerClient.events` yields: an async iterator that never ends
    by itself, with its cursor (:attr:`last_event_id`) and :attr:`reconnects`.

    Close it (``aclose()``, or ``async with``) to cancel the stream in flight at once;
    an abandoned one is closed when it is garbage collected. Not for concurrent use by
    several tasks.
    """

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> DeliveryEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Cancel the stream in flight; the iteration ends."""
        await self._events.aclose()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class MailerClient:
    """Async client of a Mailers cluster; one instance per process is enough.

    Safe for concurrent use by tasks of one event loop. Use it as an async
    context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        config: ClientConfig | None = None,
        *,
        channel_factory: Callable[[str], aio.Channel] | None = None,
        rng: random.Random | None = None,
        token: str | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        """Create a client; no connection is made until the first call.

        Args:
            addresses: Every coordinator's ``host:port``, as a list or comma-separated.
            config: Timeouts, retry policy and sizes; defaults when None.
            channel_factory: Makes the channel for an address (tests, custom
                credentials); by default a channel with :func:`channel_options`,
                TLS when ``tls`` is given, else plaintext.
            rng: Randomness for backoff jitter.
            token: The API token, sent as ``authorization: Bearer <token>`` metadata
                on every call; None for a cluster with auth off. Send it over TLS
                (``tls``) outside local dev.
            tls: TLS for every channel, leader redirects included; None dials in
                plaintext (a cluster started with ``MAILER_PLAINTEXT=1`` only).

        Raises:
            ValueError: both ``tls`` and ``channel_factory`` are given.
        """
        self._config = config or ClientConfig()
        factory = resolve_channel_factory(
            self._config,
            tls,
            channel_factory,
            insecure=aio.insecure_channel,
            secure=aio.secure_channel,
        )
        self._router = LeaderRouter(parse_addresses(addresses))
        self._channels = ops.ChannelPool(factory)
        self._rng = rng or random.Random()
        self._metadata: tuple[tuple[str, str], ...] = auth_metadata(token)

    @property
    def config(self) -> ClientConfig:
        """The client's settings."""
        return self._config

    @property
    def leader(self) -> str:
        """The address calls currently go to."""
        return self._router.current

    async def __aenter__(self) -> MailerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel; calls in flight fail with CANCELLED."""
        for channel in self._channels.take_all():
            await channel.close()

    async def _call(
        self,
        rpc: ops.Rpc,
        invoke: Callable[[ops.Stubs, float], Awaitable[T]],
        timeout: timedelta | None,  # noqa: ASYNC109
    ) -> T:
        """Run ``invoke`` at the leader, redirecting and retrying per the retry policy.

        ``invoke`` gets the leader's stubs and the seconds left; ``timeout`` bounds
        every attempt and wait together (``rpc``'s default when None).
        """
        attempts = CallAttempts.start(
            self._router,
            self._config.retry,
            self._rng,
            now_s=time.monotonic(),
            timeout_s=timeout_s(timeout, rpc.default_timeout(self._config)),
            idempotent=rpc.idempotent,
        )
        while True:
            address, remaining_s = attempts.next(time.monotonic())
            try:
                result = await invoke(self._channels.stubs(address), remaining_s)
            except aio.AioRpcError as exc:
                masked = exc.code() in _DEADLINE_MASKS or isinstance(exc, _EndedEarly)
                if masked and attempts.deadline_passed(time.monotonic()):
                    # A deadline that runs out while a stream is being written can
                    # surface from gRPC's core as INTERNAL or CANCELLED: it is the
                    # caller's deadline all the same.
                    raise DeadlineExceededError(
                        f"deadline passed during the call ({exc.details()})",
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ) from exc
                error = error_of(exc)
            else:
                attempts.succeeded(address)
                return result
            delay_s = attempts.failed(address, error, time.monotonic())
            if delay_s > 0:
                await asyncio.sleep(delay_s)

    async def _unary(self, call: ops.Call[T], timeout: timedelta | None) -> T:  # noqa: ASYNC109
        """Send ``call`` to the leader, per its operation's retry rules and timeout."""

        async def invoke(stubs: ops.Stubs, remaining_s: float) -> T:
            method = stubs.method(call.rpc)
            response = await method(call.request, metadata=self._metadata, timeout=remaining_s)
            return call.rpc.convert(response)

        return await self._call(call.rpc, invoke, timeout)

    # ----- jobs -------------------------------------------------------------------

    async def submit(
        self,
        content: MessageContent,
        recipients: RecipientSource,
        *,
        idempotency_key: str | None = None,
        options: JobOptions | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> Job:
        """Submit a job; when it returns, the job and every recipient are durable.

        Up to ``config.inline_submit_max`` recipients go in one SubmitJob call;
        more are streamed with UploadJob in chunks of ``config.upload_chunk_size``,
        never building one message with everything.

        Idempotency: the call always carries an idempotency key (a new uuid4
        when none is given) and reuses it on every retry, so it is retried on
        UNAVAILABLE and a repeat returns the first job (``job.created`` False).

        Args:
            content: The message every recipient receives, before personalisation.
            recipients: See :data:`RecipientSource`.
            idempotency_key: Pass the same key to make a repeat of the whole
                submit (e.g. after a crash) return the first job.
            options: Scheduling, priority and label.
            on_progress: Called with the count of recipients sent so far.
            timeout: Deadline of the whole call; ``config.submit_timeout`` when None.

        Raises:
            InvalidArgumentError: A field is invalid; ``details`` names it.
            UnavailableError: No leader could be reached in time.
            DeadlineExceededError: The deadline passed; repeat with the same key.
        """
        submission = Submission(content, idempotency_key or str(uuid.uuid4()), options, on_progress)
        feed = RecipientFeed(recipients, _convert.recipient_to_pb)
        cfg = self._config

        async def attempt(stubs: ops.Stubs, remaining_s: float) -> Job:
            stream = feed.aread()
            head, more = await asplit_head(
                stream, cfg.inline_submit_max, cfg.inline_submit_max_bytes
            )
            if more:
                return await self._upload(stubs, remaining_s, submission, head, stream)
            call = ops.SUBMIT_JOB(submission, head)
            method = stubs.method(call.rpc)
            response = await method(call.request, metadata=self._metadata, timeout=remaining_s)
            submission.progress(len(head))
            return call.rpc.convert(response)

        return await self._call(ops.SUBMIT_JOB, attempt, timeout)

    async def _upload(
        self,
        stubs: ops.Stubs,
        remaining_s: float,
        submission: Submission,
        head: list[ops.RecipientMessage],
        rest: AsyncIterator[ops.RecipientMessage],
    ) -> Job:
        """Stream the submit with UploadJob: a header, then ``head`` and ``rest`` in chunks."""
        rpc, cfg = ops.UPLOAD_JOB, self._config
        call = stubs.method(rpc)(metadata=self._metadata, timeout=remaining_s)
        sent = 0
        ended_early = False
        try:
            await call.write(rpc.header(submission))
            async for chunk in arecipient_chunks(
                head, rest, cfg.upload_chunk_size, cfg.upload_chunk_max_bytes
            ):
                await call.write(rpc.chunk(chunk))
                sent += len(chunk)
                submission.progress(sent)
            await call.done_writing()
        except (asyncio.InvalidStateError, aio.AioRpcError):
            # The server ended the call while we wrote (a standby refuses at
            # once). The write reports that as INTERNAL or an invalid state;
            # awaiting the call raises the status the server really sent.
            ended_early = True
        except BaseException:
            # The recipients source failed or we were cancelled: cancelling the
            # call makes the server discard the partial upload.
            call.cancel()
            raise
        try:
            return rpc.convert(await call)
        except aio.AioRpcError as exc:
            if ended_early and _EndedEarly.lost(exc):
                raise _EndedEarly(exc) from exc
            raise

    async def get(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """The job with its content and current progress.

        Raises:
            NotFoundError: No such job.
        """
        return await self._unary(ops.GET_JOB(job_id=job_id), timeout)

    async def cancel(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """Cancel a job: recipients not yet sent end as cancelled.

        Not retried on UNAVAILABLE from the leader (no idempotency key); redirects
        from standbys are followed.

        Raises:
            NotFoundError: No such job.
        """
        return await self._unary(ops.CANCEL_JOB(job_id=job_id), timeout)

    async def retry_failed(
        self,
        job_id: str,
        *,
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> tuple[Job, int]:
        """Queue again the recipients that failed transiently or ambiguously.

        Recipients refused with a 5xx reply are never retried. Returns the job (running
        again when anything was queued) and how many recipients were queued. Retried on
        UNAVAILABLE: a repeat finds nothing more to queue, so it is safe.

        Example::

            job, queued = await client.retry_failed(job.job_id)
            final = await client.wait(job.job_id)

        Raises:
            NotFoundError: No such job.
            FailedPreconditionError: The job was cancelled.
        """
        return await self._unary(ops.RETRY_FAILED(job_id=job_id), timeout)

    async def watch(
        self, job_id: str, *, stream_timeout: timedelta | None = None
    ) -> AsyncIterator[JobProgress]:
        """Yield the job's progress: the current counts at once, then every change.

        Ends after yielding a COMPLETED or CANCELLED state. Survives leader
        failover: the stream is re-opened at the new leader and continues
        (a repeated identical event is not yielded twice). There is no overall
        deadline; the consumer owns cancellation (stop iterating or cancel the
        task). Each stream lasts at most ``stream_timeout``
        (``config.watch_stream_timeout``) and is then re-opened.

        Raises:
            NotFoundError: No such job.
            UnavailableError: No leader answered within ``retry.max_elapsed``
                since the last event.
        """
        rpc = ops.WATCH_JOB
        stream_s = timeout_s(stream_timeout, rpc.default_timeout(self._config))
        request = rpc.request(job_id=job_id)
        attempts = CallAttempts.watch(self._router, self._config.retry, self._rng, time.monotonic())

        def ended(address: str, error: MailerError | None, received: int, open_s: float) -> float:
            return attempts.stream_ended(address, error, received, time.monotonic())

        last: JobProgress | None = None
        streams = self._reopening(rpc, lambda address: request, stream_s, ended)
        async with contextlib.aclosing(streams) as responses:
            async for address, response in responses:
                attempts.progressed(address, time.monotonic())
                progress = rpc.convert(response)
                if progress != last:
                    last = progress
                    yield progress
                if progress.is_final:
                    return

    async def _reopening(
        self,
        rpc: ops.ServerStream[..., Any, Any],
        request: Callable[[str], Message],
        stream_s: float,
        ended: StreamEnded,
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """The messages of ``rpc``'s streams at the leader, each with the address it came
        from; a stream that ends is opened again, with ``request(address)`` made anew.

        Each stream lasts at most ``stream_s``. When one ends, ``ended`` routes and says
        how long to wait before the next, or raises to end the iteration. Closing the
        generator cancels the stream in flight.
        """
        while True:
            address = self._router.current
            method = self._channels.stubs(address).method(rpc)
            opened_s = time.monotonic()
            call = method(request(address), metadata=self._metadata, timeout=stream_s)
            received = 0
            error: MailerError | None = None
            try:
                async for response in call:
                    received += 1
                    yield address, response
            except aio.AioRpcError as exc:
                error = error_of(exc)
            finally:
                call.cancel()
            delay_s = ended(address, error, received, time.monotonic() - opened_s)
            if delay_s > 0:
                await asyncio.sleep(delay_s)

    def events(
        self,
        after: int = 0,
        *,
        job_ids: Iterable[str] = (),
        types: Iterable[EventType] = (),
        tenant: str = "",
        stream_timeout: timedelta | None = None,
    ) -> EventStream:
        """The delivery events of the caller's tenant with an id above ``after``, oldest
        first, then each new one as it is recorded.

        The iterator never ends by itself. It survives leader failover: after
        UNAVAILABLE, a standby's redirect or a broken stream it finds the leader as
        :meth:`watch` does and resumes after the last event it yielded, so no event is
        skipped or yielded twice; :attr:`EventStream.reconnects` counts those
        resumptions. There is no overall deadline: the consumer owns cancellation
        (``aclose()`` it, use it as an async context manager, or cancel the task). Each
        stream lasts at most ``stream_timeout`` (``config.watch_stream_timeout``) and is
        then re-opened where it was.

        Example::

            async with client.events(after=cursor) as events:
                async for event in events:
                    handle(event)
                    cursor = event.event_id

        Args:
            after: The cursor: the id of the last event already handled; 0 starts at
                the oldest event kept.
            job_ids: Only events of these jobs; empty for every job.
            types: Only events of these types; empty for every type.
            tenant: Admins only: whose events. Tenant tokens always get their own.

        Raises:
            ValueError: ``after`` is negative (at once).
            AuthError: The token may not read the tenant's events.
            UnavailableError: No leader answered within ``retry.max_elapsed``
                since the stream was lost.
        """
        stream_s = timeout_s(stream_timeout, ops.STREAM_EVENTS.default_timeout(self._config))
        return EventStream(
            after, self._subscribe, job_ids=job_ids, types=types, tenant=tenant, stream_s=stream_s
        )

    async def _subscribe(self, cursor: EventCursor[Any]) -> AsyncGenerator[DeliveryEvent, None]:
        """The events of ``cursor``'s streams past it, re-opened as it says."""
        rpc = ops.STREAM_EVENTS
        cursor.start(self._router, self._config.retry, self._rng)
        streams = self._reopening(rpc, cursor.request, cursor.stream_s, cursor.ended)
        async with contextlib.aclosing(streams) as responses:
            async for address, response in responses:
                for event in cursor.received(address, rpc.convert(response)):
                    yield event

    async def wait(self, job_id: str, *, stream_timeout: timedelta | None = None) -> JobProgress:
        """Watch until the job is final and return its final progress.

        Raises:
            NotFoundError: No such job.
        """
        last: JobProgress | None = None
        async for progress in self.watch(job_id, stream_timeout=stream_timeout):
            last = progress
        assert last is not None
        return last

    async def list_jobs_page(
        self,
        *,
        states: Iterable[JobState] = (),
        page_size: int = 100,
        page_token: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> Page[Job]:
        """One page of jobs, newest first, without content."""
        call = ops.LIST_JOBS(states=states, page_size=page_size, page_token=page_token)
        return await self._unary(call, timeout)

    async def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        page_size: int | None = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[Job]:
        """Every job, newest first, fetching pages as needed; ``timeout`` is per page."""
        states = tuple(states)
        size = page_size or self._config.page_size
        async for job in _every_item(
            lambda token: self.list_jobs_page(
                states=states, page_size=size, page_token=token, timeout=timeout
            )
        ):
            yield job

    async def results_page(
        self,
        job_id: str,
        *,
        statuses: Iterable[RecipientStatus] = (),
        page_size: int = 500,
        page_token: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> Page[RecipientResult]:
        """One page of per-recipient outcomes.

        Raises:
            NotFoundError: No such job.
        """
        call = ops.LIST_JOB_RESULTS(
            job_id=job_id, statuses=statuses, page_size=page_size, page_token=page_token
        )
        return await self._unary(call, timeout)

    async def results(
        self,
        job_id: str,
        *,
        statuses: Iterable[RecipientStatus] = (),
        page_size: int | None = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[RecipientResult]:
        """Every recipient outcome of a job, paging as needed; ``timeout`` is per page.

        Raises:
            NotFoundError: No such job.
        """
        statuses = tuple(statuses)
        size = page_size or self._config.page_size
        async for result in _every_item(
            lambda token: self.results_page(
                job_id, statuses=statuses, page_size=size, page_token=token, timeout=timeout
            )
        ):
            yield result

    # ----- suppression lists ------------------------------------------------------

    async def suppressions_page(
        self,
        *,
        tenant: str = "",
        page_size: int = 100,
        page_token: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> Page[Suppression]:
        """One page of the caller's tenant's suppression list, by address.

        Args:
            tenant: Admins only: whose list ("" is the list of auth-off jobs). A tenant
                token may leave it empty or name its own tenant.

        Raises:
            AuthError: A tenant token naming another tenant (PERMISSION_DENIED).
        """
        call = ops.LIST_SUPPRESSIONS(tenant=tenant, page_size=page_size, page_token=page_token)
        return await self._unary(call, timeout)

    async def suppressions(
        self,
        *,
        tenant: str = "",
        page_size: int | None = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[Suppression]:
        """The whole suppression list, paging as needed; ``timeout`` is per page."""
        size = page_size or self._config.page_size
        async for item in _every_item(
            lambda token: self.suppressions_page(
                tenant=tenant, page_size=size, page_token=token, timeout=timeout
            )
        ):
            yield item

    async def suppress(
        self,
        email: str,
        reason: SuppressionReason = SuppressionReason.MANUAL,
        *,
        tenant: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> Suppression:
        """Put an address on the suppression list (replacing its entry): it is never
        sent to again, and recipients with it end SUPPRESSED. Idempotent.

        Raises:
            InvalidArgumentError: Not an email address.
        """
        call = ops.ADD_SUPPRESSION(tenant=tenant, email=email, reason=reason)
        return await self._unary(call, timeout)

    async def unsuppress(
        self,
        email: str,
        *,
        tenant: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> bool:
        """Take an address off the suppression list; False when it was not on it.
        Idempotent (a retried call may report False)."""
        return await self._unary(ops.REMOVE_SUPPRESSION(tenant=tenant, email=email), timeout)

    # ----- webhooks ---------------------------------------------------------------

    async def create_webhook(
        self,
        url: str,
        *,
        types: Iterable[EventType] = (),
        tenant: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> CreatedWebhook:
        """Register an HTTPS endpoint that receives the tenant's events as signed POSTs
        (Standard Webhooks): those recorded after it is created, oldest first, at least
        once (:meth:`replay_webhook` sends earlier ones).

        The result holds the signing secret, which is never shown again: keep it now.
        Not idempotent: a repeat would make a second endpoint with another secret, so
        the call is not retried once the leader is known. After an UNAVAILABLE or
        DEADLINE_EXCEEDED the endpoint may or may not exist; :meth:`webhooks` tells.

        Args:
            url: ``https://`` (``http://`` only where the coordinator allows it, e.g.
                a local cluster).
            types: Only events of these types; empty for every type.
            tenant: Admins only: whose endpoint. Tenant tokens always make their own.

        Raises:
            InvalidArgumentError: The URL or a type is unusable; ``details`` says which.
            ResourceExhaustedError: The tenant has as many endpoints as it may.
            AuthError: The token may not manage the tenant's webhooks.
        """
        call = ops.CREATE_WEBHOOK(url=url, types=tuple(types), tenant=tenant)
        return await self._unary(call, timeout)

    async def webhooks(
        self,
        *,
        tenant: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> list[Webhook]:
        """The tenant's endpoints and where their deliveries stand, without secrets.

        Raises:
            AuthError: A tenant token naming another tenant.
        """
        return await self._unary(ops.LIST_WEBHOOKS(tenant=tenant), timeout)

    async def delete_webhook(
        self,
        webhook_id: str,
        *,
        tenant: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> None:
        """Remove an endpoint; events not yet delivered to it are not sent. Idempotent:
        deleting an unknown (or already deleted) endpoint succeeds, so it is retried.

        Raises:
            AuthError: A tenant token naming another tenant.
        """
        await self._unary(ops.DELETE_WEBHOOK(tenant=tenant, webhook_id=webhook_id), timeout)

    async def replay_webhook(
        self,
        webhook_id: str,
        *,
        from_event_id: int = 0,
        tenant: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> Webhook:
        """Enable an endpoint again (one disabled after failing for the retry horizon)
        and send its backlog; with ``from_event_id``, send again every event after it.

        Retried on UNAVAILABLE: a repeat leaves the endpoint as one call does (at most,
        events it received in between come again, as deliveries are at least once).

        Args:
            webhook_id: The endpoint.
            from_event_id: Move the endpoint's cursor to this event id: every later
                event is sent (again), none up to it. 0 keeps the cursor, sending only
                what was not delivered.
            tenant: Admins only: whose endpoint.

        Raises:
            ValueError: ``from_event_id`` is negative (at once).
            NotFoundError: No such endpoint for the tenant.
        """
        call = ops.REPLAY_WEBHOOK(webhook_id=webhook_id, from_event_id=from_event_id, tenant=tenant)
        return await self._unary(call, timeout)

    # ----- admin ------------------------------------------------------------------

    async def cluster_status(self, *, timeout: timedelta | None = None) -> ClusterStatus:  # noqa: ASYNC109
        """Leader, standbys, etcd endpoints and active job count."""
        return await self._unary(ops.GET_CLUSTER_STATUS(), timeout)

    async def list_nodes(self, *, timeout: timedelta | None = None) -> list[NodeInfo]:  # noqa: ASYNC109
        """Every registered sender node."""
        return await self._unary(ops.LIST_NODES(), timeout)

    async def cordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Give the node no new batches; those it holds continue.

        Raises:
            NotFoundError: No such node.
        """
        return await self._unary(ops.CORDON_NODE(node_id=node_id), timeout)

    async def uncordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Let the node take batches again.

        Raises:
            NotFoundError: No such node.
        """
        return await self._unary(ops.UNCORDON_NODE(node_id=node_id), timeout)

    async def drain(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Cordon the node and wait until its batches are finished or moved.

        ``timeout`` defaults to ``config.drain_timeout``; when it passes the node
        stays cordoned and draining continues on the coordinator.

        Raises:
            NotFoundError: No such node.
        """
        return await self._unary(ops.DRAIN_NODE(node_id=node_id), timeout)

    async def reset_breaker(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Close the coordinator's circuit breaker for a node.

        Raises:
            NotFoundError: No such node.
        """
        return await self._unary(ops.RESET_BREAKER(node_id=node_id), timeout)

    async def pause(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """Pause a job: no new SMTP transactions start for it.

        Raises:
            NotFoundError: No such job.
            FailedPreconditionError: The job is final.
        """
        return await self._unary(ops.PAUSE_JOB(job_id=job_id), timeout)

    async def resume(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """Resume a paused job.

        Raises:
            NotFoundError: No such job.
            FailedPreconditionError: The job is final.
        """
        return await self._unary(ops.RESUME_JOB(job_id=job_id), timeout)


async def _every_item(fetch: Callable[[str], Awaitable[Page[T]]]) -> AsyncIterator[T]:
    """Every item of the pages ``fetch`` returns for each page token, from the first."""
    token = ""
    while True:
        page = await fetch(token)
        for item in page.items:
            yield item
        token = page.next_page_token
        if not token:
            return
