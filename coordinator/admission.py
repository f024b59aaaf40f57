"""Accepting a job: shared by SubmitJob (recipients inline) and UploadJob (streamed).

A job is accepted whole or not at all: its row, every recipient (COPY, as the
recipients arrive) and its idempotency key commit in one fenced transaction, with the
tenant's quotas checked inside it. Recipients are validated as they stream in; the
first chunk with a problem aborts the transaction with INVALID_ARGUMENT naming the
fields, and nothing is stored. A commit whose outcome was lost is settled by reading
back once the server process that ran it is gone (:meth:`Store.settle_commit`), never
by deleting. Memory stays flat however large the job: chunks pass straight to COPY.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence

from coordinator.batching import job_batch_size
from coordinator.db.store import (
    CommitUnknown,
    Duplicate,
    QuotaRefused,
    QuotaRequest,
    Store,
)
from coordinator.dispatcher import Dispatcher
from coordinator.model import Content, JobOptions, JobRecord, JobSpec, Recipient
from coordinator.quotas import QuotaExceeded, Quotas, check_job_size
from coordinator.validation import Collector, Limits, ValidationError, check_recipients

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 20.0
"""How long a submit waits to learn the outcome of a commit whose connection broke."""


def new_job_id(now: float) -> str:
    """Sortable by creation time (hex milliseconds), then random."""
    return f"{int(now * 1000):012x}-{secrets.token_hex(4)}"


@dataclasses.dataclass(frozen=True)
class Request:
    tenant: str
    content: Content
    options: JobOptions
    idempotency_key: str
    quotas: Quotas
    bounce_domain: str = ""


class Admission:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        batch_size: int,
        limits: Limits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._batch_size = batch_size
        self._limits = limits
        self._clock = clock

    async def existing(self, tenant: str, idempotency_key: str) -> JobRecord | None:
        return await self._store.find_by_key(tenant, idempotency_key)

    async def admit(
        self, request: Request, chunks: AsyncIterator[Sequence[Recipient]]
    ) -> tuple[JobRecord, bool]:
        """Store the job; returns it and whether it was created (False: the key was
        already used, the job returned is that one).

        Raises:
            ValidationError: a recipient is invalid, or there are none or too many.
            QuotaExceeded: the job does not fit the tenant's quotas.
            LostLeadership, StoreUnavailable: nothing was stored.
        """
        found = await self._store.find_by_key(request.tenant, request.idempotency_key)
        if found is not None:
            return found, False
        now = self._clock()
        spec = JobSpec(
            job_id=new_job_id(now),
            idempotency_key=request.idempotency_key,
            content=request.content,
            options=request.options,
            total=0,
            batch_size=job_batch_size(self._batch_size, request.content.recipients_per_message),
            created_at=now,
            tenant=request.tenant,
            bounce_domain=request.bounce_domain,
        )
        quota = QuotaRequest(
            messages_per_hour=request.quotas.messages_per_hour,
            max_active_jobs=request.quotas.max_active_jobs,
        )
        checked = self._validated(chunks, request.quotas)
        try:
            record = await self._store.submit(spec, checked, quota, now)
        except Duplicate:
            found = await self._store.find_by_key(request.tenant, request.idempotency_key)
            if found is None:  # the other submit rolled back meanwhile; let the client retry
                raise
            return found, False
        except QuotaRefused as exc:
            raise QuotaExceeded(str(exc), exc.retry_after_s) from None
        except CommitUnknown as exc:
            if not await self._store.settle_commit(spec.job_id, exc.server_pid, SETTLE_TIMEOUT_S):
                raise
            stored = await self._store.job(spec.job_id)
            if stored is None:
                raise
            record = stored
            log.info("job %s: commit outcome was lost; read back, it is stored", spec.job_id)
        self._dispatcher.add_job(record)
        log.info("accepted job %s with %d recipients", spec.job_id, record.spec.total)
        return record, True

    async def _validated(
        self, chunks: AsyncIterator[Sequence[Recipient]], quotas: Quotas
    ) -> AsyncIterator[Sequence[Recipient]]:
        seen = 0
        async for chunk in chunks:
            problems = Collector()
            check_recipients(problems, chunk, seen, self._limits)
            problems.raise_if_any()
            seen += len(chunk)
            if seen > self._limits.max_recipients:
                raise ValidationError(
                    [("recipients", f"more than {self._limits.max_recipients} recipients")]
                )
            check_job_size(quotas, seen)
            yield chunk
        if seen == 0:
            raise ValidationError([("recipients", "at least one recipient is required")])
