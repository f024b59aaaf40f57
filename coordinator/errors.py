"""The one table that maps coordinator failures to gRPC status codes."""

from __future__ import annotations

import aetcd
import grpc

from coordinator.db.store import LostLeadership, StoreUnavailable
from coordinator.quotas import QuotaExceeded
from coordinator.validation import ValidationError
from mailers_runtime.errors import MailersError, PermanentError

STORE_RETRY_AFTER_S = 2.0
"""What clients are told to wait (RetryInfo) when PostgreSQL cannot take a request."""


class NotFound(PermanentError, LookupError):
    """The job or node does not exist."""


class NotLeader(MailersError):
    """This coordinator does not lead; ``leader`` is where to go, if known."""

    def __init__(self, leader: str) -> None:
        self.leader = leader
        super().__init__(f"not the leader; the leader is {leader}" if leader else "no leader yet")


class Unauthenticated(PermanentError):
    """The call carries no valid token (normally refused earlier, by the interceptor)."""


class PermissionDenied(PermanentError):
    """The caller is known but may not make this call."""


class Conflict(PermanentError):
    """The request cannot apply in the current state (e.g. resuming a finished job)."""


_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    # RetryInfo (when waiting helps) is attached by the servicer's abort.
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    # A lost fence mid-request: the client retries and finds the new leader.
    (LostLeadership, grpc.StatusCode.UNAVAILABLE),
    # PostgreSQL down, full or read-only: nothing was accepted; RetryInfo says when.
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (aetcd.ClientError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for exc; INTERNAL when unknown."""
    if isinstance(exc, NotLeader):
        if exc.leader:
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    for kind, code in _TABLE:
        if isinstance(exc, kind):
            if isinstance(exc, StoreUnavailable):
                return code, f"database unavailable: {exc}"
            if code is grpc.StatusCode.UNAVAILABLE and not isinstance(exc, LostLeadership):
                return code, f"etcd unavailable: {exc}"
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"
