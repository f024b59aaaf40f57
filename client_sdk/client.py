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

Without ``tls`` the client dials in plaintext, for clusters started with
``MAILER_PLAINTEXT=1`` (local development); it cannot reach a TLS cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc import aio

from client_sdk import _convert
from client_sdk.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    MailerError,
    UnavailableError,
    error_for_status,
    status_details_bin,
)
from client_sdk.retry import LeaderRouter, RetryBudget, RetryPolicy, Step, next_step
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

if TYPE_CHECKING:
    from mailerpb.mailer.v1.coordinator_pb2_grpc import (
        AdminServiceAsyncStub,
        MailerServiceAsyncStub,
    )

T = TypeVar("T")

RecipientSource = (
    Iterable[Recipient]
    | AsyncIterable[Recipient]
    | Callable[[], Iterable[Recipient] | AsyncIterable[Recipient]]
)
"""Recipients of a submit: an iterable, an async iterable, or a zero-argument
factory returning one. A list or a factory is read again when an attempt is
repeated; a one-shot iterator is remembered as it is read so that a repeated
attempt can send the same recipients (memory grows with the job)."""

ProgressCallback = Callable[[int], None]
"""Called with the number of recipients handed to the transport so far."""


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Settings of a client; every field has a default that suits a local cluster."""

    retry: RetryPolicy = RetryPolicy()
    """Backoff and limits for leader discovery and UNAVAILABLE retries."""
    default_timeout: timedelta = timedelta(seconds=30)
    """Deadline of a call, retries included, when the caller gives none."""
    submit_timeout: timedelta = timedelta(minutes=10)
    """Deadline of a submit or upload when the caller gives none."""
    drain_timeout: timedelta = timedelta(minutes=10)
    """Deadline of a node drain, which waits for the node's batches."""
    watch_stream_timeout: timedelta = timedelta(seconds=60)
    """A watch re-opens its stream this often, so a silent leader is noticed."""
    keepalive_time: timedelta = timedelta(seconds=10)
    """HTTP/2 keepalive ping interval while calls are active."""
    keepalive_timeout: timedelta = timedelta(seconds=5)
    """A connection whose ping is unanswered this long is closed."""
    inline_submit_max: int = 1000
    """Jobs with at most this many recipients go in one SubmitJob; larger ones stream."""
    inline_submit_max_bytes: int = 2 * 1024 * 1024
    """Jobs whose recipients encode larger than this stream even when few."""
    upload_chunk_size: int = 500
    """Recipients per upload message."""
    upload_chunk_max_bytes: int = 1024 * 1024
    """An upload message is closed early when its recipients reach this size."""
    page_size: int = 500
    """Page size of the iterating listings."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest message the client sends or receives."""

    def __post_init__(self) -> None:
        for name in ("default_timeout", "submit_timeout", "drain_timeout", "watch_stream_timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        if self.upload_chunk_size < 1 or self.inline_submit_max < 0:
            raise ValueError("upload_chunk_size must be positive, inline_submit_max not negative")
        if self.page_size < 1:
            raise ValueError("page_size must be at least 1")


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """Coordinator addresses from a list or a comma-separated ``host:port,host:port`` string."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    result = [a.strip() for a in items if a.strip()]
    if not result:
        raise ValueError("at least one coordinator address is required")
    return result


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """TLS for a client's channels to the coordinators (every one, redirects included).

    A cluster started with TLS (``MAILER_TLS_CA``...) refuses plaintext clients, and one
    whose coordinators require client certificates (their default) refuses clients
    without a certificate from its CA: both fail with UNAVAILABLE (the handshake fails).
    Without ``tls`` a client dials in plaintext, which suits only a cluster started
    with ``MAILER_PLAINTEXT=1``.
    """

    root_certificates: bytes | None = dataclasses.field(default=None, repr=False)
    """PEM of the CA(s) coordinator certificates chain to; None trusts the system's."""
    certificate_chain: bytes | None = dataclasses.field(default=None, repr=False)
    """PEM client certificate (chain), for coordinators that require one."""
    private_key: bytes | None = dataclasses.field(default=None, repr=False)
    """PEM private key of ``certificate_chain``."""
    server_name: str = ""
    """Name checked in coordinators' certificates instead of the host of each address
    (for coordinators dialed by IP whose certificates name a service)."""

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key go together")

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        *,
        server_name: str = "",
    ) -> ClientTls:
        """Read the PEM files once, now.

        Args:
            ca_file: The CA bundle; None trusts the system's roots.
            cert_file: The client certificate; with ``key_file`` or not at all.
            key_file: Its private key.
            server_name: See :attr:`server_name`.

        Raises:
            ValueError: a file cannot be read or holds no PEM data (the message names
                the file, never its contents), or only one of cert_file and key_file.
        """
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        return cls(
            root_certificates=_read_pem(ca_file, "CA file") if ca_file else None,
            certificate_chain=_read_pem(cert_file, "certificate file") if cert_file else None,
            private_key=_read_pem(key_file, "key file") if key_file else None,
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials of these settings."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments these settings add (the server-name override)."""
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"TLS {what} {path}: cannot read: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} {path}: no PEM data in it")
    return data


