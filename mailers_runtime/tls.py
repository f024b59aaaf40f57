"""TLS on every gRPC hop between Mailers processes: settings, loading, credentials.

- SDK/CLI → coordinator: TLS with the coordinator's certificate, and a client
  certificate signed by the CA unless the coordinator sets ``MAILER_TLS_CLIENT_AUTH=none``
  (then tenant tokens alone say who calls; they always decide what a caller may do).
- coordinator → node (``SenderService.Dispatch``): mutual TLS. The coordinator presents
  its certificate as a client certificate and checks the node's against the CA; the
  node requires a client certificate from the CA naming an allowed peer
  (``mailers-coordinator`` by default), so only coordinators can stream batches to it.

Plaintext is never a default: a coordinator or node given neither the three TLS files
(``MAILER_TLS_CA``, ``_CERT``, ``_KEY``) nor ``MAILER_PLAINTEXT=1`` refuses to start
(:meth:`Transport.load` raises :class:`TlsConfigError`).

Variables (read by :func:`from_env`, for both processes):

- ``MAILER_TLS_CA``, ``MAILER_TLS_CERT``, ``MAILER_TLS_KEY``: PEM files of the CA
  bundle trusted for peers, this process's certificate (chain) and its private key. The
  certificate serves both as server certificate and, when dialing, client certificate.
- ``MAILER_TLS_CLIENT_AUTH`` [``require``]: coordinators only; ``none`` serves TLS
  without asking clients for a certificate. Nodes always require one.
- ``MAILER_TLS_ALLOWED_CLIENTS`` [nodes: ``mailers-coordinator``; coordinators: any]:
  comma-separated names; a client certificate must carry one as its CN or a DNS SAN
  (``*``: any certificate from the CA).
- ``MAILER_TLS_SERVER_NAME`` [the host of the address dialed]: the name checked in the
  certificates of the servers this process dials (a coordinator: the nodes), for peers
  dialed by IP address whose certificates name a service (e.g. Kubernetes pod IPs).
- ``MAILER_PLAINTEXT`` [off]: ``1`` runs without TLS (local development only).

Files are read once, at start; errors name the file and never show its contents.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

COORDINATOR_NAME = "mailers-coordinator"
"""The common name of coordinator certificates (``mailers certs``), which nodes accept
by default."""
HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Calls the client-certificate name check never refuses: probes present whatever
certificate their container has, and health says nothing secret."""
PLAINTEXT_HINT = (
    "set MAILER_TLS_CA, MAILER_TLS_CERT and MAILER_TLS_KEY "
    "(`mailers certs DIR` makes a development CA and certificates), "
    "or MAILER_PLAINTEXT=1 for local development"
)

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class TlsConfigError(ValueError):
    """A TLS setting is missing, contradictory or unusable (a file cannot be read)."""


class ClientAuth(enum.Enum):
    """Whether a server asks its clients for a certificate."""

    REQUIRE = "require"
    """A certificate signed by the CA is required (mutual TLS)."""
    NONE = "none"
    """No certificate is asked for: server-authenticated TLS only."""


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS settings of a process (file paths and policy; nothing read yet).

    The default (no files, ``plaintext`` False) is valid as a value but not as a choice:
    :meth:`Transport.load` refuses it.
    """

    ca_file: str = ""
    """PEM CA certificate(s) peers' certificates must chain to (MAILER_TLS_CA)."""
    cert_file: str = ""
    """PEM certificate (chain) of this process, server and client (MAILER_TLS_CERT)."""
    key_file: str = ""
    """PEM private key of cert_file, unencrypted (MAILER_TLS_KEY)."""
    client_auth: ClientAuth = ClientAuth.REQUIRE
    """``require``: clients need a certificate from the CA; ``none``: TLS without one
    (MAILER_TLS_CLIENT_AUTH)."""
    allowed_clients: tuple[str, ...] = ()
    """Names a client certificate must carry (CN or DNS SAN), one of them; empty
    accepts any certificate from the CA (MAILER_TLS_ALLOWED_CLIENTS)."""
    server_name: str = ""
    """Name checked in the certificates of servers this process dials; empty checks the
    host of the dialed address (MAILER_TLS_SERVER_NAME)."""
    plaintext: bool = False
    """Run without TLS, explicitly (MAILER_PLAINTEXT=1); local development only."""

    def __post_init__(self) -> None:
        files = {
            "MAILER_TLS_CA": self.ca_file,
            "MAILER_TLS_CERT": self.cert_file,
            "MAILER_TLS_KEY": self.key_file,
        }
        given = [name for name, value in files.items() if value]
        if self.plaintext and given:
            raise TlsConfigError(
                f"MAILER_PLAINTEXT=1 and {', '.join(given)} are both set: choose TLS or plaintext"
            )
        if given and len(given) < len(files):
            missing = [name for name in files if name not in given]
            raise TlsConfigError(
                f"{', '.join(given)} set but {', '.join(missing)} missing: "
                "TLS needs all of MAILER_TLS_CA, MAILER_TLS_CERT and MAILER_TLS_KEY"
            )
        if any(not name or "," in name or name != name.strip() for name in self.allowed_clients):
            raise TlsConfigError(f"MAILER_TLS_ALLOWED_CLIENTS: bad name in {self.allowed_clients}")

    @property
    def enabled(self) -> bool:
        """True when the TLS files are given."""
        return bool(self.ca_file)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise TlsConfigError(f"{name}={raw!r}: expected 1 or 0")


