"""Jobs and batches in etcd. The only coordinator module that reads or writes job data.

Every write is a transaction guarded by the leader's fence: "my election key still
exists with the create revision I won with". A write refused by the fence raises
:class:`LostLeadership`, after which the caller must stop acting as leader at once;
a stale leader can therefore never change job state (the etcd docs and Jepsen both
show lease-based leadership is unsafe without such a guard).

Writes are packed into transactions of up to ``MAX_TXN_OPS`` operations and
``MAX_TXN_BYTES`` bytes: etcd here does ~1-2k single writes/s but tens of thousands of
keys/s inside 16-128-key transactions, and refuses requests over 1.5 MiB.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import aetcd

from coordinator.model import (
    BatchState,
    JobSpec,
    JobStatus,
    Recipient,
    dump_batch_state,
    dump_recipients,
    dump_spec,
    dump_status,
    load_batch_state,
    load_recipients,
    load_spec,
    load_status,
)
from coordinator.suppression import Suppression, dump, load
from mailers.etcd import Keys

log = logging.getLogger(__name__)

MAX_TXN_OPS = 64
MAX_TXN_BYTES = 1_000_000


class LostLeadership(Exception):
    """The fence no longer holds: another coordinator leads, or our lease expired."""


@dataclasses.dataclass(frozen=True)
class Fence:
    """The leader's election key and the create revision it won with (its epoch)."""

    key: bytes
    revision: int