AUTH_METADATA_KEY = "authorization"
"""Metadata key carrying ``Bearer <token>``."""


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates with token (empty for None).

    Raises:
        ValueError: the token is empty or holds whitespace or control characters
            (the message never includes it).
    """
    if token is None:
        return ()
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be non-empty printable text without spaces")
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def channel_options(config: ClientConfig) -> list[tuple[str, Any]]:
    """gRPC channel arguments for a coordinator channel.

    No service-config retry policy: a per-channel retry cannot move to another
    coordinator, so the SDK retries itself, once, at the call level.
    """
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_time.total_seconds() * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout.total_seconds() * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # A restarted coordinator should be reachable again quickly.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]


def error_from_rpc(
    code: grpc.StatusCode, details: str | None, trailing: Iterable[tuple[str, str | bytes]] | None
) -> MailerError:
    """The typed error of a failed RPC (shared by the async and sync clients)."""
    metadata = list(trailing or ())
    retry_after = _convert.retry_after_from_status_details(status_details_bin(metadata))
    return error_for_status(code, details or "", metadata, retry_after)


_DEADLINE_MASKS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED})
"""Codes gRPC's core reports for a call whose deadline ran out mid-stream."""


def route_after_failure(router: LeaderRouter, address: str, error: MailerError) -> None:
    """Move ``router`` after ``error`` at ``address`` (shared by both clients).

    A standby naming another address redirects there; a standby knowing no
    leader, an unreachable address, or one that let the deadline pass (a frozen
    process accepts connections and never answers) moves on to the next address;
    any other error leaves the route alone.
    """
    if isinstance(error, FailedPreconditionError) and error.leader is not None:
        if error.leader and error.leader != address:
            router.redirect(error.leader)
        else:
            router.failed(address)
    elif isinstance(error, UnavailableError | DeadlineExceededError):
        router.failed(address)


def give_up_error(
    step: Step, error: MailerError, router: LeaderRouter, attempts: int
) -> MailerError:
    """The error to raise when no retry is left.

    Running out of redirects and failovers means no leader could be reached,
    which is transient whatever the last coordinator said.
    """
    if step is Step.RAISE:
        return error
    return UnavailableError(
        f"no leader reachable among {', '.join(router.addresses)} after {attempts} attempts; "
        f"last: {error}",
        grpc.StatusCode.UNAVAILABLE,
    )


def timeout_s(timeout: timedelta | None, default: timedelta) -> float:
    """Seconds of a call's deadline."""
    value = (timeout if timeout is not None else default).total_seconds()
    if value <= 0:
        raise ValueError("timeout must be positive")
    return value


def recipient_chunks(
    recipients: Iterable[common_pb2.Recipient], chunk_size: int, chunk_max_bytes: int
) -> Iterator[list[common_pb2.Recipient]]:
    """Group converted recipients into upload chunks by count and size."""
    chunk: list[common_pb2.Recipient] = []
    size = 0
    for r in recipients:
        chunk.append(r)
        size += r.ByteSize()
        if len(chunk) >= chunk_size or size >= chunk_max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _AsyncFeed:
    """The recipients of one submit, readable again for each attempt."""

    def __init__(self, source: RecipientSource) -> None:
        self._factory: Callable[[], Iterable[Recipient] | AsyncIterable[Recipient]] | None = None
        self._reiterable: Iterable[Recipient] | AsyncIterable[Recipient] | None = None
        self._live: Iterator[Recipient] | AsyncIterator[Recipient] | None = None
        self._recorded: list[common_pb2.Recipient] = []
        if isinstance(source, AsyncIterator):
            self._live = source
        elif isinstance(source, Iterator):
            self._live = source
        elif isinstance(source, Iterable | AsyncIterable):
            self._reiterable = source
        else:
            self._factory = source

    async def read(self) -> AsyncIterator[common_pb2.Recipient]:
        """All recipients, converted, from the start."""
        if self._live is None:
            src = self._factory() if self._factory is not None else self._reiterable
            assert src is not None
            async for r in _aiter(src):
                yield _convert.recipient_to_pb(r)
            return
        i = 0
        while i < len(self._recorded):
            yield self._recorded[i]
            i += 1
        async for r in _aiter(self._live):
            pb = _convert.recipient_to_pb(r)
            self._recorded.append(pb)
            yield pb


