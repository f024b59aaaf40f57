"""The blocking client of a Mailers cluster, for scripts and threads without an event loop.

:class:`SyncMailerClient` has the surface of :class:`client_sdk.MailerClient`
with plain methods and iterators, built on the synchronous gRPC API (so
``grpcio-testing`` can drive it). Leader discovery, redirects, retries and the
error model are the same and share their code with the async client. Every
call blocks for at most its ``timeout`` (retries included); it is safe to use
one instance from several threads.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import TypeVar

import grpc

from client_sdk import _convert
from client_sdk.client import (
    ClientConfig,
    ClientTls,
    ProgressCallback,
    auth_metadata,
    channel_options,
    error_from_rpc,
    give_up_error,
    parse_addresses,
    recipient_chunks,
    route_after_failure,
    timeout_s,
)
from client_sdk.errors import DeadlineExceededError, MailerError, UnavailableError
from client_sdk.retry import LeaderRouter, RetryBudget, Step, next_step
from client_sdk.types import (
    ClusterStatus,
    Job,
    JobOptions,
    JobProgress,
    JobState,
    MessageContent,
    NodeInfo,
    Page,
    Recipient,
    RecipientResult,
    RecipientStatus,
    Suppression,
    SuppressionReason,
)
from mailerpb.mailer.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

T = TypeVar("T")

SyncRecipientSource = Iterable[Recipient] | Callable[[], Iterable[Recipient]]
"""Recipients of a blocking submit: an iterable or a zero-argument factory of one."""


class _Feed:
    """The recipients of one submit, readable again for each attempt."""

    def __init__(self, source: SyncRecipientSource) -> None:
        self._factory: Callable[[], Iterable[Recipient]] | None = None
        self._reiterable: Iterable[Recipient] | None = None
        self._live: Iterator[Recipient] | None = None
        self._recorded: list[common_pb2.Recipient] = []
        if isinstance(source, Iterator):
            self._live = source
        elif isinstance(source, Iterable):
            self._reiterable = source
        else:
            self._factory = source

    def read(self) -> Iterator[common_pb2.Recipient]:
        """All recipients, converted, from the start."""
        if self._live is None:
            src = self._factory() if self._factory is not None else self._reiterable
            assert src is not None
            for r in src:
                yield _convert.recipient_to_pb(r)
            return
        i = 0
        while i < len(self._recorded):
            yield self._recorded[i]
            i += 1
        for r in self._live:
            pb = _convert.recipient_to_pb(r)
            self._recorded.append(pb)
            yield pb


@dataclasses.dataclass(frozen=True)
class _Stubs:
    mailer: coordinator_pb2_grpc.MailerServiceStub
    admin: coordinator_pb2_grpc.AdminServiceStub


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
                :func:`client_sdk.client.channel_options`, TLS when ``tls`` is given,
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
        if tls is not None and channel_factory is not None:
            raise ValueError("give tls or channel_factory, not both")
        self._config = config or ClientConfig()
        self._router = LeaderRouter(parse_addresses(addresses))
        self._tls = tls
        self._credentials = tls.credentials() if tls is not None else None
        self._channel_factory = channel_factory or self._default_channel
        self._rng = rng or random.Random()
        self._metadata: tuple[tuple[str, str], ...] = auth_metadata(token)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, _Stubs] = {}

    @property
    def config(self) -> ClientConfig:
        """The client's settings."""
        return self._config

    @property
    def leader(self) -> str:
        """The address calls currently go to."""
        with self._lock:
            return self._router.current

    def __enter__(self) -> SyncMailerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel; calls in flight fail with CANCELLED."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
        for channel in channels:
            channel.close()

    def _default_channel(self, address: str) -> grpc.Channel:
        options = channel_options(self._config)
        if self._tls is None or self._credentials is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(
            address, self._credentials, options=[*options, *self._tls.channel_options()]
        )

    def _route(self) -> tuple[str, _Stubs]:
        with self._lock:
            address = self._router.current
            stubs = self._stubs.get(address)
            if stubs is None:
                channel = self._channel_factory(address)
                self._channels[address] = channel
                stubs = _Stubs(
                    mailer=coordinator_pb2_grpc.MailerServiceStub(channel),
                    admin=coordinator_pb2_grpc.AdminServiceStub(channel),
                )
                self._stubs[address] = stubs
            return address, stubs

    def _after_failure(self, address: str, error: MailerError, idempotent: bool) -> Step:
        with self._lock:
            step = next_step(
                error,
                idempotent=idempotent,
                believed_leader=self._router.is_believed_leader(address),
            )
            route_after_failure(self._router, address, error)
            return step

    def _succeeded(self, address: str) -> None:
        with self._lock:
            self._router.succeeded(address)

    def _give_up(self, step: Step, error: MailerError, attempts: int) -> MailerError:
        with self._lock:
            return give_up_error(step, error, self._router, attempts)

    def _call(
        self,
        invoke: Callable[[_Stubs, float], T],
        *,
        idempotent: bool,
        timeout: timedelta | None,
        default_timeout: timedelta | None = None,
    ) -> T:
        """Run ``invoke`` at the leader, redirecting and retrying per the retry policy."""
        start_s = time.monotonic()
        deadline_s = start_s + timeout_s(timeout, default_timeout or self._config.default_timeout)
        budget = RetryBudget.start(self._config.retry, start_s, deadline_s)
        while True:
            address, stubs = self._route()
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                raise DeadlineExceededError(
                    "deadline passed while looking for the leader",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            try:
                result = invoke(stubs, remaining_s)
            except grpc.RpcError as exc:
                error = _error_from_sync(exc)
            else:
                self._succeeded(address)
                return result
            step = self._after_failure(address, error, idempotent)
            delay_s = budget.delay_s(step, time.monotonic(), self._rng)
            if delay_s is None:
                raise self._give_up(step, error, budget.attempts) from error
            if delay_s > 0:
                self._sleep(delay_s)

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
        key = idempotency_key or str(uuid.uuid4())
        feed = _Feed(recipients)
        cfg = self._config

        def attempt(stubs: _Stubs, t: float) -> Job:
            stream = feed.read()
            head: list[common_pb2.Recipient] = []
            head_bytes = 0
            for r in stream:
                head.append(r)
                head_bytes += r.ByteSize()
                if len(head) > cfg.inline_submit_max or head_bytes > cfg.inline_submit_max_bytes:
                    break
            else:
                req = _convert.submit_request(content, head, key, options)
                resp = stubs.mailer.SubmitJob(req, metadata=self._metadata, timeout=t)
                if on_progress is not None:
                    on_progress(len(head))
                return _convert.job_from_pb(resp.job, created=resp.created)
            return self._upload(
                stubs, t, itertools.chain(head, stream), content, key, options, on_progress
            )

        return self._call(
            attempt, idempotent=True, timeout=timeout, default_timeout=cfg.submit_timeout
        )

    def _upload(
        self,
        stubs: _Stubs,
        t: float,
        recipients: Iterator[common_pb2.Recipient],
        content: MessageContent,
        key: str,
        options: JobOptions | None,
        on_progress: ProgressCallback | None,
    ) -> Job:
        cfg = self._config
        source_error: list[BaseException] = []

        def requests() -> Iterator[coordinator_pb2.UploadJobRequest]:
            yield _convert.upload_header(content, key, options)
            sent = 0
            try:
                for chunk in recipient_chunks(
                    recipients, cfg.upload_chunk_size, cfg.upload_chunk_max_bytes
                ):
                    yield _convert.upload_chunk(chunk)
                    sent += len(chunk)
                    if on_progress is not None:
                        on_progress(sent)
            except Exception as exc:
                # gRPC cancels the call when the request iterator raises, so the
                # server discards the partial upload; the caller gets this error.
                source_error.append(exc)
                raise

        try:
            resp = stubs.mailer.UploadJob(requests(), metadata=self._metadata, timeout=t)
        except grpc.RpcError:
            if source_error:
                raise source_error[0] from None
            raise
        return _convert.job_from_pb(resp.job, created=resp.created)

    def get(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """The job with its content and current progress.

        Raises:
            NotFoundError: No such job.
        """
        req = coordinator_pb2.GetJobRequest(job_id=job_id)
        return self._call(
            lambda s, t: _convert.job_from_pb(
                s.mailer.GetJob(req, metadata=self._metadata, timeout=t).job
            ),
            idempotent=True,
            timeout=timeout,
        )

    def cancel(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """Cancel a job; not retried on UNAVAILABLE from the leader.

        Raises:
            NotFoundError: No such job.
        """
        req = coordinator_pb2.CancelJobRequest(job_id=job_id)
        return self._call(
            lambda s, t: _convert.job_from_pb(
                s.mailer.CancelJob(req, metadata=self._metadata, timeout=t).job
            ),
            idempotent=False,
            timeout=timeout,
        )

    def retry_failed(self, job_id: str, *, timeout: timedelta | None = None) -> tuple[Job, int]:
        """Queue again the recipients that failed transiently or ambiguously; see
        :meth:`MailerClient.retry_failed`.

        Raises:
            NotFoundError: No such job.
        """
        req = coordinator_pb2.RetryFailedRequest(job_id=job_id)

        def attempt(s: _Stubs, t: float) -> tuple[Job, int]:
            response = s.mailer.RetryFailed(req, metadata=self._metadata, timeout=t)
            return _convert.job_from_pb(response.job), int(response.requeued)

        return self._call(attempt, idempotent=True, timeout=timeout)

    def watch(
        self, job_id: str, *, stream_timeout: timedelta | None = None
    ) -> Iterator[JobProgress]:
        """Yield the job's progress until it is final; see :meth:`MailerClient.watch`.

        Raises:
            NotFoundError: No such job.
            UnavailableError: No leader answered within ``retry.max_elapsed``
                since the last event.
        """
        stream_s = timeout_s(stream_timeout, self._config.watch_stream_timeout)
        req = coordinator_pb2.WatchJobRequest(job_id=job_id)
        budget = RetryBudget.start(self._config.retry, time.monotonic(), float("inf"))
        last: JobProgress | None = None
        while True:
            address, stubs = self._route()
            call = stubs.mailer.WatchJob(req, metadata=self._metadata, timeout=stream_s)
            received = 0
            error: MailerError | None = None
            try:
                for resp in call:
                    progress = _convert.progress_from_pb(resp.progress)
                    received += 1
                    self._succeeded(address)
                    budget.progressed(time.monotonic())
                    if progress != last:
                        last = progress
                        yield progress
                    if progress.is_final:
                        return
            except grpc.RpcError as exc:
                error = _error_from_sync(exc)
            finally:
                call.cancel()
            if error is None or (isinstance(error, DeadlineExceededError) and received):
                step = Step.NEXT_ADDRESS
            else:
                if isinstance(error, DeadlineExceededError):
                    error = UnavailableError(error.details, error.code)
                step = self._after_failure(address, error, idempotent=True)
            delay_s = budget.delay_s(step, time.monotonic(), self._rng)
            if delay_s is None:
                if error is None:
                    error = UnavailableError(
                        "watch stream kept ending", grpc.StatusCode.UNAVAILABLE
                    )
                raise self._give_up(step, error, budget.attempts) from error
            if delay_s > 0:
                self._sleep(delay_s)

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
        req = coordinator_pb2.ListJobsRequest(
            page_size=page_size,
            page_token=page_token,
            states=[_convert.job_state_to_pb(s) for s in states],
        )

        def attempt(s: _Stubs, t: float) -> Page[Job]:
            resp = s.mailer.ListJobs(req, metadata=self._metadata, timeout=t)
            return Page([_convert.job_from_pb(j) for j in resp.jobs], resp.next_page_token)

        return self._call(attempt, idempotent=True, timeout=timeout)

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        page_size: int | None = None,
        timeout: timedelta | None = None,
    ) -> Iterator[Job]:
        """Every job, newest first, fetching pages as needed; ``timeout`` is per page."""
        states = tuple(states)
        token = ""
        while True:
            page = self.list_jobs_page(
                states=states,
                page_size=page_size or self._config.page_size,
                page_token=token,
                timeout=timeout,
            )
            yield from page.items
            token = page.next_page_token
            if not token:
                return

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
        req = coordinator_pb2.ListJobResultsRequest(
            job_id=job_id,
            page_size=page_size,
            page_token=page_token,
            statuses=[_convert.recipient_status_to_pb(s) for s in statuses],
        )

        def attempt(s: _Stubs, t: float) -> Page[RecipientResult]:
            resp = s.mailer.ListJobResults(req, metadata=self._metadata, timeout=t)
            return Page([_convert.result_from_pb(r) for r in resp.results], resp.next_page_token)

        return self._call(attempt, idempotent=True, timeout=timeout)

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
        token = ""
        while True:
            page = self.results_page(
                job_id,
                statuses=statuses,
                page_size=page_size or self._config.page_size,
                page_token=token,
                timeout=timeout,
            )
            yield from page.items
            token = page.next_page_token
            if not token:
                return

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
        req = coordinator_pb2.ListSuppressionsRequest(
            tenant=tenant, page_size=page_size, page_token=page_token
        )

        def attempt(s: _Stubs, t: float) -> Page[Suppression]:
            resp = s.mailer.ListSuppressions(req, metadata=self._metadata, timeout=t)
            return Page(
                [_convert.suppression_from_pb(x) for x in resp.suppressions], resp.next_page_token
            )

        return self._call(attempt, idempotent=True, timeout=timeout)

    def suppressions(
        self, *, tenant: str = "", page_size: int | None = None, timeout: timedelta | None = None
    ) -> Iterator[Suppression]:
        """The whole suppression list, paging as needed; ``timeout`` is per page."""
        token = ""
        while True:
            page = self.suppressions_page(
                tenant=tenant,
                page_size=page_size or self._config.page_size,
                page_token=token,
                timeout=timeout,
            )
            yield from page.items
            token = page.next_page_token
            if not token:
                return

    def suppress(
        self,
        email: str,
        reason: SuppressionReason = SuppressionReason.MANUAL,
        *,
        tenant: str = "",
        timeout: timedelta | None = None,
    ) -> Suppression:
        """Put an address on the suppression list (replacing its entry). Idempotent."""
        req = coordinator_pb2.AddSuppressionRequest(
            tenant=tenant, email=email, reason=_convert.suppression_reason_to_pb(reason)
        )
        return self._call(
            lambda s, t: _convert.suppression_from_pb(
                s.mailer.AddSuppression(req, metadata=self._metadata, timeout=t).suppression
            ),
            idempotent=True,
            timeout=timeout,
        )

    def unsuppress(self, email: str, *, tenant: str = "", timeout: timedelta | None = None) -> bool:
        """Take an address off the suppression list; False when it was not on it."""
        req = coordinator_pb2.RemoveSuppressionRequest(tenant=tenant, email=email)
        return self._call(
            lambda s, t: (
                s.mailer.RemoveSuppression(req, metadata=self._metadata, timeout=t).removed
            ),
            idempotent=True,
            timeout=timeout,
        )

    # ----- admin ------------------------------------------------------------------

    def cluster_status(self, *, timeout: timedelta | None = None) -> ClusterStatus:
        """Leader, standbys, etcd endpoints and active job count."""
        req = coordinator_pb2.GetClusterStatusRequest()
        return self._call(
            lambda s, t: _convert.cluster_status_from_pb(
                s.admin.GetClusterStatus(req, metadata=self._metadata, timeout=t)
            ),
            idempotent=True,
            timeout=timeout,
        )

    def list_nodes(self, *, timeout: timedelta | None = None) -> list[NodeInfo]:
        """Every registered sender node."""
        req = coordinator_pb2.ListNodesRequest()
        return self._call(
            lambda s, t: [
                _convert.node_from_pb(n)
                for n in s.admin.ListNodes(req, metadata=self._metadata, timeout=t).nodes
            ],
            idempotent=True,
            timeout=timeout,
        )

    def cordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Give the node no new batches; those it holds continue."""
        req = coordinator_pb2.CordonNodeRequest(node_id=node_id)
        return self._call(
            lambda s, t: _convert.node_from_pb(
                s.admin.CordonNode(req, metadata=self._metadata, timeout=t).node
            ),
            idempotent=False,
            timeout=timeout,
        )

    def uncordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Let the node take batches again."""
        req = coordinator_pb2.UncordonNodeRequest(node_id=node_id)
        return self._call(
            lambda s, t: _convert.node_from_pb(
                s.admin.UncordonNode(req, metadata=self._metadata, timeout=t).node
            ),
            idempotent=False,
            timeout=timeout,
        )

    def drain(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Cordon the node and wait until its batches are finished or moved."""
        req = coordinator_pb2.DrainNodeRequest(node_id=node_id)
        return self._call(
            lambda s, t: _convert.node_from_pb(
                s.admin.DrainNode(req, metadata=self._metadata, timeout=t).node
            ),
            idempotent=False,
            timeout=timeout,
            default_timeout=self._config.drain_timeout,
        )

    def reset_breaker(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:
        """Close the coordinator's circuit breaker for a node."""
        req = coordinator_pb2.ResetBreakerRequest(node_id=node_id)
        return self._call(
            lambda s, t: _convert.node_from_pb(
                s.admin.ResetBreaker(req, metadata=self._metadata, timeout=t).node
            ),
            idempotent=False,
            timeout=timeout,
        )

    def pause(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """Pause a job: no new SMTP transactions start for it."""
        req = coordinator_pb2.PauseJobRequest(job_id=job_id)
        return self._call(
            lambda s, t: _convert.job_from_pb(
                s.admin.PauseJob(req, metadata=self._metadata, timeout=t).job
            ),
            idempotent=False,
            timeout=timeout,
        )

    def resume(self, job_id: str, *, timeout: timedelta | None = None) -> Job:
        """Resume a paused job."""
        req = coordinator_pb2.ResumeJobRequest(job_id=job_id)
        return self._call(
            lambda s, t: _convert.job_from_pb(
                s.admin.ResumeJob(req, metadata=self._metadata, timeout=t).job
            ),
            idempotent=False,
            timeout=timeout,
        )


def _error_from_sync(exc: grpc.RpcError) -> MailerError:
    """The typed error of a failed blocking call (the exception is also a grpc.Call)."""
    if isinstance(exc, grpc.Call):
        return error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
    return error_from_rpc(grpc.StatusCode.UNKNOWN, str(exc), ())
