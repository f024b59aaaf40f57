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
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def probe(address: str, service: str | None, timeout_s: float) -> Verdict:
    """Ask the health service at address once, within timeout_s.

    The channel is closed before returning; nothing is retried (the caller, e.g. the
    kubelet, decides how many failures count).
    """
    request = health_pb2.HealthCheckRequest(service=service or "")
    with grpc.insecure_channel(address) as channel:
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
    ns = parser.parse_args(argv)
    verdict = probe(ns.address, ns.service, ns.timeout_s)
    print(f"{ns.address}: {verdict.reason}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
