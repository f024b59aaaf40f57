"""Configuration of a sender node: frozen dataclasses read from ``MAILER_*`` variables.

The environment is read in exactly one place, :func:`from_env`, called only from
``__main__``; everything else receives a :class:`SenderConfig`.

Variables (defaults in brackets):

- ``MAILER_NODE_ID`` [``node-<hostname>-<pid>``]
- ``MAILER_LISTEN`` [``127.0.0.1:0``]: gRPC listen address; port 0 picks a free port.
- ``MAILER_ADVERTISE`` [the bound listen address]: what the coordinator dials.
- ``MAILER_ETCD_ENDPOINTS`` (required): ``host:port,host:port``.
- ``MAILER_ETCD_PREFIX`` [``/mailers``]
- ``MAILER_RELAYS`` (required): ``host:port,...`` SMTP relays, preferred first; each may
  carry ``;key=value`` options (see :func:`parse_relays`): ``tls=auto|starttls|implicit|none``,
  ``verify=false``, ``ca=/path.pem``, ``user=NAME`` with ``password_env=VAR`` or
  ``password_file=/path``, ``weight=N``, ``connections=N``, ``rate=R`` (messages/s).
- ``MAILER_RELAY_STRATEGY`` [``failover``]: ``failover`` (priority order) or ``balance``
  (smooth weighted round-robin by relay ``weight``).
- ``MAILER_LEASE_TTL_S`` [5]
- ``MAILER_SMTP_CONNECTIONS`` [4]: persistent connections per relay (a relay's
  ``connections=`` option overrides it).
- ``MAILER_CAPACITY`` [400]: recipients held at once.
- ``MAILER_SMTP_TIMEOUT_S`` [30]: deadline of every SMTP reply before the message body.
- ``MAILER_SMTP_FINAL_REPLY_TIMEOUT_S`` [60]: deadline of the reply to the final dot (plus
  the transfer time); at least ``MAILER_SMTP_TIMEOUT_S``. Running out is AMBIGUOUS.
- ``MAILER_DRAIN_TIMEOUT_S`` [10]: on SIGTERM, how long in-flight batches may go on
  starting transactions. Transactions past their final dot are never cut, so the
  process may exit up to the final-reply timeout (:class:`NodeTimings`) later.
- ``MAILER_STATE_DIR`` [``/var/lib/mailers/node-<node_id>``]: the result journal; must
  survive restarts and belong to this node alone (absolute path).
- ``MAILER_MAX_UNACKED_RESULTS`` [50000]: results no leader has acknowledged yet above
  which the node rejects new batches ("at capacity").
- ``MAILER_METRICS_LISTEN`` [empty: off]: ``host:port`` of the Prometheus exporter.
- ``MAILER_DOMAIN_LIMITS`` [empty: 20 transactions at once per recipient domain, no
  rate limit]: e.g. ``default=concurrency:20;gmail.com=rate:10,burst:5,concurrency:4``
  (keys: rate, burst, concurrency, min_rate, decrease, increase, recovery, cooldown; see
  ``throttle.parse_domain_limits``). A 421/451 reply always slows the domain down.
- ``MAILER_DKIM_KEYS`` [empty: no signing]: ``domain:selector:/path/key.pem,...``; mail
  whose From domain has a key is DKIM-signed (RSA or Ed25519 PEM).
- ``MAILER_ETCD_CA``, ``MAILER_ETCD_CERT``, ``MAILER_ETCD_KEY`` [empty: plaintext etcd]:
  TLS to etcd with this client certificate (its CN is the node's etcd user).
- ``MAILER_LOG_LEVEL`` [``INFO``]; ``MAILER_LOG_FORMAT`` [``text``] or ``json``.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import logging
import math
import os
import socket
from collections.abc import Mapping

from mailers.etcd import EtcdTls, parse_endpoints
from mailers.tls import TlsConfig
from mailers.tls import node_from_env as tls_from_env
from sender_node.dkim import parse_key_spec
from sender_node.errors import ConfigError
from sender_node.relay_breaker import data_timeout_s
from sender_node.relay_choice import Strategy
from sender_node.throttle import Limits, parse_domain_limits


def _split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {value!r} is not host:port")
    return host.strip("[]"), int(port)


class Secret:
    """A credential that never shows itself: ``repr``/``str``/f-strings print ``********``.

    Only :meth:`reveal` gives the value, and only the SMTP client calls it, to log in.
    Equality compares in constant time (configs are compared in tests).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: pass it straight to the protocol, never to a log."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)  # equal secrets must hash alike; the value must not leak


