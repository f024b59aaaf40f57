"""Where each batch of one job stands while the leader schedules it. Pure; time is passed in.

Every batch is in exactly one place:

- **fresh**: ``seq >= cursor``, never handed out (no row in the store's batches table);
- **ready**: handed out before, back, and may go now (oldest returns first);
- **waiting**: may go again at its ``retry_at`` (deferred recipients, a backoff after
  losses);
- **held**: a node holds it, under a dispatch ``attempt`` (a node's acks and results
  name the attempt, so a late ack of an earlier attempt changes nothing);
- **done**: every recipient final; forgotten.

Memory is proportional to the batches that are ready, waiting or held, never to the
job's size. A batch leaves *held* only through :meth:`JobPlan.settle` (its holder released
it and the store settled it from its recipients' state) or :meth:`JobPlan.unsend` (the
ownership write failed, so it was never sent).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq


@dataclasses.dataclass
class Hold:
    """A node's hold on a batch."""

    node_id: str
    """"" for a batch the leader itself settles (every recipient suppressed)."""
    attempt: int
    since: float
    progress_at: float
    """When the holder last reported anything for it (dispatch time at first)."""
    cancel_sent: bool = False
    stream_no: int = 0
    """The leader's stream it was sent on (0: sent by an earlier leader)."""


class JobPlan:
    """The batches of one job that are not done.

    Args:
        batch_count: Batches in the job.
        cursor: Batches below it were handed out at least once.
    """

    def __init__(self, batch_count: int, cursor: int = 0) -> None:
        if not 0 <= cursor <= batch_count:
            raise ValueError("cursor must be within 0..batch_count")
        self.batch_count = batch_count
        self.cursor = cursor
        self.ready: collections.deque[int] = collections.deque()
        self.waiting: list[tuple[float, int]] = []
        self.held: dict[int, Hold] = {}
        self.attempts: dict[int, int] = {}
        """Last dispatch attempt of every batch below the cursor that is not done."""
        self.lost: dict[int, int] = {}
        """Times in a row a batch was lost by its holder (only batches lost at least once)."""

    # ---- loading a new leader's view ----------------------------------------------------

    def restore(
        self,
        seq: int,
        attempt: int,
        lost: int,
        holder: str | None,
        retry_at: float | None,
        now: float,
    ) -> None:
        """Add a batch read from the store (handed out before, not done)."""
        self.attempts[seq] = attempt
        if lost:
            self.lost[seq] = lost
        if holder:
            self.held[seq] = Hold(holder, attempt, now, now)
        elif retry_at is not None:
            heapq.heappush(self.waiting, (retry_at, seq))
        else:
            self.ready.append(seq)

    # ---- dispatching ----------------------------------------------------------------

    def promote(self, now: float) -> None:
        """Move batches whose wait is over to ready."""
        while self.waiting and self.waiting[0][0] <= now:
            _, seq = heapq.heappop(self.waiting)
            self.ready.append(seq)

    def next_wait(self) -> float | None:
        """When the earliest waiting batch may go."""
        return self.waiting[0][0] if self.waiting else None

    def peek(self) -> int | None:
        """The batch that would go next (ready first, then fresh), or None."""
        if self.ready:
            return self.ready[0]
        if self.cursor < self.batch_count:
            return self.cursor
        return None

    def take(self, node_id: str, now: float) -> tuple[int, int]:
        """Hand the next batch to node_id; returns (seq, attempt).

        Raises:
            LookupError: nothing to hand out.
        """
        if self.ready:
            seq = self.ready.popleft()
        elif self.cursor < self.batch_count:
            seq = self.cursor
            self.cursor += 1
        else:
            raise LookupError("no batch to hand out")
        attempt = self.attempts.get(seq, 0) + 1
        self.attempts[seq] = attempt
        self.held[seq] = Hold(node_id, attempt, now, now)
        return seq, attempt

    def unsend(self, seq: int) -> None:
        """The hold was never recorded (the ownership write failed): back to ready."""
        hold = self.held.pop(seq, None)
        if hold is None:
            return
        self.attempts[seq] = hold.attempt - 1
        self.ready.appendleft(seq)

    # ---- releases -------------------------------------------------------------------

    def holds(self, seq: int, node_id: str, attempt: int) -> bool:
        hold = self.held.get(seq)
        return hold is not None and hold.node_id == node_id and hold.attempt == attempt

    def settle(self, seq: int, done: bool, retry_at: float | None, lost: int) -> None:
        """A released batch as the store settled it: done, waiting until retry_at, or
        ready (unattempted recipients left). A batch no longer held is left alone: a
        release reported twice (a hello and a hand-back) settles it once."""
        if self.held.pop(seq, None) is None:
            return
        if lost:
            self.lost[seq] = lost
        else:
            self.lost.pop(seq, None)
        if done:
            self.attempts.pop(seq, None)
            self.lost.pop(seq, None)
        elif retry_at is not None:
            heapq.heappush(self.waiting, (retry_at, seq))
        else:
            self.ready.appendleft(seq)

    def reopen(self, seqs: list[int]) -> None:
        """Batches that were done get recipients to send again (retry of failures)."""
        for seq in seqs:
            if seq < self.cursor and seq not in self.held and seq not in self.attempts:
                self.attempts[seq] = 0
                self.ready.append(seq)

    def clear_queue(self) -> None:
        """Forget everything not held (a cancelled or expired job sends nothing more)."""
        self.ready.clear()
        self.waiting.clear()
        self.cursor = self.batch_count
        for seq in list(self.attempts):
            if seq not in self.held:
                del self.attempts[seq]

    # ---- questions ------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Whether any batch is not done."""
        return bool(self.cursor < self.batch_count or self.ready or self.waiting or self.held)

    def held_by(self, node_id: str) -> list[int]:
        return [seq for seq, hold in self.held.items() if hold.node_id == node_id]
