"""The SDK's errors as seen from outside: the standard library's bases and the mapping of calls."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from client_sdk import (
    DeadlineExceededError,
    MailerError,
    RpcError,
    TransientError,
    UnavailableError,
)
from client_sdk.errors import error_from_rpc, error_of, status_details_with_retry_info


@pytest.mark.parametrize(
    ("cls", "code", "stdlib"),
    [
        (UnavailableError, grpc.StatusCode.UNAVAILABLE, ConnectionError),
        (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, TimeoutError),
    ],
)
def test_transient_network_errors_are_also_the_stdlib_ones(
    cls: type[TransientError], code: grpc.StatusCode, stdlib: type[OSError]
) -> None:
    # Given the error a call raises
    error = cls("down", code, retry_after=timedelta(seconds=1))
    # Then it is the SDK's transient error and the standard library's, both
    assert isinstance(error, TransientError) and isinstance(error, MailerError)
    assert isinstance(error, stdlib) and isinstance(error, OSError)
    # And it reads as before: no errno, the same message and attributes
    assert error.errno is None and error.strerror is None
    assert str(error) == f"{code.name}: down" and error.args == (f"{code.name}: down",)
    assert (error.code, error.details, error.retry_after) == (code, "down", timedelta(seconds=1))
    # And an OSError handler catches it
    with pytest.raises(stdlib):
        raise error


def test_the_rest_of_the_tree_stays_out_of_oserror() -> None:
    other = error_from_rpc(grpc.StatusCode.NOT_FOUND, "gone", ())
    assert not isinstance(other, OSError)


class _NotACall(grpc.RpcError):
    """An RpcError without a status, as gRPC raises for some local failures."""


def test_an_rpc_error_without_status_surfaces_as_unknown() -> None:
    error = error_of(_NotACall("broken"))
    assert isinstance(error, RpcError) and error.code is grpc.StatusCode.UNKNOWN
    assert "broken" in error.details


def test_retry_info_in_trailing_metadata_becomes_retry_after() -> None:
    details = status_details_with_retry_info(8, "full", timedelta(seconds=3))
    error = error_from_rpc(
        grpc.StatusCode.UNAVAILABLE, None, [("grpc-status-details-bin", details)]
    )
    assert isinstance(error, UnavailableError)
    assert error.retry_after == timedelta(seconds=3) and error.details == ""
