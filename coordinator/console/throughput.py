"""The last hour's outcomes per minute, from rows of delivery events. Pure.

The store is read newest first with a row limit (:mod:`coordinator.console.reads`), so a
very busy hour may be cut: then the minutes before the oldest event read are unknown,
and :attr:`Throughput.complete_from_s` says from when on the counts are whole. Minutes
are UTC epoch minutes; the window ends with the current (partial) minute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import UTC, datetime

from coordinator.model import EventType

WINDOW_MINUTES = 60


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Delivered and failed recipients per minute, oldest minute first."""

    first_minute: int
    """The window's first minute, as whole minutes since the epoch (UTC)."""
    delivered: tuple[int, ...]
    failed: tuple[int, ...]
    complete_from_s: float | None = None
    """None: every minute is whole. Else the counts before this time are partial
    (the read stopped at its row limit)."""

    @property
    def peak(self) -> int:
        return max((d + f for d, f in zip(self.delivered, self.failed, strict=True)), default=0)

    def minute_label(self, i: int) -> str:
        """``HH:MM`` (UTC) of the i-th minute of the window."""
        at = datetime.fromtimestamp((self.first_minute + i) * 60, UTC)
        return at.strftime("%H:%M")


def window_start_s(now_s: float, minutes: int = WINDOW_MINUTES) -> float:
    """The first second of the window that ends with ``now_s``'s minute."""
    return (int(now_s // 60) - minutes + 1) * 60.0


def per_minute(
    rows: Iterable[tuple[int, int, int]],
    now_s: float,
    *,
    oldest_read_s: float | None = None,
    minutes: int = WINDOW_MINUTES,
) -> Throughput:
    """Bucket ``(epoch_minute, event_type, count)`` rows into the window ending now.

    Args:
        rows: Counts per minute and type; other types and minutes outside the window
            are ignored (a clock step must not break the page).
        now_s: The current time.
        oldest_read_s: When the read hit its row limit, the time of the oldest event
            it read; None when it read every event of the window.
        minutes: The window's length.
    """
    first = int(now_s // 60) - minutes + 1
    delivered = [0] * minutes
    failed = [0] * minutes
    for minute, kind, count in rows:
        i = minute - first
        if not 0 <= i < minutes:
            continue
        if kind == EventType.DELIVERED:
            delivered[i] += count
        elif kind == EventType.FAILED:
            failed[i] += count
    complete = None
    if oldest_read_s is not None and oldest_read_s > first * 60:
        complete = oldest_read_s
    return Throughput(first, tuple(delivered), tuple(failed), complete)
