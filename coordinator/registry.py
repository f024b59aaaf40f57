"""The leader's view of the sender nodes: registrations, links, cordons, hand-backs.

It follows ``nodes/`` in etcd (leased registrations) and opens a :class:`NodeLink` to
each node. A node whose registration goes away keeps its link and its batches for a
while: :meth:`NodeEntry.leave` starts the clock after which the dispatcher may treat the
batches it still holds as lost (long enough for transactions past their final dot to
end, see :mod:`coordinator.timeouts`). It also follows ``handback/``, where a node that
cannot reach the leader leaves its results and released batches, and deletes each
hand-back once the dispatcher has written it.

Owned by the leader: :meth:`Registry.run` is its task; :meth:`Registry.close` closes
every link.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import aetcd

from coordinator import _convert
from coordinator.breaker import NodeBreaker
from coordinator.node_link import LinkEvents, NodeLink
from coordinator.node_messages import HandbackMessage
from coordinator.timeouts import NodeLimits
from mailers_runtime.etcd import Keys, read_prefix, watch_prefix
from mailers_runtime.records import NodeRecord
from mailers_runtime.tls import Transport

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NodeEntry:
    node_id: str
    address: str
    capacity: int
    lease_id: int
    link: NodeLink
    breaker: NodeBreaker
    registered: bool = True
    left_at: float | None = None
    """When its registration went away (monotonic s); None while registered."""
    limits: NodeLimits = dataclasses.field(default_factory=NodeLimits)
    recipients_done: int = 0
    full_until: float = 0.0

    def leave(self, now: float) -> None:
        if self.registered:
            self.registered = False
            self.left_at = now


class RegistryEvents(Protocol):
    def node_left(self, node: NodeEntry) -> None: ...
    def node_back(self, node: NodeEntry) -> None: ...
    async def handback(self, node_id: str, handback: HandbackMessage) -> None: ...


@dataclasses.dataclass(frozen=True)
class LinkSettings:
    coordinator_id: str
    epoch: int
    transport: Transport
    may_lead: Callable[[], bool]
    authority_s: float
    heartbeat_interval_s: float
    breaker_failures: int
    breaker_reset_s: float


class Registry:
    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        settings: LinkSettings,
        events: RegistryEvents,
        links: LinkEvents,
        clock: Callable[[], float],
    ) -> None:
        self._client = client
        self._keys = keys
        self._settings = settings
        self._events = events
        self._links = links
        self._clock = clock
        self.nodes: dict[str, NodeEntry] = {}
        self.cordoned: set[str] = set()
        self.listed = asyncio.Event()
        """Set once the first listing of registrations has been applied."""
        self._encoder = _convert.BatchEncoder()
        self._stream_numbers = itertools.count(1).__next__
        """Numbers the streams of every link of this reign (hand-backs name them)."""
        """Shared by the links: a job's content is encoded once for all nodes."""

    # ---- tasks ----------------------------------------------------------------------

    async def load_cordons(self) -> None:
        items, _ = await read_prefix(self._client, self._keys.cordons)
        self.cordoned = {self._keys.tail(i.key, self._keys.cordons) for i in items}

    def tasks(self) -> list[Awaitable[None]]:
        """The coroutines to run for the reign: registrations and hand-backs."""
        return [
            watch_prefix(self._client, self._keys.nodes, self._snapshot, self._change),
            watch_prefix(
                self._client, self._keys.handback_prefix, self._handback_snapshot, self._handback
            ),
        ]

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.link.close()

    # ---- registrations --------------------------------------------------------------

    async def _snapshot(self, items: list[tuple[bytes, bytes]]) -> None:
        seen = {self._keys.tail(key, self._keys.nodes): value for key, value in items}
        for node_id, node in self.nodes.items():
            if node_id not in seen and node.registered:
                node.leave(self._clock())
                self._events.node_left(node)
        for node_id, value in seen.items():
            self._upsert(node_id, value)
        self.listed.set()

    async def _change(self, kind: str, key: bytes, value: bytes) -> None:
        node_id = self._keys.tail(key, self._keys.nodes)
        if kind == "DELETE":
            node = self.nodes.get(node_id)
            if node is not None and node.registered:
                log.warning("node %s left the registry", node_id)
                node.leave(self._clock())
                self._events.node_left(node)
        else:
            self._upsert(node_id, value)

    def _upsert(self, node_id: str, value: bytes) -> None:
        try:
            record = NodeRecord.decode(value, node_id)
        except ValueError as exc:
            log.warning("ignoring the registration of node %s: %s", node_id, exc)
            return
        address, capacity, lease_id = record.address, record.capacity, record.lease_id
        node = self.nodes.get(node_id)
        if node is not None and node.address == address:
            node.capacity = capacity
            node.lease_id = lease_id
            if not node.registered:
                node.registered = True
                node.left_at = None
                log.info("node %s registered again", node_id)
                self._events.node_back(node)
            return
        if node is not None:
            # Same id, new address: a new process. Its batches stay held by the id and
            # are released by its hello like any reconnecting node's.
            asyncio.ensure_future(node.link.close())
        log.info("node %s registered at %s", node_id, address)
        s = self._settings
        link = NodeLink(
            node_id, address, s.coordinator_id, s.epoch, self._links,
            transport=s.transport, may_lead=s.may_lead, authority_s=s.authority_s,
            heartbeat_interval_s=s.heartbeat_interval_s, encoder=self._encoder,
            stream_numbers=self._stream_numbers,
        )  # fmt: skip
        entry = NodeEntry(
            node_id=node_id,
            address=address,
            capacity=capacity,
            lease_id=lease_id,
            link=link,
            breaker=node.breaker
            if node is not None
            else NodeBreaker(node_id, s.breaker_failures, s.breaker_reset_s),
            limits=node.limits if node is not None else NodeLimits(),
        )
        self.nodes[node_id] = entry
        link.start()
        if node is not None and not node.registered:
            self._events.node_back(entry)

    def job_finished(self, job_id: str) -> None:
        """Drop what the links keep for a job that sends nothing more (its content)."""
        self._encoder.forget(job_id)

    async def forget(self, node_id: str) -> None:
        """Drop a node that left and holds nothing any more."""
        node = self.nodes.get(node_id)
        if node is not None and not node.registered:
            del self.nodes[node_id]
            await node.link.close()

    # ---- hand-backs -----------------------------------------------------------------

    async def _handback_snapshot(self, items: list[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            await self._handback("PUT", key, value)

    async def _handback(self, kind: str, key: bytes, value: bytes) -> None:
        if kind == "DELETE":
            return
        node_id = self._keys.tail(key, self._keys.handback_prefix)
        try:
            handback = _convert.parse_handback(value)
        except Exception:
            log.warning("ignoring a malformed hand-back of node %s", node_id)
            return
        kv = await self._client.get(key)
        if kv is None or kv.value != value:
            return  # replaced or taken meanwhile; the newer one has its own event
        log.info(
            "node %s handed back %d results and %d batches through etcd",
            node_id, sum(len(r.results) for r in handback.results), len(handback.released),
        )  # fmt: skip
        await self._events.handback(node_id, handback)
        # Delete only what we applied: a node that rewrote the key meanwhile keeps it.
        tx = self._client.transactions
        with contextlib.suppress(aetcd.ClientError):
            await self._client.transaction(
                compare=[tx.mod(key) == kv.mod_revision], success=[tx.delete(key)], failure=[]
            )
