"""Configuration of a sender node: frozen dataclasses read from ``MAILER_*`` variables.

The environment is read in exactly one place, :func:`from_env`, called only from
``__main__``; everything else receives a :class:`SenderConfig`.

Variables (defaults in brackets):

- ``MAILER_NODE_ID`` [``node-<hostname>-<pid>``]
- ``MAILER_LISTEN`` [``127.0.0.1:0``]: gRPC listen address; port 0 picks a free port.
- ``MAILER_ADVERTISE`` [the bound listen address]: what the coordinator dials.
- ``MAILER_ETCD_ENDPOINTS`` (required): ``host:port,host:port``.
- ``MAILER_ETCD_PREFIX`` [``/mailers``]
- ``MAILER_RELAYS`` (required): ``host:port,...`` SMTP relays, preferred first.
- ``MAILER_LEASE_TTL_S`` [5]
- ``MAILER_SMTP_CONNECTIONS`` [4]: persistent connections per relay.
- ``MAILER_CAPACITY`` [400]: recipients held at once.
- ``MAILER_SMTP_TIMEOUT_S`` [30]: deadline of every SMTP command.
- ``MAILER_DRAIN_TIMEOUT_S`` [10]: on SIGTERM, how long in-flight batches may finish.
- ``MAILER_METRICS_LISTEN`` [empty: off]: ``host:port`` of the Prometheus exporter.
- ``MAILER_LOG_LEVEL`` [``INFO``]; ``MAILER_LOG_FORMAT`` [``text``] or ``json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Mapping

from mailers.etcd import parse_endpoints
from sender_node.errors import ConfigError


def _split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {value!r} is not host:port")
    return host.strip("[]"), int(port)


def parse_relays(spec: str) -> tuple[str, ...]:
    """Split ``host:port,host:port`` into relay addresses, in order of preference.

    Raises:
        ConfigError: no relay, or an entry that is not ``host:port``.
    """
    relays = tuple(part.strip() for part in spec.split(",") if part.strip())
    if not relays:
        raise ConfigError("no SMTP relays given (MAILER_RELAYS)")
    for relay in relays:
        _split_hostport(relay, "relay")
    return relays


@dataclasses.dataclass(frozen=True)
class EtcdConfig:
    """Where and how the node registers."""

    endpoints: tuple[str, ...]
    """etcd client endpoints, ``host:port``; the client fails over across them."""
    prefix: str = "/mailers"
    """Key prefix shared by the cluster (see ``mailers.etcd.Keys``)."""
    lease_ttl_s: int = 5
    """TTL of the registration lease; the node is considered gone this long after it stops."""
    trust_margin_s: float = 1.0
    """The node stops sending this long before its lease could have expired."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("no etcd endpoints")
        if self.lease_ttl_s < 2:
            raise ConfigError("lease TTL must be at least 2 s")
        if not 0 <= self.trust_margin_s < self.lease_ttl_s / 2:
            raise ConfigError("trust margin must be below half the lease TTL")
        if not self.prefix.startswith("/"):
            raise ConfigError("etcd prefix must start with '/'")


@dataclasses.dataclass(frozen=True)
class SmtpConfig:
    """The relays a node sends through."""

    relays: tuple[str, ...]
    """``host:port`` of each relay; the first is preferred, the rest take over on failure."""
    connections_per_relay: int = 4
    """Persistent connections kept per relay; also the node's sending concurrency per relay."""
    timeout_s: float = 30.0
    """Deadline of each SMTP step (connect, MAIL, RCPT, DATA, end of data)."""
    helo_name: str = "localhost"
    """Name given in EHLO."""

    def __post_init__(self) -> None:
        if not self.relays:
            raise ConfigError("no SMTP relays")
        for relay in self.relays:
            _split_hostport(relay, "relay")
        if self.connections_per_relay < 1:
            raise ConfigError("MAILER_SMTP_CONNECTIONS must be at least 1")
        if self.timeout_s <= 0:
            raise ConfigError("MAILER_SMTP_TIMEOUT_S must be positive")


