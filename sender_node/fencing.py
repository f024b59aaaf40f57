"""Who may make a node send: leader epochs and dispatch authority. Pure.

Two fences keep a deposed leader from making a node send, each enough on its own:

- **Epochs.** A leader's epoch is the create revision of its election key; a later
  leader always has a higher one. The node keeps the highest epoch it has seen (in an
  ``open``, or from etcd's election keys) in an :class:`EpochFence` and refuses any
  ``open``, ``batch`` or ``heartbeat`` below it.
- **Authority.** A leader grants ``authority_ms`` with ``open`` and every heartbeat,
  and heartbeats only while it trusts its election lease. The node starts an SMTP
  transaction of a stream's batch only before :func:`authority_until` of the last
  grant on that stream, by its own monotonic clock.

:func:`start_refusal` is the whole rule for starting a transaction.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

STALE_EPOCH = "stale epoch"
STREAM_ENDED = "stream ended"
NOT_CURRENT = "superseded by a newer stream"
NO_AUTHORITY = "authority lapsed"
LEASE_UNTRUSTED = "lease not trusted"


def authority_until(received_at_s: float, authority_ms: int, max_authority_s: float) -> float:
    """When a grant of ``authority_ms`` received at ``received_at_s`` runs out.

    A grant above ``max_authority_s`` is cut to it; a non-positive one grants nothing.
    """
    granted_s = min(max(authority_ms, 0) / 1000.0, max_authority_s)
    return received_at_s + granted_s


@dataclasses.dataclass
class EpochFence:
    """The highest leader epoch this node has seen."""

    highest: int = 0

    def admits(self, epoch: int) -> bool:
        """Whether a message of ``epoch`` may act (not below the highest)."""
        return epoch >= self.highest

    def observe(self, epoch: int) -> bool:
        """Note a leader epoch; True when it is higher than any before."""
        if epoch > self.highest:
            self.highest = epoch
            return True
        return False


@dataclasses.dataclass(frozen=True)
class StreamView:
    """What :func:`start_refusal` needs to know about a batch's stream."""

    epoch: int
    current: bool
    """It is the node's current stream (no newer one replaced it)."""
    open: bool
    """It has not ended and the leader has not half-closed it."""
    authority_until_s: float


class StreamState(Protocol):
    """What :func:`start_refusal` reads of a batch's stream: a :class:`StreamView`, or
    the live ``stream.Stream`` itself (asked several times per transaction, it is read
    in place rather than copied into a view each time)."""

    @property
    def epoch(self) -> int: ...

    @property
    def current(self) -> bool: ...

    @property
    def open(self) -> bool: ...

    @property
    def authority_until_s(self) -> float: ...


def start_refusal(
    stream: StreamState,
    *,
    now_s: float,
    highest_epoch: int,
    lease_trusted: bool,
    stopping: str | None,
) -> str | None:
    """Why a transaction of a batch from ``stream`` may not start now; None if it may.

    Args:
        stream: The stream the batch came on.
        now_s: Monotonic now.
        highest_epoch: The highest leader epoch known.
        lease_trusted: The node's registration lease surely still exists.
        stopping: Why the node stops every batch (drain timeout, shutdown, a failed
            journal), or None.
    """
    if stopping is not None:
        return stopping
    if not stream.open:
        return STREAM_ENDED
    if not stream.current:
        return NOT_CURRENT
    if stream.epoch < highest_epoch:
        return STALE_EPOCH
    if now_s >= stream.authority_until_s:
        return NO_AUTHORITY
    if not lease_trusted:
        return LEASE_UNTRUSTED
    return None
