"""Garbage-collector settings for the long-running processes (nodes, coordinators).

Both allocate a few dozen short-lived objects per message (results, protobuf messages,
database rows), almost none of them in reference cycles. At CPython's default
young-generation threshold (700) the collector ran every few messages and walked what
the process built at startup. On the coordinator, ``python -m bench.e2e --recipients
20000`` interleaved with the default (three pairs): 0.091-0.100 ms of CPU per message
against 0.099-0.106, and 3,852-4,059 msg/s end to end against 3,888-3,931.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
"""Allocations (net) between young-generation collections; CPython's default is 700."""


def tune() -> None:
    """Fewer, larger collections; what exists now (modules, protobuf descriptors,
    configuration) is frozen out of every later collection. Call once, after the
    imports and before the event loop starts."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 20)
