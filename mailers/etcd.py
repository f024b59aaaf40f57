"""Connecting to etcd and the key layout every process shares.

aetcd dials a single ``host:port``. gRPC's ``ipv4:`` resolver accepts a list of
addresses, and its default pick-first policy moves to the next address when the
current one fails, so a client built by :func:`connect` survives the loss of one member
of an etcd cluster without any code of ours choosing endpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import aetcd

# Every etcd call made through these clients gives up after this many seconds, so no
# await on etcd can hang a process; callers choose what a timeout means.
DEFAULT_TIMEOUT_S = 5


@dataclasses.dataclass(frozen=True)
class Keys:
    """The etcd key layout under one prefix (``/mailers`` by default).

    Values are JSON unless said otherwise. The layout:

    - ``election/<lease hex>``: one per coordinator campaigning; value is its
      CoordinatorInfo JSON. The lowest create revision leads; that revision is its epoch.
    - ``nodes/<node_id>``: a sender node's registration, bound to its lease.
    - ``cordon/<node_id>``: present while an operator has cordoned the node.
    - ``jobs/<job_id>``: the job record (content, options, state, counts).
    - ``idem/<key>``: idempotency key -> job id.
    - ``batch/<job_id>/<seq>``: a batch's recipients, written once at submit.
    - ``state/<job_id>/<seq>``: a batch's per-recipient results and attempts.
    """

    prefix: str = "/mailers"

    def _k(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    @property
    def election(self) -> bytes:
        return self._k("election", "")

    def election_key(self, lease_id: int) -> bytes:
        return self._k("election", f"{lease_id:016x}")

    @property
    def nodes(self) -> bytes:
        return self._k("nodes", "")

    def node(self, node_id: str) -> bytes:
        return self._k("nodes", node_id)

    @property
    def cordons(self) -> bytes:
        return self._k("cordon", "")

    def cordon(self, node_id: str) -> bytes:
        return self._k("cordon", node_id)

    @property
    def jobs(self) -> bytes:
        return self._k("jobs", "")

    def job(self, job_id: str) -> bytes:
        return self._k("jobs", job_id)

    def idempotency(self, key: str) -> bytes:
        return self._k("idem", key)

    def batches(self, job_id: str) -> bytes:
        return self._k("batch", job_id, "")

    def batch(self, job_id: str, seq: int) -> bytes:
        return self._k("batch", job_id, f"{seq:08d}")

    def states(self, job_id: str) -> bytes:
        return self._k("state", job_id, "")

    def state(self, job_id: str, seq: int) -> bytes:
        return self._k("state", job_id, f"{seq:08d}")

    def tail(self, key: bytes, parent: bytes) -> str:
        """The part of key after parent (one of the prefix properties above)."""
        return key[len(parent) :].decode()


def parse_endpoints(spec: str) -> list[str]:
    """Split "host:port,host:port" into a list, rejecting malformed entries.

    Raises:
        ValueError: an entry has no port or a non-numeric port.
    """
    endpoints = [part.strip() for part in spec.split(",") if part.strip()]
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return endpoints


def connect(endpoints: Sequence[str], timeout_s: int = DEFAULT_TIMEOUT_S) -> aetcd.Client:
    """A client (not yet connected) that fails over across endpoints.

    aetcd builds its target as f"{host}:{port}"; handing it the head of an ``ipv4:``
    address list as host and the last port as port yields "ipv4:a:1,b:2,c:3".
    """
    if len(endpoints) == 1:
        host, _, port = endpoints[0].rpartition(":")
        return aetcd.Client(host=host, port=int(port), timeout=timeout_s)
    *rest, last = endpoints
    last_host, _, last_port = last.rpartition(":")
    target_head = "ipv4:" + ",".join([*rest, last_host])
    return aetcd.Client(
        host=target_head,
        port=int(last_port),
        timeout=timeout_s,
        # Reconnect quickly after a member dies instead of gRPC's default 20 s backoff cap.
        options={"grpc.max_reconnect_backoff_ms": 1000, "grpc.initial_reconnect_backoff_ms": 100},
    )