class JobStore:
    """Fenced reads and writes of jobs, batches and results.

    Every method awaits etcd with the client's timeout; none retries, so an etcd
    failure surfaces as an aetcd.ClientError and the caller decides.
    """

    def __init__(self, client: aetcd.Client, keys: Keys, fence: Fence) -> None:
        self._client = client
        self._keys = keys
        self._fence = fence

    def _fence_compare(self) -> Any:
        return self._client.transactions.create(self._fence.key) == self._fence.revision

    async def _fence_holds(self) -> bool:
        kv = await self._client.get(self._fence.key)
        return kv is not None and kv.create_revision == self._fence.revision

    async def _put_all(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """Put every item in fenced transactions. Raises LostLeadership."""
        ops: list[Any] = []
        size = 0
        for key, value in items:
            if ops and (len(ops) >= MAX_TXN_OPS or size + len(value) > MAX_TXN_BYTES):
                await self._commit(ops)
                ops, size = [], 0
            ops.append(self._client.transactions.put(key, value))
            size += len(key) + len(value)
        if ops:
            await self._commit(ops)

    async def _commit(self, ops: list[Any]) -> None:
        ok, _ = await self._client.transaction(
            compare=[self._fence_compare()], success=ops, failure=[]
        )
        if not ok:
            raise LostLeadership("fenced write refused")

    # ---- submit ---------------------------------------------------------------------

    def _idem_key(self, tenant: str, key: str) -> bytes:
        # Keys are scoped per tenant; neither a tenant id nor a key may hold '/', and
        # tenant "" keeps the original layout (idem/<key>) of records from before tenants.
        return self._keys.idempotency(f"{tenant}/{key}" if tenant else key)

    async def find_idempotent(self, tenant: str, key: str) -> str | None:
        kv = await self._client.get(self._idem_key(tenant, key))
        return kv.value.decode() if kv is not None else None

    async def write_batches(
        self, job_id: str, batches: Iterable[tuple[int, int, list[Recipient]]]
    ) -> None:
        """Store (seq, first_index, recipients) batches of a job not yet committed."""
        await self._put_all(
            (self._keys.batch(job_id, seq), dump_recipients(first, recipients))
            for seq, first, recipients in batches
        )

    async def commit_job(self, spec: JobSpec, status: JobStatus) -> str | None:
        """Make a job visible, atomically with its idempotency key.

        Returns None when committed, or the id of the job that already holds the
        idempotency key (the caller then discards its batches and returns that job).
        Raises LostLeadership when the fence fails.
        """
        idem_key = self._idem_key(spec.tenant, spec.idempotency_key)
        ok, _ = await self._client.transaction(
            compare=[self._fence_compare(), self._client.transactions.create(idem_key) == 0],
            success=[
                self._client.transactions.put(self._keys.job(spec.job_id), dump_spec(spec)),
                self._client.transactions.put(
                    self._keys.job_state(spec.job_id), dump_status(status)
                ),
                self._client.transactions.put(idem_key, spec.job_id.encode()),
            ],
            failure=[],
        )
        if ok:
            return None
        if not await self._fence_holds():
            raise LostLeadership("fenced write refused")
        existing = await self.find_idempotent(spec.tenant, spec.idempotency_key)
        if existing is None:  # deleted in between: extremely unlikely; let the client retry
            raise aetcd.ClientError("idempotency key changed during commit")
        return existing

    async def discard_batches(self, job_id: str) -> None:
        """Remove the batches of a job that was never committed. Best effort."""
        try:
            await asyncio.wait_for(self._client.delete_prefix(self._keys.batches(job_id)), 5)
        except Exception as exc:
            log.warning("could not discard batches of uncommitted job %s: %s", job_id, exc)

    # ---- reads ----------------------------------------------------------------------

    async def load_spec(self, job_id: str) -> JobSpec | None:
        kv = await self._client.get(self._keys.job(job_id))
        return load_spec(kv.value) if kv is not None else None

    async def load_status(self, job_id: str) -> JobStatus | None:
        kv = await self._client.get(self._keys.job_state(job_id))
        return load_status(kv.value) if kv is not None else None

    async def list_statuses(self) -> dict[str, JobStatus]:
        listing = await self._client.get_prefix(self._keys.job_states)
        return {
            self._keys.tail(kv.key, self._keys.job_states): load_status(kv.value) for kv in listing
        }

    async def load_batch(self, job_id: str, seq: int) -> tuple[int, list[Recipient]]:
        kv = await self._client.get(self._keys.batch(job_id, seq))
        if kv is None:
            raise KeyError(f"batch {job_id}/{seq} is missing")
        return load_recipients(kv.value)

    async def load_state(self, job_id: str, seq: int) -> BatchState | None:
        kv = await self._client.get(self._keys.state(job_id, seq))
        return load_batch_state(kv.value) if kv is not None else None

    async def list_states(self, job_id: str) -> dict[int, BatchState]:
        prefix = self._keys.states(job_id)
        listing = await self._client.get_prefix(prefix)
        return {int(self._keys.tail(kv.key, prefix)): load_batch_state(kv.value) for kv in listing}

    # ---- progress -------------------------------------------------------------------

    async def save(
        self,
        states: dict[tuple[str, int], BatchState],
        statuses: dict[str, JobStatus],
        suppressions: Iterable[tuple[str, Suppression]] = (),
    ) -> None:
        """Persist batch results, job statuses and (tenant, address) suppressions.
        Raises LostLeadership."""
        items: list[tuple[bytes, bytes]] = [
            (self._keys.state(job_id, seq), dump_batch_state(state))
            for (job_id, seq), state in states.items()
        ]
        items.extend(
            (self._keys.job_state(job_id), dump_status(status))
            for job_id, status in statuses.items()
        )
        items.extend(
            (self._keys.suppression(tenant, s.email), dump(s)) for tenant, s in suppressions
        )
        await self._put_all(items)

    # ---- suppression lists ----------------------------------------------------------

    async def suppressions(self, tenant: str) -> dict[str, Suppression]:
        """The tenant's whole list, by normalised address."""
        prefix = self._keys.suppressions(tenant)
        listing = await self._client.get_prefix(prefix)
        return {self._keys.tail(kv.key, prefix): load(kv.value) for kv in listing}

    async def put_suppression(self, tenant: str, suppression: Suppression) -> None:
        """Add or replace one address. Raises LostLeadership."""
        await self._put_all(
            [(self._keys.suppression(tenant, suppression.email), dump(suppression))]
        )

    async def delete_suppression(self, tenant: str, email: str) -> None:
        """Remove one address (absent is fine). Raises LostLeadership."""
        await self._commit(
            [self._client.transactions.delete(self._keys.suppression(tenant, email))]
        )

    # ---- cordons --------------------------------------------------------------------

    async def cordoned(self) -> set[str]:
        listing = await self._client.get_prefix(self._keys.cordons)
        return {self._keys.tail(kv.key, self._keys.cordons) for kv in listing}

    async def set_cordon(self, node_id: str, cordoned: bool) -> None:
        if cordoned:
            await self._put_all([(self._keys.cordon(node_id), b"1")])
            return
        ok, _ = await self._client.transaction(
            compare=[self._fence_compare()],
            success=[self._client.transactions.delete(self._keys.cordon(node_id))],
            failure=[],
        )
        if not ok:
            raise LostLeadership("fenced write refused")
