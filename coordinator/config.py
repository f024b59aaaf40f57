"""Coordinator configuration: one frozen dataclass whose fields declare their variables.

A field the environment can set names its ``MAILER_*`` variable, parser and default in
one declaration (``mailers_runtime.settings``); :func:`from_env` reads them all, and
``deploy/CONFIG.md`` is generated from the same declarations.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import timedelta

from coordinator.backoff import BackoffPolicy
from coordinator.db.settings import DatabaseConfig
from coordinator.inbound import InboundConfig
from coordinator.quotas import Quotas
from coordinator.validation import Limits
from coordinator.webhooks import WebhookConfig
from mailers_runtime import settings
from mailers_runtime.errors import ConfigError
from mailers_runtime.etcd import endpoints
from mailers_runtime.etcd import tls_setting as etcd_tls_setting
from mailers_runtime.tls import TlsConfig, TlsFiles

_DAY_S = 24 * 3600.0


def _days(raw: str) -> float:
    """A number of days, in seconds."""
    return settings.number(raw) * _DAY_S


def _in_days(seconds: float) -> str:
    return f"{seconds / _DAY_S:g}"


def _integer(name: str) -> settings.Variable:
    return settings.Variable(name, settings.integer)


@settings.config
class CoordinatorConfig:
    database: DatabaseConfig = settings.nested(DatabaseConfig)
    """PostgreSQL, where jobs, recipients, outcomes and suppressions live."""
    etcd_endpoints: tuple[str, ...] = settings.setting(
        "MAILER_ETCD_ENDPOINTS", default=("127.0.0.1:2379",), parse=endpoints, quote=False
    )
    """etcd client endpoints, host:port (IP addresses)."""
    listen: str = settings.setting("MAILER_LISTEN", default="127.0.0.1:7701")
    """Address the client and admin gRPC services listen on."""
    advertise: str = settings.setting("MAILER_ADVERTISE", default="")
    """Address clients are redirected to when this coordinator leads; defaults to listen."""
    coordinator_id: str = settings.setting("MAILER_COORDINATOR_ID", default="")
    """Stable name in logs and cluster status; defaults to <host>-<pid>."""
    metrics_listen: str = settings.setting("MAILER_METRICS_LISTEN", default="")
    """host:port of the Prometheus exporter; empty disables it."""
    http_listen: str = settings.setting("MAILER_HTTP_LISTEN", default="")
    """host:port of the HTTPS endpoint (one-click unsubscribe; the console with
    MAILER_CONSOLE), with the TLS certificate of the gRPC server (HTTP when plaintext);
    empty: none. Needs MAILER_TOKEN_KEY_FILE."""
    console: bool = settings.setting("MAILER_CONSOLE", default=False, parse=settings.boolean)
    """Serve the operators' web console under /console/ on MAILER_HTTP_LISTEN (log-in with
    a tenant or admin token). Off by default: that endpoint often faces the internet for
    one-click unsubscribe, and the console need not."""
    health_listen: str = settings.setting("MAILER_HEALTH_LISTEN", default="")
    """host:port of a plaintext gRPC server with only the health service, for probes
    that cannot do TLS (Kubernetes gRPC probes); empty disables it. It tells who leads,
    nothing else."""
    etcd_prefix: str = settings.setting("MAILER_ETCD_PREFIX", default="/mailers")
    """Key prefix shared by the cluster (see ``mailers_runtime.etcd.Keys``)."""
    election_ttl_s: int = settings.setting(
        "MAILER_ELECTION_TTL_S", default=5, parse=settings.integer
    )
    """Lease TTL of the election key: a dead leader is replaced within about this long."""
    batch_size: int = settings.setting("MAILER_BATCH_SIZE", default=100, parse=settings.integer)
    """Recipients per batch (a job sharing its messages gets at least five messages'
    worth). Larger batches cost fewer round trips and database writes per message; a
    node that dies takes more recipients back to the queue (bench/e2e.py measured 50,
    100 and 200: 100 was fastest)."""
    heartbeat_interval_s: float = settings.setting(
        "MAILER_HEARTBEAT_INTERVAL_S", default=1.0, parse=settings.number
    )
    """How often the leader tells each node it still leads."""
    authority_s: float = settings.setting("MAILER_AUTHORITY_S", default=3.0, parse=settings.number)
    """How long a node may start transactions after the leader's last heartbeat; at most
    the election TTL (a deposed leader's authority must end before a new one is elected)."""
    max_unsaved_results: int = settings.setting(
        "MAILER_MAX_UNSAVED_RESULTS", default=20_000, parse=settings.integer
    )
    """The leader stops handing out batches while this many results wait to be written."""
    retention_s: float = settings.setting(
        "MAILER_RETENTION_DAYS", default=30 * _DAY_S, parse=_days, show=_in_days
    )
    """Recipient rows of a job are dropped this long after it finished (the variable
    counts days); the job's summary and the suppression lists stay."""
    retention_check_s: float = settings.setting(
        "MAILER_RETENTION_CHECK_S", default=600.0, parse=settings.number
    )
    """How often the leader looks for jobs due for retention."""
    max_attempts: int = settings.setting("MAILER_MAX_ATTEMPTS", default=5, parse=settings.integer)
    """SMTP attempts per recipient before a transient failure becomes permanent."""
    max_dispatches: int = settings.setting(
        "MAILER_MAX_DISPATCHES", default=10, parse=settings.integer
    )
    """Times in a row a batch may be lost by the node holding it (crash, silence, refusal)
    before its remaining recipients fail."""
    retry: BackoffPolicy = settings.nested(
        BackoffPolicy,
        default=BackoffPolicy(initial=timedelta(seconds=2), maximum=timedelta(minutes=5)),
        initial=settings.Variable("MAILER_RETRY_INITIAL_S", settings.duration),
        maximum=settings.Variable("MAILER_RETRY_MAX_S", settings.duration),
    )
    """Delay before a batch with deferred recipients is sent again."""
    reassign: BackoffPolicy = BackoffPolicy(
        initial=timedelta(seconds=0.5), maximum=timedelta(seconds=30)
    )
    """Delay before a batch lost again by a node is handed out again (the first move is
    immediate)."""
    max_job_age_s: float = settings.setting(
        "MAILER_MAX_JOB_AGE_S", default=3 * _DAY_S, parse=settings.number
    )
    """Recipients of a job older than this (or past its own expires_at) that are still
    not delivered fail, keeping the last reply they got."""
    breaker_failures: int = settings.setting(
        "MAILER_BREAKER_FAILURES", default=5, parse=settings.integer
    )
    """Batches a node may lose in a row before its breaker opens and it gets none for a
    while."""
    breaker_reset_s: float = settings.setting(
        "MAILER_BREAKER_RESET_S", default=10.0, parse=settings.number
    )
    """How long an open node breaker waits before it lets one trial batch through."""
    limits: Limits = settings.nested(
        Limits,
        default=Limits(),
        max_recipients=_integer("MAILER_MAX_RECIPIENTS"),
        max_body_bytes=_integer("MAILER_MAX_BODY_BYTES"),
        max_content_bytes=_integer("MAILER_MAX_CONTENT_BYTES"),
        max_subject_chars=_integer("MAILER_MAX_SUBJECT_CHARS"),
        max_headers=_integer("MAILER_MAX_HEADERS"),
        max_variables=_integer("MAILER_MAX_VARIABLES"),
        max_variable_chars=_integer("MAILER_MAX_VARIABLE_CHARS"),
    )
    """Submit-time size limits."""
    max_message_bytes: int = settings.setting(
        "MAILER_MAX_MESSAGE_BYTES", default=8 * 1024 * 1024, parse=settings.integer
    )
    """Largest gRPC request the server accepts. The SDK sends at most ~2 MiB of
    recipients inline and 1 MiB upload chunks, and content is capped near 1.2 MB, so
    8 MiB leaves room while bounding what one call can make the server buffer."""
    auth_file: str = settings.setting("MAILER_AUTH_FILE", default="")
    """Path of the tenants-and-tokens file (JSON, or TOML by suffix); empty turns
    authentication off (local development only: every caller may do everything)."""
    default_quotas: Quotas = settings.nested(
        Quotas,
        default=Quotas(),
        max_recipients_per_job=_integer("MAILER_QUOTA_MAX_RECIPIENTS_PER_JOB"),
        messages_per_hour=_integer("MAILER_QUOTA_MESSAGES_PER_HOUR"),
        max_active_jobs=_integer("MAILER_QUOTA_MAX_ACTIVE_JOBS"),
    )
    """Quotas of tenants whose entry in the auth file sets none, and of every caller
    when auth is off; 0 means unlimited."""
    tls: TlsConfig = settings.nested(TlsConfig, default=TlsConfig())
    """TLS of the client API and of the streams to nodes (its server name: the name in
    node certificates), or plaintext; the coordinator refuses to start with neither
    (see mailers_runtime/tls.py)."""
    webhooks: WebhookConfig = settings.nested(WebhookConfig, default=WebhookConfig())
    """Delivery of events to tenants' webhook endpoints."""
    inbound: InboundConfig = settings.nested(InboundConfig, default=InboundConfig())
    """The endpoint bounces, complaints and mailto: unsubscribes come back to."""
    etcd_tls: TlsFiles | None = etcd_tls_setting()
    """etcd over TLS with this client certificate (its CN is the coordinator's etcd
    user); None for plaintext."""

    def __post_init__(self) -> None:
        if not self.etcd_endpoints:
            raise ConfigError("MAILER_ETCD_ENDPOINTS: no etcd endpoints")
        if self.batch_size < 1 or self.batch_size > 1000:
            raise ConfigError("MAILER_BATCH_SIZE must be within 1..1000")
        if (
            self.authority_s > self.election_ttl_s
            or self.heartbeat_interval_s * 2 > self.authority_s
        ):
            raise ConfigError(
                "need 2 * heartbeat_interval_s <= authority_s <= election_ttl_s "
                "(MAILER_HEARTBEAT_INTERVAL_S, MAILER_AUTHORITY_S, MAILER_ELECTION_TTL_S)"
            )
        if self.retention_s <= 0 or self.retention_check_s <= 0 or self.max_unsaved_results < 1:
            raise ConfigError(
                "MAILER_RETENTION_DAYS, MAILER_RETENTION_CHECK_S and MAILER_MAX_UNSAVED_RESULTS "
                "must be positive"
            )
        if self.max_attempts < 1 or self.max_dispatches < 1:
            raise ConfigError("MAILER_MAX_ATTEMPTS and MAILER_MAX_DISPATCHES must be at least 1")
        if self.election_ttl_s < 2:
            raise ConfigError("MAILER_ELECTION_TTL_S must be at least 2")
        if self.http_listen and not self.inbound.token_key_file:
            raise ConfigError("MAILER_HTTP_LISTEN needs MAILER_TOKEN_KEY_FILE")
        if self.console and not self.http_listen:
            raise ConfigError("MAILER_CONSOLE needs MAILER_HTTP_LISTEN")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigError("MAILER_MAX_MESSAGE_BYTES must be at least 64 KiB")

    @property
    def advertised(self) -> str:
        return self.advertise or self.listen

    @property
    def name(self) -> str:
        return self.coordinator_id or f"{socket.gethostname()}-{os.getpid()}"


def from_env(environ: Mapping[str, str]) -> CoordinatorConfig:
    """The coordinator's configuration from its ``MAILER_*`` variables (the
    declarations above; ``deploy/CONFIG.md`` lists them).

    Args:
        environ: Usually ``os.environ``.

    Raises:
        ConfigError: ``MAILER_DATABASE_URL`` is unset, or a value is malformed or does
            not fit the others; the message names the variable.
    """
    return settings.load(CoordinatorConfig, environ)
