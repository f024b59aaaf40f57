"""Configuration of a sender node: frozen dataclasses whose fields declare their variables.

A field the environment can set names its ``MAILER_*`` variable, parser and default in
one declaration (``mailers_runtime.settings``); ``deploy/CONFIG.md`` lists them all,
generated from these declarations. The environment is read in exactly one place,
:func:`from_env`, called only from ``__main__``; everything else receives a
:class:`SenderConfig`.

``MAILER_RELAYS`` is a list of relays, each ``host:port`` with optional ``;key=value``
options (see :func:`parse_relay`); its passwords come from other variables or files
that the relay names, read once at start.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mailers_runtime import settings
from mailers_runtime.etcd import endpoints
from mailers_runtime.etcd import tls_setting as etcd_tls_setting
from mailers_runtime.tls import COORDINATOR_NAME, ClientAuth, TlsConfig, TlsFiles
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


def _relay_options(address: str, options: Iterable[str]) -> dict[str, str]:
    """The ``key=value`` options of one relay: known keys, each once, with a value."""
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
    return values


def _relay_option(
    address: str, values: Mapping[str, str], key: str, parse: Callable[[str], Any], what: str
) -> Any:
    """Option ``key`` parsed, or None when absent; a refused value names the relay, the
    key and what was expected (these options hold no secret)."""
    raw = values.get(key)
    if raw is None:
        return None
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"relay {address}: {key}={raw!r} is not {what}") from None


def _relay_password(
    address: str, values: Mapping[str, str], environ: Mapping[str, str]
) -> Secret | None:
    """The password ``password_env`` or ``password_file`` names, read now; error
    messages never show it."""
    if "password_env" in values and "password_file" in values:
        raise ConfigError(f"relay {address}: password_env and password_file are exclusive")
    if "password_env" in values:
        name = values["password_env"]
        raw = environ.get(name)
        if not raw:
            raise ConfigError(
                f"relay {address}: password_env names {name}, which is unset or empty"
            )
        return Secret(raw)
    if "password_file" not in values:
        return None
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
    return Secret(raw)


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
    values = _relay_options(address, options)
    known = ", ".join(m.value for m in RelayTls)
    tls = _relay_option(address, values, "tls", settings.choice(RelayTls), f"one of {known}")
    verify = _relay_option(address, values, "verify", settings.boolean, "a boolean")
    ca_file = values.get("ca")
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise ConfigError(f"relay {address}: ca file {ca_file!r} is not readable")
    password = _relay_password(address, values, environ)
    weight = _relay_option(address, values, "weight", settings.integer, "an integer")
    connections = _relay_option(address, values, "connections", settings.integer, "an integer")
    return RelayConfig(
        address=address,
        tls=RelayTls.AUTO if tls is None else tls,
        verify=True if verify is None else verify,
        ca_file=ca_file,
        user=values.get("user"),
        password=password,
        weight=1 if weight is None else weight,
        connections=connections,
        rate_per_s=_relay_option(address, values, "rate", settings.number, "a number"),
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


@settings.config
class EtcdConfig:
    """Where and how the node registers."""

    endpoints: tuple[str, ...] = settings.setting(
        "MAILER_ETCD_ENDPOINTS", parse=endpoints, quote=False
    )
    """etcd client endpoints, ``host:port``; the client fails over across them."""
    prefix: str = settings.setting("MAILER_ETCD_PREFIX", default="/mailers")
    """Key prefix shared by the cluster (see ``mailers_runtime.etcd.Keys``)."""
    lease_ttl_s: int = settings.setting("MAILER_LEASE_TTL_S", default=5, parse=settings.integer)
    """TTL of the registration lease; the node is considered gone this long after it
    stops, and stops sending ``trust_margin_s`` before its lease could expire (a quarter
    of the TTL, at most 1 s)."""
    tls: TlsFiles | None = etcd_tls_setting()
    """Client certificate and CA for etcd over TLS (the certificate's CN is the node's
    etcd user); None for plaintext."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("MAILER_ETCD_ENDPOINTS: no etcd endpoints")
        if self.lease_ttl_s < 2:
            raise ConfigError("MAILER_LEASE_TTL_S must be at least 2")
        if not self.prefix.startswith("/"):
            raise ConfigError("MAILER_ETCD_PREFIX must start with '/'")

    @property
    def trust_margin_s(self) -> float:
        """The node stops sending this long before its lease could have expired: a
        quarter of the TTL, at most 1 s (short TTLs, in tests and demos, get a
        proportionally shorter margin; it stays below half the TTL)."""
        return min(1.0, self.lease_ttl_s / 4)


MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest rendered message a node sends; a larger one fails without being sent, so
that the final-reply bound holds. Submitted content is capped near 1.2 MB; rendering
(base64, quoted-printable, DKIM) keeps it well below this."""


@settings.config
class SmtpConfig:
    """The relays a node sends through."""

    relays: tuple[RelayConfig, ...] = settings.setting(
        "MAILER_RELAYS", parse=parse_relays, quote=False, with_environ=True
    )
    """Each relay, ``host:port`` plus optional ``;key=value`` options (``tls``, ``verify``,
    ``ca``, ``user``, ``password_env``/``password_file``, ``weight``, ``connections``,
    ``rate``); comma-separated, the first preferred under ``failover``."""
    connections_per_relay: int = settings.setting(
        "MAILER_SMTP_CONNECTIONS", default=16, parse=settings.integer
    )
    """Persistent connections kept per relay (unless the relay sets ``connections``);
    also the node's sending concurrency per relay. Each transaction waits on two round
    trips, so more connections keep a node busy: bench/e2e.py (two nodes, 20,000
    messages, interleaved) 2,809-2,989 msg/s with 8, 3,021-3,293 with 16, 2,758 with 32."""
    timeout_s: float = settings.setting(
        "MAILER_SMTP_TIMEOUT_S", default=30.0, parse=settings.number
    )
    """Deadline of each SMTP step before the message body (connect, TLS, EHLO, AUTH,
    MAIL, each RCPT, DATA)."""
    final_reply_timeout_s: float = settings.setting(
        "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S", default=60.0, parse=settings.number
    )
    """Deadline of the reply to the final dot, plus the time the message takes at the
    slowest healthy throughput. At least ``timeout_s``: running out is AMBIGUOUS (the
    relay may have the message), so it is kept long."""
    max_message_bytes: int = settings.setting(
        "MAILER_SMTP_MAX_MESSAGE_BYTES", default=MAX_MESSAGE_BYTES, parse=settings.integer
    )
    """Largest rendered message sent; a larger one fails without being sent. It also
    bounds how long a transaction can take after its body started (at the slowest
    healthy throughput), which is what the leader waits before moving the batches of a
    node that vanished: a smaller limit moves them sooner."""
    helo_name: str = "localhost"
    """Name given in EHLO (``from_env`` gives the host name)."""
    strategy: Strategy = settings.setting(
        "MAILER_RELAY_STRATEGY", default=Strategy.FAILOVER, parse=Strategy.parse, quote=False
    )
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
class DomainLimits:
    """Throttles by recipient domain: the default and the overrides."""

    default: Limits = Limits()
    """Throttles of a recipient domain without an override."""
    overrides: Mapping[str, Limits] = dataclasses.field(default_factory=dict)
    """Throttles by recipient domain (lower case)."""


def _domain_limits(spec: str) -> DomainLimits:
    default, overrides = parse_domain_limits(spec)
    return DomainLimits(default, overrides)


@settings.config
class SenderConfig:
    """Everything a sender node process needs."""

    node_id: str = settings.setting("MAILER_NODE_ID")
    """Stable name of the node; its registration key is ``nodes/<node_id>``
    (``from_env`` defaults it to ``node-<hostname>-<pid>``)."""
    etcd: EtcdConfig = settings.nested(EtcdConfig)
    smtp: SmtpConfig = settings.nested(SmtpConfig)
    listen: str = settings.setting("MAILER_LISTEN", default="127.0.0.1:0")
    """gRPC listen address ``host:port``; port 0 binds a free port."""
    advertise: str | None = settings.setting("MAILER_ADVERTISE", default=None)
    """Address the coordinator dials; ``None`` means the bound listen address."""
    capacity: int = settings.setting("MAILER_CAPACITY", default=4000, parse=settings.integer)
    """Recipients the node holds at once; batches beyond it are rejected. Enough that
    the node's connections never wait for the next batch: about a second of
    personalised mail, and enough batches of a job sharing its message (a batch of 500
    recipients is then five transactions). bench/e2e.py: 400 left connections idle
    between batches; with --recipients-per-message 100, 14,923-15,301 recipients/s at
    2000, 16,963 at 4000, 17,234 at 8000; personalised, 4000 and 2000 alike."""
    metrics_listen: str = settings.setting("MAILER_METRICS_LISTEN", default="")
    """host:port of the Prometheus exporter; empty disables it."""
    health_listen: str = settings.setting("MAILER_HEALTH_LISTEN", default="")
    """host:port of a plaintext gRPC server with only the health service, for probes
    that cannot present a client certificate (Kubernetes' native gRPC probes); empty
    disables it. It tells whether the node takes work, nothing else."""
    drain_timeout_s: float = settings.setting(
        "MAILER_DRAIN_TIMEOUT_S", default=10.0, parse=settings.number
    )
    """On SIGTERM, how long batches under way may go on starting SMTP transactions;
    then the rest is handed back. A transaction past its final dot is never cut, so the
    process may exit up to the final-reply timeout (``NodeTimings.final_reply_s``) later."""
    state_dir: str = settings.setting("MAILER_STATE_DIR", default="")
    """Directory of the result journal, absolute; empty means
    ``/var/lib/mailers/node-<node_id>``. It must outlive the process (a volume, not a
    container's own layer) and serve one node only (a lock file enforces that)."""
    max_unacked_results: int = settings.setting(
        "MAILER_MAX_UNACKED_RESULTS", default=50_000, parse=settings.integer
    )
    """Results in the journal that no leader has acknowledged; beyond this the node
    rejects new batches as "at capacity" until acknowledgements bring it down."""
    log_level: str = settings.setting("MAILER_LOG_LEVEL", default="INFO", parse=str.upper)
    """Log level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``."""
    tls: TlsConfig = settings.nested(
        TlsConfig, default=TlsConfig(allowed_clients=(COORDINATOR_NAME,))
    )
    """TLS of the dispatch server (client certificates always required; by default
    only coordinators' are accepted), or plaintext; the node refuses to start with
    neither (see mailers_runtime/tls.py)."""
    domain_limits: DomainLimits = settings.setting(
        "MAILER_DOMAIN_LIMITS", default=DomainLimits(), parse=_domain_limits, quote=False
    )
    """Throttles by recipient domain, e.g.
    ``default=concurrency:20;gmail.com=rate:10,burst:5,concurrency:4`` (keys: rate, burst,
    concurrency, min_rate, decrease, increase, recovery, cooldown; see
    ``throttle.parse_domain_limits``); by default 20 transactions at once per domain, no
    rate. A 421/451 reply slows a domain down regardless."""
    dkim_keys: Mapping[str, tuple[str, str]] = settings.setting(
        "MAILER_DKIM_KEYS", default_factory=dict, parse=parse_key_spec, quote=False
    )
    """DKIM ``{domain: (selector, key file)}`` from ``domain:selector:/path/key.pem,...``;
    mail whose From domain has a key is signed. The keys are read at startup."""
    bounce_domain: str = settings.setting("MAILER_BOUNCE_DOMAIN", default="")
    """Envelope senders become ``bounces+<token>@<this domain>`` (VERP), so bounces come
    back to the coordinators' inbound endpoint naming the recipient; a tenant's own
    bounce domain (the auth file) comes with its jobs and wins. Empty, and no tenant
    domain: the From address is the envelope sender. Needs MAILER_TOKEN_KEY_FILE."""
    unsubscribe_url: str = settings.setting("MAILER_UNSUBSCRIBE_URL", default="")
    """The coordinators' one-click unsubscribe endpoint, e.g.
    ``https://mail.example.com:8443/unsubscribe/``: every message of a job that gives no
    unsubscribe_url of its own gets a List-Unsubscribe with this URL and a token (and a
    ``mailto:`` on the bounce domain), and List-Unsubscribe-Post. Needs
    MAILER_BOUNCE_DOMAIN."""
    token_key_file: str = settings.setting("MAILER_TOKEN_KEY_FILE", default="")
    """File of at least 32 random bytes, the same on every node and coordinator: it signs
    the recipient tokens of VERP addresses and unsubscribe links."""

    def __post_init__(self) -> None:
        if self.bounce_domain and not self.token_key_file:
            raise ConfigError("MAILER_BOUNCE_DOMAIN needs MAILER_TOKEN_KEY_FILE")
        if self.unsubscribe_url and (
            not self.bounce_domain or not self.unsubscribe_url.startswith("https://")
        ):
            raise ConfigError(
                "MAILER_UNSUBSCRIBE_URL must be an https:// URL and needs MAILER_BOUNCE_DOMAIN"
            )
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
        if self.tls.client_auth is not ClientAuth.REQUIRE:
            raise ConfigError(
                "MAILER_TLS_CLIENT_AUTH=none: sender nodes always require client certificates"
            )


MIN_THROUGHPUT_BYTES_PER_S = 64 * 1024
"""Slowest message transfer still considered healthy. The node hands it to ``RelayPool``
(``min_throughput_bytes_per_s``), whose deadline for the final dot's reply grows with
the message size at this rate; :func:`derive_timings` uses the same formula."""

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


def from_env(
    environ: Mapping[str, str],
    *,
    hostname: str | None = None,
    pid: int | None = None,
) -> SenderConfig:
    """Build the node's configuration from its ``MAILER_*`` variables (the declarations
    above; ``deploy/CONFIG.md`` lists them).

    Args:
        environ: Usually ``os.environ``.
        hostname: For the default node id and the EHLO name; the machine's host name
            when omitted.
        pid: For the default node id; this process's id when omitted.

    Raises:
        ConfigError: a required variable is missing or a value is malformed; the
            message names the variable.
    """
    host = hostname if hostname is not None else socket.gethostname()
    process_id = pid if pid is not None else os.getpid()
    computed = {"node_id": f"node-{host}-{process_id}", "smtp.helo_name": host or "localhost"}
    return settings.load(SenderConfig, environ, computed)
