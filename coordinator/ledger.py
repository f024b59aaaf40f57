"""Which node holds which batch, and until when. Pure; time is passed in.

A batch's deadline is a progress deadline: it is pushed back every time the node
reports results for it, so a slow but working node keeps its batch while a silent one
loses it after ``timeout_s``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Entry:
    batch_id: str
    node_id: str
    recipients: int
    dispatched_at: float
    deadline: float
    timeout_s: float


class Ledger:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._entries

    def add(
        self, batch_id: str, node_id: str, recipients: int, now: float, timeout_s: float
    ) -> None:
        if batch_id in self._entries:
            raise ValueError(
                f"batch {batch_id} is already held by {self._entries[batch_id].node_id}"
            )
        self._entries[batch_id] = Entry(
            batch_id, node_id, recipients, now, now + timeout_s, timeout_s
        )

    def holder(self, batch_id: str) -> str | None:
        entry = self._entries.get(batch_id)
        return entry.node_id if entry else None

    def touch(self, batch_id: str, node_id: str, now: float) -> bool:
        """Progress from node_id on batch_id; False if node_id does not hold it."""
        entry = self._entries.get(batch_id)
        if entry is None or entry.node_id != node_id:
            return False
        entry.deadline = now + entry.timeout_s
        return True

    def remove(self, batch_id: str, node_id: str | None = None) -> Entry | None:
        """Drop the batch (if node_id is given, only when that node holds it)."""
        entry = self._entries.get(batch_id)
        if entry is None or (node_id is not None and entry.node_id != node_id):
            return None
        return self._entries.pop(batch_id)

    def expired(self, now: float) -> list[Entry]:
        """Remove and return the batches whose deadline has passed."""
        gone = [e for e in self._entries.values() if e.deadline <= now]
        for entry in gone:
            del self._entries[entry.batch_id]
        return gone

    def orphaned(self, node_id: str) -> list[Entry]:
        """Remove and return every batch held by node_id (it died or lost its stream)."""
        gone = [e for e in self._entries.values() if e.node_id == node_id]
        for entry in gone:
            del self._entries[entry.batch_id]
        return gone

    def held_by(self, node_id: str) -> list[Entry]:
        return [e for e in self._entries.values() if e.node_id == node_id]

    def recipients_on(self, node_id: str) -> int:
        return sum(e.recipients for e in self._entries.values() if e.node_id == node_id)

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self._entries.values()), default=None)
