"""The blocking client of a Mailers cluster, for scripts and threads without an event loop.

:class:`SyncMailerClient` has the surface of :class:`client_sdk.MailerClient`
with plain methods and iterators, built on the synchronous gRPC API (so
``grpcio-testing`` can drive it). It sends the same operations
(:mod:`client_sdk._operations`) with the same leader discovery, redirects,
retries (:class:`client_sdk.retry.CallAttempts`) and error model
(:func:`client_sdk.errors.error_of`). Every call blocks for at most its
``timeout`` (retries included); it is safe to use one instance from several threads.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from client_sdk import _convert
from client_sdk import _operations as ops
from client_sdk._events import EventCursor
from client_sdk._recipients import (
    ProgressCallback,
    RecipientFeed,
    Submission,
    SyncRecipientSource,
    recipient_chunks,
    split_head,
)
from client_sdk.config import (
    ClientConfig,
    ClientTls,
    auth_metadata,
    parse_addresses,
    resolve_channel_factory,
)
from client_sdk.errors import MailerError, error_of
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

__all__ = ["SyncEventStream", "SyncMailerClient", "SyncRecipientSource"]


T = TypeVar("T")


class SyncEventStream(EventCursor[Generator[DeliveryEvent, None, None]]):
    """The events :meth:`SyncMailerClient.events` yields: an iterator that never ends by
    itself, with its cursor (:attr:`last_event_id`) and :attr:`reconnects`.

    ``close()`` it (or use ``with``) to cancel the stream in flight; an abandoned one is
    closed when it is garbage collected. Not for concurrent use by several threads.
    """

    def __iter__(self) -> SyncEventStream:
        return self

    def __next__(self) -> DeliveryEvent:
        return next(self._events)

    def close(self) -> None:
        """Cancel the stream in flight; the iteration ends."""
        self._events.close()

    def __enter__(self) -> SyncEventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncMailerClient:
    """Blocking client of a Mailers cluster; see :class:`client_sdk.MailerClient`."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        config: ClientConfig | None = None,
        *,
        channel_factory: Callable[[str], grpc.Channel] | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        token: str | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        """Create a client; no connection is made until the first call.

        Args:
            addresses: Every coordinator's ``host:port``, as a list or comma-separated.
            config: Timeouts, retry policy and sizes; defaults when None.
            channel_factory: Makes the channel for an address (tests, custom
                credentials); by default a channel with
                :func:`client_sdk.config.channel_options`, TLS when ``tls`` is given,
                else plaintext.
            rng: Randomness for backoff jitter.
            token: The API token, sent as ``authorization: Bearer <token>`` metadata
                on every call; None for a cluster with auth off. Send it over TLS
                (``tls``) outside local dev.
            sleep: Waits between retries (tests pass a recorder).
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
            insecure=grpc.insecure_channel,
            secure=grpc.secure_channel,
        )
        self._router = LeaderRouter(parse_addresses(addresses))
        self._channels = ops.ChannelPool(factory)
        self._rng = rng or random.Random()
        self._metadata: tuple[tuple[str, str], ...] = auth_metadata(token)
        self._sleep = sleep

    @property
    def config(self) -> ClientConfig:
        """The client's settings."""
        return self._config

    @property
    def leader(self) -> str:
        """The address calls currently go to."""
        return self._router.current

    def __enter__(self) -> SyncMailerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel; calls in flight fail with CANCELLED."""
        for channel in self._channels.take_all():
            channel.close()

    def _call(
        self,
        rpc: ops.Rpc,
        invoke: Callable[[ops.Stubs, float], T],
        timeout: timedelta | None,
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
                result = invoke(self._channels.stubs(address), remaining_s)
            except grpc.RpcError as exc:
                error = error_of(exc)
            else:
                attempts.succeeded(address)
                return result
            delay_s = attempts.failed(address, error, time.monotonic())
            if delay_s > 0:
                self._sleep(delay_s)

    def _unary(self, call: ops.Call[T], timeout: timedelta | None) -> T:
        """Send ``call`` to the leader, per its operation's retry rules and timeout."""

        def invoke(stubs: ops.Stubs, remaining_s: float) -> T:
            method = stubs.method(call.rpc)
            response = method(call.request, metadata=self._metadata, timeout=remaining_s)
            return call.rpc.convert(response)

        return self._call(call.rpc, invoke, timeout)

    # ----- jobs -------------------------------------------------------------------

    def submit(
        self,
        content: MessageContent,
        recipients: SyncRecipientSource,
        *,
        idempotency_key: str | None = None,
        options: JobOptions | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: timedelta | None = None,
    ) -> Job:
        """Submit a job; see :meth:`client_sdk.MailerClient.submit`.

        ``on_progress`` may be called from a gRPC thread while an upload streams.

        Raises:
            InvalidArgumentError: A field is invalid; ``details`` names it.
            UnavailableError: No leader could be reached in time.
            DeadlineExceededError: The deadline passed; repeat with the same key.
        """
        submission = Submission(content, idempotency_key or str(uuid.uuid4()), options, on_progress)
        feed = RecipientFeed(recipients, _convert.recipient_to_pb)
        cfg = self._config

        def attempt(stubs: ops.Stubs, remaining_s: float) -> Job:
            stream = feed.read()
            head, more = split_head(stream, cfg.inline_submit_max, cfg.inline_submit_max_bytes)
            if more:
                return self._upload(stubs, remaining_s, submission, itertools.chain(head, stream))
            call = ops.SUBMIT_JOB(submission, head)
            method = stubs.method(call.rpc)
            response = method(call.request, metadata=self._metadata, timeout=remaining_s)
            submission.progress(len(head))
            return call.rpc.convert(response)

        return self._call(ops.SUBMIT_JOB, attempt, timeout)

    def _upload(
        self,
        stubs: ops.Stubs,
        remaining_s: float,
        submission: Submission,
        recipients: Iterator[ops.RecipientMessage],
    ) -> Job:
        """Stream the submit with UploadJob: a header, then the recipients in chunks."""
        rpc, cfg = ops.UPLOAD_JOB, self._config
        source_error: list[BaseException] = []

        def requests() -> Iterator[Message]:
            yield rpc.header(submission)
            sent = 0
            try:
                for chunk in recipient_chunks(
                    recipients, cfg.upload_chunk_size, cfg.upload_chunk_max_bytes
                ):
                    yield rpc.chunk(chunk)
                    sent += len(chunk)
                    submission.progress(sent)
            except Exception as exc:
                # gRPC cancels the call when the request iterator raises, so the
                # server discards the partial upload; the caller gets this error.
                source_error.append(exc)
                raise

        try:
            response = stubs.method(rpc)(requests(), metadata=self._metadata, timeout=remaining_s)
        except grpc.RpcError:
            if source_error:
                raise source_error[0] from None
            raise
        return rpc.convert(response)

    def get(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """The job with its content and current progress.

        Raises:
            NotFoundError: No such job.
        """
        return self._unary(ops.GET_JOB(job_id=job_id), timeout)

    def cancel(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """Cancel a job; not retried on UNAVAILABLE from the leader.

        Raises:
            NotFoundError: No such job.
        """
        return self._unary(ops.CANCEL_JOB(job_id=job_id), timeout)

    def retry_failed(self, job_id: str, *, timeout: timedelta | None = None) -> tuple[Job, int]:
        """Queue again the recipients that failed transiently or ambiguously; see
        :meth:`MailerClient.retry_failed`.

        Raises:
            NotFoundError: No such job.
        """
        return self._unary(ops.RETRY_FAILED(job_id=job_id), timeout)

    def watch(
        self, job_id: str, *, stream_timeout: timedelta | None = None
    ) -> Iterator[JobProgress]:
        """Yield the job's progress until it is final; see :meth:`MailerClient.watch`.

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
        with contextlib.closing(streams) as responses:
            for address, response in responses:
                attempts.progressed(address, time.monotonic())
                progress = rpc.convert(response)
                if progress != last:
                    last = progress
                    yield progress
                if progress.is_final:
                    return

    def _reopening(
        self,
        rpc: ops.ServerStream[..., Any, Any],
        request: Callable[[str], Message],
        stream_s: float,
        ended: StreamEnded,
    ) -> Generator[tuple[str, Any], None, None]:
        """The messages of ``rpc``'s streams at the leader, each with its address; see
        :meth:`client_sdk.MailerClient._reopening`. Closing the generator cancels the
        stream in flight."""
        while True:
            address = self._router.current
            method = self._channels.stubs(address).method(rpc)
            opened_s = time.monotonic()
            call = method(request(address), metadata=self._metadata, timeout=stream_s)
            received = 0
            error: MailerError | None = None
            try:
                for response in call:
                    received += 1
                    yield address, response
            except grpc.RpcError as exc:
                error = error_of(exc)
            finally:
                call.cancel()
            delay_s = ended(address, error, received, time.monotonic() - opened_s)
            if delay_s > 0:
                self._sleep(delay_s)

    def events(
        self,
        after: int = 0,
        *,
        job_ids: Iterable[str] = (),
        types: Iterable[EventType] = (),
        tenant: str = "",
        stream_timeout: timedelta | None = None,
    ) -> SyncEventStream:
        """The delivery events of the caller's tenant with an id above ``after``, then
        each new one; see :meth:`client_sdk.MailerClient.events`. The iterator never ends
        by itself; ``close()`` it (or use it as a context manager) to stop.

        Example::

            with client.events(after=cursor) as events:
                for event in events:
                    handle(event)

        Raises:
            ValueError: ``after`` is negative (at once).
            MailerError: While iterating, as :meth:`client_sdk.MailerClient.events`.
        """
        stream_s = timeout_s(stream_timeout, ops.STREAM_EVENTS.default_timeout(self._config))
        return SyncEventStream(
            after, self._subscribe, job_ids=job_ids, types=types, tenant=tenant, stream_s=stream_s
        )

    def _subscribe(self, cursor: EventCursor[Any]) -> Generator[DeliveryEvent, None, None]:
        """The events of ``cursor``'s streams; see :meth:`client_sdk.MailerClient._subscribe`."""
        rpc = ops.STREAM_EVENTS
        cursor.start(self._router, self._config.retry, self._rng)
        streams = self._reopening(rpc, cursor.request, cursor.stream_s, cursor.ended)
        with contextlib.closing(streams) as responses:
            for address, response in responses:
                yield from cursor.received(address, rpc.convert(response))

    def wait(self, job_id: str, *, stream_timeout: timedelta | None = None) -> JobProgress:
        """Watch until the job is final and return its final progress."""
        last: JobProgress | None = None
        for progress in self.watch(job_id, stream_timeout=stream_timeout):
            last = progress
        assert last is not None
        return last

    def list_jobs_page(
        self,
        *,
        states: Iterable[JobState] = (),
        page_size: int = 100,
        page_token: str = "",
        timeout: timedelta | None = None,
    ) -> Page[Job]:
        """One page of jobs, newest first, without content."""
        call = ops.LIST_JOBS(states=states, page_size=page_size, page_token=page_token)
        return self._unary(call, timeout)

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        page_size: int | None = None,
        timeout: timedelta | None = None,
    ) -> Iterator[Job]:
        """Every job, newest first, fetching pages as needed; ``timeout`` is per page."""
        states = tuple(states)
        size = page_size or self._config.page_size
        yield from _every_item(
            lambda token: self.list_jobs_page(
                states=states, page_size=size, page_token=token, timeout=timeout
            )
        )

    def results_page(
        self,
        job_id: str,
        *,
        statuses: Iterable[RecipientStatus] = (),
        page_size: int = 500,
        page_token: str = "",
        timeout: timedelta | None = None,
    ) -> Page[RecipientResult]:
        """One page of per-recipient outcomes.

        Raises:
            NotFoundError: No such job.
        """
        call = ops.LIST_JOB_RESULTS(
            job_id=job_id, statuses=statuses, page_size=page_size, page_token=page_token
        )
        return self._unary(call, timeout)

    def results(
        self,
        job_id: str,
        *,
        statuses: Iterable[RecipientStatus] = (),
        page_size: int | None = None,
        timeout: timedelta | None = None,
    ) -> Iterator[RecipientResult]:
        """Every recipient outcome of a job, paging as needed; ``timeout`` is per page."""
        statuses = tuple(statuses)
        size = page_size or self._config.page_size
        yield from _every_item(
            lambda token: self.results_page(
                job_id, statuses=statuses, page_size=size, page_token=token, timeout=timeout
            )
        )

    # ----- suppression lists ------------------------------------------------------

    def suppressions_page(
        self,
        *,
        tenant: str = "",
        page_size: int = 100,
        page_token: str = "",
        timeout: timedelta | None = None,
    ) -> Page[Suppression]:
        """One page of the suppression list, by address (``tenant``: admins only)."""
        call = ops.LIST_SUPPRESSIONS(tenant=tenant, page_size=page_size, page_token=page_token)
        return self._unary(call, timeout)

    def suppressions(
        self, *, tenant: str = "", page_size: int | None = None, timeout: timedelta | None = None
    ) -> Iterator[Suppression]:
        """The whole suppression list, paging as needed; ``timeout`` is per page."""
        size = page_size or self._config.page_size
        yield from _every_item(
            lambda token: self.suppressions_page(
                tenant=tenant, page_size=size, page_token=token, timeout=timeout
            )
        )

    def suppress(
        self,
        email: str,
        reason: SuppressionReason = SuppressionReason.MANUAL,
        *,
        tenant: str = "",
        timeout: timedelta | None = None,
    ) -> Suppression:
        """Put an address on the suppression list (replacing its entry). Idempotent."""
        return self._unary(ops.ADD_SUPPRESSION(tenant=tenant, email=email, reason=reason), timeout)

    def unsuppress(self, email: str, *, tenant: str = "", timeout: timedelta | None = None) -> bool:
        """Take an address off the suppression list; False when it was not on it."""
        return self._unary(ops.REMOVE_SUPPRESSION(tenant=tenant, email=email), timeout)

    # ----- webhooks ---------------------------------------------------------------

    def create_webhook(
        self,
        url: str,
        *,
        types: Iterable[EventType] = (),
        tenant: str = "",
        timeout: timedelta | None = None,
    ) -> CreatedWebhook:
        """Register an endpoint; the result holds its secret, shown only now. Not
        idempotent (not retried once the leader is known); see
        :meth:`client_sdk.MailerClient.create_webhook`."""
        return self._unary(ops.CREATE_WEBHOOK(url=url, types=tuple(types), tenant=tenant), timeout)

    def webhooks(self, *, tenant: str = "", timeout: timedelta | None = None) -> list[Webhook]:
        """The tenant's endpoints and where their deliveries stand, without secrets."""
        return self._unary(ops.LIST_WEBHOOKS(tenant=tenant), timeout)

    def delete_webhook(
        self, webhook_id: str, *, tenant: str = "", timeout: timedelta | None = None
    ) -> None:
        """Remove an endpoint; its undelivered events are not sent. Idempotent."""
        self._unary(ops.DELETE_WEBHOOK(tenant=tenant, webhook_id=webhook_id), timeout)

    def replay_webhook(
        self,
        webhook_id: str,
        *,
        from_event_id: int = 0,
        tenant: str = "",
        timeout: timedelta | None = None,
    ) -> Webhook:
        """Enable an endpoint again and send its backlog, or every event after
        ``from_event_id``; see :meth:`client_sdk.MailerClient.replay_webhook`.

        Raises:
            ValueError: ``from_event_id`` is negative (at once).
        """
        call = ops.REPLAY_WEBHOOK(webhook_id=webhook_id, from_event_id=from_event_id, tenant=tenant)
        return self._unary(call, timeout)

    # ----- admin ------------------------------------------------------------------

    def cluster_status(self, *, timeout: timedelta | None = None) -> ClusterStatus:
        """Leader, standbys, etcd endpoints and active job count."""
        return self._unary(ops.GET_CLUSTER_STATUS(), timeout)

    def list_nodes(self, *, timeout: timedelta | None = None) -> list[NodeInfo]:
        """Every registered sender node."""
        return self._unary(ops.LIST_NODES(), timeout)

    def cordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Give the node no new batches; those it holds continue."""
        return self._unary(ops.CORDON_NODE(node_id=node_id), timeout)

    def uncordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Let the node take batches again."""
        return self._unary(ops.UNCORDON_NODE(node_id=node_id), timeout)

    def drain(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Cordon the node and wait until its batches are finished or moved."""
        return self._unary(ops.DRAIN_NODE(node_id=node_id), timeout)

    def reset_breaker(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Close the coordinator's circuit breaker for a node."""
        return self._unary(ops.RESET_BREAKER(node_id=node_id), timeout)

    def pause(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """Pause a job: no new SMTP transactions start for it."""
        return self._unary(ops.PAUSE_JOB(job_id=job_id), timeout)

    def resume(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """Resume a paused job."""
        return self._unary(ops.RESUME_JOB(job_id=job_id), timeout)


def _every_item(fetch: Callable[[str], Page[T]]) -> Iterator[T]:
    """Every item of the pages ``fetch`` returns for each page token, from the first."""
    token = ""
    while True:
        page = fetch(token)
        yield from page.items
        token = page.next_page_token
        if not token:
            return
