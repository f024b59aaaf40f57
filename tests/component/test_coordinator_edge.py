"""The coordinator's gRPC edge on a real grpc.aio server: tokens, roles, undecodable input.

No etcd: the servicers run with no leader, so a call that passes the edge answers
UNAVAILABLE ("no leader yet"), which shows it got past authentication.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client_sdk import AuthError, MailerClient, ResourceExhaustedError
from client_sdk.client import error_from_rpc
from coordinator.auth import AuthConfig, hash_token, parse_auth
from coordinator.config import CoordinatorConfig
from coordinator.db.settings import DatabaseConfig
from coordinator.edge import UNDECODABLE_MESSAGE
from coordinator.quotas import Quotas
from coordinator.server import build_server
from coordinator.servicer import Role, retry_info_status

TENANT = "tenant-token-1"
ADMIN = "admin-token-1"
CONFIG = CoordinatorConfig(
    etcd_endpoints=("127.0.0.1:1",),
    database=DatabaseConfig(url="postgresql://mailers@127.0.0.1:1/mailers"),
    listen="127.0.0.1:0",
)


def _auth() -> AuthConfig:
    return parse_auth(
        {"tenants": {"acme": {"tokens": [hash_token(TENANT)]}}, "admins": [hash_token(ADMIN)]},
        Quotas(),
    )


class _LeaderlessRole(Role):
    def __init__(self) -> None:
        super().__init__("c1", "127.0.0.1:1", [])


class _StreamReadingRole(Role):
    """Claims to lead, so UploadJob reads its stream (and fails on the first message)."""

    def __init__(self) -> None:
        super().__init__("c1", "127.0.0.1:1", [])

    async def leader(self) -> Any:
        return object()


async def _serve(role: Role, auth: AuthConfig | None) -> tuple[grpc.aio.Server, str]:
    server = build_server(CONFIG, role, auth)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def secured() -> AsyncIterator[str]:
    server, address = await _serve(_LeaderlessRole(), _auth())
    yield address
    await server.stop(None)


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


async def _code(
    channel: grpc.aio.Channel, method: str, request: bytes, metadata: Any
) -> grpc.StatusCode:
    call: Any = channel.unary_unary(method)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, metadata=metadata, timeout=5)
    return info.value.code()


GET_JOB = "/mailer.v1.MailerService/GetJob"
SUBMIT = "/mailer.v1.MailerService/SubmitJob"
LIST_NODES = "/mailer.v1.AdminService/ListNodes"
U, P, OK = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE,  # past the edge: no leader in this test
)


@pytest.mark.parametrize(
    ("method", "token", "code"),
    [
        (GET_JOB, None, U),
        (GET_JOB, "wrong", U),
        (GET_JOB, TENANT, OK),
        (GET_JOB, ADMIN, OK),
        (SUBMIT, None, U),
        (SUBMIT, TENANT, OK),
        (SUBMIT, ADMIN, P),
        (LIST_NODES, None, U),
        (LIST_NODES, "wrong", U),
        (LIST_NODES, TENANT, P),
        (LIST_NODES, ADMIN, OK),
    ],
)
async def test_auth_matrix(secured: str, method: str, token: str | None, code: Any) -> None:
    request = b""  # a valid (empty) message of every request type
    async with grpc.aio.insecure_channel(secured) as channel:
        assert await _code(channel, method, request, _md(token)) is code


async def test_bad_token_metadata_forms_are_unauthenticated(secured: str) -> None:
    async with grpc.aio.insecure_channel(secured) as channel:
        for metadata in (
            (("authorization", TENANT),),
            (("authorization", f"Basic {TENANT}"),),
            (("authorization", f"Bearer {TENANT}"), ("authorization", f"Bearer {TENANT}")),
        ):
            assert await _code(channel, GET_JOB, b"", metadata) is U


async def test_health_stays_open(secured: str) -> None:
    async with grpc.aio.insecure_channel(secured) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_unauthenticated_gets_no_leader_hint(secured: str) -> None:
    async with grpc.aio.insecure_channel(secured) as channel:
        call: Any = channel.unary_unary(GET_JOB)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"", timeout=5)
        assert info.value.details() == "missing or invalid API token"
        keys = [k for k, _ in (info.value.trailing_metadata() or ())]
        assert "mailers-leader" not in keys


async def test_sdk_maps_auth_codes_to_auth_error(secured: str) -> None:
    for token in (None, "wrong", TENANT):
        async with MailerClient([secured], token=token) as client:
            with pytest.raises(AuthError) as info:
                await client.list_nodes(timeout=timedelta(seconds=5))
            expected = P if token == TENANT else U
            assert info.value.code is expected


def test_sdk_refuses_a_malformed_token() -> None:
    with pytest.raises(ValueError, match="token must be"):
        MailerClient(["127.0.0.1:1"], token="two words")


# ---- invalid UTF-8 ----------------------------------------------------------------------

# GetJobRequest.job_id (field 1, string) holding the bytes ff fe: not UTF-8.
BAD_UTF8 = b"\x0a\x02\xff\xfe"


@pytest.mark.parametrize("auth", [None, "on"])
async def test_invalid_utf8_is_invalid_argument_not_internal(auth: str | None) -> None:
    server, address = await _serve(_LeaderlessRole(), _auth() if auth else None)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            for method in (GET_JOB, SUBMIT):
                call: Any = channel.unary_unary(method)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(BAD_UTF8, metadata=_md(TENANT), timeout=5)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == UNDECODABLE_MESSAGE
            # A server-streaming method too
            watch: Any = channel.unary_stream("/mailer.v1.MailerService/WatchJob")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in watch(BAD_UTF8, metadata=_md(TENANT), timeout=5):
                    pass
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)


async def test_invalid_utf8_in_an_upload_stream_is_invalid_argument() -> None:
    server, address = await _serve(_StreamReadingRole(), None)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            upload: Any = channel.stream_unary("/mailer.v1.MailerService/UploadJob")

            async def messages() -> AsyncIterator[bytes]:
                # UploadJobRequest.header (1) with idempotency_key (2) = bytes ff fe.
                yield b"\x0a\x04\x12\x02\xff\xfe"

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await upload(messages(), timeout=5)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == UNDECODABLE_MESSAGE
    finally:
        await server.stop(None)


async def test_unauthenticated_invalid_utf8_is_unauthenticated() -> None:
    # The edge checks the token before parsing anything.
    server, address = await _serve(_LeaderlessRole(), _auth())
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            assert await _code(channel, GET_JOB, BAD_UTF8, ()) is U
    finally:
        await server.stop(None)


# ---- RetryInfo ----------------------------------------------------------------------------


async def test_retry_info_reaches_the_sdk() -> None:
    async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort_with_status(
            retry_info_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota: full", 42.5)
        )
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                raw: Any = channel.unary_unary("/t.T/M")
                await raw(b"", timeout=5)
        exc = info.value
        error = error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
        assert isinstance(error, ResourceExhaustedError)
        assert error.details == "quota: full"
        assert error.retry_after == timedelta(seconds=42.5)
    finally:
        await server.stop(None)


async def test_requests_over_the_receive_limit_are_refused() -> None:
    # Given the server's deliberate 8 MiB receive limit (CoordinatorConfig.max_message_bytes)
    server, address = await _serve(_LeaderlessRole(), None)
    try:
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            call: Any = channel.unary_unary(SUBMIT)
            # When a 9 MiB request arrives (field 2, idempotency_key, 9 MiB long)
            size = 9 * 1024 * 1024
            body = b"\x12" + _varint(size) + b"k" * size
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(body, timeout=10)
            # Then grpc refuses it before any handler runs
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