class RelayTls(enum.StrEnum):
    """How a relay connection is encrypted (the relay's ``tls=`` option)."""

    AUTO = "auto"
    """STARTTLS when the relay offers it, plaintext otherwise (never AUTH in plaintext)."""
    STARTTLS = "starttls"
    """STARTTLS is required: a relay not offering it is a relay fault."""
    IMPLICIT = "implicit"
    """TLS from the first byte (SMTPS, usually port 465)."""
    NONE = "none"
    """Plaintext, even when the relay offers STARTTLS; only when chosen explicitly."""


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    """One SMTP relay: where it is, how to secure and authenticate, and its limits."""

    address: str
    """``host:port``."""
    tls: RelayTls = RelayTls.AUTO
    """Encryption mode; see :class:`RelayTls`."""
    verify: bool = True
    """Verify the relay's certificate and host name in every TLS mode (``verify=false``
    turns it off for this relay). A failed verification is a relay fault."""
    ca_file: str | None = None
    """PEM file of CAs to trust for this relay instead of the system trust store."""
    user: str | None = None
    """AUTH user name; AUTH happens only over an encrypted connection."""
    password: Secret | None = dataclasses.field(default=None, repr=False)
    """AUTH password, read at startup from ``password_env`` or ``password_file``."""
    weight: int = 1
    """Share of transactions under the ``balance`` strategy."""
    connections: int | None = None
    """Connections (and concurrent transactions) to this relay; None: the node default."""
    rate_per_s: float | None = None
    """Messages per second this relay may take (bursts up to one second's worth); None:
    unlimited."""

    def __post_init__(self) -> None:
        _split_hostport(self.address, "relay")
        where = f"relay {self.address}"
        if self.weight < 1:
            raise ConfigError(f"{where}: weight must be at least 1")
        if self.connections is not None and self.connections < 1:
            raise ConfigError(f"{where}: connections must be at least 1")
        if self.rate_per_s is not None and not (
            self.rate_per_s > 0 and math.isfinite(self.rate_per_s)
        ):
            raise ConfigError(f"{where}: rate must be a positive number")
        if (self.user is None) != (self.password is None):
            raise ConfigError(f"{where}: user needs password_env or password_file, and back")
        if self.user is not None and self.tls is RelayTls.NONE:
            raise ConfigError(f"{where}: user (AUTH) with tls=none would send it in clear")
        if self.ca_file is not None and self.tls is RelayTls.NONE:
            raise ConfigError(f"{where}: ca is meaningless with tls=none")

    @property
    def host(self) -> str:
        """The host part, without IPv6 brackets."""
        return _split_hostport(self.address, "relay")[0]

    @property
    def port(self) -> int:
        """The port part."""
        return _split_hostport(self.address, "relay")[1]


