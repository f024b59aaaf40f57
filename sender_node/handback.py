"""Handing work back through etcd when no leader can be reached.

A node that holds results no leader has acknowledged, or batches it released without a
leader hearing of it, and that has had no usable stream for ``after_s`` (its batches
stopped when the stream was lost), writes one key, ``Keys.handback(node_id)``: a
serialized ``NodeHandback`` (see ``outbox.Outbox.handback`` for what it holds and its
size bound). Without it such a node, alive and registered but cut off from the leader,
would keep its batches from moving until its lease ran out, and a leader that applies
the hand-back needs no stream to the node.

The key has no lease, so it survives the node; the leader applies it and deletes it.
The node rewrites it whenever its content changes while it still has no usable stream,
and keeps its journal until a stream acknowledges the results (replays are
idempotent). Every etcd call has a deadline; a failed write is retried on the next
tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aetcd

log = logging.getLogger(__name__)


class HandbackWriter:
    """Writes the hand-back key while no leader is reachable. Owns its task.

    Args:
        client: A connected aetcd client.
        key: ``Keys.handback(node_id)``.
        content: The serialized hand-back, or None when there is nothing to hand back.
        usable: Whether the node has a usable stream to a leader now.
        end_streams: Ends every stream before a write after ``after_s``, so that the
            hand-back is all the node will do with what came on them.
        after_s: How long without a usable stream before the first write.
        interval_s: Period of the check.
        call_timeout_s: Deadline of each put.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        client: aetcd.Client,
        key: bytes,
        *,
        content: Callable[[], bytes | None],
        usable: Callable[[], bool],
        after_s: float,
        end_streams: Callable[[], None],
        interval_s: float = 0.5,
        call_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._key = key
        self._content = content
        self._usable = usable
        self._end_streams = end_streams
        self._after_s = after_s
        self._interval_s = interval_s
        self._call_timeout_s = call_timeout_s
        self._clock = clock
        self._unusable_since: float | None = None
        self._written: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def written(self) -> bytes | None:
        """The value last written (None before the first write)."""
        return self._written

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="handback")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def write_now(self) -> bool:
        """Write the hand-back now if there is one and it changed (at shutdown, without
        waiting for ``after_s``). Returns whether it wrote.

        Raises:
            TimeoutError: etcd did not answer within the call deadline.
            aetcd.ClientError: etcd refused or failed the put.
        """
        value = self._content()
        if value is None or value == self._written:
            return False
        async with asyncio.timeout(self._call_timeout_s):
            await self._client.put(self._key, value)
        self._written = value
        log.info("handed back %d bytes through etcd (%s)", len(value), self._key.decode())
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable or refusing: try on the next tick
                log.warning("hand-back to etcd failed: %s", exc or type(exc).__name__)

    async def _tick(self) -> None:
        if self._usable():
            self._unusable_since = None
            return
        now = self._clock()
        if self._unusable_since is None:
            self._unusable_since = now
        if now - self._unusable_since >= self._after_s:
            self._end_streams()
            await self.write_now()
