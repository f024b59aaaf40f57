"""The coordinator process: gRPC server, election, and the dispatcher while leading.

One coroutine, :func:`serve`, owns everything it starts: the gRPC server, the etcd
client, each election session and each dispatcher. It campaigns; when it wins it
starts a dispatcher and marks the health service SERVING; when the session ends or a
fenced write fails it stops the dispatcher at once and campaigns again under a new
lease. ``stop`` (SIGTERM) resigns: the lease is revoked so a standby leads at once.

The client API listens with the coordinator's :class:`mailers_runtime.tls.Transport` (TLS,
client certificates required unless ``MAILER_TLS_CLIENT_AUTH=none``; plaintext only
with ``MAILER_PLAINTEXT=1``), and node links dial with it. ``MAILER_HEALTH_LISTEN``
adds a plaintext port with the health service alone, for probes that cannot do TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.auth import AuthConfig, load_auth_file
from coordinator.config import CoordinatorConfig
from coordinator.console import console_for
from coordinator.db.store import Database, LostLeadership, Store, StoreUnavailable
from coordinator.edge import AuthInterceptor, add_service
from coordinator.election import Election, LeadershipUnavailable
from coordinator.inbound import start_inbound
from coordinator.leader import Leader
from coordinator.metrics import CoordinatorMetrics
from coordinator.servicer import AdminServicer, MailerServicer, Role
from coordinator.validation import TemplateCheck
from coordinator.web import start_web
from mailerpb.mailer.v1 import coordinator_pb2, coordinator_pb2_grpc
from mailers_runtime import message
from mailers_runtime.etcd import (
    DEFAULT_TIMEOUT_S,
    EtcdClientMetrics,
    Keys,
    Session,
    connect,
    describe_error,
    endpoint_of,
)
from mailers_runtime.tls import Transport
from mailers_runtime.verp import TokenKey

log = logging.getLogger(__name__)

# Named services are SERVING only on the leader (readiness, client discovery); the
# overall "" status is SERVING while the process runs, so a plain liveness probe does
# not restart standbys.
SERVICES = ("mailer.v1.MailerService", "mailer.v1.AdminService")


def server_options(config: CoordinatorConfig) -> list[tuple[str, int]]:
    """gRPC server arguments; the receive limit is CoordinatorConfig.max_message_bytes."""
    return [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
        # Never GOAWAY a client for its pings: a client (or this server) stalled on a
        # busy machine can send two keepalives close together, and the GOAWAY would
        # fail every call on the connection, long unary ones (CancelJob) included.
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # gRPC shares a port with any other process that binds it too (SO_REUSEPORT); a
        # port taken by another server must fail the start instead of splitting calls.
        ("grpc.so_reuseport", 0),
    ]


def load_auth(config: CoordinatorConfig) -> AuthConfig | None:
    """The auth file's contents, read once at start; None (with a warning) when auth is off.

    Raises:
        ValueError, OSError: the file is unreadable or malformed; the coordinator
            must not start open by accident.
    """
    if not config.auth_file:
        log.warning(
            "MAILER_AUTH_FILE is not set: authentication is OFF and every caller may do "
            "everything (local development only)"
        )
        return None
    auth = load_auth_file(Path(config.auth_file), config.default_quotas)
    log.info("auth on: %d tenants, %d admin tokens", len(auth.tenants), len(auth.admin_hashes))
    return auth


def build_server(
    config: CoordinatorConfig,
    role: Role,
    auth: AuthConfig | None,
    peer_checks: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """The gRPC server with the client and admin services, auth and safe deserializers.

    Health and reflection are added by the caller and stay open to token-less callers.

    Args:
        peer_checks: Interceptors that run first (``Transport.interceptors()``: the
            client-certificate name check).
    """
    interceptors: list[grpc.aio.ServerInterceptor] = list(peer_checks)
    if auth is not None:
        interceptors.append(AuthInterceptor(auth))
    server = grpc.aio.server(options=server_options(config), interceptors=interceptors)
    add_service(
        server,
        coordinator_pb2_grpc.add_MailerServiceServicer_to_server,
        MailerServicer(
            role,
            config.batch_size,
            config.limits,
            auth=auth,
            default_quotas=config.default_quotas,
            templates=template_check(),
            webhooks=config.webhooks,
        ),
    )
    add_service(
        server, coordinator_pb2_grpc.add_AdminServiceServicer_to_server, AdminServicer(role)
    )
    return server


def template_check() -> TemplateCheck:
    """The sender node's own compile check (sandbox policy, syntax, filters), run at
    submit: the job's content is the message model the node compiles."""
    return message.check_templates


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in SERVICES:
        await servicer.set(service, status)


