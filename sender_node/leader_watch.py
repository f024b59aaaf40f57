"""Following the leader's epoch in etcd, so a deposed leader is fenced off at once.

Coordinators campaign with keys under ``Keys.election`` (``coordinator/election.py``):
the key with the lowest create revision leads, and that revision is its epoch. Since
every new key gets a higher revision than the keys already there, the leader's epoch
only grows. :class:`LeaderWatch` keeps the highest epoch it has seen and reports each
increase (``on_epoch``); the servicer then ends streams of older epochs and refuses
their ``open``, ``batch`` and ``heartbeat``.

Reading: only the leader's key, with a range read limited to one key (sorted by create
revision), never an unbounded listing. Watching: every change under the prefix
triggers such a read. A watch ends when etcd restarts or a member dies: it is resumed
from the revision after the last event seen (or, when that revision is compacted,
from a fresh read). A periodic read backs the watch up in case it stalls silently.
Every etcd call has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aetcd
from aetcd import rpc, utils

from mailers_runtime.etcd import Keys

log = logging.getLogger(__name__)


class LeaderWatch:
    """Follows ``Keys.election``; calls ``on_epoch(epoch)`` whenever a higher leader
    epoch appears. Owns its tasks: :meth:`start`, :meth:`stop`.

    Args:
        client: A connected aetcd client (the node's).
        keys: The cluster's key layout.
        on_epoch: Called on the event loop with each new highest epoch.
        call_timeout_s: Deadline of each etcd call.
        retry_s: Pause before resuming a failed watch.
        poll_s: Period of the backup read.
    """

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        on_epoch: Callable[[int], None],
        *,
        call_timeout_s: float = 2.0,
        retry_s: float = 0.5,
        poll_s: float = 5.0,
    ) -> None:
        self._client = client
        self._prefix = keys.election
        self._on_epoch = on_epoch
        self._call_timeout_s = call_timeout_s
        self._retry_s = retry_s
        self._poll_s = poll_s
        self._epoch = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def epoch(self) -> int:
        """The highest leader epoch seen; 0 before any."""
        return self._epoch

    def start(self) -> None:
        """Start watching (returns at once)."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._watch_loop(), name="leader-watch"),
                asyncio.create_task(self._poll_loop(), name="leader-poll"),
            ]

    async def stop(self) -> None:
        """Stop watching; idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def refresh(self) -> int:
        """Read the leader's key now; returns the store's revision of the read.

        Raises:
            TimeoutError: etcd did not answer within the call deadline.
            grpc.aio.AioRpcError: etcd refused or failed the read.
        """
        await self._client.connect()
        request = rpc.RangeRequest(
            key=self._prefix,
            range_end=utils.prefix_range_end(self._prefix),
            limit=1,
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.CREATE,
        )
        async with asyncio.timeout(self._call_timeout_s):
            reply = await self._client.kvstub.Range(
                request, timeout=self._call_timeout_s, metadata=self._client.metadata
            )
        if reply.kvs:
            self._note(int(reply.kvs[0].create_revision))
        return int(reply.header.revision)

    def _note(self, epoch: int) -> None:
        if epoch > self._epoch:
            self._epoch = epoch
            log.info("leader epoch %d", epoch)
            self._on_epoch(epoch)

    async def _watch_loop(self) -> None:
        revision = 0
        while True:
            try:
                if revision == 0:
                    revision = await self.refresh()
                revision = await self._follow(revision)
            except asyncio.CancelledError:
                raise
            except aetcd.exceptions.RevisionCompactedError:
                revision = 0  # events are gone: read the state afresh
            except Exception as exc:  # etcd restarted, a member died, a deadline passed
                log.warning("election watch ended: %s; resuming after revision %d", exc, revision)
                await asyncio.sleep(self._retry_s)

    async def _follow(self, revision: int) -> int:
        """Watch from after ``revision`` until the watch ends; returns the last revision
        seen."""
        async with asyncio.timeout(self._call_timeout_s):
            watch: Any = await self._client.watch_prefix(self._prefix, start_revision=revision + 1)
        try:
            async for event in watch:
                revision = max(revision, int(event.kv.mod_revision))
                await self.refresh()
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._call_timeout_s):
                    await watch.cancel()
        return revision

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("leader read failed: %s", exc)
