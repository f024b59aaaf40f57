"""``python -m sender_node``: run one sender node until SIGTERM or SIGINT.

Startup: read ``MAILER_*`` (see ``config.py``; inconsistent timeouts exit 2) and the TLS
files (``mailers_runtime/tls.py``: without TLS files or ``MAILER_PLAINTEXT=1`` the node exits
2), open the result journal in ``MAILER_STATE_DIR`` (exit 2 if it cannot be used or
another process holds it), connect to etcd, start the gRPC server with the dispatch and
health services (binding a free port when the listen port is 0; with TLS it requires a
coordinator's client certificate for dispatch), register under a lease with the
advertised address, then follow the leader's epoch and watch for the need to hand back.

Shutdown on SIGTERM/SIGINT:

1. drain: health turns NOT_SERVING, new batches are rejected, batches under way go on
   for up to ``MAILER_DRAIN_TIMEOUT_S``;
2. then every batch stops starting transactions; those past their final dot finish
   (up to the final-reply timeout, ``NodeTimings.final_reply_s``) and are journaled;
   every batch is released: acks on the leader's stream, or, with no usable stream,
   a hand-back through etcd;
3. the journal's last fsync, streams end, the lease is revoked, SMTP connections
   close, exit 0.

No transaction is ever cut after its final dot, so the process may exit up to the
final-reply timeout later than the drain timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import aetcd
import grpc
import uvloop
from grpc_health.v1 import health_pb2_grpc

from mailerpb.mailer.v1 import sender_pb2_grpc
from mailers_runtime import collector, logs
from mailers_runtime.etcd import EtcdClient, EtcdClientMetrics, Keys, connect
from mailers_runtime.tls import Transport
from mailers_runtime.verp import ReturnPath, TokenKey
from sender_node.config import (
    MIN_THROUGHPUT_BYTES_PER_S,
    NodeTimings,
    SenderConfig,
    from_env,
    timings_of,
)
from sender_node.dkim import DkimSigner
from sender_node.errors import ConfigError
from sender_node.handback import HandbackWriter
from sender_node.health import NodeHealth
from sender_node.journal import Journal, JournalError
from sender_node.leader_watch import LeaderWatch
from sender_node.metrics import NodeMetrics
from sender_node.pacing import DomainPacer
from sender_node.registration import Registration
from sender_node.servicer import SenderServicer
from sender_node.smtp_client import RelayPool

log = logging.getLogger("sender_node")

# The leader pings every 2 s so a dead peer is noticed in seconds; accept that (the
# default would answer with GOAWAY "too_many_pings" and cut an idle stream), and ping
# back so a node notices a vanished leader and stops its batches just as fast.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # gRPC shares a port with any other process that binds it too (SO_REUSEPORT); a
    # port taken by another server must fail the start instead of splitting its calls.
    ("grpc.so_reuseport", 0),
]

_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}
_ETCD_CONNECT_TIMEOUT_S = 10.0
_SERVER_STOP_GRACE_S = 1.0
_HANDBACK_WRITE_TIMEOUT_S = 5.0


def _advertise_address(config: SenderConfig, bound_port: int) -> str:
    if config.advertise:
        return config.advertise
    host = config.listen.rpartition(":")[0]
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"{host}:{bound_port}"


@dataclasses.dataclass
class _Node:
    """A node's parts; :func:`_serve` starts them, :func:`_shut_down` stops them."""

    config: SenderConfig
    timings: NodeTimings
    journal: Journal
    etcd: aetcd.Client
    pool: RelayPool
    registration: Registration
    servicer: SenderServicer
    leader: LeaderWatch
    handback: HandbackWriter
    health: NodeHealth
    server: grpc.aio.Server
    health_server: grpc.aio.Server | None = None


def _assemble(
    config: SenderConfig, journal: Journal, etcd: EtcdClient, transport: Transport
) -> _Node:
    timings = timings_of(config)
    keys = Keys(config.etcd.prefix)
    pool = _relay_pool(config)
    metrics = NodeMetrics()
    metrics.registry.register(EtcdClientMetrics(etcd))
    if config.metrics_listen:
        metrics.serve(config.metrics_listen)
    registration = Registration(
        etcd,
        keys,
        config.node_id,
        capacity=config.capacity,
        ttl_s=config.etcd.lease_ttl_s,
        margin_s=config.etcd.trust_margin_s,
        metrics=metrics,
    )
    servicer = SenderServicer(
        node_id=config.node_id,
        registration=registration,
        mailer=pool,
        journal=journal,
        capacity=config.capacity,
        concurrency=config.smtp.sending_concurrency(),
        timings=timings,
        max_unacked_results=config.max_unacked_results,
        metrics=metrics,
        signer=DkimSigner.from_files(config.dkim_keys) if config.dkim_keys else None,
        return_path=ReturnPath(
            TokenKey.from_file(config.token_key_file),
            config.bounce_domain,
            unsubscribe_url=config.unsubscribe_url,
        )  # fmt: skip
        if config.token_key_file
        else None,
        pacer=DomainPacer(config.domain_limits.default, config.domain_limits.overrides),
    )
    handback = HandbackWriter(
        etcd,
        keys.handback(config.node_id),
        content=servicer.handback_bytes,
        usable=servicer.usable_stream,
        after_s=timings.handback_after_s,
        end_streams=lambda: servicer.end_streams("no usable stream: handing back through etcd"),
    )
    # mTLS: only clients with a certificate from the CA naming a coordinator get to
    # the dispatch servicer (transport.interceptors() checks the name; health is open).
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=transport.interceptors())
    health = NodeHealth(servicer.serving)
    sender_pb2_grpc.add_SenderServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    leader = LeaderWatch(etcd, keys, servicer.observe_epoch)
    return _Node(
        config, timings, journal, etcd, pool, registration, servicer, leader, handback, health,
        server, _health_server(config, health),
    )  # fmt: skip