_RELAY_KEYS = (
    "tls",
    "verify",
    "ca",
    "user",
    "password_env",
    "password_file",
    "weight",
    "connections",
    "rate",
)
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def parse_relay(entry: str, environ: Mapping[str, str]) -> RelayConfig:
    """Parse one relay: ``host:port`` then optional ``;key=value`` options.

    Keys: ``tls`` (``auto``, ``starttls``, ``implicit``, ``none``), ``verify`` (a boolean),
    ``ca`` (a PEM file), ``user``, ``password_env`` (a variable in ``environ``) or
    ``password_file`` (a file; one trailing newline is stripped), ``weight`` (integer >= 1),
    ``connections`` (integer >= 1), ``rate`` (messages per second). Files are read here,
    once; error messages name the relay and the key, never a password.

    Raises:
        ConfigError: an unknown or repeated key, a bad value, an unset ``password_env``
            variable, or an unreadable ``password_file`` or ``ca``.
    """
    address, *options = (part.strip() for part in entry.split(";"))
    _split_hostport(address, "relay")
    values: dict[str, str] = {}
    for n, option in enumerate(options, 1):
        if not option:
            continue
        key, sep, value = (s.strip() for s in option.partition("="))
        key = key.lower()
        where = f"relay {address}: {key}"
        # Never echo a value, or text that is not key=value: it may be a password
        # written inline by mistake.
        if not sep:
            raise ConfigError(f"relay {address}: option #{n} is not key=value")
        if key not in _RELAY_KEYS:
            raise ConfigError(
                f"relay {address}: unknown option {key!r} (known: {', '.join(_RELAY_KEYS)})"
            )
        if not value:
            raise ConfigError(f"{where} needs a value ({key}=...)")
        if key in values:
            raise ConfigError(f"{where} given twice")
        values[key] = value

    def number(key: str, kind: type[int] | type[float]) -> int | float | None:
        raw = values.get(key)
        if raw is None:
            return None
        try:
            return kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"relay {address}: {key}={raw!r} is not {what}") from None

    tls = RelayTls.AUTO
    if "tls" in values:
        try:
            tls = RelayTls(values["tls"].lower())
        except ValueError:
            known = ", ".join(m.value for m in RelayTls)
            raise ConfigError(
                f"relay {address}: tls={values['tls']!r} is not one of {known}"
            ) from None
    verify = True
    if "verify" in values:
        flag = values["verify"].lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigError(f"relay {address}: verify={values['verify']!r} is not a boolean")
        verify = flag in _TRUE
    ca_file = values.get("ca")
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise ConfigError(f"relay {address}: ca file {ca_file!r} is not readable")
    if "password_env" in values and "password_file" in values:
        raise ConfigError(f"relay {address}: password_env and password_file are exclusive")
    password: Secret | None = None
    if "password_env" in values:
        name = values["password_env"]
        raw = environ.get(name)
        if not raw:
            raise ConfigError(
                f"relay {address}: password_env names {name}, which is unset or empty"
            )
        password = Secret(raw)
    elif "password_file" in values:
        path = values["password_file"]
        try:
            with open(path, encoding="utf-8") as f:
                raw = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            # The reason only (strerror), never the file's content.
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"relay {address}: password_file {path!r} is not readable: {reason}"
            ) from None
        raw = raw.removesuffix("\n").removesuffix("\r")
        if not raw:
            raise ConfigError(f"relay {address}: password_file {path!r} is empty")
        password = Secret(raw)
    weight = number("weight", int)
    connections = number("connections", int)
    rate = number("rate", float)
    return RelayConfig(
        address=address,
        tls=tls,
        verify=verify,
        ca_file=ca_file,
        user=values.get("user"),
        password=password,
        weight=1 if weight is None else int(weight),
        connections=None if connections is None else int(connections),
        rate_per_s=rate,
    )