async def _first(*aws: asyncio.Future[Any]) -> None:
    await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)


CRASH_PAUSE_S = 5.0
"""How long a coordinator whose reign ended in a failed task waits before campaigning."""


async def _pause_until(stop_task: asyncio.Future[Any], seconds: float) -> None:
    await asyncio.wait({stop_task}, timeout=seconds)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def open_database(config: CoordinatorConfig, stop: asyncio.Event) -> Database | None:
    """Connect to PostgreSQL and bring the schema to head, retrying until it works or
    ``stop`` is set (None then). A coordinator campaigns only with a usable store."""
    pause_s = 0.5
    while not stop.is_set():
        try:
            db = await Database.open(config.database)
        except (StoreUnavailable, OSError) as exc:
            log.warning("PostgreSQL not usable yet (%s); retrying", exc)
            await _pause(stop, pause_s)
            pause_s = min(pause_s * 2, 5.0)
            continue
        log.info("PostgreSQL at %s, schema current", config.database.redacted())
        return db
    return None


async def serve(
    config: CoordinatorConfig, stop: asyncio.Event, transport: Transport | None = None
) -> None:
    """Run a coordinator until stop is set.

    Args:
        config: The coordinator's settings.
        stop: Set it to resign and shut down.
        transport: ``config.tls`` loaded (files read, or plaintext); None: load it here.

    Raises:
        TlsConfigError: neither TLS nor plaintext was chosen, or a TLS file is unusable.
    """
    if transport is None:
        transport = Transport.load(config.tls)
    client = connect(list(config.etcd_endpoints), tls=config.etcd_tls)
    role = Role(config.name, config.advertised, list(config.etcd_endpoints), config.etcd_tls)
    auth = load_auth(config)
    server = build_server(config, role, auth, transport.interceptors())
    health_servicer = await _health_and_reflection(server)
    metrics = _metrics(config, client)
    health_server = await _health_port(config.health_listen, health_servicer)
    transport.add_port(server, config.listen)
    await server.start()
    log.info("coordinator %s listening on %s, %s", config.name, config.listen, transport.describe())
    stop_task = asyncio.ensure_future(stop.wait())
    db: Database | None = None
    endpoints = _Endpoints()
    try:
        db = await open_database(config, stop)
        if db is not None:
            await endpoints.start(config, db, auth)
        while db is not None and not stop.is_set():
            try:
                await _term(
                    config, db, client, Keys(config.etcd_prefix), role, health_servicer,
                    stop_task, metrics, transport,
                )  # fmt: skip
            except asyncio.CancelledError:
                raise
            except (aetcd.ClientError, TimeoutError, LeadershipUnavailable) as exc:
                log.warning(
                    "etcd trouble at %s (%s); campaigning again shortly",
                    endpoint_of(client), describe_error(exc, DEFAULT_TIMEOUT_S),
                )  # fmt: skip
                await _pause(stop, 1.0)
            except (StoreUnavailable, LostLeadership) as exc:
                log.warning("could not take over (%s); campaigning again shortly", exc)
                await _pause(stop, 1.0)
    finally:
        stop_task.cancel()
        await endpoints.stop()
        await _set_health(health_servicer, False)
        await server.stop(grace=2)
        if health_server is not None:
            await health_server.stop(grace=None)
        if db is not None:
            await db.close()
        with contextlib.suppress(Exception):
            await client.close()


