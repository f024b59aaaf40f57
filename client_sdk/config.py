"""How a client reaches the coordinators: its settings, TLS, token metadata and channel options.

Shared by :class:`client_sdk.MailerClient` and :class:`client_sdk.SyncMailerClient`;
nothing here dials. Settings are frozen dataclasses validated on construction; TLS
files are read once, when :meth:`ClientTls.from_files` is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc

from client_sdk.retry import RetryPolicy


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Settings of a client; every field has a default that suits a local cluster."""

    retry: RetryPolicy = RetryPolicy()
    """Backoff and limits for leader discovery and UNAVAILABLE retries."""
    default_timeout: timedelta = timedelta(seconds=30)
    """Deadline of a call, retries included, when the caller gives none."""
    submit_timeout: timedelta = timedelta(minutes=10)
    """Deadline of a submit or upload when the caller gives none."""
    drain_timeout: timedelta = timedelta(minutes=10)
    """Deadline of a node drain, which waits for the node's batches."""
    watch_stream_timeout: timedelta = timedelta(seconds=60)
    """A watch, or an event subscription, re-opens its stream this often, so a leader
    that stepped down without ending it is noticed."""
    keepalive_time: timedelta = timedelta(seconds=10)
    """HTTP/2 keepalive ping interval while calls are active."""
    keepalive_timeout: timedelta = timedelta(seconds=5)
    """A connection whose ping is unanswered this long is closed."""
    inline_submit_max: int = 1000
    """Jobs with at most this many recipients go in one SubmitJob; larger ones stream."""
    inline_submit_max_bytes: int = 2 * 1024 * 1024
    """Jobs whose recipients encode larger than this stream even when few."""
    upload_chunk_size: int = 500
    """Recipients per upload message."""
    upload_chunk_max_bytes: int = 1024 * 1024
    """An upload message is closed early when its recipients reach this size."""
    page_size: int = 500
    """Page size of the iterating listings."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest message the client sends or receives."""

    def __post_init__(self) -> None:
        for name in ("default_timeout", "submit_timeout", "drain_timeout", "watch_stream_timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        if self.upload_chunk_size < 1 or self.inline_submit_max < 0:
            raise ValueError("upload_chunk_size must be positive, inline_submit_max not negative")
        if self.page_size < 1:
            raise ValueError("page_size must be at least 1")


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """Coordinator addresses from a list or a comma-separated ``host:port,host:port`` string."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    result = [a.strip() for a in items if a.strip()]
    if not result:
        raise ValueError("at least one coordinator address is required")
    return result


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """TLS for a client's channels to the coordinators (every one, redirects included).

    A cluster started with TLS (``MAILER_TLS_CA``...) refuses plaintext clients, and one
    whose coordinators require client certificates (their default) refuses clients
    without a certificate from its CA: both fail with UNAVAILABLE (the handshake fails).
    Without ``tls`` a client dials in plaintext, which suits only a cluster started
    with ``MAILER_PLAINTEXT=1``.
    """

    root_certificates: bytes | None = dataclasses.field(default=None, repr=False)
    """PEM of the CA(s) coordinator certificates chain to; None trusts the system's."""
    certificate_chain: bytes | None = dataclasses.field(default=None, repr=False)
    """PEM client certificate (chain), for coordinators that require one."""
    private_key: bytes | None = dataclasses.field(default=None, repr=False)
    """PEM private key of ``certificate_chain``."""
    server_name: str = ""
    """Name checked in coordinators' certificates instead of the host of each address
    (for coordinators dialed by IP whose certificates name a service)."""

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key go together")

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        *,
        server_name: str = "",
    ) -> ClientTls:
        """Read the PEM files once, now.

        Args:
            ca_file: The CA bundle; None trusts the system's roots.
            cert_file: The client certificate; with ``key_file`` or not at all.
            key_file: Its private key.
            server_name: See :attr:`server_name`.

        Raises:
            ValueError: a file cannot be read or holds no PEM data (the message names
                the file, never its contents), or only one of cert_file and key_file.
        """
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        return cls(
            root_certificates=_read_pem(ca_file, "CA file") if ca_file else None,
            certificate_chain=_read_pem(cert_file, "certificate file") if cert_file else None,
            private_key=_read_pem(key_file, "key file") if key_file else None,
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials of these settings."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments these settings add (the server-name override)."""
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"TLS {what} {path}: cannot read: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} {path}: no PEM data in it")
    return data


AUTH_METADATA_KEY = "authorization"
"""Metadata key carrying ``Bearer <token>``."""


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates with token (empty for None).

    Raises:
        ValueError: the token is empty or holds whitespace or control characters
            (the message never includes it).
    """
    if token is None:
        return ()
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be non-empty printable text without spaces")
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def channel_options(config: ClientConfig) -> list[tuple[str, Any]]:
    """gRPC channel arguments for a coordinator channel.

    No service-config retry policy: a per-channel retry cannot move to another
    coordinator, so the SDK retries itself, once, at the call level.
    """
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_time.total_seconds() * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout.total_seconds() * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # A restarted coordinator should be reachable again quickly.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]


C = TypeVar("C")


def resolve_channel_factory(
    config: ClientConfig,
    tls: ClientTls | None,
    given: Callable[[str], C] | None,
    *,
    insecure: Callable[..., C],
    secure: Callable[..., C],
) -> Callable[[str], C]:
    """How a client makes the channel to an address.

    ``given`` when the caller passed one; otherwise ``secure`` with ``tls``'s
    credentials (made once, now) or, without ``tls``, ``insecure``, both with
    :func:`channel_options`. The async client passes ``grpc.aio``'s channel
    constructors, the blocking one ``grpc``'s.

    Raises:
        ValueError: both ``tls`` and ``given`` are set.
    """
    if tls is not None and given is not None:
        raise ValueError("give tls or channel_factory, not both")
    if given is not None:
        return given
    options = channel_options(config)
    if tls is None:
        return lambda address: insecure(address, options=options)
    credentials = tls.credentials()
    tls_options = [*options, *tls.channel_options()]
    return lambda address: secure(address, credentials, options=tls_options)
