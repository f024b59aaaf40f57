"""Typed values of the etcd keys that one process writes and another reads.

A sender node writes its registration (``Keys.node``); the coordinators' registry reads
it. Both go through :class:`NodeRecord`, so the field names and types are stated once.
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True, slots=True)
class NodeRecord:
    """A sender node's registration, the value of ``<prefix>/nodes/<node_id>``.

    Args:
        node_id: The node's id (also the key's last part).
        address: ``host:port`` coordinators dial for the dispatch stream.
        lease_id: The etcd lease the key is bound to.
        capacity: Recipients the node holds at once.
        started_at: The process start, Unix seconds.
    """

    node_id: str
    address: str
    lease_id: int = 0
    capacity: int = 0
    started_at: float = 0.0

    def encode(self) -> bytes:
        """The JSON bytes stored in etcd (keys sorted, so equal records are equal bytes)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes, node_id: str = "") -> NodeRecord:
        """Parse a stored value; ``node_id`` fills in a record written without one.

        Raises:
            ValueError: not JSON, not an object, no address, or a field of the wrong type.
        """
        try:
            info = json.loads(value)
            if not isinstance(info, dict):
                raise TypeError("not an object")
            return cls(
                node_id=str(info.get("node_id") or node_id),
                address=str(info["address"]),
                lease_id=int(info.get("lease_id", 0)),
                capacity=int(info.get("capacity", 0)),
                started_at=float(info.get("started_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed node registration: {exc!r}") from None