def from_env(
    environ: Mapping[str, str],
    *,
    default_allowed_clients: tuple[str, ...] = (),
    require_client_cert: bool = False,
) -> TlsConfig:
    """The TLS settings in ``MAILER_TLS_CA``... and ``MAILER_PLAINTEXT`` (see the module doc).

    Args:
        environ: Usually ``os.environ``.
        default_allowed_clients: Names accepted when MAILER_TLS_ALLOWED_CLIENTS is unset.
        require_client_cert: The process always requires client certificates
            (nodes); MAILER_TLS_CLIENT_AUTH=none is then an error.

    Raises:
        TlsConfigError: a malformed or contradictory value. Giving neither TLS nor
            plaintext is not an error here (it is when the process starts).
    """
    raw_auth = environ.get("MAILER_TLS_CLIENT_AUTH", "").strip().lower() or "require"
    try:
        client_auth = ClientAuth(raw_auth)
    except ValueError:
        raise TlsConfigError(
            f"MAILER_TLS_CLIENT_AUTH={raw_auth!r}: expected require or none"
        ) from None
    if require_client_cert and client_auth is not ClientAuth.REQUIRE:
        raise TlsConfigError(
            "MAILER_TLS_CLIENT_AUTH=none: sender nodes always require client certificates"
        )
    raw_allowed = environ.get("MAILER_TLS_ALLOWED_CLIENTS", "").strip()
    if not raw_allowed:
        allowed = default_allowed_clients
    elif raw_allowed == "*":
        allowed = ()
    else:
        allowed = tuple(name.strip() for name in raw_allowed.split(",") if name.strip())
    return TlsConfig(
        ca_file=environ.get("MAILER_TLS_CA", "").strip(),
        cert_file=environ.get("MAILER_TLS_CERT", "").strip(),
        key_file=environ.get("MAILER_TLS_KEY", "").strip(),
        client_auth=client_auth,
        allowed_clients=allowed,
        server_name=environ.get("MAILER_TLS_SERVER_NAME", "").strip(),
        plaintext=_flag(environ, "MAILER_PLAINTEXT"),
    )


def coordinator_from_env(environ: Mapping[str, str]) -> TlsConfig:
    """A coordinator's TLS settings: any client certificate from the CA by default."""
    return from_env(environ)


def node_from_env(environ: Mapping[str, str]) -> TlsConfig:
    """A sender node's TLS settings: client certificates required, coordinators' only."""
    return from_env(environ, default_allowed_clients=(COORDINATOR_NAME,), require_client_cert=True)


# ---- loading ---------------------------------------------------------------------------


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{variable}={path}: cannot read: {exc.strerror or exc}") from None