def parse_relays(spec: str, environ: Mapping[str, str] | None = None) -> tuple[RelayConfig, ...]:
    """Parse ``MAILER_RELAYS``: comma-separated relays, preferred first.

    Each relay is ``host:port`` optionally followed by ``;key=value`` options (see
    :func:`parse_relay`), e.g.
    ``smtp.example.com:465;tls=implicit;user=bulk;password_env=RELAY_PW, 127.0.0.1:2525;tls=none``.
    A plain ``host:port,host:port`` list means ``tls=auto`` with verified certificates,
    no AUTH, weight 1, the default connection count and no rate limit.

    Args:
        spec: The variable's value.
        environ: Where ``password_env`` variables are looked up (empty when omitted).

    Raises:
        ConfigError: no relay, or a malformed one (the message names it and the key).
    """
    entries = [part.strip() for part in spec.split(",") if part.strip()]
    if not entries:
        raise ConfigError("no SMTP relays given (MAILER_RELAYS)")
    return tuple(parse_relay(entry, environ or {}) for entry in entries)


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
    tls: EtcdTls | None = None
    """Client certificate and CA for etcd over TLS; None for plaintext."""

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

    relays: tuple[RelayConfig, ...]
    """Each relay, ``host:port`` plus optional ``;key=value`` options (``tls``, ``verify``,
    ``ca``, ``user``, ``password_env``/``password_file``, ``weight``, ``connections``,
    ``rate``); comma-separated, the first preferred under ``failover``."""
    connections_per_relay: int = 4
    """Persistent connections kept per relay (unless the relay sets ``connections``);
    also the node's sending concurrency per relay."""
    timeout_s: float = 30.0
    """Deadline of each SMTP step before the message body (connect, TLS, EHLO, AUTH,
    MAIL, each RCPT, DATA)."""
    final_reply_timeout_s: float = 60.0
    """Deadline of the reply to the final dot, plus the time the message takes at the
    slowest healthy throughput. At least ``timeout_s``: running out is AMBIGUOUS (the
    relay may have the message), so it is kept long."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest rendered message sent; a larger one fails without being sent. It also
    bounds how long a transaction can take after its body started (at the slowest
    healthy throughput), which is what the leader waits before moving the batches of a
    node that vanished: a smaller limit moves them sooner."""
    helo_name: str = "localhost"
    """Name given in EHLO."""
    strategy: Strategy = Strategy.FAILOVER
    """How transactions are spread over the relays: ``failover`` (priority order) or
    ``balance`` (smooth weighted round-robin by ``weight``)."""

    def sending_concurrency(self) -> int:
        """Transactions a node runs at once: the connections of the relays it uses
        together (all of them when balancing, the largest pool under failover)."""
        sizes = [r.connections or self.connections_per_relay for r in self.relays]
        return sum(sizes) if self.strategy is Strategy.BALANCE else max(sizes)

    def __post_init__(self) -> None:
        if not self.relays:
            raise ConfigError("no SMTP relays")
        if self.connections_per_relay < 1:
            raise ConfigError("MAILER_SMTP_CONNECTIONS must be at least 1")
        if self.timeout_s <= 0:
            raise ConfigError("MAILER_SMTP_TIMEOUT_S must be positive")
        if self.final_reply_timeout_s < self.timeout_s:
            raise ConfigError(
                "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S must be at least MAILER_SMTP_TIMEOUT_S"
            )
        if self.max_message_bytes < 16 * 1024:
            raise ConfigError("MAILER_SMTP_MAX_MESSAGE_BYTES must be at least 16384")


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
    health_listen: str = ""
    """host:port of a plaintext gRPC server with only the health service
    (``MAILER_HEALTH_LISTEN``), for probes that cannot present a client certificate
    (Kubernetes' native gRPC probes); empty disables it. It tells whether the node takes
    work, nothing else."""
    drain_timeout_s: float = 10.0
    """On SIGTERM, how long batches under way may go on starting SMTP transactions;
    then the rest is handed back. A transaction past its final dot is never cut, so the
    process may exit up to the final-reply timeout (``NodeTimings.final_reply_s``) later."""
    state_dir: str = ""
    """Directory of the result journal (``MAILER_STATE_DIR``), absolute; empty means
    ``/var/lib/mailers/node-<node_id>``. It must outlive the process (a volume, not a
    container's own layer) and serve one node only (a lock file enforces that)."""
    max_unacked_results: int = 50_000
    """Results in the journal that no leader has acknowledged; beyond this the node
    rejects new batches as "at capacity" until acknowledgements bring it down."""
    log_level: str = "INFO"
    tls: TlsConfig = TlsConfig()
    """TLS of the dispatch server: MAILER_TLS_CA, MAILER_TLS_CERT, MAILER_TLS_KEY, and
    MAILER_TLS_ALLOWED_CLIENTS (client certificate names accepted, by default
    ``mailers-coordinator``), or MAILER_PLAINTEXT=1; the node refuses to start with
    neither (see mailers/tls.py)."""
    domain_limits: Limits = Limits()
    """Throttles of a recipient domain without an override."""
    domain_overrides: Mapping[str, Limits] = dataclasses.field(default_factory=dict)
    """Throttles by recipient domain (lower case)."""
    dkim_keys: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """DKIM ``{domain: (selector, key file)}``; the keys are read at startup."""

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
        if not self.state_dir:
            # Frozen: __post_init__ is the one place a derived default can be set.
            object.__setattr__(self, "state_dir", f"/var/lib/mailers/node-{self.node_id}")
        if not os.path.isabs(self.state_dir):
            raise ConfigError(f"MAILER_STATE_DIR {self.state_dir!r} must be an absolute path")
        if self.max_unacked_results < 1:
            raise ConfigError("MAILER_MAX_UNACKED_RESULTS must be at least 1")
        # The timeouts and lease margins must agree; fail here rather than at start.
        timings_of(self)
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError(f"unknown log level {self.log_level!r}")


