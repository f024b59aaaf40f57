"""``python -m mailers.healthcheck ADDR [--service S]``: a probe for containers and units.

Two questions, two modes, exit status 0 (yes) or 1 (no):

- Without ``--service`` (liveness): does a gRPC server answer at ADDR? Any reply counts,
  whatever the status it reports: a standby coordinator answers ``NOT_SERVING`` for every
  service and a sender node has no health service at all (``UNIMPLEMENTED``), yet both
  are alive. Only no answer (refused, reset, deadline) fails.
- With ``--service S`` (readiness): is S ``SERVING`` at ADDR? Coordinators report
  ``mailer.v1.MailerService`` SERVING only while they lead, so this selects the leader.

Every call has a deadline (``--timeout-s``, 3 s by default); the probe never retries, so
it finishes within that time plus the interpreter's start. It prints one line saying
why, for ``docker inspect`` and ``kubectl describe``.

TLS: with ``MAILER_TLS_CA``/``MAILER_TLS_CERT``/``MAILER_TLS_KEY`` in the environment
(the probed process's own, when run inside its container) or ``--tls-ca``/``--tls-cert``/
``--tls-key``, the probe dials over TLS and presents that certificate, which servers
requiring client certificates accept. The server's certificate is checked for the host
of ADDR (``127.0.0.1``: the certificate must name it) or for ``--tls-server-name``.
Otherwise it dials in plaintext.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mailers.tls import TlsConfig, TlsConfigError, TlsMaterial
from mailers.tls import from_env as tls_from_env

# Codes that prove a server read our request and answered: it is alive, even when it
# does not implement the health service or does not know the service asked about.
_ANSWERED_CODES = frozenset(
    {
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def judge(service: str | None, status: str | None, code: grpc.StatusCode | None) -> Verdict:
    """Decide a probe from what the server said. Pure.

    Args:
        service: The service asked about; ``None`` for a liveness probe.
        status: The ``HealthCheckResponse`` status name when the call succeeded.
        code: The gRPC status code when the call failed.
    """
    if status is not None:
        if service is None:
            return Verdict(True, f"alive (health status {status})")
        return Verdict(status == "SERVING", f"{service or '<server>'}: {status}")
    assert code is not None
    if service is None and code in _ANSWERED_CODES:
        return Verdict(True, f"alive (answered {code.name})")
    return Verdict(False, f"no usable answer: {code.name}")


def _channel(address: str, tls: TlsConfig | None, server_name: str) -> grpc.Channel:
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(address)
    material = TlsMaterial.load(tls)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key,
        certificate_chain=material.cert_chain,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def probe(
    address: str,
    service: str | None,
    timeout_s: float,
    *,
    tls: TlsConfig | None = None,
    server_name: str = "",
) -> Verdict:
    """Ask the health service at address once, within timeout_s.

    The channel is closed before returning; nothing is retried (the caller, e.g. the
    kubelet, decides how many failures count).

    Args:
        address: ``host:port``.
        service: The service that must be SERVING; None for liveness.
        timeout_s: Deadline of the call.
        tls: Dial over TLS with these files (also the client certificate); None or
            no files: plaintext.
        server_name: The name the server's certificate must carry; the host of
            address when empty.
    """
    request = health_pb2.HealthCheckRequest(service=service or "")
    try:
        channel = _channel(address, tls, server_name)
    except TlsConfigError as exc:
        return Verdict(False, f"TLS: {exc}")
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            return judge(service, None, exc.code())
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return judge(service, name, None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailers.healthcheck", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("address", help="host:port of the gRPC server")
    parser.add_argument(
        "--service",
        help="require this service to be SERVING (readiness); without it, any answer "
        "from the server passes (liveness)",
    )
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the call")
    parser.add_argument("--tls-ca", help="CA file (default: $MAILER_TLS_CA)")
    parser.add_argument("--tls-cert", help="client certificate (default: $MAILER_TLS_CERT)")
    parser.add_argument("--tls-key", help="its private key (default: $MAILER_TLS_KEY)")
    parser.add_argument(
        "--tls-server-name", default="", help="name in the server's certificate (default: host)"
    )
    ns = parser.parse_args(argv)
    env = dict(os.environ)
    for flag, name in (("tls_ca", "MAILER_TLS_CA"), ("tls_cert", "MAILER_TLS_CERT"),
                       ("tls_key", "MAILER_TLS_KEY")):  # fmt: skip
        if getattr(ns, flag):
            env[name] = getattr(ns, flag)
            env.pop("MAILER_PLAINTEXT", None)
    try:
        tls = tls_from_env(env)
    except TlsConfigError as exc:
        print(f"{ns.address}: TLS: {exc}")
        return 1
    verdict = probe(ns.address, ns.service, ns.timeout_s, tls=tls, server_name=ns.tls_server_name)
    print(f"{ns.address}: {verdict.reason}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
