"""TLS on every hop between Mailers processes and to etcd: files, settings, credentials.

- SDK/CLI → coordinator: TLS with the coordinator's certificate, and a client
  certificate signed by the CA unless the coordinator sets ``MAILER_TLS_CLIENT_AUTH=none``
  (then tenant tokens alone say who calls; they always decide what a caller may do).
- coordinator → node (``SenderService.Dispatch``): mutual TLS. The coordinator presents
  its certificate as a client certificate and checks the node's against the CA; the
  node requires a client certificate from the CA naming an allowed peer
  (``mailers-coordinator`` by default), so only coordinators can stream batches to it.
- every process → etcd: the same kind of files (``MAILER_ETCD_*``, see
  ``mailers_runtime.etcd``); the certificate's CN is the etcd user.

One type names the files, :class:`TlsFiles`, for gRPC and etcd alike; one type reads
them and builds every gRPC credential, :class:`TlsMaterial`. :class:`TlsConfig` is a
process's gRPC transport setting (its variables are declared on its fields; see
``deploy/CONFIG.md``), :class:`Transport` the transport it chose, loaded.

Plaintext is never a default: a coordinator or node given neither the three TLS files
nor ``MAILER_PLAINTEXT=1`` refuses to start (:meth:`Transport.load` raises
:class:`TlsConfigError`). Files are read once, at start; errors name the file and never
show its contents.
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

from mailers_runtime import settings
from mailers_runtime.errors import ConfigError

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
FILE_FIELDS = ("ca_file", "cert_file", "key_file")
"""The fields of :class:`TlsFiles` that name files: all three or none."""
ETCD_TLS_VARIABLES: Mapping[str, str] = {
    "ca_file": "MAILER_ETCD_CA",
    "cert_file": "MAILER_ETCD_CERT",
    "key_file": "MAILER_ETCD_KEY",
    "server_name": "MAILER_ETCD_SERVER_NAME",
}
"""The variables of etcd's :class:`TlsFiles`, by field (declared by
``mailers_runtime.etcd.tls_setting``)."""

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class TlsConfigError(ConfigError):
    """A TLS setting is missing, contradictory or unusable (a file cannot be read)."""


class ClientAuth(enum.Enum):
    """Whether a server asks its clients for a certificate."""

    REQUIRE = "require"
    """A certificate signed by the CA is required (mutual TLS)."""
    NONE = "none"
    """No certificate is asked for: server-authenticated TLS only."""


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one TLS identity, for gRPC and etcd alike (nothing read yet).

    The certificate serves as server certificate and, when dialing, as client
    certificate; towards an etcd with ``--client-cert-auth`` its common name is the etcd
    user. Read them with :meth:`TlsMaterial.load`.
    """

    ca_file: Path
    """CA certificate(s) (PEM) the peers' certificates must chain to."""
    cert_file: Path
    """This process's certificate (chain, PEM): served, and presented when dialing; for
    etcd its CN is the etcd user."""
    key_file: Path
    """The private key of the certificate (PEM, unencrypted); never logged."""
    server_name: str | None = None
    """The name checked in the certificates of the servers dialed, when it is not the
    host dialed (peers dialed by IP address: Kubernetes pods, etcd members sharing a DNS
    SAN); None checks the host (for etcd, the first endpoint's)."""

    def __post_init__(self) -> None:
        for field in FILE_FIELDS:
            if not str(getattr(self, field)):
                raise TlsConfigError(f"TlsFiles.{field} is empty")
        if self.server_name is not None and not self.server_name.strip():
            raise TlsConfigError("TlsFiles.server_name is empty; use None for the default")

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> TlsFiles:
        """``ca.crt`` and ``<name>.crt``/``<name>.key`` in ``directory``: the layout of
        ``mailers_dev.certs.make_dev_pki`` (e.g. name ``node-n1``, ``coordinator``,
        ``etcd-root``)."""
        return cls(directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key")

    def env(self, variables: Mapping[str, str] = ETCD_TLS_VARIABLES) -> dict[str, str]:
        """The variables (etcd's by default) that a process reads back into equal files."""
        values = {field: getattr(self, field) for field in variables}
        return {variables[field]: str(v) for field, v in values.items() if v is not None}


def _client_names(raw: str) -> tuple[str, ...]:
    return () if raw == "*" else settings.listed(raw)


@settings.config
class TlsConfig:
    """A process's gRPC transport setting (file paths and policy; nothing read yet).

    The default (no files, ``plaintext`` False) is valid as a value but not as a choice:
    :meth:`Transport.load` refuses it.
    """

    files: TlsFiles | None = settings.nested(
        TlsFiles,
        default=None,
        optional=True,
        # The name only matters for dialing over TLS; alone (plaintext) it is ignored.
        alone_ignored=("server_name",),
        ca_file=settings.Variable("MAILER_TLS_CA", settings.path),
        cert_file=settings.Variable("MAILER_TLS_CERT", settings.path),
        key_file=settings.Variable("MAILER_TLS_KEY", settings.path),
        server_name=settings.Variable("MAILER_TLS_SERVER_NAME"),
    )
    """The CA, certificate and key of the gRPC servers and channels (all three or none);
    the server name is checked in the certificates of the servers this process dials (a
    coordinator: the nodes'), for peers dialed by IP address."""
    client_auth: ClientAuth = settings.setting(
        "MAILER_TLS_CLIENT_AUTH", default=ClientAuth.REQUIRE, parse=settings.choice(ClientAuth)
    )
    """``require``: clients need a certificate from the CA (mutual TLS); ``none``: TLS
    without one, tenant tokens only (coordinators only: nodes always require one)."""
    allowed_clients: tuple[str, ...] = settings.setting(
        "MAILER_TLS_ALLOWED_CLIENTS", default=(), parse=_client_names
    )
    """Names a client certificate must carry (CN or DNS SAN), one of them; empty (or
    ``*``) accepts any certificate from the CA."""
    plaintext: bool = settings.setting("MAILER_PLAINTEXT", default=False, parse=settings.boolean)
    """Run gRPC without TLS, explicitly; local development only. With neither this nor
    the TLS files a coordinator or node refuses to start."""

    def __post_init__(self) -> None:
        if self.plaintext and self.files is not None:
            raise TlsConfigError(
                "MAILER_PLAINTEXT=1 and MAILER_TLS_CA, MAILER_TLS_CERT, MAILER_TLS_KEY are "
                "both set: choose TLS or plaintext"
            )
        if any(not name or "," in name or name != name.strip() for name in self.allowed_clients):
            raise TlsConfigError(f"MAILER_TLS_ALLOWED_CLIENTS: bad name in {self.allowed_clients}")

    @property
    def enabled(self) -> bool:
        """True when the TLS files are given."""
        return self.files is not None

    @property
    def server_name(self) -> str:
        """The name checked in dialed servers' certificates; "" for the host dialed."""
        return (self.files.server_name or "") if self.files is not None else ""


# ---- loading ---------------------------------------------------------------------------


def _read(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{label}={path}: cannot read: {exc.strerror or exc}") from None


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
    """The PEM bytes of a :class:`TlsFiles`, read and checked once; the one place gRPC
    credentials are built from (servers, channels and etcd clients alike)."""

    ca: bytes = dataclasses.field(repr=False)
    cert_chain: bytes = dataclasses.field(repr=False)
    key: bytes = dataclasses.field(repr=False)
    common_name: str = ""
    """CN of the process's own certificate (for logs)."""

    @classmethod
    def load(cls, files: TlsFiles, labels: Mapping[str, str] | None = None) -> TlsMaterial:
        """Read and check the three files.

        Args:
            files: What to read.
            labels: How error messages name each file field (its variable, e.g.
                ``MAILER_TLS_CERT``); the field name when omitted.

        Raises:
            TlsConfigError: a file cannot be read or holds no usable PEM data, or the
                key does not belong to the certificate. The message names the file and
                never includes its contents.
        """
        ca_label, cert_label, key_label = (
            (labels or {}).get(field, field) for field in FILE_FIELDS
        )
        ca = _read(files.ca_file, ca_label)
        chain = _read(files.cert_file, cert_label)
        key_pem = _read(files.key_file, key_label)
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise TlsConfigError(f"{ca_label}={files.ca_file}: no PEM certificate in it") from None
        try:
            cert = x509.load_pem_x509_certificates(chain)[0]
        except ValueError:
            raise TlsConfigError(
                f"{cert_label}={files.cert_file}: no PEM certificate in it"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            # Never chain the parser's error: it could quote the file.
            raise TlsConfigError(
                f"{key_label}={files.key_file}: not an unencrypted PEM private key"
            ) from None
        if _public(key.public_key()) != _public(cert.public_key()):
            raise TlsConfigError(
                f"{key_label}={files.key_file} is not the key of the certificate in "
                f"{cert_label}={files.cert_file}"
            )
        return cls(ca=ca, cert_chain=chain, key=key_pem, common_name=_common_name(cert))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a channel: trust the CA, present this certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert_chain
        )

    def server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """Credentials of a server port: serve this certificate; with
        ``require_client_cert``, accept only clients with a certificate from the CA."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert_chain)],
            root_certificates=self.ca,
            require_client_auth=require_client_cert,
        )


def name_override(server_name: str | None) -> list[tuple[str, Any]]:
    """The channel argument that checks ``server_name`` in the server's certificate
    instead of the host dialed (none for None or "")."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


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
        if config.files is None:
            raise TlsConfigError(f"no transport security chosen: {PLAINTEXT_HINT}")
        labels = settings.variable_names(TlsConfig, "files")
        material = TlsMaterial.load(config.files, labels)
        return cls(config, material, material.channel_credentials())

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

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``address`` on ``server`` with this transport; returns the bound port.

        Client certificates are required unless ``client_auth`` is ``none``.
        """
        if self.material is None:
            return server.add_insecure_port(address)
        require = self.config.client_auth is ClientAuth.REQUIRE
        return server.add_secure_port(
            address, self.material.server_credentials(require_client_cert=require)
        )

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
        if self.material is None:
            return []
        return name_override(self.config.server_name)

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
