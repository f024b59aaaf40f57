"""The coordinator's gRPC edge: who may call, and requests that do not parse.

:class:`AuthInterceptor` checks the ``authorization: Bearer <token>`` metadata of
every MailerService and AdminService call before any handler (so before the leader
check: a standby never redirects an unauthenticated caller). Health and reflection
stay open for probes and tools.

:func:`add_service` registers a generated servicer with request deserializers that
turn a protobuf ``DecodeError`` (notably a ``string`` field holding invalid UTF-8)
into INVALID_ARGUMENT; grpc's own handling of a failing deserializer answers
INTERNAL, which would tell a client the server is at fault.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from coordinator.auth import AuthConfig, Principal
from coordinator.validation import ValidationError

log = logging.getLogger(__name__)

CLIENT_API = "mailer.v1.MailerService"
ADMIN_API = "mailer.v1.AdminService"
UNAUTHENTICATED_MESSAGE = "missing or invalid API token"
ADMIN_ONLY_MESSAGE = "this call needs an admin token"
TENANT_ONLY_MESSAGE = "submitting needs a tenant token"
UNDECODABLE_PROBLEM = "is not a valid message (string fields must be UTF-8)"
UNDECODABLE_MESSAGE = f"request: {UNDECODABLE_PROBLEM}"
_SUBMIT_METHODS = frozenset(
    f"/{CLIENT_API}/{m}" for m in ("SubmitJob", "UploadJob")
)  # fmt: skip

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _rejecting(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of handler's kind that answers code without reading the request."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    # No deserializer: an unauthenticated caller's bytes are never parsed.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


def authorize(auth: AuthConfig, method: str, metadata: Any) -> tuple[Principal | None, str]:
    """Who the call is from and why it is refused ("" when allowed); no I/O.

    Returns:
        (principal, refusal): principal None means UNAUTHENTICATED; a non-empty
        refusal with a principal means PERMISSION_DENIED.
    """
    principal = auth.identify(metadata or ())
    if principal is None:
        return None, UNAUTHENTICATED_MESSAGE
    service = method.split("/")[1] if method.count("/") >= 2 else ""
    if service == ADMIN_API and not principal.admin:
        return principal, ADMIN_ONLY_MESSAGE
    if method in _SUBMIT_METHODS and not principal.tenant:
        return principal, TENANT_ONLY_MESSAGE
    return principal, ""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses MailerService and AdminService calls without a valid token.

    Missing or unknown token → UNAUTHENTICATED; a tenant token on the admin API, or
    an admin token on a submit → PERMISSION_DENIED. Never logs a token.
    """

    def __init__(self, auth: AuthConfig) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        method = handler_call_details.method
        if not method.startswith((f"/{CLIENT_API}/", f"/{ADMIN_API}/")):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        principal, refusal = authorize(self._auth, method, handler_call_details.invocation_metadata)
        if principal is None:
            log.debug("refused %s: %s", method, refusal)
            return _rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, refusal)
        if refusal:
            log.debug("refused %s for tenant %r: %s", method, principal.tenant, refusal)
            return _rejecting(handler, grpc.StatusCode.PERMISSION_DENIED, refusal)
        return handler


class Undecodable:
    """Stands for a request message that failed to parse."""


_UNDECODABLE = Undecodable()


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


def _guard(handler: Handler) -> Handler:
    """handler, answering INVALID_ARGUMENT for a request (or stream item) that did not parse."""
    if handler.request_streaming:
        if handler.stream_unary is None:
            raise NotImplementedError("stream-stream methods are not served by the coordinator")
        inner_su: Any = handler.stream_unary

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            # The servicer reads the stream inside its error mapping, so a bad item
            # surfaces there as INVALID_ARGUMENT and discards what was written.
            async for request in requests:
                if request is _UNDECODABLE:
                    raise ValidationError([("request", UNDECODABLE_PROBLEM)])
                yield request

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await inner_su(checked(aiter(requests)), context)

        return handler._replace(  # type: ignore[attr-defined,no-any-return]
            request_deserializer=_safe(handler.request_deserializer), stream_unary=stream_unary
        )

    if handler.response_streaming:
        inner_us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request is _UNDECODABLE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
            async for response in inner_us(request, context):
                yield response

        return handler._replace(  # type: ignore[attr-defined,no-any-return]
            request_deserializer=_safe(handler.request_deserializer), unary_stream=unary_stream
        )

    inner_uu: Any = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
        return await inner_uu(request, context)

    return handler._replace(  # type: ignore[attr-defined,no-any-return]
        request_deserializer=_safe(handler.request_deserializer), unary_unary=unary_unary
    )


class _Capture:
    """Stands in for a server to collect what a generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: Mapping[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self.service = service
        self.handlers = handlers


def add_service(
    server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any
) -> None:
    """Register servicer like the generated ``add_to_server``, with UTF-8-safe deserializers.

    Args:
        server: The server to register on.
        add_to_server: The generated ``add_XServiceServicer_to_server`` function.
        servicer: The servicer instance.
    """
    capture = _Capture()
    add_to_server(servicer, capture)
    handlers = {name: _guard(h) for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.service, handlers),)
    )
    server.add_registered_method_handlers(capture.service, handlers)