async def _aiter(src: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(src, AsyncIterable):
        async for item in src:
            yield item
    else:
        for item in src:
            yield item


@dataclasses.dataclass(frozen=True)
class _Stubs:
    mailer: MailerServiceAsyncStub
    admin: AdminServiceAsyncStub


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
        if tls is not None and channel_factory is not None:
            raise ValueError("give tls or channel_factory, not both")
        self._config = config or ClientConfig()
        self._router = LeaderRouter(parse_addresses(addresses))
        self._tls = tls
        self._credentials = tls.credentials() if tls is not None else None
        self._channel_factory = channel_factory or self._default_channel
        self._rng = rng or random.Random()
        self._metadata: tuple[tuple[str, str], ...] = auth_metadata(token)
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, _Stubs] = {}

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
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    def _default_channel(self, address: str) -> aio.Channel:
        options = channel_options(self._config)
        if self._tls is None or self._credentials is None:
            return aio.insecure_channel(address, options=options)
        return aio.secure_channel(
            address, self._credentials, options=[*options, *self._tls.channel_options()]
        )

    def _stubs_for(self, address: str) -> _Stubs:
        stubs = self._stubs.get(address)
        if stubs is None:
            channel = self._channel_factory(address)
            self._channels[address] = channel
            stubs = _Stubs(
                mailer=coordinator_pb2_grpc.MailerServiceStub(channel),
                admin=coordinator_pb2_grpc.AdminServiceStub(channel),
            )
            self._stubs[address] = stubs
        return stubs

    async def _call(
        self,
        invoke: Callable[[_Stubs, float], Awaitable[T]],
        *,
        idempotent: bool,
        timeout: timedelta | None,  # noqa: ASYNC109
        default_timeout: timedelta | None = None,
    ) -> T:
        """Run ``invoke`` at the leader, redirecting and retrying per the retry policy."""
        start_s = time.monotonic()
        deadline_s = start_s + timeout_s(timeout, default_timeout or self._config.default_timeout)
        budget = RetryBudget.start(self._config.retry, start_s, deadline_s)
        while True:
            address = self._router.current
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                raise DeadlineExceededError(
                    "deadline passed while looking for the leader",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            try:
                result = await invoke(self._stubs_for(address), remaining_s)
            except aio.AioRpcError as exc:
                error = error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
                if time.monotonic() >= deadline_s and exc.code() in _DEADLINE_MASKS:
                    # A deadline that runs out while a stream is being written can
                    # surface from gRPC's core as INTERNAL or CANCELLED: it is the
                    # caller's deadline all the same.
                    raise DeadlineExceededError(
                        f"deadline passed during the call ({exc.details()})",
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ) from exc
            else:
                self._router.succeeded(address)
                return result
            step = next_step(
                error,
                idempotent=idempotent,
                believed_leader=self._router.is_believed_leader(address),
            )
            route_after_failure(self._router, address, error)
            delay_s = budget.delay_s(step, time.monotonic(), self._rng)
            if delay_s is None:
                raise give_up_error(step, error, self._router, budget.attempts) from error
            if delay_s > 0:
                await asyncio.sleep(delay_s)

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
        key = idempotency_key or str(uuid.uuid4())
        feed = _AsyncFeed(recipients)
        cfg = self._config

        async def attempt(stubs: _Stubs, timeout_s: float) -> Job:
            stream = feed.read()
            head: list[common_pb2.Recipient] = []
            head_bytes = 0
            async for r in stream:
                head.append(r)
                head_bytes += r.ByteSize()
                if len(head) > cfg.inline_submit_max or head_bytes > cfg.inline_submit_max_bytes:
                    break
            else:
                req = _convert.submit_request(content, head, key, options)
                resp = await stubs.mailer.SubmitJob(req, metadata=self._metadata, timeout=timeout_s)
                if on_progress is not None:
                    on_progress(len(head))
                return _convert.job_from_pb(resp.job, created=resp.created)
            return await self._upload(
                stubs, timeout_s, head, stream, content, key, options, on_progress
            )

        return await self._call(
            attempt, idempotent=True, timeout=timeout, default_timeout=cfg.submit_timeout
        )

    async def _upload(
        self,
        stubs: _Stubs,
        timeout_s: float,
        head: list[common_pb2.Recipient],
        rest: AsyncIterator[common_pb2.Recipient],
        content: MessageContent,
        key: str,
        options: JobOptions | None,
        on_progress: ProgressCallback | None,
    ) -> Job:
        cfg = self._config
        call = stubs.mailer.UploadJob(metadata=self._metadata, timeout=timeout_s)
        sent = 0
        try:
            await call.write(_convert.upload_header(content, key, options))
            chunk: list[common_pb2.Recipient] = []
            chunk_bytes = 0
            async for r in _chain(head, rest):
                chunk.append(r)
                chunk_bytes += r.ByteSize()
                if len(chunk) >= cfg.upload_chunk_size or chunk_bytes >= cfg.upload_chunk_max_bytes:
                    await call.write(_convert.upload_chunk(chunk))
                    sent += len(chunk)
                    chunk, chunk_bytes = [], 0
                    if on_progress is not None:
                        on_progress(sent)
            if chunk:
                await call.write(_convert.upload_chunk(chunk))
                sent += len(chunk)
                if on_progress is not None:
                    on_progress(sent)
            await call.done_writing()
        except (asyncio.InvalidStateError, aio.AioRpcError):
            # The server ended the call while we wrote (a standby refuses at
            # once). The write reports that as INTERNAL or an invalid state;
            # awaiting the call raises the status the server really sent.
            pass
        except BaseException:
            # The recipients source failed or we were cancelled: cancelling the
            # call makes the server discard the partial upload.
            call.cancel()
            raise
        resp = await call
        return _convert.job_from_pb(resp.job, created=resp.created)

    async def get(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """The job with its content and current progress.

        Raises:
            NotFoundError: No such job.
        """
        req = coordinator_pb2.GetJobRequest(job_id=job_id)

        async def attempt(stubs: _Stubs, t: float) -> Job:
            return _convert.job_from_pb(
                (await stubs.mailer.GetJob(req, metadata=self._metadata, timeout=t)).job
            )

        return await self._call(attempt, idempotent=True, timeout=timeout)

    async def cancel(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """Cancel a job: recipients not yet sent end as cancelled.

        Not retried on UNAVAILABLE from the leader (no idempotency key); redirects
        from standbys are followed.

        Raises:
            NotFoundError: No such job.
        """
        req = coordinator_pb2.CancelJobRequest(job_id=job_id)

        async def attempt(stubs: _Stubs, t: float) -> Job:
            return _convert.job_from_pb(
                (await stubs.mailer.CancelJob(req, metadata=self._metadata, timeout=t)).job
            )

        return await self._call(attempt, idempotent=False, timeout=timeout)

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
        req = coordinator_pb2.RetryFailedRequest(job_id=job_id)

        async def attempt(stubs: _Stubs, t: float) -> tuple[Job, int]:
            response = await stubs.mailer.RetryFailed(req, metadata=self._metadata, timeout=t)
            return _convert.job_from_pb(response.job), response.requeued

        return await self._call(attempt, idempotent=True, timeout=timeout)

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
        stream_s = timeout_s(stream_timeout, self._config.watch_stream_timeout)
        req = coordinator_pb2.WatchJobRequest(job_id=job_id)
        budget = RetryBudget.start(self._config.retry, time.monotonic(), float("inf"))
        last: JobProgress | None = None
        while True:
            address = self._router.current
            call = self._stubs_for(address).mailer.WatchJob(
                req, metadata=self._metadata, timeout=stream_s
            )
            received = 0
            error: MailerError | None = None
            try:
                async for resp in call:
                    progress = _convert.progress_from_pb(resp.progress)
                    received += 1
                    self._router.succeeded(address)
                    budget.progressed(time.monotonic())
                    if progress != last:
                        last = progress
                        yield progress
                    if progress.is_final:
                        return
            except aio.AioRpcError as exc:
                error = error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
            finally:
                call.cancel()
            if error is None or (isinstance(error, DeadlineExceededError) and received):
                # The stream ended (leader stepping down, or our own re-open
                # timer) after events: re-open, with a backoff against a loop.
                step = Step.NEXT_ADDRESS
            else:
                if isinstance(error, DeadlineExceededError):
                    # Not one event within the stream deadline: a hung coordinator.
                    error = UnavailableError(error.details, error.code)
                step = next_step(error, idempotent=True, believed_leader=True)
                route_after_failure(self._router, address, error)
            delay_s = budget.delay_s(step, time.monotonic(), self._rng)
            if delay_s is None:
                if error is None:
                    error = UnavailableError(
                        "watch stream kept ending", grpc.StatusCode.UNAVAILABLE
                    )
                raise give_up_error(step, error, self._router, budget.attempts) from error
            if delay_s > 0:
                await asyncio.sleep(delay_s)

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
        req = coordinator_pb2.ListJobsRequest(
            page_size=page_size,
            page_token=page_token,
            states=[_convert.job_state_to_pb(s) for s in states],
        )

        async def attempt(stubs: _Stubs, t: float) -> Page[Job]:
            resp = await stubs.mailer.ListJobs(req, metadata=self._metadata, timeout=t)
            return Page([_convert.job_from_pb(j) for j in resp.jobs], resp.next_page_token)

        return await self._call(attempt, idempotent=True, timeout=timeout)

    async def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        page_size: int | None = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[Job]:
        """Every job, newest first, fetching pages as needed; ``timeout`` is per page."""
        states = tuple(states)
        token = ""
        while True:
            page = await self.list_jobs_page(
                states=states,
                page_size=page_size or self._config.page_size,
                page_token=token,
                timeout=timeout,
            )
            for job in page.items:
                yield job
            token = page.next_page_token
            if not token:
                return

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
        req = coordinator_pb2.ListJobResultsRequest(
            job_id=job_id,
            page_size=page_size,
            page_token=page_token,
            statuses=[_convert.recipient_status_to_pb(s) for s in statuses],
        )

        async def attempt(stubs: _Stubs, t: float) -> Page[RecipientResult]:
            resp = await stubs.mailer.ListJobResults(req, metadata=self._metadata, timeout=t)
            return Page([_convert.result_from_pb(r) for r in resp.results], resp.next_page_token)

        return await self._call(attempt, idempotent=True, timeout=timeout)

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
        token = ""
        while True:
            page = await self.results_page(
                job_id,
                statuses=statuses,
                page_size=page_size or self._config.page_size,
                page_token=token,
                timeout=timeout,
            )
            for result in page.items:
                yield result
            token = page.next_page_token
            if not token:
                return

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
        req = coordinator_pb2.ListSuppressionsRequest(
            tenant=tenant, page_size=page_size, page_token=page_token
        )

        async def attempt(stubs: _Stubs, t: float) -> Page[Suppression]:
            resp = await stubs.mailer.ListSuppressions(req, metadata=self._metadata, timeout=t)
            return Page(
                [_convert.suppression_from_pb(s) for s in resp.suppressions], resp.next_page_token
            )

        return await self._call(attempt, idempotent=True, timeout=timeout)

    async def suppressions(
        self,
        *,
        tenant: str = "",
        page_size: int | None = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[Suppression]:
        """The whole suppression list, paging as needed; ``timeout`` is per page."""
        token = ""
        while True:
            page = await self.suppressions_page(
                tenant=tenant,
                page_size=page_size or self._config.page_size,
                page_token=token,
                timeout=timeout,
            )
            for item in page.items:
                yield item
            token = page.next_page_token
            if not token:
                return

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
        req = coordinator_pb2.AddSuppressionRequest(
            tenant=tenant, email=email, reason=_convert.suppression_reason_to_pb(reason)
        )

        async def attempt(stubs: _Stubs, t: float) -> Suppression:
            resp = await stubs.mailer.AddSuppression(req, metadata=self._metadata, timeout=t)
            return _convert.suppression_from_pb(resp.suppression)

        return await self._call(attempt, idempotent=True, timeout=timeout)

    async def unsuppress(
        self,
        email: str,
        *,
        tenant: str = "",
        timeout: timedelta | None = None,  # noqa: ASYNC109
    ) -> bool:
        """Take an address off the suppression list; False when it was not on it.
        Idempotent (a retried call may report False)."""
        req = coordinator_pb2.RemoveSuppressionRequest(tenant=tenant, email=email)

        async def attempt(stubs: _Stubs, t: float) -> bool:
            resp = await stubs.mailer.RemoveSuppression(req, metadata=self._metadata, timeout=t)
            return resp.removed

        return await self._call(attempt, idempotent=True, timeout=timeout)

    # ----- admin ------------------------------------------------------------------

    async def cluster_status(self, *, timeout: timedelta | None = None) -> ClusterStatus:  # noqa: ASYNC109
        """Leader, standbys, etcd endpoints and active job count."""
        req = coordinator_pb2.GetClusterStatusRequest()

        async def attempt(stubs: _Stubs, t: float) -> ClusterStatus:
            return _convert.cluster_status_from_pb(
                await stubs.admin.GetClusterStatus(req, metadata=self._metadata, timeout=t)
            )

        return await self._call(attempt, idempotent=True, timeout=timeout)

    async def list_nodes(self, *, timeout: timedelta | None = None) -> list[NodeInfo]:  # noqa: ASYNC109
        """Every registered sender node."""
        req = coordinator_pb2.ListNodesRequest()

        async def attempt(stubs: _Stubs, t: float) -> list[NodeInfo]:
            resp = await stubs.admin.ListNodes(req, metadata=self._metadata, timeout=t)
            return [_convert.node_from_pb(n) for n in resp.nodes]

        return await self._call(attempt, idempotent=True, timeout=timeout)

    async def cordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Give the node no new batches; those it holds continue.

        Raises:
            NotFoundError: No such node.
        """
        req = coordinator_pb2.CordonNodeRequest(node_id=node_id)

        async def attempt(stubs: _Stubs, t: float) -> NodeInfo:
            return _convert.node_from_pb(
                (await stubs.admin.CordonNode(req, metadata=self._metadata, timeout=t)).node
            )

        return await self._call(attempt, idempotent=False, timeout=timeout)

    async def uncordon(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Let the node take batches again.

        Raises:
            NotFoundError: No such node.
        """
        req = coordinator_pb2.UncordonNodeRequest(node_id=node_id)

        async def attempt(stubs: _Stubs, t: float) -> NodeInfo:
            return _convert.node_from_pb(
                (await stubs.admin.UncordonNode(req, metadata=self._metadata, timeout=t)).node
            )

        return await self._call(attempt, idempotent=False, timeout=timeout)

    async def drain(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Cordon the node and wait until its batches are finished or moved.

        ``timeout`` defaults to ``config.drain_timeout``; when it passes the node
        stays cordoned and draining continues on the coordinator.

        Raises:
            NotFoundError: No such node.
        """
        req = coordinator_pb2.DrainNodeRequest(node_id=node_id)

        async def attempt(stubs: _Stubs, t: float) -> NodeInfo:
            return _convert.node_from_pb(
                (await stubs.admin.DrainNode(req, metadata=self._metadata, timeout=t)).node
            )

        return await self._call(
            attempt, idempotent=False, timeout=timeout, default_timeout=self._config.drain_timeout
        )

    async def reset_breaker(self, node_id: str, *, timeout: timedelta | None = None) -> NodeInfo:  # noqa: ASYNC109
        """Close the coordinator's circuit breaker for a node.

        Raises:
            NotFoundError: No such node.
        """
        req = coordinator_pb2.ResetBreakerRequest(node_id=node_id)

        async def attempt(stubs: _Stubs, t: float) -> NodeInfo:
            return _convert.node_from_pb(
                (await stubs.admin.ResetBreaker(req, metadata=self._metadata, timeout=t)).node
            )

        return await self._call(attempt, idempotent=False, timeout=timeout)

    async def pause(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """Pause a job: no new SMTP transactions start for it.

        Raises:
            NotFoundError: No such job.
            FailedPreconditionError: The job is final.
        """
        req = coordinator_pb2.PauseJobRequest(job_id=job_id)

        async def attempt(stubs: _Stubs, t: float) -> Job:
            return _convert.job_from_pb(
                (await stubs.admin.PauseJob(req, metadata=self._metadata, timeout=t)).job
            )

        return await self._call(attempt, idempotent=False, timeout=timeout)

    async def resume(self, job_id: str, *, timeout: timedelta | None = None) -> Job:  # noqa: ASYNC109
        """Resume a paused job.

        Raises:
            NotFoundError: No such job.
            FailedPreconditionError: The job is final.
        """
        req = coordinator_pb2.ResumeJobRequest(job_id=job_id)

        async def attempt(stubs: _Stubs, t: float) -> Job:
            return _convert.job_from_pb(
                (await stubs.admin.ResumeJob(req, metadata=self._metadata, timeout=t)).job
            )

        return await self._call(attempt, idempotent=False, timeout=timeout)


async def _chain(head: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in head:
        yield item
    async for item in rest:
        yield item
