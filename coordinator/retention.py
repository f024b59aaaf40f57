"""Dropping the recipient rows of jobs that ended long ago; summaries stay.

The leader looks every ``check_s`` for jobs finished more than ``retention_s`` ago and
deletes their recipient rows in slices of :data:`SLICE` indexes, each in a transaction
of its own, so no lock is held long and sending goes on meanwhile; their events go with
them, and so do the applied rows of what came back (bounces, complaints, unsubscribes).
Job rows (with their counts) and suppression lists are kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from coordinator.db.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

SLICE = 10_000
"""Recipient rows deleted per transaction."""


class Retention:
    def __init__(
        self,
        store: Store,
        retention_s: float,
        check_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._retention_s = retention_s
        self._check_s = check_s
        self._clock = clock

    async def run(self) -> None:
        """Purge until cancelled; PostgreSQL trouble only delays it."""
        while True:
            try:
                await self.purge_once()
            except StoreUnavailable as exc:
                log.warning("retention: %s; trying again later", exc)
            await asyncio.sleep(self._check_s)

    async def purge_once(self) -> int:
        """Purge every job due now, and what came back and was applied as long ago;
        returns how many jobs were purged."""
        dropped = await self._store.purge_inbound(self._clock() - self._retention_s)
        if dropped:
            log.info("retention: dropped %d rows of what came back", dropped)
        purged = 0
        while True:
            due = await self._store.jobs_to_purge(self._clock() - self._retention_s, 20)
            if not due:
                return purged
            for job_no, total in due:
                for lo in range(0, total, SLICE):
                    await self._store.purge_slice(job_no, lo, lo + SLICE)
                    # Let the dispatcher and the writer in between slices.
                    await asyncio.sleep(0)
                await self._store.mark_purged(job_no, self._clock())
                purged += 1
                log.info("retention: dropped the %d recipient rows of job #%d", total, job_no)
