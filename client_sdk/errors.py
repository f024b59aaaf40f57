"""Errors the SDK raises, mapped from gRPC status codes in one table.

Every error derives from :class:`MailerError`. :class:`TransientError` means the
same call may succeed later (``retry_after`` says when, if the server said);
:class:`PermanentError` means repeating the call unchanged will fail again.
Codes without a specific meaning surface as :class:`RpcError`.

:class:`UnavailableError` is also a :class:`ConnectionError` and
:class:`DeadlineExceededError` a :class:`TimeoutError`, so code written against
the standard library's network errors handles them too.

Both clients turn a failed call into one of these through :func:`error_of`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc import aio

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


class UnavailableError(TransientError, ConnectionError):
    """No coordinator could serve the call right now (down, or no leader elected).

    Also a :class:`ConnectionError` (an ``OSError``): ``errno`` and ``strerror`` are None.
    """


class ResourceExhaustedError(TransientError):
    """The cluster is at capacity; wait ``retry_after`` before trying again."""


class DeadlineExceededError(TransientError, TimeoutError):
    """The call's deadline passed before an answer arrived.

    The call may or may not have taken effect; repeating it is safe only for
    reads and for submits with the same idempotency key. Also a
    :class:`TimeoutError` (an ``OSError``): ``errno`` and ``strerror`` are None.
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


def error_from_rpc(
    code: grpc.StatusCode, details: str | None, trailing: Iterable[tuple[str, str | bytes]] | None
) -> MailerError:
    """The typed error of a failed RPC, its ``RetryInfo`` decoded into ``retry_after``."""
    metadata = list(trailing or ())
    retry_after = retry_after_from_status_details(status_details_bin(metadata))
    return error_for_status(code, details or "", metadata, retry_after)


def error_of(exc: grpc.RpcError) -> MailerError:
    """The typed error of a failed call of either client.

    A blocking call's exception is also a ``grpc.Call``, an async call's an
    ``AioRpcError``; an ``RpcError`` that is neither carries no status and
    surfaces as UNKNOWN.
    """
    if isinstance(exc, grpc.Call | aio.AioRpcError):
        return error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
    return error_from_rpc(grpc.StatusCode.UNKNOWN, str(exc), ())


def retry_after_from_status_details(data: bytes | None) -> timedelta | None:
    """The ``RetryInfo.retry_delay`` inside a serialized ``google.rpc.Status``, if any."""
    if not data:
        return None
    try:
        status = status_pb2.Status.FromString(data)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay: timedelta = info.retry_delay.ToTimedelta()
                return delay
    except DecodeError:
        return None
    return None


def status_details_with_retry_info(code: int, message: str, retry_after: timedelta) -> bytes:
    """A serialized ``google.rpc.Status`` carrying ``RetryInfo`` (for tests and fakes)."""
    detail = any_pb2.Any()
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromTimedelta(retry_after)
    detail.Pack(info)
    status = status_pb2.Status(code=code, message=message, details=[detail])
    data: bytes = status.SerializeToString()
    return data