def _public(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclasses.dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of a process's TLS files, read and checked once."""

    ca: bytes = dataclasses.field(repr=False)
    cert_chain: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)
    common_name: str = ""
    """CN of the process's own certificate (for logs)."""

    @classmethod
    def load(cls, config: TlsConfig) -> TlsMaterial:
        """Read and check the three files of ``config``.

        Raises:
            TlsConfigError: a file cannot be read or holds no usable PEM data, or the
                key does not belong to the certificate. The message names the file and
                never includes its contents.
        """
        ca = _read(config.ca_file, "MAILER_TLS_CA")
        chain = _read(config.cert_file, "MAILER_TLS_CERT")
        key_pem = _read(config.key_file, "MAILER_TLS_KEY")
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise TlsConfigError(
                f"MAILER_TLS_CA={config.ca_file}: no PEM certificate in it"
            ) from None
        try:
            cert = x509.load_pem_x509_certificates(chain)[0]
        except ValueError:
            raise TlsConfigError(
                f"MAILER_TLS_CERT={config.cert_file}: no PEM certificate in it"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            # Never chain the parser's error: it could quote the file.
            raise TlsConfigError(
                f"MAILER_TLS_KEY={config.key_file}: not an unencrypted PEM private key"
            ) from None
        if _public(key.public_key()) != _public(cert.public_key()):
            raise TlsConfigError(
                f"MAILER_TLS_KEY={config.key_file} is not the key of the certificate in "
                f"MAILER_TLS_CERT={config.cert_file}"
            )
        return cls(ca=ca, cert_chain=chain, key=key_pem, common_name=_common_name(cert))


# ---- the transport of a process ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transport:
    """How one process's gRPC servers listen and its channels dial: TLS, or plaintext.

    Make it with :meth:`load` at start; credentials are built once and shared by every
    server port and channel.
    """

    config: TlsConfig
    material: TlsMaterial | None
    """None: plaintext, chosen explicitly."""
    _channel_credentials: grpc.ChannelCredentials | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def load(cls, config: TlsConfig) -> Transport:
        """The transport ``config`` chooses, with its files read.

        Raises:
            TlsConfigError: neither TLS nor plaintext was chosen, or a file is unusable.
        """
        if config.plaintext:
            return cls(config, None)
        if not config.enabled:
            raise TlsConfigError(f"no transport security chosen: {PLAINTEXT_HINT}")
        material = TlsMaterial.load(config)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=material.ca,
            private_key=material.key,
            certificate_chain=material.cert_chain,
        )
        return cls(config, material, credentials)

    @property
    def plaintext(self) -> bool:
        return self.material is None

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.material is None:
            return "PLAINTEXT (MAILER_PLAINTEXT=1): local development only"
        allowed = ", ".join(self.config.allowed_clients) or "any from the CA"
        if self.config.client_auth is ClientAuth.NONE:
            clients = "no client certificate asked"
        else:
            clients = f"client certificates required ({allowed})"
        return f"TLS as {self.material.common_name or '?'}; {clients}"

    def server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """Credentials of a TLS server port (not for plaintext)."""
        assert self.material is not None, "plaintext has no server credentials"
        return grpc.ssl_server_credentials(
            [(self.material.key, self.material.cert_chain)],
            root_certificates=self.material.ca,
            require_client_auth=require_client_cert,
        )

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``address`` on ``server`` with this transport; returns the bound port.

        Client certificates are required unless ``client_auth`` is ``none``.
        """
        if self.material is None:
            return server.add_insecure_port(address)
        require = self.config.client_auth is ClientAuth.REQUIRE
        return server.add_secure_port(address, self.server_credentials(require_client_cert=require))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The client-certificate name check, when TLS requires certificates and names."""
        if (
            self.material is None
            or self.config.client_auth is not ClientAuth.REQUIRE
            or not self.config.allowed_clients
        ):
            return []
        return [PeerNameCheck(self.config.allowed_clients)]

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments this transport adds (the server-name override)."""
        if self.material is None or not self.config.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.config.server_name)]

    def aio_channel(
        self, address: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """A channel to ``address``: TLS with this process's certificate, or plaintext."""
        if self.material is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        assert self._channel_credentials is not None
        return grpc.aio.secure_channel(
            address, self._channel_credentials, options=[*options, *self.channel_options()]
        )


# ---- who the client is ----------------------------------------------------------------------


def peer_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The names of a peer's verified certificate: its CN, then its DNS SANs. Pure.

    IP-address SANs are left out: many server certificates list 127.0.0.1, which would
    make any of them pass for a name.
    """
    names: list[str] = []
    for key in ("x509_common_name", "peer_dns"):
        for value in auth_context.get(key, ()):
            name = value.decode("utf-8", "replace")
            if name not in names:
                names.append(name)
    return names


def refusal(names: Sequence[str], allowed: Iterable[str]) -> str:
    """Why a peer with ``names`` is refused, or "" when one is allowed. Pure."""
    allowed_set = set(allowed)
    if any(name in allowed_set for name in names):
        return ""
    shown = ", ".join(names) if names else "no name"
    return (
        f"client certificate ({shown}) is not one of {', '.join(sorted(allowed_set))} "
        "(MAILER_TLS_ALLOWED_CLIENTS)"
    )


class PeerNameCheck(grpc.aio.ServerInterceptor):
    """Refuses calls whose client certificate names none of ``allowed``.

    The answer is PERMISSION_DENIED, before the handler reads anything: the TLS handshake
    already proved the certificate comes from the CA; this says which of the CA's
    certificates may call (a node: only coordinators, not SDK clients). Health checks
    pass unchecked (see :data:`HEALTH_PREFIX`).
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = frozenset(allowed)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        result: grpc.RpcMethodHandler[_Req, _Resp] = _guarded(
            handler, handler_call_details.method, self._check
        )
        return result

    def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        return refusal(peer_names(context.auth_context()), self._allowed)


def _guarded(
    handler: Handler, method: str, check: Callable[[grpc.aio.ServicerContext[Any, Any]], str]
) -> Handler:
    """``handler`` with ``check`` run first; a non-empty answer aborts the call."""

    async def enforce(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        why = check(context)
        if why:
            log.warning("refused %s from %s: %s", method, context.peer(), why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    def streaming(inner: Callable[..., Any]) -> Callable[..., Any]:
        # An async-generator handler stays one, a context.write() handler a coroutine:
        # grpc.aio serves each kind differently.
        if inspect.isasyncgenfunction(inner):

            async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
                await enforce(context)
                async for response in inner(request, context):
                    yield response

            return gen

        async def coro(request: Any, context: Any) -> Any:
            await enforce(context)
            return await inner(request, context)

        return coro

    def unary(inner: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Any) -> Any:
            await enforce(context)
            return await inner(request, context)

        return call

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **codecs)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **codecs)
