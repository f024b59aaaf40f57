"""Connecting to etcd and the key layout every process shares.

A client built by :func:`connect` talks to one member at a time, asks every call to be
refused by a member without a raft leader, and moves to the next member when one fails
a call (:class:`EtcdClient`), so it survives a member that is dead, frozen, or cut off
from its peers.

Given :class:`~mailers_runtime.tls.TlsFiles` (``EtcdTls``), the client speaks TLS and
presents a client certificate. An etcd started with ``--client-cert-auth`` and auth
enabled takes the certificate's common name as the etcd user (no password, no token), so
which keys a process may touch follows from the certificate it is given (see
``mailers.etcd_auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailers_runtime import settings
from mailers_runtime.lease import LeaseTrust, Refresh, attempt_deadline, classify_reply
from mailers_runtime.tls import ETCD_TLS_VARIABLES, FILE_FIELDS, TlsFiles, TlsMaterial

log = logging.getLogger(__name__)

# Every etcd call made through these clients gives up after this many seconds, so no
# await on etcd can hang a process; callers choose what a timeout means.
DEFAULT_TIMEOUT_S = 5
RECEIVE_LIMIT_BYTES = 16 * 1024 * 1024
"""The client's gRPC receive limit, set explicitly (gRPC's default is 4 MiB). Reads are
paged well below it (:func:`read_prefix`), so no reply can come near it."""
PAGE_KEYS = 256
"""Keys per page of a range read."""


@dataclasses.dataclass(frozen=True)
class Keys:
    """The etcd key layout under one prefix (``/mailers`` by default).

    Values are JSON unless said otherwise. The layout:

    - ``election/<lease hex>``: one per coordinator campaigning; value is its
      CoordinatorInfo JSON. The lowest create revision leads; that revision is its epoch.
    - ``nodes/<node_id>``: a sender node's registration, bound to its lease.
    - ``cordon/<node_id>``: present while an operator has cordoned the node.
    - ``handback/<node_id>``: a node that cannot reach the leader hands back its
      unacknowledged results and released batches here (a ``NodeHandback`` protobuf);
      the leader applies it and deletes the key.

    Jobs, recipients, outcomes and suppressions live in PostgreSQL, not here: etcd holds
    coordination only.
    """

    prefix: str = "/mailers"

    def _k(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    @property
    def election(self) -> bytes:
        return self._k("election", "")

    def election_key(self, lease_id: int) -> bytes:
        return self._k("election", f"{lease_id:016x}")

    @property
    def nodes(self) -> bytes:
        return self._k("nodes", "")

    def node(self, node_id: str) -> bytes:
        return self._k("nodes", node_id)

    @property
    def cordons(self) -> bytes:
        return self._k("cordon", "")

    def cordon(self, node_id: str) -> bytes:
        return self._k("cordon", node_id)

    @property
    def handback_prefix(self) -> bytes:
        return self._k("handback", "")

    def handback(self, node_id: str) -> bytes:
        return self._k("handback", node_id)

    def tail(self, key: bytes, parent: bytes) -> str:
        """The part of key after parent (one of the prefix properties above)."""
        return key[len(parent) :].decode()


def parse_endpoints(spec: str) -> list[str]:
    """Split "host:port,host:port" into a list, rejecting malformed entries.

    Raises:
        ValueError: an entry has no port or a non-numeric port.
    """
    endpoints = list(settings.listed(spec))
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return endpoints


def endpoints(spec: str) -> tuple[str, ...]:
    """:func:`parse_endpoints` as the parser of ``MAILER_ETCD_ENDPOINTS``."""
    return tuple(parse_endpoints(spec))


EtcdTls = TlsFiles
"""The files of a TLS client of etcd: the type every TLS hop uses (kept as a name for
its callers)."""

TLS_ENV = tuple(ETCD_TLS_VARIABLES[field] for field in FILE_FIELDS)
"""``MAILER_ETCD_CA``, ``MAILER_ETCD_CERT``, ``MAILER_ETCD_KEY``: all three or none."""

SERVER_NAME_ENV = ETCD_TLS_VARIABLES["server_name"]
"""Optional with :data:`TLS_ENV`: the name every etcd member's certificate carries."""