def _relay_pool(config: SenderConfig) -> RelayPool:
    return RelayPool(
        config.smtp.relays,
        strategy=config.smtp.strategy,
        connections_per_relay=config.smtp.connections_per_relay,
        timeout_s=config.smtp.timeout_s,
        final_reply_timeout_s=config.smtp.final_reply_timeout_s,
        helo_name=config.smtp.helo_name,
        # The final-reply bound the leader is told assumes this throughput.
        min_throughput_bytes_per_s=MIN_THROUGHPUT_BYTES_PER_S,
    )


def _health_server(config: SenderConfig, health: NodeHealth) -> grpc.aio.Server | None:
    """Plaintext, health only: for probes without a client certificate (none unless
    ``config.health_listen``)."""
    if not config.health_listen:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    server.add_insecure_port(config.health_listen)
    return server


async def run(
    config: SenderConfig, stop: asyncio.Event, transport: Transport | None = None
) -> None:
    """Run a node until ``stop`` is set, then shut it down in order (module docstring).

    Args:
        config: The node's settings.
        stop: Set it to shut down.
        transport: ``config.tls`` loaded (TLS files read, or plaintext chosen); loaded
            here when None.

    Raises:
        RuntimeError: the listen address cannot be bound.
        TimeoutError: etcd could not be reached at startup.
        TlsConfigError: neither TLS nor plaintext was chosen, or a TLS file is unusable.
        JournalError: the state directory cannot be used (or another process holds it).
    """
    if transport is None:
        transport = Transport.load(config.tls)
    journal = await asyncio.to_thread(Journal.open, Path(config.state_dir))
    journal.start()
    etcd = connect(list(config.etcd.endpoints), tls=config.etcd.tls)
    try:
        async with asyncio.timeout(_ETCD_CONNECT_TIMEOUT_S):
            await etcd.connect()
        node = _assemble(config, journal, etcd, transport)
        try:
            await _serve(node, transport, stop)
        finally:
            await _shut_down(node)
    finally:
        await journal.close()
        await etcd.close()
        log.info("stopped")


async def _serve(node: _Node, transport: Transport, stop: asyncio.Event) -> None:
    config = node.config
    port = transport.add_port(node.server, config.listen)
    await node.server.start()
    if node.health_server is not None:
        await node.health_server.start()
        log.info("health service (plaintext) on %s", config.health_listen)
    node.health.start()
    address = _advertise_address(config, port)
    node.registration.start(address)
    node.leader.start()
    node.handback.start()
    log.info(
        "serving on %s (advertised as %s), %s; journal in %s",
        config.listen,
        address,
        transport.describe(),
        config.state_dir,
    )
    await stop.wait()
    log.info("stopping: draining batches for up to %.1fs", config.drain_timeout_s)
    node.servicer.drain()
    await node.health.update()
    if not await node.servicer.wait_idle(config.drain_timeout_s):
        log.warning(
            "drain timed out: no new transactions; finishing those past their final dot "
            "(up to %.1fs)",
            node.timings.release_s,
        )
        node.servicer.stop_all("the node is shutting down")
        await node.servicer.wait_idle(node.timings.release_s + 1.0)


async def _shut_down(node: _Node) -> None:
    """Release everything (acks on the stream, or a hand-back), then stop the parts."""
    servicer = node.servicer
    usable = await servicer.release_all()
    await servicer.close(ack_wait_s=0)
    await node.handback.stop()
    if not usable:
        try:
            async with asyncio.timeout(_HANDBACK_WRITE_TIMEOUT_S):
                await node.handback.write_now()
        except Exception as exc:  # etcd unreachable: the journal keeps everything
            log.warning("no hand-back at shutdown: %s", exc or type(exc).__name__)
    await node.leader.stop()
    await node.health.stop()
    if node.health_server is not None:
        await node.health_server.stop(None)
    await node.server.stop(_SERVER_STOP_GRACE_S)
    await node.registration.stop(revoke=True)
    await node.pool.close()


async def _main(config: SenderConfig, transport: Transport) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run(config, stop, transport)


def main() -> int:
    """Entry point: configure from the environment and run until signalled."""
    try:
        config = from_env(os.environ)
        # TLS files are read once, here, so a bad one stops the node before it starts.
        transport = Transport.load(config.tls)
    except ConfigError as exc:  # TlsConfigError too
        print(f"sender_node: {exc}", file=sys.stderr)
        return 2
    logs.setup("node", config.node_id, os.environ)
    # uvloop measured +30% end-to-end throughput on a node (bench/e2e.py).
    uvloop.install()
    collector.tune()
    try:
        asyncio.run(_main(config, transport))
    except JournalError as exc:
        print(f"sender_node: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
