"""``python -m sender_node``: run one sender node until SIGTERM or SIGINT.

Startup: read ``MAILER_*`` (see ``config.py``) and the TLS files (``mailers/tls.py``:
without TLS files or ``MAILER_PLAINTEXT=1`` the node exits 2), connect to etcd, start
the gRPC server (binding a free port when the listen port is 0; with TLS it requires a
coordinator's client certificate), then register under a lease with the advertised
address. Shutdown on SIGTERM/SIGINT: refuse new streams and batches, let
batches under way finish for up to ``MAILER_DRAIN_TIMEOUT_S``, cancel the rest, revoke
the lease, close the SMTP connections, and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

import grpc
import uvloop

from mailerpb.mailer.v1 import sender_pb2_grpc
from mailers import logs
from mailers.etcd import Keys, connect
from mailers.tls import TlsConfigError, Transport
from sender_node.config import SenderConfig, from_env
from sender_node.dkim import DkimSigner
from sender_node.errors import ConfigError
from sender_node.metrics import NodeMetrics
from sender_node.pacing import DomainPacer
from sender_node.registration import Registration
from sender_node.servicer import SenderServicer
from sender_node.smtp_client import RelayPool

log = logging.getLogger("sender_node")

# The leader pings every 2 s so a dead peer is noticed in seconds; accept that (the
# default would answer with GOAWAY "too_many_pings" and cut an idle stream), and ping
# back so a node notices a vanished leader and drops its batches just as fast.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}
_ETCD_CONNECT_TIMEOUT_S = 10.0
_SERVER_STOP_GRACE_S = 1.0


def _advertise_address(config: SenderConfig, bound_port: int) -> str:
    if config.advertise:
        return config.advertise
    host = config.listen.rpartition(":")[0]
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"{host}:{bound_port}"


async def run(
    config: SenderConfig, stop: asyncio.Event, transport: Transport | None = None
) -> None:
    """Run a node until ``stop`` is set, then shut it down in order.

    Args:
        config: The node's settings.
        stop: Set it to shut down.
        transport: ``config.tls`` loaded (TLS files read, or plaintext chosen); loaded
            here when None.

    Raises:
        RuntimeError: the listen address cannot be bound.
        TimeoutError: etcd could not be reached at startup.
        TlsConfigError: neither TLS nor plaintext was chosen, or a TLS file is unusable.
    """
    if transport is None:
        transport = Transport.load(config.tls)
    etcd = connect(list(config.etcd.endpoints), tls=config.etcd.tls)
    async with asyncio.timeout(_ETCD_CONNECT_TIMEOUT_S):
        await etcd.connect()
    pool = RelayPool(
        config.smtp.relays,
        strategy=config.smtp.strategy,
        connections_per_relay=config.smtp.connections_per_relay,
        timeout_s=config.smtp.timeout_s,
        helo_name=config.smtp.helo_name,
    )
    metrics = NodeMetrics()
    if config.metrics_listen:
        metrics.serve(config.metrics_listen)
    registration = Registration(
        etcd,
        Keys(config.etcd.prefix),
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
        capacity=config.capacity,
        concurrency=config.smtp.sending_concurrency(),
        metrics=metrics,
        signer=DkimSigner.from_files(config.dkim_keys) if config.dkim_keys else None,
        pacer=DomainPacer(config.domain_limits, config.domain_overrides),
    )
    # mTLS: only clients with a certificate from the CA naming a coordinator get to
    # the servicer (transport.interceptors() checks the name).
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=transport.interceptors())
    sender_pb2_grpc.add_SenderServiceServicer_to_server(servicer, server)
    try:
        port = transport.add_port(server, config.listen)
        await server.start()
        address = _advertise_address(config, port)
        registration.start(address)
        log.info(
            "serving on %s (advertised as %s), %s", config.listen, address, transport.describe()
        )
        await stop.wait()
        log.info("stopping: draining batches for up to %.1fs", config.drain_timeout_s)
        servicer.drain()
        if not await servicer.wait_idle(config.drain_timeout_s):
            log.warning("drain timed out; dropping the batches still under way")
    finally:
        await servicer.close()
        await server.stop(_SERVER_STOP_GRACE_S)
        await registration.stop(revoke=True)
        await pool.close()
        await etcd.close()
        log.info("stopped")


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
    except (ConfigError, TlsConfigError) as exc:
        print(f"sender_node: {exc}", file=sys.stderr)
        return 2
    logs.setup("node", config.node_id, os.environ)
    # uvloop measured +30% end-to-end throughput on a node (bench/e2e.py).
    uvloop.install()
    asyncio.run(_main(config, transport))
    return 0


if __name__ == "__main__":
    sys.exit(main())
