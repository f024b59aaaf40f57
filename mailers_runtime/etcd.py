"""Connecting to etcd and the key layout every process shares.

aetcd dials a single ``host:port``. gRPC's ``ipv4:`` resolver accepts a list of
addresses, and its default pick-first policy moves to the next address when the
current one fails, so a client built by :func:`connect` survives the loss of one member
of an etcd cluster without any code of ours choosing endpoints.

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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from mailers_runtime import settings
from mailers_runtime.lease import LeaseTrust, Refresh, classify_reply
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


class _TlsClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """An aetcd client whose channel is ``grpc.aio.secure_channel``.

    aetcd 1.0.0 hard-codes ``insecure_channel`` in ``Client.connect``; this is that method
    with the channel swapped (and without aetcd's user/password login, which a
    certificate replaces). Everything else (stubs, watcher, error mapping) is aetcd's.
    """

    _is_connecting: bool  # set by aetcd.Client.__init__

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

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
            self.channel = grpc.aio.secure_channel(
                f"{self._host}:{self._port}", self._credentials, options=list(self._options.items())
            )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def connect(
    endpoints: Sequence[str], timeout_s: int = DEFAULT_TIMEOUT_S, tls: EtcdTls | None = None
) -> aetcd.Client:
    """A client (not yet connected) that fails over across endpoints.

    aetcd builds its target as f"{host}:{port}"; handing it the head of an ``ipv4:``
    address list as host and the last port as port yields "ipv4:a:1,b:2,c:3".

    Args:
        endpoints: ``host:port`` of each member; several must be IP addresses.
        timeout_s: Deadline of every etcd call made through the client.
        tls: Speak TLS and present this certificate; None for plaintext.

    Raises:
        ValueError: no endpoints.
        TlsConfigError: a TLS file cannot be read or is unusable.
    """
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    first_host = endpoints[0].rpartition(":")[0].strip("[]")
    options: dict[str, Any] = {"grpc.max_receive_message_length": RECEIVE_LIMIT_BYTES}
    if len(endpoints) == 1:
        host, _, port = endpoints[0].rpartition(":")
    else:
        *rest, last = endpoints
        last_host, _, port = last.rpartition(":")
        host = "ipv4:" + ",".join([*rest, last_host])
        # Reconnect quickly after a member dies instead of gRPC's default 20 s backoff cap.
        options["grpc.max_reconnect_backoff_ms"] = 1000
        options["grpc.initial_reconnect_backoff_ms"] = 100
    if tls is None:
        return aetcd.Client(host=host, port=int(port), timeout=timeout_s, options=options)
    server_name = tls.server_name or (None if len(endpoints) == 1 else first_host)
    if server_name is not None:
        # An ipv4: target's default authority is the whole address list, which no
        # certificate names; verify the members against one name instead.
        options["grpc.ssl_target_name_override"] = server_name
    labels = dict(zip(FILE_FIELDS, TLS_ENV, strict=True))
    credentials = TlsMaterial.load(tls, labels).channel_credentials()
    return _TlsClient(credentials, host=host, port=int(port), timeout=timeout_s, options=options)


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
    """The target a client dials (``host:port``, or an ``ipv4:`` list), for log lines."""
    return f"{getattr(client, '_host', '?')}:{getattr(client, '_port', '?')}"


def describe_error(exc: BaseException, deadline_s: float) -> str:
    """An error as a log phrase that is never empty: a deadline's TimeoutError has no
    text, so it reads "no reply within ``deadline_s``"."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no reply within {deadline_s:.2f} s"
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
        self.endpoint = endpoint_of(client)
        self.lease: Any = None  # aetcd.leases.Lease (untyped)
        self.done = asyncio.Event()
        self._retry_s = retry_s
        self._clock = clock
        self._on_refresh = on_refresh
        self._trust: LeaseTrust | None = None
        self._task: asyncio.Task[None] | None = None
        self._revoked = False

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
        """One refresh, within ``budget_s`` (the trust left) and ``call_timeout_s``."""
        deadline_s = max(0.0, min(self.call_timeout_s, budget_s))
        try:
            async with asyncio.timeout(deadline_s):
                reply = await self.lease.refresh()
        except Exception as exc:  # any failure: LeaseTrust retries until its deadline
            log.warning(
                "etcd LeaseKeepAlive for lease %x at %s failed: %s",
                self.lease_id, self.endpoint, describe_error(exc, deadline_s),
            )  # fmt: skip
            return Refresh.FAILED, None
        # aetcd returns None when the stream ends without a reply.
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


@dataclasses.dataclass(frozen=True)
class Item:
    """One key of a range read."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int


async def _range(client: aetcd.Client, request: Any) -> Any:
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
