"""Coordinator configuration: one frozen dataclass, read from the environment in one place."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from datetime import timedelta

from coordinator.backoff import BackoffPolicy
from coordinator.db.settings import DatabaseConfig
from coordinator.quotas import Quotas
from coordinator.validation import Limits
from mailers.etcd import EtcdTls, parse_endpoints
from mailers.tls import TlsConfig
from mailers.tls import coordinator_from_env as tls_from_env


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    etcd_endpoints: tuple[str, ...]
    """etcd client endpoints, host:port (IP addresses)."""
    database: DatabaseConfig
    """PostgreSQL, where jobs, recipients, outcomes and suppressions live
    (MAILER_DATABASE_URL, MAILER_DATABASE_PASSWORD_FILE, MAILER_DATABASE_POOL_SIZE)."""
    listen: str = "127.0.0.1:7701"
    """Address the client and admin gRPC services listen on."""
    advertise: str = ""
    """Address clients are redirected to when this coordinator leads; defaults to listen."""
    coordinator_id: str = ""
    """Stable name in logs and cluster status; defaults to <host>-<pid>."""
    metrics_listen: str = ""
    """host:port of the Prometheus exporter; empty disables it."""
    health_listen: str = ""
    """host:port of a plaintext gRPC server with only the health service, for probes
    that cannot do TLS (Kubernetes gRPC probes); empty disables it. It tells who leads,
    nothing else."""
    etcd_prefix: str = "/mailers"
    election_ttl_s: int = 5
    """Lease TTL of the election key: a dead leader is replaced within about this long."""
    batch_size: int = 50
    """Recipients per batch."""
    heartbeat_interval_s: float = 1.0
    """How often the leader tells each node it still leads."""
    authority_s: float = 3.0
    """How long a node may start transactions after the leader's last heartbeat; at most
    the election TTL (a deposed leader's authority must end before a new one is elected)."""
    max_unsaved_results: int = 20_000
    """The leader stops handing out batches while this many results wait to be written."""
    retention_s: float = 30 * 24 * 3600.0
    """Recipient rows of a job are dropped this long after it finished; the job's
    summary and the suppression lists stay."""
    retention_check_s: float = 600.0
    """How often the leader looks for jobs due for retention."""
    max_attempts: int = 5
    """SMTP attempts per recipient before a transient failure becomes permanent."""
    max_dispatches: int = 10
    """Times in a row a batch may be lost by the node holding it (crash, silence, refusal)
    before its remaining recipients fail."""
    retry: BackoffPolicy = BackoffPolicy(initial=timedelta(seconds=2), maximum=timedelta(minutes=5))
    """Delay before a batch with deferred recipients is sent again."""
    reassign: BackoffPolicy = BackoffPolicy(
        initial=timedelta(seconds=0.5), maximum=timedelta(seconds=30)
    )
    """Delay before a batch lost again by a node is handed out again (the first move is
    immediate)."""
    max_job_age_s: float = 3 * 24 * 3600.0
    """Recipients of a job older than this (or past its own expires_at) that are still
    not delivered fail, keeping the last reply they got."""
    breaker_failures: int = 5
    breaker_reset_s: float = 10.0
    limits: Limits = Limits()
    """Submit-time size limits (MAILER_MAX_RECIPIENTS, MAILER_MAX_BODY_BYTES,
    MAILER_MAX_CONTENT_BYTES, MAILER_MAX_SUBJECT_CHARS, MAILER_MAX_HEADERS,
    MAILER_MAX_VARIABLES, MAILER_MAX_VARIABLE_CHARS)."""
    max_message_bytes: int = 8 * 1024 * 1024
    """Largest gRPC request the server accepts. The SDK sends at most ~2 MiB of
    recipients inline and 1 MiB upload chunks, and content is capped near 1.2 MB, so
    8 MiB leaves room while bounding what one call can make the server buffer."""
    auth_file: str = ""
    """Path of the tenants-and-tokens file (JSON, or TOML by suffix); empty turns
    authentication off (local development only: every caller may do everything)."""
    default_quotas: Quotas = Quotas()
    """Quotas of tenants whose entry in the auth file sets none, and of every caller
    when auth is off (MAILER_QUOTA_MAX_RECIPIENTS_PER_JOB, MAILER_QUOTA_MESSAGES_PER_HOUR,
    MAILER_QUOTA_MAX_ACTIVE_JOBS); 0 means unlimited."""
    tls: TlsConfig = TlsConfig()
    """TLS of the client API and of the streams to nodes (MAILER_TLS_CA, MAILER_TLS_CERT,
    MAILER_TLS_KEY, MAILER_TLS_CLIENT_AUTH, MAILER_TLS_ALLOWED_CLIENTS,
    MAILER_TLS_SERVER_NAME: the name in node certificates), or MAILER_PLAINTEXT=1; the
    coordinator refuses to start with neither (see mailers/tls.py)."""
    etcd_tls: EtcdTls | None = None
    """etcd over TLS with this client certificate (MAILER_ETCD_CA, MAILER_ETCD_CERT,
    MAILER_ETCD_KEY; its CN is the coordinator's etcd user); None for plaintext."""

    def __post_init__(self) -> None:
        if not self.etcd_endpoints:
            raise ValueError("etcd_endpoints is required")
        if self.batch_size < 1 or self.batch_size > 1000:
            raise ValueError("batch_size must be within 1..1000")
        if (
            self.authority_s > self.election_ttl_s
            or self.heartbeat_interval_s * 2 > self.authority_s
        ):
            raise ValueError(
                "need 2 * heartbeat_interval_s <= authority_s <= election_ttl_s "
                "(MAILER_HEARTBEAT_INTERVAL_S, MAILER_AUTHORITY_S, MAILER_ELECTION_TTL_S)"
            )
        if self.retention_s <= 0 or self.retention_check_s <= 0 or self.max_unsaved_results < 1:
            raise ValueError("retention and max_unsaved_results must be positive")
        if self.max_attempts < 1 or self.max_dispatches < 1:
            raise ValueError("max_attempts and max_dispatches must be at least 1")
        if self.election_ttl_s < 2:
            raise ValueError("election_ttl_s must be at least 2")
        if self.max_message_bytes < 64 * 1024:
            raise ValueError("max_message_bytes must be at least 64 KiB")

    @property
    def advertised(self) -> str:
        return self.advertise or self.listen

    @property
    def name(self) -> str:
        return self.coordinator_id or f"{socket.gethostname()}-{os.getpid()}"


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ValueError(f"{name} is required")
    return value


def from_env(environ: Mapping[str, str]) -> CoordinatorConfig:
    """Build the config from MAILER_* variables; unknown values raise ValueError."""
    e = environ
    d = Limits()
    retry_initial = float(e.get("MAILER_RETRY_INITIAL_S", "2"))
    retry_max = float(e.get("MAILER_RETRY_MAX_S", "300"))
    return CoordinatorConfig(
        etcd_endpoints=tuple(parse_endpoints(e.get("MAILER_ETCD_ENDPOINTS", "127.0.0.1:2379"))),
        database=DatabaseConfig(
            url=_required(e, "MAILER_DATABASE_URL"),
            password_file=e.get("MAILER_DATABASE_PASSWORD_FILE", ""),
            pool_size=int(e.get("MAILER_DATABASE_POOL_SIZE", "10")),
        ),
        listen=e.get("MAILER_LISTEN", "127.0.0.1:7701"),
        advertise=e.get("MAILER_ADVERTISE", ""),
        coordinator_id=e.get("MAILER_COORDINATOR_ID", ""),
        etcd_prefix=e.get("MAILER_ETCD_PREFIX", "/mailers"),
        metrics_listen=e.get("MAILER_METRICS_LISTEN", ""),
        health_listen=e.get("MAILER_HEALTH_LISTEN", ""),
        election_ttl_s=int(e.get("MAILER_ELECTION_TTL_S", "5")),
        batch_size=int(e.get("MAILER_BATCH_SIZE", "50")),
        heartbeat_interval_s=float(e.get("MAILER_HEARTBEAT_INTERVAL_S", "1")),
        authority_s=float(e.get("MAILER_AUTHORITY_S", "3")),
        max_unsaved_results=int(e.get("MAILER_MAX_UNSAVED_RESULTS", "20000")),
        retention_s=float(e.get("MAILER_RETENTION_DAYS", "30")) * 86400,
        retention_check_s=float(e.get("MAILER_RETENTION_CHECK_S", "600")),
        max_attempts=int(e.get("MAILER_MAX_ATTEMPTS", "5")),
        max_dispatches=int(e.get("MAILER_MAX_DISPATCHES", "10")),
        retry=BackoffPolicy(
            initial=timedelta(seconds=retry_initial), maximum=timedelta(seconds=retry_max)
        ),
        max_job_age_s=float(e.get("MAILER_MAX_JOB_AGE_S", str(3 * 24 * 3600))),
        breaker_failures=int(e.get("MAILER_BREAKER_FAILURES", "5")),
        breaker_reset_s=float(e.get("MAILER_BREAKER_RESET_S", "10")),
        limits=Limits(
            max_recipients=int(e.get("MAILER_MAX_RECIPIENTS", str(d.max_recipients))),
            max_body_bytes=int(e.get("MAILER_MAX_BODY_BYTES", str(d.max_body_bytes))),
            max_content_bytes=int(e.get("MAILER_MAX_CONTENT_BYTES", str(d.max_content_bytes))),
            max_subject_chars=int(e.get("MAILER_MAX_SUBJECT_CHARS", str(d.max_subject_chars))),
            max_headers=int(e.get("MAILER_MAX_HEADERS", str(d.max_headers))),
            max_variables=int(e.get("MAILER_MAX_VARIABLES", str(d.max_variables))),
            max_variable_chars=int(e.get("MAILER_MAX_VARIABLE_CHARS", str(d.max_variable_chars))),
        ),
        max_message_bytes=int(e.get("MAILER_MAX_MESSAGE_BYTES", str(8 * 1024 * 1024))),
        auth_file=e.get("MAILER_AUTH_FILE", ""),
        default_quotas=Quotas(
            max_recipients_per_job=int(e.get("MAILER_QUOTA_MAX_RECIPIENTS_PER_JOB", "0")),
            messages_per_hour=int(e.get("MAILER_QUOTA_MESSAGES_PER_HOUR", "0")),
            max_active_jobs=int(e.get("MAILER_QUOTA_MAX_ACTIVE_JOBS", "0")),
        ),
        tls=tls_from_env(e),
        etcd_tls=EtcdTls.from_env(e),
    )
