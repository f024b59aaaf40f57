"""Errors the SDK raises, mapped from gRPC status codes in one table.

Every error derives from :class:`MailerError`. :class:`TransientError` means the
same call may succeed later (``retry_after`` says when, if the server said);
:class:`PermanentError` means repeating the call unchanged will fail again.
Codes without a specific meaning surface as :class:`RpcError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta

import grpc

LEADER_METADATA_KEY = "mailers-leader"
"""Trailing metadata key in which a standby names the leader's ``host:port``."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing metadata key of a serialized ``google.rpc.Status`` (for ``RetryInfo``)."""

_FIELD_RE = re.compile(r"^\s*([A-Za-z_][\w.\[\]]*)\s*:")


class MailerError(Exception):
    """Root of every error the SDK raises.

    Attributes:
        code: The gRPC status code the server (or the channel) answered with,
            ``None`` for errors raised by the SDK itself.
        details: The status details text.
    """

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{code.name}: {details}" if code is not None else details)
        self.code = code
        self.details = details


class TransientError(MailerError):
    """The call may succeed later.

    Attributes:
        retry_after: How long the server asked to wait, when it said.
    """

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        retry_after: timedelta | None = None,
    ) -> None:
        super().__init__(details, code)
        self.retry_after = retry_after


class PermanentError(MailerError):
    """Repeating the same call will fail the same way."""


class InvalidArgumentError(PermanentError):
    """The request is invalid; ``details`` names the offending field.

    Attributes:
        field: The field path the details start with (``"recipients[3].email"``),
            when the server put one there.
    """

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details, code)
        match = _FIELD_RE.match(details)
        self.field: str | None = match.group(1) if match else None


class NotFoundError(PermanentError):
    """The job or node does not exist."""


class AlreadyExistsError(PermanentError):
    """The object exists already."""


class FailedPreconditionError(PermanentError):
    """The system is not in a state that allows the call.

    Attributes:
        leader: Set when a standby coordinator answered: the leader's
            ``host:port``, or ``""`` when the standby does not know it.
            ``None`` when the leader itself refused the call.
    """

    def __init__(
        self, details: str, code: grpc.StatusCode | None = None, leader: str | None = None
    ) -> None:
        super().__init__(details, code)
        self.leader = leader


class AuthError(PermanentError):
    """The caller is not authenticated or not allowed."""


class UnavailableError(TransientError):
    """No coordinator could serve the call right now (down, or no leader elected)."""


class ResourceExhaustedError(TransientError):
    """The cluster is at capacity; wait ``retry_after`` before trying again."""


class DeadlineExceededError(TransientError):
    """The call's deadline passed before an answer arrived.

    The call may or may not have taken effect; repeating it is safe only for
    reads and for submits with the same idempotency key.
    """


class RpcError(MailerError):
    """A status code without a more specific error class (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: Mapping[grpc.StatusCode, type[MailerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
}
"""The one table from status code to error class; anything else is RpcError."""


def error_for_status(
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    retry_after: timedelta | None = None,
) -> MailerError:
    """Build the typed error for a non-OK status.

    Args:
        code: The status code.
        details: The status details text.
        trailing_metadata: The call's trailing metadata; ``mailers-leader`` is read
            from it for FAILED_PRECONDITION.
        retry_after: A delay decoded from the status' ``RetryInfo``, if any.
    """
    cls = _BY_CODE.get(code, RpcError)
    if cls is FailedPreconditionError:
        return FailedPreconditionError(details, code, leader=leader_hint(trailing_metadata))
    if issubclass(cls, TransientError):
        return cls(details, code, retry_after=retry_after)
    return cls(details, code)


def leader_hint(trailing_metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The ``mailers-leader`` value: ``None`` when absent, ``""`` when present but empty."""
    for key, value in trailing_metadata:
        if key == LEADER_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def status_details_bin(trailing_metadata: Iterable[tuple[str, str | bytes]]) -> bytes | None:
    """The serialized ``google.rpc.Status`` from the trailing metadata, if present."""
    for key, value in trailing_metadata:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    return None
