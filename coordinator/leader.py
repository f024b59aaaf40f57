"""One reign of a leader: the store under its fence, the dispatcher, the writer, the
registry, retention and webhook deliveries, started together and stopped together.

:meth:`Leader.start` raises the fence to our epoch (waiting for a deposed leader's
transactions in flight), reads the unfinished work (only that, by index, in pages),
and starts the tasks. Any task that fails, and any fenced write refused, sets
:attr:`Leader.lost`: the coordinator then stops the reign at once and campaigns again.
:meth:`Leader.stop` stops dispatching first, gives the writer a moment to write what
it holds, then cancels everything and closes the node links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

import aetcd

from coordinator.admission import Admission
from coordinator.config import CoordinatorConfig
from coordinator.db.store import Database, LostLeadership, Store
from coordinator.dispatcher import Dispatcher
from coordinator.election import Fence
from coordinator.feedback import FeedbackProcessor
from coordinator.metrics import CoordinatorMetrics
from coordinator.registry import LinkSettings, Registry
from coordinator.retention import Retention
from coordinator.timeouts import LeaderTimeouts
from coordinator.webhook_sender import WebhookSender
from mailers_runtime.etcd import Keys, Session
from mailers_runtime.tls import Transport
from mailers_runtime.verp import TokenKey

log = logging.getLogger(__name__)

WRITER_DRAIN_S = 3.0
"""How long a stopping leader lets the writer finish what it holds."""


class Leader:
    def __init__(
        self,
        config: CoordinatorConfig,
        db: Database,
        client: aetcd.Client,
        keys: Keys,
        fence: Fence,
        session: Session,
        transport: Transport,
        metrics: CoordinatorMetrics,
    ) -> None:
        self.config = config
        self.client = client
        self.keys = keys
        self.fence = fence
        self.session = session
        self.store = Store(db, fence.revision)
        self.timeouts = LeaderTimeouts(
            election_ttl_s=config.election_ttl_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
            authority_s=config.authority_s,
        )

        def registry(d: Dispatcher) -> Registry:
            settings = LinkSettings(
                coordinator_id=config.name, epoch=fence.revision, transport=transport,
                may_lead=self.may_lead, authority_s=config.authority_s,
                heartbeat_interval_s=config.heartbeat_interval_s,
                breaker_failures=config.breaker_failures, breaker_reset_s=config.breaker_reset_s,
            )  # fmt: skip
            return Registry(client, keys, settings, d, d, time.monotonic)

        self.dispatcher = Dispatcher(
            config, self.store, registry, may_lead=self.may_lead, timeouts=self.timeouts,
            metrics=metrics,
        )  # fmt: skip
        self.admission = Admission(self.store, self.dispatcher, config.batch_size, config.limits)
        self.retention = Retention(self.store, config.retention_s, config.retention_check_s)
        self.webhooks = WebhookSender(self.store, config.webhooks, metrics)
        self.feedback = (
            FeedbackProcessor(self.store, TokenKey.from_file(config.inbound.token_key_file))
            if config.inbound.token_key_file
            else None
        )
        self.lost = asyncio.Event()
        self.why = ""
        """Why the reign ended, for the log."""
        self.crashed = False
        """A task failed (a bug, not a lost fence): pause before campaigning again."""
        self._tasks: list[asyncio.Task[None]] = []

    def may_lead(self) -> bool:
        """Whether our election lease surely still exists (so we may send work)."""
        return not self.lost.is_set() and self.session.trusted()

    async def start(self) -> None:
        """Take the fence, read the unfinished work, start the tasks.

        Raises:
            LostLeadership: a newer leader holds the fence.
            StoreUnavailable, aetcd.ClientError: try again later.
        """
        started = time.monotonic()
        await self.store.raise_fence(self.config.name)
        registry = self.dispatcher.registry
        await registry.load_cordons()
        await self.dispatcher.load()
        log.info(
            "leading with epoch %d; took over in %.3fs",
            self.fence.revision, time.monotonic() - started,
        )  # fmt: skip
        coroutines: list[tuple[str, Awaitable[None]]] = [
            ("writer", self.dispatcher.writer.run()),
            ("dispatch", self.dispatcher.run()),
            ("retention", self.retention.run()),
            ("webhooks", self.webhooks.run()),
        ]
        if self.feedback is not None:
            coroutines.append(("feedback", self.feedback.run()))
        coroutines += [(f"registry-{i}", c) for i, c in enumerate(registry.tasks())]
        self._tasks = [
            asyncio.create_task(self._guard(name, c), name=name) for name, c in coroutines
        ]

    async def _guard(self, name: str, coro: Awaitable[None]) -> None:
        """Run one task of the reign; its failure ends the reign."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except LostLeadership as exc:
            log.error("lost leadership (%s): %s", name, exc)
            self.why = f"fence lost: {exc}"
            self.lost.set()
        except Exception as exc:
            log.exception("leader task %s crashed; stepping down", name)
            self.why = f"task {name} failed: {exc!r}"
            self.crashed = True
            self.lost.set()

    async def set_cordon(self, node_id: str, cordoned: bool) -> None:
        """Cordon or uncordon a node, in etcd, only while our election key stands.

        Raises:
            LostLeadership: our key is gone or not ours any more.
        """
        tx = self.client.transactions
        key = self.keys.cordon(node_id)
        op = tx.put(key, b"1") if cordoned else tx.delete(key)
        ok, _ = await self.client.transaction(
            compare=[tx.create(self.fence.key) == self.fence.revision], success=[op], failure=[]
        )
        if not ok:
            raise LostLeadership("our election key is gone")
        registry = self.dispatcher.registry
        if cordoned:
            registry.cordoned.add(node_id)
        else:
            registry.cordoned.discard(node_id)
            self.dispatcher.wake()

    async def stop(self) -> None:
        """End the reign. Safe to call once, whatever state start() reached."""
        for task in self._tasks:
            if task.get_name() == "dispatch":
                task.cancel()
        writer = self.dispatcher.writer
        if not self.lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WRITER_DRAIN_S):
                    await writer.drained()
        self.lost.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.dispatcher.stop()
        await self.dispatcher.registry.close()