MIN_THROUGHPUT_BYTES_PER_S = 64 * 1024
"""Slowest message transfer still considered healthy. The node hands it to ``RelayPool``
(``min_throughput_bytes_per_s``), whose deadline for the final dot's reply grows with
the message size at this rate; :func:`derive_timings` uses the same formula."""

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest rendered message a node sends; a larger one fails without being sent, so
that the final-reply bound holds. Submitted content is capped near 1.2 MB; rendering
(base64, quoted-printable, DKIM) keeps it well below this."""

SETUP_STEPS = 4
"""SMTP steps before the body a transaction's start budget allows for, one step
timeout each (connect with TLS and EHLO, AUTH, MAIL with the RCPTs, DATA)."""


@dataclasses.dataclass(frozen=True)
class NodeTimings:
    """How long a node's SMTP work can take: what the leader is told (``NodeTimeouts``)
    and what bounds every stop. Build it with :func:`derive_timings`, the one place
    where these numbers come from the configuration."""

    final_reply_s: float
    """Longest a transaction can last after its final dot: then it has a verdict or is
    given up as ambiguous. The SMTP step timeout plus the largest message (dot-stuffed)
    at :data:`MIN_THROUGHPUT_BYTES_PER_S`."""
    start_budget_s: float
    """Longest from a transaction's first wait (domain pacing, a node slot, a relay's
    rate) to its message body. A transaction not at its body by then is given up before
    the body and its recipients are deferred without using an attempt."""
    max_authority_s: float
    """The most authority one ``open`` or ``heartbeat`` grants; a longer
    ``authority_ms`` is cut to this."""
    handback_after_s: float = 2.0
    """A node holding results or released batches writes its hand-back to etcd once it
    has had no usable stream to a leader this long."""
    stop_slack_s: float = 0.5
    """After a stop, transactions still short of their body when ``final_reply_s`` has
    passed are cut this much later (none can be past its final dot by then)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest rendered message sent (see :data:`MAX_MESSAGE_BYTES`)."""

    def __post_init__(self) -> None:
        if not 0 < self.final_reply_s <= self.transaction_s:
            raise ConfigError("final_reply_s must be positive and within transaction_s")
        if self.start_budget_s <= 0 or self.max_authority_s <= 0:
            raise ConfigError("start_budget_s and max_authority_s must be positive")
        if self.handback_after_s < 0 or self.stop_slack_s < 0 or self.max_message_bytes < 1:
            raise ConfigError("handback_after_s, stop_slack_s, max_message_bytes out of range")

    @property
    def transaction_s(self) -> float:
        """Longest one whole transaction can take: its start budget, then its final reply."""
        return self.start_budget_s + self.final_reply_s

    @property
    def release_s(self) -> float:
        """Longest from stopping a batch to its release: transactions past their final
        dot finish within ``final_reply_s``; the others are cut after the slack."""
        return self.final_reply_s + self.stop_slack_s


def derive_timings(
    *,
    smtp_timeout_s: float,
    lease_ttl_s: float,
    final_reply_timeout_s: float | None = None,
    trust_margin_s: float,
    pacing_wait_s: float = 30.0,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    min_throughput_bytes_per_s: float = MIN_THROUGHPUT_BYTES_PER_S,
    handback_after_s: float = 2.0,
) -> NodeTimings:
    """The node's time bounds from its settings (pure); checks they are consistent.

    - final reply: the final-reply timeout (``MAILER_SMTP_FINAL_REPLY_TIMEOUT_S``; the
      step timeout when not given) plus the largest message at the slowest healthy
      throughput (``relay_breaker.data_timeout_s``, as the SMTP client does).
      Dot-stuffing grows CRLF text by at most a third.
    - start budget: the domain pacing wait plus :data:`SETUP_STEPS` step timeouts.
    - transaction: start budget plus final reply (``NodeTimeouts.transaction_ms``).
    - most authority: the lease's trusted span (TTL minus margin), so a node cut off
      from both leader and etcd stops starting transactions on either count within the
      same bound, and no heartbeat outlasts what the node's own lease guarantees.

    Raises:
        ConfigError: a non-positive timeout, or a lease margin that leaves no trusted
            span for authority.
    """
    if smtp_timeout_s <= 0 or pacing_wait_s < 0:
        raise ConfigError("the SMTP timeout must be positive, the pacing wait not negative")
    if not 0 <= trust_margin_s < lease_ttl_s:
        raise ConfigError("the lease trust margin must be below the lease TTL")
    payload_bytes = max_message_bytes + max_message_bytes // 3 + 3
    return NodeTimings(
        final_reply_s=data_timeout_s(
            final_reply_timeout_s or smtp_timeout_s, payload_bytes, min_throughput_bytes_per_s
        ),
        start_budget_s=pacing_wait_s + SETUP_STEPS * smtp_timeout_s,
        max_authority_s=lease_ttl_s - trust_margin_s,
        handback_after_s=handback_after_s,
        max_message_bytes=max_message_bytes,
    )


def timings_of(config: SenderConfig) -> NodeTimings:
    """:func:`derive_timings` for a node's configuration.

    Raises:
        ConfigError: the configuration's timeouts are inconsistent.
    """
    return derive_timings(
        smtp_timeout_s=config.smtp.timeout_s,
        final_reply_timeout_s=config.smtp.final_reply_timeout_s,
        max_message_bytes=config.smtp.max_message_bytes,
        lease_ttl_s=config.etcd.lease_ttl_s,
        trust_margin_s=config.etcd.trust_margin_s,
    )


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


def _strategy(environ: Mapping[str, str], name: str) -> Strategy:
    raw = environ.get(name, "").strip()
    if not raw:
        return Strategy.FAILOVER
    try:
        return Strategy.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


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
    try:
        etcd_tls = EtcdTls.from_env(environ)
    except ValueError as exc:
        raise ConfigError(f"etcd TLS: {exc}") from None
    try:
        domain_limits, domain_overrides = parse_domain_limits(
            environ.get("MAILER_DOMAIN_LIMITS", "")
        )
    except ValueError as exc:
        raise ConfigError(f"MAILER_DOMAIN_LIMITS: {exc}") from None
    etcd = EtcdConfig(
        tls=etcd_tls,
        endpoints=etcd_endpoints,
        prefix=environ.get("MAILER_ETCD_PREFIX", "").strip() or "/mailers",
        lease_ttl_s=lease_ttl_s,
        # Short TTLs (tests, demos) get a proportionally shorter margin.
        trust_margin_s=min(1.0, lease_ttl_s / 4),
    )
    smtp = SmtpConfig(
        relays=parse_relays(_required(environ, "MAILER_RELAYS"), environ),
        connections_per_relay=_integer(environ, "MAILER_SMTP_CONNECTIONS", 4),
        timeout_s=_number(environ, "MAILER_SMTP_TIMEOUT_S", 30.0),
        final_reply_timeout_s=_number(environ, "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S", 60.0),
        max_message_bytes=_integer(environ, "MAILER_SMTP_MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES),
        helo_name=host or "localhost",
        strategy=_strategy(environ, "MAILER_RELAY_STRATEGY"),
    )
    return SenderConfig(
        node_id=environ.get("MAILER_NODE_ID", "").strip() or f"node-{host}-{process_id}",
        listen=environ.get("MAILER_LISTEN", "").strip() or "127.0.0.1:0",
        metrics_listen=environ.get("MAILER_METRICS_LISTEN", "").strip(),
        health_listen=environ.get("MAILER_HEALTH_LISTEN", "").strip(),
        advertise=environ.get("MAILER_ADVERTISE", "").strip() or None,
        etcd=etcd,
        smtp=smtp,
        capacity=_integer(environ, "MAILER_CAPACITY", 400),
        drain_timeout_s=_number(environ, "MAILER_DRAIN_TIMEOUT_S", 10.0),
        state_dir=environ.get("MAILER_STATE_DIR", "").strip(),
        max_unacked_results=_integer(environ, "MAILER_MAX_UNACKED_RESULTS", 50_000),
        log_level=environ.get("MAILER_LOG_LEVEL", "").strip().upper() or "INFO",
        tls=tls_from_env(environ),
        domain_limits=domain_limits,
        domain_overrides=domain_overrides,
        dkim_keys=parse_key_spec(environ.get("MAILER_DKIM_KEYS", "")),
    )
