"""Log phrases for etcd failures (``mailers_runtime.etcd.describe_error``): never empty,
never gRPC's multi-line dump, the wrapped cause told when the wrapper has no text."""

from __future__ import annotations

import asyncio

import aetcd
import grpc
import pytest

from mailers_runtime.etcd import describe_error


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_deadline_reads_as_no_reply() -> None:
    assert describe_error(TimeoutError(), 1.5) == "no reply within 1.50 s"
    # asyncio.timeout raises it from the CancelledError of the call it stopped
    try:
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    except TimeoutError as deadline:
        assert describe_error(deadline, 1.5) == "no reply within 1.50 s"


def test_a_grpc_error_is_its_code_and_details_on_one_line() -> None:
    phrase = describe_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader"), 2)
    assert phrase == "UNAVAILABLE: etcdserver: no leader"


def test_a_wrapper_without_text_is_told_by_its_cause() -> None:
    try:
        try:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "")
        except grpc.aio.AioRpcError as exc:
            raise aetcd.ClientError() from exc
    except aetcd.ClientError as wrapped:
        phrase = describe_error(wrapped, 2)
    assert phrase == "ClientError: DEADLINE_EXCEEDED: no details"


@pytest.mark.parametrize("exc", [RuntimeError(), aetcd.ClientError(), OSError("refused")])
def test_never_empty(exc: BaseException) -> None:
    assert describe_error(exc, 2).strip()
