"""Choosing a node for the next batch, by the load nodes report. Pure.

Smooth weighted round-robin (as in nginx): each eligible node's weight is its free
capacity scaled down by its recent error rate, so over time nodes receive batches in
proportion to what they can take, without random choice and without bursts to one node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Candidate:
    node_id: str
    capacity: int
    """Recipients the node says it can hold at once."""
    in_flight: int
    """Recipients the node holds now: the larger of the leader's count and the node's report."""
    error_rate: float = 0.0
    """Recent share of failed SMTP transactions on the node (0..1)."""
    schedulable: bool = True
    """False when the node is cordoned, draining, disconnected or its breaker is open."""

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.in_flight)

    @property
    def weight(self) -> float:
        # A node failing everything still gets a trickle, so it can show it recovered.
        return self.free * (1.0 - min(max(self.error_rate, 0.0), 0.9))


class Balancer:
    """Remembers the smooth-WRR running weights between choices."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def choose(self, candidates: Sequence[Candidate], recipients: int) -> str | None:
        """The node for a batch of this many recipients, or None if none can take it.

        A node can take the batch when it is schedulable and has room for it, or when it
        holds nothing at all (so a batch larger than any capacity still goes somewhere).
        """
        eligible = [
            c
            for c in candidates
            if c.schedulable and (c.free >= recipients or (c.in_flight == 0 and c.capacity > 0))
        ]
        if not eligible:
            return None
        live = {c.node_id for c in candidates}
        for gone in [n for n in self._current if n not in live]:
            del self._current[gone]
        total = 0.0
        best: Candidate | None = None
        for c in eligible:
            weight = max(c.weight, 1e-6)
            total += weight
            self._current[c.node_id] = self._current.get(c.node_id, 0.0) + weight
            if best is None or self._current[c.node_id] > self._current[best.node_id]:
                best = c
        assert best is not None
        self._current[best.node_id] -= total
        return best.node_id
