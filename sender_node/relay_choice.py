"""Which relay a transaction goes to next: failover order or smooth weighted balancing. Pure.

``smtp_client.RelayPool`` asks :meth:`RelayChooser.choose` once per attempt with the
relays still worth trying (not yet tried for this transaction, breaker not skipping
them, SIZE limit not known to be too small), each with how long until its rate limit
allows one more message. The answer is a relay and a wait: 0 means send now (take the
token), more means sleep exactly that long and ask again. Nothing here reads a clock
or sleeps.

- :attr:`Strategy.FAILOVER`: always the first candidate in the configured order; when it
  is out of tokens the transaction waits for it rather than spilling to a lower-priority
  relay (the order is the operator's preference, e.g. a cheaper or closer relay first).
- :attr:`Strategy.BALANCE`: smooth weighted round-robin (nginx's algorithm) among the
  candidates that have a token now; when none has, wait for the one ready soonest. With
  every relay healthy and unthrottled, weights 3:1 give exactly 3 of every 4 picks to
  the first, interleaved (A A B A, not A A A B).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Sequence


class Strategy(enum.StrEnum):
    """How a node spreads transactions over its relays (``MAILER_RELAY_STRATEGY``)."""

    FAILOVER = "failover"
    """Priority order: the first usable relay takes everything."""
    BALANCE = "balance"
    """Weighted: each relay takes a share proportional to its ``weight``."""

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """The strategy called ``name`` (case-insensitive).

        Raises:
            ValueError: an unknown name.
        """
        try:
            return cls(name.strip().lower())
        except ValueError:
            known = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown relay strategy {name!r} (one of: {known})") from None


class SmoothWeighted:
    """Smooth weighted round-robin over indices ``0..len(weights)-1``.

    Each pick adds every eligible index's weight to its running score, takes the highest
    score (the lowest index on a tie) and subtracts the eligible total from it. Over any
    run of ``sum(weights)`` picks with the same eligible set, each index is picked
    exactly ``weight`` times, spread out rather than in bursts.

    Args:
        weights: A positive integer weight per index.

    Raises:
        ValueError: no weights, or a weight below 1.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights or any(w < 1 for w in weights):
            raise ValueError("weights must be a non-empty list of integers >= 1")
        self._weights = tuple(weights)
        self._scores = [0] * len(weights)

    @property
    def scores(self) -> tuple[int, ...]:
        """The running scores (for tests and debugging)."""
        return tuple(self._scores)

    def pick(self, eligible: Collection[int]) -> int:
        """Pick one of ``eligible`` and advance the state.

        Raises:
            ValueError: ``eligible`` is empty or holds an unknown index.
        """
        if not eligible:
            raise ValueError("nothing to pick from")
        if any(not 0 <= i < len(self._weights) for i in eligible):
            raise ValueError("unknown index")
        total = 0
        best = -1
        for i in sorted(eligible):
            self._scores[i] += self._weights[i]
            total += self._weights[i]
            if best < 0 or self._scores[i] > self._scores[best]:
                best = i
        self._scores[best] -= total
        return best


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A relay that may take the transaction now."""

    index: int
    """Position of the relay in the configured order."""
    wait_s: float = 0.0
    """Seconds until its rate limit allows one more message; 0 when it does now."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The relay to use, and how long to wait before asking again (0: use it now)."""

    index: int
    wait_s: float


class RelayChooser:
    """Picks the next relay for a transaction according to a :class:`Strategy`.

    Args:
        strategy: Failover or balance.
        weights: One weight per relay in configured order (only ``BALANCE`` uses them).
    """

    def __init__(self, strategy: Strategy, weights: Sequence[int]) -> None:
        self.strategy = strategy
        self._wrr = SmoothWeighted(weights)

    def choose(self, candidates: Sequence[Candidate]) -> Choice | None:
        """The relay for the next attempt, or None when there is no candidate.

        ``candidates`` must be in configured order. A choice with ``wait_s == 0`` is
        final (for ``BALANCE`` it advances the rotation); one with ``wait_s > 0`` is
        not: sleep that long, then ask again with fresh candidates.
        """
        if not candidates:
            return None
        if self.strategy is Strategy.FAILOVER:
            first = candidates[0]
            return Choice(first.index, max(0.0, first.wait_s))
        ready = [c.index for c in candidates if c.wait_s <= 0]
        if ready:
            return Choice(self._wrr.pick(ready), 0.0)
        soonest = min(candidates, key=lambda c: (c.wait_s, c.index))
        return Choice(soonest.index, soonest.wait_s)