@dataclasses.dataclass(frozen=True)
class SenderConfig:
    """Everything a sender node process needs."""

    node_id: str
    """Stable name of the node; its registration key is ``nodes/<node_id>``."""
    listen: str
    """gRPC listen address ``host:port``; port 0 binds a free port."""
    etcd: EtcdConfig
    smtp: SmtpConfig
    advertise: str | None = None
    """Address the coordinator dials; ``None`` means the bound listen address."""
    capacity: int = 400
    """Recipients the node holds at once; batches beyond it are rejected."""
    metrics_listen: str = ""
    """host:port of the Prometheus exporter (``MAILER_METRICS_LISTEN``); empty disables it."""
    drain_timeout_s: float = 10.0
    """On SIGTERM, how long in-flight batches may run before they are dropped."""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.node_id or "/" in self.node_id:
            raise ConfigError(f"node id {self.node_id!r} must be non-empty without '/'")
        _split_hostport(self.listen, "MAILER_LISTEN")
        if self.advertise is not None:
            _split_hostport(self.advertise, "MAILER_ADVERTISE")
        if self.capacity < 1:
            raise ConfigError("MAILER_CAPACITY must be at least 1")
        if self.drain_timeout_s < 0:
            raise ConfigError("MAILER_DRAIN_TIMEOUT_S must not be negative")
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError(f"unknown log level {self.log_level!r}")


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _integer(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _required(environ: Mapping[str, str], name: str) -> str:
    raw = environ.get(name, "").strip()
    if not raw:
        raise ConfigError(f"{name} is required")
    return raw


def from_env(
    environ: Mapping[str, str],
    *,
    hostname: str | None = None,
    pid: int | None = None,
) -> SenderConfig:
    """Build the node's configuration from ``MAILER_*`` variables.

    Args:
        environ: Usually ``os.environ``.
        hostname: For the default node id; the machine's host name when omitted.
        pid: For the default node id; this process's id when omitted.

    Raises:
        ConfigError: a required variable is missing or a value is malformed.
    """
    host = hostname if hostname is not None else socket.gethostname()
    process_id = pid if pid is not None else os.getpid()
    try:
        etcd_endpoints = tuple(parse_endpoints(_required(environ, "MAILER_ETCD_ENDPOINTS")))
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"MAILER_ETCD_ENDPOINTS: {exc}") from None
    lease_ttl_s = _integer(environ, "MAILER_LEASE_TTL_S", 5)
    etcd = EtcdConfig(
        endpoints=etcd_endpoints,
        prefix=environ.get("MAILER_ETCD_PREFIX", "").strip() or "/mailers",
        lease_ttl_s=lease_ttl_s,
        # Short TTLs (tests, demos) get a proportionally shorter margin.
        trust_margin_s=min(1.0, lease_ttl_s / 4),
    )
    smtp = SmtpConfig(
        relays=parse_relays(_required(environ, "MAILER_RELAYS")),
        connections_per_relay=_integer(environ, "MAILER_SMTP_CONNECTIONS", 4),
        timeout_s=_number(environ, "MAILER_SMTP_TIMEOUT_S", 30.0),
        helo_name=host or "localhost",
    )
    return SenderConfig(
        node_id=environ.get("MAILER_NODE_ID", "").strip() or f"node-{host}-{process_id}",
        listen=environ.get("MAILER_LISTEN", "").strip() or "127.0.0.1:0",
        metrics_listen=environ.get("MAILER_METRICS_LISTEN", "").strip(),
        advertise=environ.get("MAILER_ADVERTISE", "").strip() or None,
        etcd=etcd,
        smtp=smtp,
        capacity=_integer(environ, "MAILER_CAPACITY", 400),
        drain_timeout_s=_number(environ, "MAILER_DRAIN_TIMEOUT_S", 10.0),
        log_level=environ.get("MAILER_LOG_LEVEL", "").strip().upper() or "INFO",
    )