def tls_setting() -> Any:
    """The declaration of a config field holding etcd's :class:`TlsFiles` (None for
    plaintext etcd): :data:`TLS_ENV` all three or none, each naming an existing file,
    and the optional :data:`SERVER_NAME_ENV`, which alone is an error.

    The files are read when a client is built (:func:`connect`), so a process picks up
    renewed certificates when it next connects.
    """
    ca, cert, key = (settings.Variable(name, settings.existing_file) for name in TLS_ENV)
    return settings.nested(
        TlsFiles,
        default=None,
        optional=True,
        ca_file=ca,
        cert_file=cert,
        key_file=key,
        server_name=settings.Variable(SERVER_NAME_ENV),
    )


REQUIRE_LEADER = (("hasleader", "true"),)
"""Metadata of every call: a member that has lost its raft leader refuses the call at
once ("etcdserver: no leader", UNAVAILABLE) instead of letting it time out, as etcd's
own Go client asks (``clientv3.WithRequireLeader``)."""
SILENT_CALL_S = 0.5
"""A call cancelled by its caller after this long without an answer counts as a member
that does not answer (a caller's deadline cancels the call, gRPC then says CANCELLED).
Every call here is a small one that a healthy member answers in milliseconds; the
callers' deadlines are 1-5 s."""
_KEEPALIVE_METHOD = "/etcdserverpb.Lease/LeaseKeepAlive"


def _unfit(code: grpc.StatusCode | None, cancelled_after_s: float | None) -> str | None:
    """Why a finished call says its member is unfit for the next call, or None. Pure."""
    if code is grpc.StatusCode.UNAVAILABLE:
        return "unavailable"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no reply before the call's deadline"
    if cancelled_after_s is not None and cancelled_after_s >= SILENT_CALL_S:
        return f"no reply within {cancelled_after_s:.1f} s"
    return None


class _Observer(grpc.aio.UnaryUnaryClientInterceptor):
    """Tells the client how each unary call on one member's channel ended (the one
    streaming call that matters, LeaseKeepAlive, reports itself: :func:`keepalive_once`)."""

    def __init__(self, client: EtcdClient, endpoint: str) -> None:
        self._client = client
        self._endpoint = endpoint

    def _watch(self, call: Any, method: str, started: float) -> None:
        def done(finished: Any) -> None:
            elapsed = time.monotonic() - started
            if finished.cancelled():
                self._client.call_ended(self._endpoint, method, None, "", elapsed)
                return
            # The call is over: its status is there, awaiting it does not wait.
            task = asyncio.ensure_future(self._report(finished, method))
            self._client.keep(task)

        call.add_done_callback(done)

    async def _report(self, call: Any, method: str) -> None:
        code, details = await call.code(), await call.details()
        self._client.call_ended(self._endpoint, method, code, details or "", None)

    @staticmethod
    def _method(details: grpc.aio.ClientCallDetails) -> str:
        method = details.method
        return method.decode() if isinstance(method, bytes) else str(method)

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        started = time.monotonic()
        call = await continuation(client_call_details, request)
        self._watch(call, self._method(client_call_details), started)
        return call


class EtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """An aetcd client that talks to one etcd member at a time and moves to the next
    when that member fails a call.

    gRPC's pick-first over several addresses moves only when a connection breaks, and a
    member cut off from its peers still accepts connections: every call to it timed
    out. Here each member gets a channel of its own (so endpoints may be DNS names, and
    TLS verifies each member by its own name), every call carries
    :data:`REQUIRE_LEADER`, and a call that ends UNAVAILABLE, past its deadline, or
    cancelled after :data:`SILENT_CALL_S` without an answer moves the client to the next
    member: the next call opens a channel to the next endpoint, the watches on the old
    one end at once (their owners re-list), and the old channel closes once the calls on
    it have ended by themselves (:func:`_retire`). ``member`` is the endpoint in use,
    ``failovers`` counts the moves and ``refusals`` the "no leader" answers.

    aetcd 1.0.0 builds an insecure channel to one target in ``Client.connect``; this is
    that method with our channel, and without aetcd's user/password login (a client
    certificate or no auth replaces it). Stubs, watcher and error mapping are aetcd's.
    """

    _is_connecting: bool  # set by aetcd.Client.__init__

    def __init__(
        self,
        endpoints: Sequence[str],
        credentials: grpc.ChannelCredentials | None,
        timeout_s: int,
        options: dict[str, Any],
    ) -> None:
        host, _, port = endpoints[0].rpartition(":")
        super().__init__(host=host, port=int(port), timeout=timeout_s, options=options)
        self.endpoints = tuple(endpoints)
        self._credentials = credentials
        self._index = 0
        self.failovers = 0
        self.refusals = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def member(self) -> str:
        """The endpoint calls go to now."""
        return self.endpoints[self._index]

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a reference to a background task until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close the channel in use and any being retired."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            # Another task is opening the channel; wait for it as aetcd does.
            async with asyncio.timeout(self._connect_wait_timeout):
                await self._connected.wait()
            return
        try:
            self._is_connecting = True
            member = self.member
            observer = [_Observer(self, member)]
            options = list(self._options.items())
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(member, options, interceptors=observer)
            else:
                channel = grpc.aio.secure_channel(
                    member, self._credentials, options, interceptors=observer
                )
            self.channel = channel
            self.metadata = REQUIRE_LEADER
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self.auth_stub = rpc.AuthStub(channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    def call_ended(
        self,
        endpoint: str,
        method: str,
        code: grpc.StatusCode | None,
        details: str,
        cancelled_after_s: float | None,
    ) -> None:
        """A call to ``endpoint`` ended: move to the next member if it says this one is
        unfit (only once per member: calls failing together move the client once)."""
        if "no leader" in details:
            self.refusals += 1
        why = _unfit(code, cancelled_after_s)
        if why is None or endpoint != self.member or len(self.endpoints) == 1:
            return
        if not self._connected.is_set():
            return
        self._index = (self._index + 1) % len(self.endpoints)
        self.failovers += 1
        log.warning(
            "etcd member %s failed %s (%s%s); moving to %s",
            endpoint, method, why, f": {details}" if details else "", self.member,
        )  # fmt: skip
        channel, old_watcher = self.channel, self._watcher
        self._init_channel_attrs()
        self._connected.clear()
        grace_s = float(self._timeout or DEFAULT_TIMEOUT_S) + 1.0
        self.keep(asyncio.ensure_future(_retire(channel, old_watcher, grace_s)))


class EtcdClientMetrics(Collector):
    """Prometheus view of an :class:`EtcdClient`, read at scrape time: the member in
    use, the moves to another member, and the "no leader" refusals."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        client = self._client
        member = GaugeMetricFamily(
            "mailers_etcd_member", "1 for the etcd member this process talks to", labels=["member"]
        )
        member.add_metric([client.member], 1)
        yield member
        yield CounterMetricFamily(
            "mailers_etcd_failovers", "Moves to another etcd member", value=client.failovers
        )
        yield CounterMetricFamily(
            "mailers_etcd_no_leader_refusals",
            "Calls an etcd member refused for having no raft leader",
            value=client.refusals,
        )


async def _retire(channel: grpc.aio.Channel | None, old_watcher: Any, grace_s: float) -> None:
    """Retire a member's channel the client has moved away from: its watches end now
    (their owners re-list and watch on the next member); the channel closes after
    ``grace_s``, once every call on it has ended by itself. Closing it at once would
    cancel those calls, and gRPC raises CancelledError in their callers, which reads
    as their own cancellation."""
    with contextlib.suppress(Exception):
        if old_watcher is not None:
            await old_watcher.shutdown()
    try:
        await asyncio.sleep(grace_s)
    finally:
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)


def connect(
    endpoints: Sequence[str], timeout_s: int = DEFAULT_TIMEOUT_S, tls: EtcdTls | None = None
) -> EtcdClient:
    """A client (not yet connected) that fails over across endpoints (:class:`EtcdClient`).

    Args:
        endpoints: ``host:port`` of each member (names or addresses).
        timeout_s: Deadline of every etcd call made through the client.
        tls: Speak TLS and present this certificate; None for plaintext.

    Raises:
        ValueError: no endpoints.
        TlsConfigError: a TLS file cannot be read or is unusable.
    """
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    options: dict[str, Any] = {
        "grpc.max_receive_message_length": RECEIVE_LIMIT_BYTES,
        # Reconnect quickly after a member restarts instead of gRPC's 20 s backoff cap.
        "grpc.max_reconnect_backoff_ms": 1000,
        "grpc.initial_reconnect_backoff_ms": 100,
    }
    if tls is None:
        return EtcdClient(endpoints, None, timeout_s, options)
    if tls.server_name is not None:
        # Every member's certificate carries this one name.
        options["grpc.ssl_target_name_override"] = tls.server_name
    labels = dict(zip(FILE_FIELDS, TLS_ENV, strict=True))
    credentials = TlsMaterial.load(tls, labels).channel_credentials()
    return EtcdClient(endpoints, credentials, timeout_s, options)


def permission_denied(exc: BaseException) -> bool:
    """Whether an aetcd error is etcd refusing the call to this user.

    aetcd has no class for gRPC's PERMISSION_DENIED: it raises a plain
    ``aetcd.ClientError`` caused by the ``grpc.aio.AioRpcError``.
    """
    cause = exc.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and (
        cause.code() == grpc.StatusCode.PERMISSION_DENIED
    )


def endpoint_of(client: aetcd.Client) -> str:
    """The member a client talks to now (``host:port``), for log lines."""
    member = getattr(client, "member", None)
    if isinstance(member, str):
        return member
    return f"{getattr(client, '_host', '?')}:{getattr(client, '_port', '?')}"


def describe_error(exc: BaseException, deadline_s: float) -> str:
    """An error as a log phrase that is never empty: a deadline's TimeoutError has no
    text, so it reads "no reply within ``deadline_s``"; an error without text that wraps
    another (aetcd's, around gRPC's) is told by the one it wraps."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no reply within {deadline_s:.2f} s"
    if not str(exc) and exc.__cause__ is not None:
        return f"{type(exc).__name__}: {describe_error(exc.__cause__, deadline_s)}"
    if isinstance(exc, grpc.aio.AioRpcError):  # its str() is a multi-line dump
        return f"{exc.code().name}: {exc.details() or 'no details'}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Session:
    """A lease kept alive in the background, after etcd's ``concurrency.Session``.

    The one lease session of both servers: the coordinator campaigns under it
    (``coordinator.election``) and a sender node registers under it
    (``sender_node.registration``). The rules (trust, refresh timing, what a reply means)
    are :mod:`mailers_runtime.lease`, with the clock injected; this class sends the calls.

    ``done`` is set once the lease is lost, and :attr:`why` says how: a refresh answered
    TTL 0 or ended without a reply, or no refresh succeeded within TTL minus
    ``margin_s``. From then on the holder must act as if its keys are gone; a session is
    never reused. :meth:`trusted` turns false as soon as the deadline passes, even
    before the keepalive task notices.

    Deadlines: the grant, each refresh and the revoke give up after ``call_timeout_s``
    (a refresh also at the trust deadline). Ownership: :meth:`open` starts the keepalive
    task, and the owner must call :meth:`close`, which cancels it and (by default)
    revokes the lease so its keys go at once. Failed calls are logged naming the call,
    the lease and the endpoint.

    Args:
        client: The etcd client.
        ttl_s: The TTL to ask for (etcd may grant more; the granted TTL counts).
        margin_s: Trust ends this long before the lease could expire.
        call_timeout_s: Deadline of each etcd call.
        retry_s: Longest pause before retrying a failed refresh.
        clock: Monotonic seconds.
        on_refresh: Called with each refresh's result (to count them).

    Raises:
        ValueError: ``ttl_s`` below 2, ``margin_s`` not within [0, ttl_s), or a
            non-positive timeout or retry pause.
    """

    def __init__(
        self,
        client: aetcd.Client,
        ttl_s: int,
        margin_s: float = 1.0,
        *,
        call_timeout_s: float = 2.0,
        retry_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        on_refresh: Callable[[Refresh], None] | None = None,
    ) -> None:
        if ttl_s < 2:
            raise ValueError("ttl_s must be at least 2")
        if not 0 <= margin_s < ttl_s:
            raise ValueError("margin_s must be at least 0 and below ttl_s")
        if call_timeout_s <= 0 or retry_s <= 0:
            raise ValueError("call_timeout_s and retry_s must be positive")
        self.client = client
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.call_timeout_s = call_timeout_s
        self.lease: Any = None  # aetcd.leases.Lease (untyped)
        self.done = asyncio.Event()
        self._retry_s = retry_s
        self._clock = clock
        self._on_refresh = on_refresh
        self._trust: LeaseTrust | None = None
        self._task: asyncio.Task[None] | None = None
        self._revoked = False

    @property
    def endpoint(self) -> str:
        """The etcd member the client talks to now, for log lines."""
        return endpoint_of(self.client)

    @property
    def lease_id(self) -> int:
        """The lease's id; 0 before it is granted."""
        return int(self.lease.id) if self.lease is not None else 0

    @property
    def why(self) -> str:
        """Why the session ended; empty while it lasts."""
        return (self._trust.lost if self._trust is not None else None) or ""

    def trusted(self) -> bool:
        """Whether the lease surely still exists now (by the injected clock)."""
        trust = self._trust
        return trust is not None and not self.done.is_set() and trust.trusted(self._clock())

    async def open(self) -> None:
        """Grant the lease and start keeping it alive. Call once.

        Cancellation: safe; nothing is left running (a lease granted while the call was
        cancelled expires on its own).

        Raises:
            aetcd.ClientError, OSError: etcd failed or refused the grant.
            TimeoutError: no grant within ``call_timeout_s``.
        """
        if self.lease is not None or self.done.is_set():
            raise RuntimeError("a session is opened once")
        sent_s = self._clock()
        async with asyncio.timeout(self.call_timeout_s):
            self.lease = await self.client.lease(self.ttl_s)
        trust = LeaseTrust(float(self.lease.ttl), self.margin_s, sent_s, self._retry_s)
        self._trust = trust
        self._task = asyncio.create_task(self._keepalive(trust), name=f"lease-{self.lease_id:x}")

    async def _keepalive(self, trust: LeaseTrust) -> None:
        """Refresh the lease when :class:`LeaseTrust` says so until it is lost, then set
        ``done``. Runs until then or until :meth:`close` cancels it."""
        try:
            while (wait_s := trust.poll(self._clock())) is not None:
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue
                sent_s = self._clock()
                result, ttl_s = await self._refresh(trust.deadline_s - sent_s)
                trust.record(result, sent_s, self._clock(), ttl_s)
                if self._on_refresh is not None:
                    self._on_refresh(result)
            log.warning("lease %x at %s lost: %s", self.lease_id, self.endpoint, trust.lost)
        finally:
            self.done.set()

    async def _refresh(self, budget_s: float) -> tuple[Refresh, int | None]:
        """One refresh, within :func:`attempt_deadline` of ``budget_s`` (the trust left)."""
        deadline_s = attempt_deadline(budget_s, self.call_timeout_s)
        try:
            async with asyncio.timeout(deadline_s):
                reply = await keepalive_once(self.client, self.lease_id, deadline_s)
        except Exception as exc:  # any failure: LeaseTrust retries until its deadline
            log.warning(
                "etcd LeaseKeepAlive for lease %x at %s failed: %s",
                self.lease_id, self.endpoint, describe_error(exc, deadline_s),
            )  # fmt: skip
            return Refresh.FAILED, None
        # None: the stream ended without a reply.
        ttl_s = None if reply is None else int(reply.TTL)
        return classify_reply(ttl_s), ttl_s

    async def close(self, revoke: bool = True) -> None:
        """End the session: set ``done``, stop the keepalive task and, if ``revoke``,
        revoke the lease so its keys go at once. Idempotent.

        The revoke has a deadline (``call_timeout_s``); its failure is logged, not
        raised: the lease then expires on its own after its TTL.
        """
        if self._trust is not None:
            self._trust.lose("closed by its owner")
        self.done.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not revoke or self.lease is None or self._revoked:
            return
        self._revoked = True
        try:
            async with asyncio.timeout(self.call_timeout_s):
                await self.lease.revoke()
        except Exception as exc:  # the lease expires by itself; nothing more to do
            log.warning(
                "etcd LeaseRevoke for lease %x at %s failed: %s",
                self.lease_id, self.endpoint, describe_error(exc, self.call_timeout_s),
            )  # fmt: skip


async def keepalive_once(client: aetcd.Client, lease_id: int, deadline_s: float) -> Any:
    """One LeaseKeepAlive round trip: etcd's reply (``TTL`` 0: the lease is gone), or
    None when the stream ended without one. Unlike aetcd's ``refresh_lease``, the call
    carries ``deadline_s`` to gRPC and is cancelled however this ends, so a member that
    does not answer is seen as one (:class:`EtcdClient` moves on).

    Raises:
        grpc.aio.AioRpcError: the call failed or its deadline passed.
    """
    await client.connect()
    member, started = endpoint_of(client), time.monotonic()
    call = client.leasestub.LeaseKeepAlive(
        iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]),
        timeout=max(deadline_s, 0.001),
        metadata=client.metadata,
    )
    code: grpc.StatusCode | None = None
    details = ""
    try:
        reply = await call.read()
        code = grpc.StatusCode.OK
        return None if reply is grpc.aio.EOF else reply
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        raise
    finally:
        call.cancel()
        if isinstance(client, EtcdClient):
            silent_s = time.monotonic() - started if code is None else None
            client.call_ended(member, _KEEPALIVE_METHOD, code, details, silent_s)


