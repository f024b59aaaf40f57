"""A sender node's leased registration in etcd, kept alive, with a loss signal.

The node puts ``Keys(prefix).node(node_id)`` bound to the lease of a
``mailers_runtime.etcd.Session``, which refreshes it every TTL/3 by the rules of
``mailers_runtime.lease`` (the same session the coordinator campaigns under). After
``Session.Done()`` in etcd's ``client/v3/concurrency/session.go``,
:attr:`Registration.done` is an event that fires when the current registration can no
longer be trusted:

- a refresh answers TTL 0 (the lease expired or was revoked) or ends without a reply, or
- no refresh succeeded for TTL minus a safety margin, measured from when the last
  successful refresh was *sent* (etcd restarts the TTL no earlier than that).

From then on :meth:`Registration.healthy` is false, so the node starts no SMTP
transaction (a node whose key may be gone must not keep sending: the coordinator
hands its batches to others). The owner task then registers again under a NEW lease
and replaces ``done`` with a fresh event; consumers re-read ``done`` and ``lease_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aetcd

from mailers_runtime.etcd import Keys, Session, describe_error, permission_denied
from mailers_runtime.lease import Refresh
from mailers_runtime.records import NodeRecord
from sender_node.metrics import NodeMetrics

log = logging.getLogger(__name__)


class Registration:
    """Keeps the node registered in etcd under a lease; re-registers when it is lost.

    The owner of the registration task is this object: :meth:`start` creates it and
    :meth:`stop` cancels it; each lease's keepalive task is owned by its session, which
    this object closes. Every etcd call has a deadline (``call_timeout_s``; a refresh
    also at most the time left before the lease stops being trusted).

    Args:
        client: A connected aetcd client (see ``mailers_runtime.etcd.connect``).
        keys: The key layout.
        node_id: This node's id.
        capacity: Advertised in the registration value.
        ttl_s: Lease TTL.
        margin_s: The node stops trusting its lease this long before it could expire.
        call_timeout_s: Deadline of each etcd call (grant, put, refresh, revoke).
        retry_delay_s: Pause between failed registration attempts, and the longest
            pause before retrying a failed refresh.
        clock: Monotonic seconds.
        wall_clock: Unix seconds, for ``started_at``.
        metrics: Counts registrations and refreshes.

    Raises:
        ValueError: ``margin_s`` not within [0, ttl_s).
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
        self._session: Session | None = None
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
        return self._session.lease_id if self._session is not None else 0

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
        return session is not None and session.trusted()

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
        """Cancel the registration task and close the session; if ``revoke``, revoke the
        lease so the key goes at once instead of after the TTL. Idempotent; the revoke
        has a deadline and its failure is logged, not raised (the lease then expires on
        its own)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close(revoke=revoke)

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
            log.info("registered %s under lease %x", self._key.decode(), session.lease_id)
            await session.done.wait()
            if self._stopping:
                return  # stop() closes the session and revokes the lease
            self._registered.clear()
            log.warning(
                "lost registration under lease %x: %s; re-registering",
                session.lease_id, session.why,
            )  # fmt: skip
            # The old lease may still exist (e.g. etcd was unreachable, not gone);
            # revoking it removes the key at once so the coordinator stops counting on us.
            await session.close(revoke=True)

    async def _register(self) -> Session:
        """Grant a lease and put the key, retrying until it succeeds."""
        while True:
            if self._stopping:
                raise asyncio.CancelledError
            session = Session(
                self._client, self._ttl_s, self._margin_s,
                call_timeout_s=self._call_timeout_s, retry_s=self._retry_delay_s,
                clock=self._clock, on_refresh=self._count_refresh,
            )  # fmt: skip
            claimed = False
            try:
                claimed = await self._claim(session)
            finally:
                if not claimed:  # also when cancelled: no keepalive task may outlive us
                    await session.close(revoke=True)
            if claimed:
                return session
            await asyncio.sleep(self._retry_delay_s)

    async def _claim(self, session: Session) -> bool:
        """Open ``session`` and put the key under its lease; False (logged) on failure."""
        call = "LeaseGrant"
        try:
            await session.open()
            call = "Txn"
            value = NodeRecord(
                self._node_id, self._address, session.lease_id, self._capacity, self._started_at
            ).encode()
            if await self._put(value, session.lease):
                self._last_value = value
                return True
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
                why = describe_error(exc, self._call_timeout_s)
                log.warning(
                    "registering %s failed: etcd %s at %s: %s",
                    self._key.decode(), call, session.endpoint, why,
                )  # fmt: skip
        except Exception:
            # Never let a bug end the owner task silently: the node would sit
            # unregistered forever. Log it and keep trying.
            log.exception("registration failed unexpectedly")
        return False

    async def _put(self, value: bytes, lease: object) -> bool:
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

    def _count_refresh(self, result: Refresh) -> None:
        self._metrics.lease_renewals.labels(result.value).inc()