def _metrics(config: CoordinatorConfig, client: aetcd.Client) -> CoordinatorMetrics:
    metrics = CoordinatorMetrics()
    metrics.registry.register(EtcdClientMetrics(client))
    if config.metrics_listen:
        metrics.serve(config.metrics_listen)
    return metrics


class _Endpoints:
    """What every coordinator serves besides gRPC once PostgreSQL is usable: the inbound
    SMTP endpoint and the HTTPS endpoint with the console (each when configured)."""

    def __init__(self) -> None:
        self.inbound: asyncio.Server | None = None
        self.web: web.AppRunner | None = None

    async def start(self, config: CoordinatorConfig, db: Database, auth: AuthConfig | None) -> None:
        store = Store(db)
        tls = _server_tls(config)
        tenant_domains = auth.bounce_domains() if auth is not None else frozenset()
        self.inbound = await start_inbound(config.inbound, store, tls, tenant_domains)
        key_file = config.inbound.token_key_file
        key = TokenKey.from_file(key_file) if key_file else None
        console = console_for(config, auth, db)
        self.web = await start_web(config.http_listen, store, key, tls, console)

    async def stop(self) -> None:
        if self.inbound is not None:
            self.inbound.close()
        if self.web is not None:
            await self.web.cleanup()


def _server_tls(config: CoordinatorConfig) -> ssl.SSLContext | None:
    """TLS of the inbound SMTP (STARTTLS) and HTTPS endpoints: the coordinator's own
    certificate, no client certificate asked; None when plaintext."""
    files = config.tls.files
    if files is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)
    return context


async def _health_and_reflection(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """Add the health service (overall SERVING, the API services not yet) and reflection,
    which lets grpcurl-style tools discover the API without the protos."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            coordinator_pb2.DESCRIPTOR.services_by_name["MailerService"].full_name,
            coordinator_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    await _set_health(health_servicer, False)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return health_servicer


async def _health_port(
    listen: str, health_servicer: health.aio.HealthServicer
) -> grpc.aio.Server | None:
    """The plaintext health-only port (``MAILER_HEALTH_LISTEN``), started; None when off."""
    if not listen:
        return None
    health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    health_server.add_insecure_port(listen)
    await health_server.start()
    log.info("health service (plaintext) on %s", listen)
    return health_server


async def _term(
    config: CoordinatorConfig,
    db: Database,
    client: aetcd.Client,
    keys: Keys,
    role: Role,
    health_servicer: health.aio.HealthServicer,
    stop_task: asyncio.Future[Any],
    metrics: CoordinatorMetrics,
    transport: Transport,
) -> None:
    """One session: campaign, lead until something ends it, then clean up."""
    session = Session(client, config.election_ttl_s)
    await session.open()
    reign: Leader | None = None
    done_task = asyncio.ensure_future(session.done.wait())
    try:
        election = Election(client, keys, session, config.name, config.advertised)
        await election.enter()
        role.election = election
        campaign = asyncio.ensure_future(election.campaign())
        await _first(campaign, done_task, stop_task)
        if not campaign.done():
            campaign.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeadershipUnavailable):
                await campaign
            return
        fence = campaign.result()
        reign = Leader(config, db, client, keys, fence, session, transport, metrics)
        await reign.start()
        role.reign = reign
        await _set_health(health_servicer, True)
        metrics.leader.set(1)
        metrics.leader_changes.labels("elected").inc()
        lost_task = asyncio.ensure_future(reign.lost.wait())
        try:
            await _first(lost_task, done_task, stop_task)
        finally:
            lost_task.cancel()
        log.warning(
            "stepping down: %s",
            "stopping"
            if stop_task.done()
            else "lease lost"
            if session.done.is_set()
            else reign.why or "fence lost",
        )
    finally:
        role.reign = None
        await _set_health(health_servicer, False)
        if reign is not None:
            metrics.leader.set(0)
            metrics.leader_changes.labels("stepped_down").inc()
            await reign.stop()
        done_task.cancel()
        await session.close(revoke=True)
    if reign is not None and reign.crashed:
        # A failing task would fail again at once under a new epoch: give a standby (or
        # an operator) a moment instead of flapping.
        await _pause_until(stop_task, CRASH_PAUSE_S)