@dataclasses.dataclass(frozen=True)
class Item:
    """One key of a range read."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int


async def _range(client: aetcd.Client, request: Any) -> Any:
    # The client may have moved to another member since the last page.
    await client.connect()
    try:
        return await client.kvstub.Range(request, timeout=client._timeout, metadata=client.metadata)
    except grpc.aio.AioRpcError as exc:
        raise aetcd.ClientError(f"etcd range read failed: {exc.code()} {exc.details()}") from exc


async def read_prefix(
    client: aetcd.Client, prefix: bytes, page: int = PAGE_KEYS
) -> tuple[list[Item], int]:
    """Every key under ``prefix`` and the revision they were read at, in pages of
    ``page`` keys, all at that one revision (so the listing is a consistent snapshot
    however many pages it takes). No reply can exceed the receive limit.

    Raises:
        aetcd.ClientError: etcd failed or timed out (the client's deadline per page);
            a compacted revision mid-listing surfaces here too (call again).
    """
    await client.connect()
    end = aetcd.utils.prefix_range_end(prefix)
    start = prefix
    revision = 0
    items: list[Item] = []
    while True:
        request = rpc.RangeRequest(key=start, range_end=end, limit=page, revision=revision)
        reply = await _range(client, request)
        if not revision:
            revision = reply.header.revision
        items.extend(
            Item(kv.key, kv.value, kv.create_revision, kv.mod_revision) for kv in reply.kvs
        )
        if not reply.more or not reply.kvs:
            return items, revision
        start = reply.kvs[-1].key + b"\0"


async def first_created(
    client: aetcd.Client, prefix: bytes, *, below: int | None = None
) -> Item | None:
    """The key under ``prefix`` with the lowest create revision, or (with ``below``) the
    one created last before revision ``below``: one key read, however many exist."""
    await client.connect()
    request = rpc.RangeRequest(
        key=prefix,
        range_end=aetcd.utils.prefix_range_end(prefix),
        limit=1,
        sort_target=rpc.RangeRequest.CREATE,
        sort_order=rpc.RangeRequest.ASCEND if below is None else rpc.RangeRequest.DESCEND,
        max_create_revision=0 if below is None else below - 1,
    )
    reply = await _range(client, request)
    if not reply.kvs:
        return None
    kv = reply.kvs[0]
    return Item(kv.key, kv.value, kv.create_revision, kv.mod_revision)


async def watch_prefix(
    client: aetcd.Client,
    prefix: bytes,
    on_snapshot: Callable[[list[tuple[bytes, bytes]]], Awaitable[None]],
    on_change: Callable[[str, bytes, bytes], Awaitable[None]],
) -> None:
    """List prefix, then follow its changes forever.

    on_snapshot gets every (key, value) under prefix; on_change gets ("PUT" or "DELETE",
    key, value). When the watch ends with an error (etcd restarted, a member died) it
    re-lists and re-watches from the new revision, so the caller sees a fresh snapshot
    rather than a gap. Runs until cancelled; the caller owns the task.
    """
    while True:
        try:
            items, revision = await read_prefix(client, prefix)
            await on_snapshot([(item.key, item.value) for item in items])
            watch = await client.watch_prefix(prefix, start_revision=revision + 1)
            async for event in watch:
                await on_change(str(event.kind), event.kv.key, event.kv.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any etcd or channel failure: re-list after a pause
            log.warning("watch on %r ended: %s; re-listing", prefix, exc)
            await asyncio.sleep(0.5)
