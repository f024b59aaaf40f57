"""A sender node's leased registration in etcd, kept alive, with a loss signal.

The node puts ``Keys(prefix).node(node_id)`` bound to a lease and refreshes the lease
every TTL/3. After ``Session.Done()`` in etcd's ``client/v3/concurrency/session.go``,
:attr:`Registration.done` is an event that fires when the current registration can no
longer be trusted:

- a refresh answers TTL 0 (the lease expired or was revoked), or
- no refresh succeeded for TTL minus a safety margin, measured from when the last
  successful refresh was *sent* (etcd restarts the TTL no earlier than that).

From then on :meth:`Registration.healthy` is false, so the node starts no SMTP
transaction (a node whose key may be gone must not keep sending: the coordinator
hands its batches to others). The owner task then registers again under a NEW lease
and replaces ``done`` with a fresh event; consumers re-read ``done`` and ``lease_id``.

:func:`lease_trusted` is the pure decision, with the clock passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aetcd

from mailers.etcd import Keys, permission_denied
from sender_node.metrics import NodeMetrics

log = logging.getLogger(__name__)


def lease_trusted(last_ok_s: float, now_s: float, ttl_s: float, margin_s: float) -> bool:
    """Whether a lease last confirmed at ``last_ok_s`` surely still exists at ``now_s``.

    Args:
        last_ok_s: When the last successful grant or refresh was sent (monotonic s).
        now_s: The current monotonic time.
        ttl_s: The TTL the lease was granted or refreshed with.
        margin_s: Safety margin for clock rate differences and in-flight work.
    """
    return now_s < last_ok_s + ttl_s - margin_s


def trust_deadline(last_ok_s: float, ttl_s: float, margin_s: float) -> float:
    """The monotonic time at which :func:`lease_trusted` turns false."""
    return last_ok_s + ttl_s - margin_s


def node_record(
    node_id: str, address: str, lease_id: int, capacity: int, started_at: float
) -> bytes:
    """The JSON value of a node's registration key.

    ``started_at`` is the process start as Unix seconds (float).
    """
    return json.dumps(
        {
            "node_id": node_id,
            "address": address,
            "lease_id": lease_id,
            "capacity": capacity,
            "started_at": started_at,
        },
        sort_keys=True,
    ).encode()


@dataclasses.dataclass
class _Session:
    lease: Any  # aetcd.leases.Lease (untyped)
    value: bytes
    ttl_s: float
    last_ok_s: float
    done: asyncio.Event


class Registration:
    """Keeps the node registered in etcd under a lease; re-registers when it is lost.

    The owner of the keepalive task is this object: :meth:`start` creates it and
    :meth:`stop` cancels it. Every etcd call has a deadline (at most the time left
    before the lease stops being trusted, for refreshes).

    Args:
        client: A connected aetcd client (see ``mailers.etcd.connect``).
        keys: The key layout.
        node_id: This node's id.
        capacity: Advertised in the registration value.
        ttl_s: Lease TTL.
        margin_s: The node stops trusting its lease this long before it could expire.
        call_timeout_s: Deadline of grant, put and revoke calls.
        retry_delay_s: Pause between failed registration attempts.
        clock: Monotonic seconds.
        wall_clock: Unix seconds, for ``started_at``.
    """

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        node_id: str,
        *,
        capacity: int,
        ttl_s: int = 5,
        margin_s: float = 1.0,
        call_timeout_s: float = 2.0,
        retry_delay_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self._metrics = metrics or NodeMetrics()
        if not 0 <= margin_s < ttl_s:
            raise ValueError("margin_s must be below ttl_s")
        self._client = client
        self._key = keys.node(node_id)
        self._node_id = node_id
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._margin_s = margin_s
        self._call_timeout_s = call_timeout_s
        self._retry_delay_s = retry_delay_s
        self._clock = clock
        self._started_at = wall_clock()
        self._address = ""
        self._session: _Session | None = None
        self._last_value: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Before the first registration there is no session: "done" is already set.
        self._done = asyncio.Event()
        self._done.set()
        self._registered = asyncio.Event()
        self._renewed = asyncio.Event()

    @property
    def key(self) -> bytes:
        """The registration key."""
        return self._key

    @property
    def lease_id(self) -> int:
        """The current lease id, 0 when not registered."""
        return int(self._session.lease.id) if self._session is not None else 0

    @property
    def done(self) -> asyncio.Event:
        """Fires when the current registration is lost; replaced on re-registration.

        Read it together with :attr:`lease_id` (without an await in between) to watch
        one registration.
        """
        return self._done

    def healthy(self) -> bool:
        """True while registered under a lease that surely has not expired."""
        session = self._session
        if session is None or session.done.is_set():
            return False
        return lease_trusted(session.last_ok_s, self._clock(), session.ttl_s, self._margin_s)

    def start(self, address: str) -> None:
        """Start registering under ``address`` and keeping the registration alive.

        Returns at once; use :meth:`wait_registered` to wait for the first lease.
        """
        if self._task is not None:
            raise RuntimeError("registration already started")
        self._address = address
        self._task = asyncio.create_task(self._run(), name=f"registration-{self._node_id}")

    async def next_registration(self, after: asyncio.Event) -> None:
        """Wait until the node is registered under a newer lease than the one whose
        :attr:`done` is ``after``. Cancellation: safe at any point."""
        while self._done is after:
            await self._renewed.wait()

    async def wait_registered(self, timeout_s: float) -> None:
        """Wait until the node is registered.

        Raises:
            TimeoutError: not registered within ``timeout_s``.
        """
        async with asyncio.timeout(timeout_s):
            await self._registered.wait()

    async def stop(self, *, revoke: bool = True) -> None:
        """Cancel the keepalive task and, if ``revoke``, revoke the lease so the key goes
        at once instead of after the TTL. Idempotent; the revoke has a deadline and its
        failure is logged, not raised (the lease then expires on its own)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            session.done.set()
            if revoke:
                await self._revoke(session)

    async def _run(self) -> None:
        # Loops also check _stopping: a cancellation can be lost when it races with a
        # finishing await (e.g. gh-86296 in wait_for), and stop() must still end them.
        while not self._stopping:
            session = await self._register()
            self._session = session
            self._done = session.done
            self._registered.set()
            self._renewed.set()
            self._renewed = asyncio.Event()
            self._metrics.registrations.inc()
            log.info("registered %s under lease %x", self._key.decode(), session.lease.id)
            reason = await self._keep_alive(session)
            if self._stopping:
                return  # stop() revokes the lease
            session.done.set()
            self._registered.clear()
            log.warning(
                "lost registration under lease %x: %s; re-registering", session.lease.id, reason
            )
            # The old lease may still exist (e.g. etcd was unreachable, not gone);
            # revoking it removes the key at once so the coordinator stops counting on us.
            await self._revoke(session)

    async def _register(self) -> _Session:
        """Grant a lease and put the key, retrying until it succeeds."""
        while True:
            if self._stopping:
                raise asyncio.CancelledError
            sent = self._clock()
            lease = None
            try:
                async with asyncio.timeout(self._call_timeout_s):
                    lease = await self._client.lease(self._ttl_s)
                value = node_record(
                    self._node_id, self._address, int(lease.id), self._capacity, self._started_at
                )
                if await self._put(value, lease):
                    self._last_value = value
                    return _Session(lease, value, float(lease.ttl), sent, asyncio.Event())
                log.warning(
                    "%s is held by another registration; retrying until its lease expires",
                    self._key.decode(),
                )
            except (aetcd.ClientError, TimeoutError, OSError) as exc:
                if permission_denied(exc):
                    # Not transient: retrying will not help until an operator acts.
                    log.error(
                        "etcd refused to register %s: this node's etcd user (the CN of "
                        "MAILER_ETCD_CERT) may not write it; run `mailers etcd-auth "
                        "--add-node %s` as root",
                        self._key.decode(),
                        self._node_id,
                    )
                else:
                    log.warning("registration failed: %s", exc or type(exc).__name__)
            except Exception:
                # Never let a bug end the owner task silently: the node would sit
                # unregistered forever. Log it and keep trying.
                log.exception("registration failed unexpectedly")
            if lease is not None:
                with contextlib.suppress(aetcd.ClientError, TimeoutError, OSError):
                    async with asyncio.timeout(self._call_timeout_s):
                        await lease.revoke()
            await asyncio.sleep(self._retry_delay_s)

    async def _put(self, value: bytes, lease: Any) -> bool:
        """Put the key only if it does not exist or holds what this process last wrote."""
        txn = self._client.transactions
        put = txn.put(self._key, value, lease=lease)
        async with asyncio.timeout(self._call_timeout_s):
            ok, _ = await self._client.transaction(
                compare=[txn.create(self._key) == 0], success=[put], failure=[]
            )
        if ok or self._last_value is None:
            return bool(ok)
        async with asyncio.timeout(self._call_timeout_s):
            ok, _ = await self._client.transaction(
                compare=[txn.value(self._key) == self._last_value], success=[put], failure=[]
            )
        return bool(ok)

    async def _keep_alive(self, session: _Session) -> str:
        """Refresh the lease every TTL/3 until it is lost; returns why it was lost."""
        next_refresh = session.last_ok_s + session.ttl_s / 3
        while not self._stopping:
            deadline = trust_deadline(session.last_ok_s, session.ttl_s, self._margin_s)
            now = self._clock()
            if now >= deadline:
                return "no successful refresh within the lease TTL"
            await asyncio.sleep(max(0.0, min(next_refresh, deadline) - now))
            sent = self._clock()
            if sent >= deadline:
                return "no successful refresh within the lease TTL"
            try:
                async with asyncio.timeout(deadline - sent):
                    reply = await session.lease.refresh()
            except Exception as exc:  # any failed refresh is retried until the deadline
                self._metrics.lease_renewals.labels("error").inc()
                log.warning("lease refresh failed: %s", exc or type(exc).__name__)
                next_refresh = self._clock() + min(self._retry_delay_s, session.ttl_s / 6)
                continue
            if reply is None:
                next_refresh = self._clock() + min(self._retry_delay_s, session.ttl_s / 6)
                continue
            if reply.TTL <= 0:
                self._metrics.lease_renewals.labels("expired").inc()
                return "the lease expired or was revoked"
            self._metrics.lease_renewals.labels("ok").inc()
            session.last_ok_s = sent
            session.ttl_s = float(reply.TTL)
            next_refresh = sent + session.ttl_s / 3
        return "stopping"

    async def _revoke(self, session: _Session) -> None:
        try:
            async with asyncio.timeout(self._call_timeout_s):
                await session.lease.revoke()
        except (aetcd.ClientError, TimeoutError, OSError) as exc:
            log.warning("revoking lease %x failed: %s", session.lease.id, exc or type(exc).__name__)
