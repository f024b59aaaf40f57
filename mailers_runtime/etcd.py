"""Connecting to etcd and the key layout every process shares.

aetcd dials a single ``host:port``. gRPC's ``ipv4:`` resolver accepts a list of
addresses, and its default pick-first policy moves to the next address when the
current one fails, so a client built by :func:`connect` survives the loss of one member
of an etcd cluster without any code of ours choosing endpoints.

With an :class:`EtcdTls` the client speaks TLS and presents a client certificate. An
etcd started with ``--client-cert-auth`` and auth enabled takes the certificate's
common name as the etcd user (no password, no token), so which keys a process may
touch follows from the certificate it is given (see ``mailers.etcd_auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

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
    endpoints = [part.strip() for part in spec.split(",") if part.strip()]
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return endpoints


TLS_ENV = ("MAILER_ETCD_CA", "MAILER_ETCD_CERT", "MAILER_ETCD_KEY")
"""The variables of :meth:`EtcdTls.from_env`: all three or none."""

SERVER_NAME_ENV = "MAILER_ETCD_SERVER_NAME"
"""Optional with :data:`TLS_ENV`: the name every etcd member's certificate carries."""


@dataclasses.dataclass(frozen=True)
class EtcdTls:
    """TLS towards etcd: the CA to trust and the certificate to present.

    The certificate's common name is the etcd user the client acts as once etcd runs
    with ``--client-cert-auth`` and auth enabled. The same triple describes an etcd
    member's side (``mailers.procs.EtcdCluster``): the CA its clients and peers must be
    signed by, and the member's own certificate.

    The files are read when a client is built (:func:`connect`), so a process picks up
    renewed certificates when it next connects.
    """

    ca_file: Path
    """PEM CA certificate(s) the server must be signed by (``MAILER_ETCD_CA``)."""
    cert_file: Path
    """PEM client certificate, whose CN is the etcd user (``MAILER_ETCD_CERT``)."""
    key_file: Path
    """PEM private key of ``cert_file``, unencrypted (``MAILER_ETCD_KEY``)."""
    server_name: str | None = None
    """Host name to verify the members' certificates against (``MAILER_ETCD_SERVER_NAME``).

    None: the host of the first endpoint. A cluster spread over several hosts needs a
    name every member's certificate carries (a shared DNS SAN), because a client with
    several endpoints checks every member against one name."""

    def __post_init__(self) -> None:
        for field in ("ca_file", "cert_file", "key_file"):
            if not str(getattr(self, field)):
                raise ValueError(f"EtcdTls.{field} is empty")
        if self.server_name is not None and not self.server_name.strip():
            raise ValueError("EtcdTls.server_name is empty; use None for the default")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> EtcdTls | None:
        """TLS settings from ``MAILER_ETCD_CA``, ``MAILER_ETCD_CERT``, ``MAILER_ETCD_KEY``
        (and the optional ``MAILER_ETCD_SERVER_NAME``); None when none of the three is set.

        Raises:
            ValueError: only some of the three are set (the message names the missing
                ones), or a named file does not exist.
        """
        values = {name: environ.get(name, "").strip() for name in TLS_ENV}
        missing = [name for name, value in values.items() if not value]
        server_name = environ.get(SERVER_NAME_ENV, "").strip() or None
        if len(missing) == len(TLS_ENV):
            if server_name is not None:
                raise ValueError(f"{SERVER_NAME_ENV} is set but {', '.join(TLS_ENV)} are not")
            return None
        if missing:
            raise ValueError(
                f"etcd TLS needs {', '.join(TLS_ENV)} together; missing: {', '.join(missing)}"
            )
        for name, value in values.items():
            if not Path(value).is_file():
                raise ValueError(f"{name}: no file at {value}")
        ca, cert, key = (Path(values[name]) for name in TLS_ENV)
        return cls(ca_file=ca, cert_file=cert, key_file=key, server_name=server_name)

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> EtcdTls:
        """``ca.crt`` and ``<name>.crt``/``<name>.key`` in ``directory``: the layout of
        ``mailers.certs.make_dev_pki`` (e.g. name ``node-n1``, ``coordinator``, ``etcd-root``).
        """
        return cls(directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key")

    def env(self) -> dict[str, str]:
        """The variables :meth:`from_env` reads back into an equal EtcdTls."""
        env = dict(
            zip(TLS_ENV, map(str, (self.ca_file, self.cert_file, self.key_file)), strict=True)
        )
        if self.server_name is not None:
            env[SERVER_NAME_ENV] = self.server_name
        return env

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the files (read now).

        Raises:
            OSError: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes(),
            certificate_chain=self.cert_file.read_bytes(),
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
        OSError: a TLS file cannot be read.
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
    return _TlsClient(
        tls.credentials(), host=host, port=int(port), timeout=timeout_s, options=options
    )


def permission_denied(exc: BaseException) -> bool:
    """Whether an aetcd error is etcd refusing the call to this user.

    aetcd has no class for gRPC's PERMISSION_DENIED: it raises a plain
    ``aetcd.ClientError`` caused by the ``grpc.aio.AioRpcError``.
    """
    cause = exc.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and (
        cause.code() == grpc.StatusCode.PERMISSION_DENIED
    )


class Session:
    """A lease kept alive in the background, after etcd's concurrency.Session.

    ``done`` is set once the lease can no longer be trusted: a keepalive answered TTL 0
    (the lease expired; aetcd reports that instead of raising), or no keepalive has
    succeeded for longer than ttl minus ``margin_s``. After ``done`` the holder must act as
    if its keys are gone. The owner must call :meth:`close`, which cancels the keepalive
    task and, when ``revoke`` is true, revokes the lease so its keys vanish at once.
    """

    def __init__(self, client: aetcd.Client, ttl_s: int, margin_s: float = 1.0) -> None:
        if ttl_s < 2:
            raise ValueError("ttl_s must be at least 2")
        self.client = client
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.lease: Any = None
        self.done = asyncio.Event()
        self.last_ok = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> int:
        return int(self.lease.id) if self.lease is not None else 0

    async def open(self) -> None:
        """Grant the lease and start keeping it alive. Raises on etcd errors."""
        async with asyncio.timeout(self.ttl_s):
            self.lease = await self.client.lease(self.ttl_s)
        self.last_ok = time.monotonic()
        self._task = asyncio.create_task(self._keepalive(), name=f"lease-{self.lease_id:x}")

    def trusted(self, now: float) -> bool:
        return (
            lease_trusted(self.last_ok, now, self.ttl_s, self.margin_s) and not self.done.is_set()
        )

    async def _keepalive(self) -> None:
        interval = self.ttl_s / 3
        # After a failed refresh (an etcd leader election takes 1-2 s) try again soon,
        # not a whole interval later: one miss must not cost the lease.
        retry_s = min(0.5, interval)
        wait_s = interval
        while True:
            await asyncio.sleep(wait_s)
            sent = time.monotonic()
            try:
                async with asyncio.timeout(interval):
                    reply = await self.lease.refresh()
            except Exception as exc:  # any failure: retry until the lease can't be trusted
                log.warning("lease %x keepalive failed: %r", self.lease_id, exc)
                if not lease_trusted(self.last_ok, time.monotonic(), self.ttl_s, self.margin_s):
                    self.done.set()
                    return
                wait_s = retry_s
                continue
            if reply is None or reply.TTL <= 0:
                log.warning("lease %x expired", self.lease_id)
                self.done.set()
                return
            # etcd restarts the TTL no earlier than when the refresh was sent.
            self.last_ok = sent
            wait_s = interval

    async def close(self, revoke: bool = True) -> None:
        self.done.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.lease.revoke()


def lease_trusted(last_ok: float, now: float, ttl_s: float, margin_s: float) -> bool:
    """Whether a lease last refreshed at last_ok is surely still alive at now."""
    return now - last_ok < ttl_s - margin_s


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
