"""Connecting to etcd and the key layout every process shares.

aetcd dials a single ``host:port``. gRPC's ``ipv4:`` resolver accepts a list of
addresses, and its default pick-first policy moves to the next address when the
current one fails, so a client built by :func:`connect` survives the loss of one member
of an etcd cluster without any code of ours choosing endpoints.
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

log = logging.getLogger(__name__)

# Every etcd call made through these clients gives up after this many seconds, so no
# await on etcd can hang a process; callers choose what a timeout means.
DEFAULT_TIMEOUT_S = 5


@dataclasses.dataclass(frozen=True)
class Keys:
    """The etcd key layout under one prefix (``/mailers`` by default).

    Values are JSON unless said otherwise. The layout:

    - ``election/<lease hex>``: one per coordinator campaigning; value is its
      CoordinatorInfo JSON. The lowest create revision leads; that revision is its epoch.
    - ``nodes/<node_id>``: a sender node's registration, bound to its lease.
    - ``cordon/<node_id>``: present while an operator has cordoned the node.
    - ``jobs/<job_id>``: the job spec, written once (content, options, totals).
    - ``jstate/<job_id>``: the job's state and counts, rewritten as it progresses.
    - ``idem/<key>``: idempotency key -> job id.
    - ``batch/<job_id>/<seq>``: a batch's recipients, written once at submit.
    - ``state/<job_id>/<seq>``: a batch's per-recipient results and attempts.
    - ``suppress/<tenant>/<email>``: an address the tenant never sends to (email
      lower-cased; tenant "" for auth off, giving ``suppress//<email>``).
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
    def jobs(self) -> bytes:
        return self._k("jobs", "")

    def job(self, job_id: str) -> bytes:
        return self._k("jobs", job_id)

    @property
    def job_states(self) -> bytes:
        return self._k("jstate", "")

    def job_state(self, job_id: str) -> bytes:
        return self._k("jstate", job_id)

    def idempotency(self, key: str) -> bytes:
        return self._k("idem", key)

    def batches(self, job_id: str) -> bytes:
        return self._k("batch", job_id, "")

    def batch(self, job_id: str, seq: int) -> bytes:
        return self._k("batch", job_id, f"{seq:08d}")

    def states(self, job_id: str) -> bytes:
        return self._k("state", job_id, "")

    def state(self, job_id: str, seq: int) -> bytes:
        return self._k("state", job_id, f"{seq:08d}")

    def suppressions(self, tenant: str) -> bytes:
        return self._k("suppress", tenant, "")

    def suppression(self, tenant: str, email: str) -> bytes:
        return self._k("suppress", tenant, email)

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


def connect(endpoints: Sequence[str], timeout_s: int = DEFAULT_TIMEOUT_S) -> aetcd.Client:
    """A client (not yet connected) that fails over across endpoints.

    aetcd builds its target as f"{host}:{port}"; handing it the head of an ``ipv4:``
    address list as host and the last port as port yields "ipv4:a:1,b:2,c:3".
    """
    if len(endpoints) == 1:
        host, _, port = endpoints[0].rpartition(":")
        return aetcd.Client(host=host, port=int(port), timeout=timeout_s)
    *rest, last = endpoints
    last_host, _, last_port = last.rpartition(":")
    target_head = "ipv4:" + ",".join([*rest, last_host])
    return aetcd.Client(
        host=target_head,
        port=int(last_port),
        timeout=timeout_s,
        # Reconnect quickly after a member dies instead of gRPC's default 20 s backoff cap.
        options={"grpc.max_reconnect_backoff_ms": 1000, "grpc.initial_reconnect_backoff_ms": 100},
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
        self.lease = await asyncio.wait_for(self.client.lease(self.ttl_s), self.ttl_s)
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
                reply = await asyncio.wait_for(self.lease.refresh(), interval)
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
                await asyncio.wait_for(self.lease.revoke(), 2)


def lease_trusted(last_ok: float, now: float, ttl_s: float, margin_s: float) -> bool:
    """Whether a lease last refreshed at last_ok is surely still alive at now."""
    return now - last_ok < ttl_s - margin_s


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
            listing = await client.get_prefix(prefix)
            await on_snapshot([(kv.key, kv.value) for kv in listing])
            start = listing.header.revision + 1 if listing.header else None
            watch = await client.watch_prefix(prefix, start_revision=start)
            async for event in watch:
                await on_change(str(event.kind), event.kv.key, event.kv.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any etcd or channel failure: re-list after a pause
            log.warning("watch on %r ended: %s; re-listing", prefix, exc)
            await asyncio.sleep(0.5)
