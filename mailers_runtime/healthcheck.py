"""``python -m mailers_runtime.healthcheck [ADDR] [--service S]``: a probe for containers and units.

Without ADDR it probes the process of its own container (the image's ``HEALTHCHECK``):

- The role is ``--role coordinator|node``, or else read from the command line of PID 1
  (``mailers coordinator``, ``mailers node``, ``python -m coordinator``,
  ``python -m sender_node``), so one image serves both without a setting.
- The address and TLS come from the process's own ``MAILER_*`` environment, which the
  probe inherits: a coordinator is asked on its plaintext health port
  (``MAILER_HEALTH_LISTEN``) when it has one, else on ``MAILER_LISTEN`` over TLS; a node
  on ``MAILER_LISTEN`` over TLS (a node's port must be fixed, not 0). A wildcard host
  (``0.0.0.0``, ``::``) is dialed on loopback. A node is never asked on 7701 unless its
  own ``MAILER_LISTEN`` says so.
- The overall service ``""`` must be SERVING: a coordinator from its start, leader or
  standby; a node while it is registered in etcd and not draining. With ``--ready`` a
  coordinator must also lead (``mailer.v1.MailerService`` SERVING).

With ADDR, two questions, two modes, exit status 0 (yes) or 1 (no):

- Without ``--service`` (liveness): does a gRPC server answer at ADDR? Any reply counts,
  whatever the status it reports: a standby coordinator answers ``NOT_SERVING`` for the
  leader's services, a draining node ``NOT_SERVING``, a server without the health service
  ``UNIMPLEMENTED``, yet all are alive. Only no answer (refused, reset, deadline) fails.
- With ``--service S`` (readiness): is S ``SERVING`` at ADDR? Coordinators report
  ``mailer.v1.MailerService`` SERVING only while they lead, so this selects the leader;
  ``--service ""`` asks about the server as a whole (a node: registered, not draining).

Every call has a deadline (``--timeout-s``, 3 s by default); the probe never retries, so
it finishes within that time plus the interpreter's start. It prints one line saying
why, for ``docker inspect`` and ``kubectl describe``.

TLS: with the TLS files in the environment (the probed process's own
``MAILER_TLS_CA``/``_CERT``/``_KEY``, read through its ``TlsConfig`` declarations, when
run inside its container) or ``--tls-ca``/``--tls-cert``/``--tls-key`` (each replaces
its variable), the probe dials over TLS and presents that certificate, which servers
requiring client certificates accept. The server's certificate is checked for the host
of ADDR (``127.0.0.1``: the certificate must name it) or for ``--tls-server-name``.
Otherwise it dials in plaintext.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mailers_runtime import settings
from mailers_runtime.errors import ConfigError
from mailers_runtime.tls import TlsConfig, TlsFiles, TlsMaterial, name_override

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


LEADER_SERVICE = "mailer.v1.MailerService"
"""SERVING on the coordinator that leads, and nowhere else."""
COORDINATOR_LISTEN = "127.0.0.1:7701"
"""A coordinator's ``MAILER_LISTEN`` when unset (``coordinator/config.py``)."""
PID1_CMDLINE = Path("/proc/1/cmdline")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


class Role(enum.Enum):
    """The server a container runs."""

    COORDINATOR = "coordinator"
    NODE = "node"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and what to ask the local process (see :func:`local_target`)."""

    address: str
    service: str
    """The service that must be SERVING; ``""`` is the server as a whole."""
    plaintext: bool
    """Dial without TLS (a coordinator's health-only port)."""


class TargetError(ValueError):
    """The environment does not say where the local process listens; the message says why."""


def role_from_command(argv: Sequence[str]) -> Role | None:
    """The role of a process started as argv, or None when argv runs no server. Pure.

    Recognised: ``mailers coordinator``, ``mailers node`` (the program may be a path and
    follow an interpreter or an init such as ``tini --``), ``python -m coordinator`` and
    ``python -m sender_node``. ``mailers node drain ID`` (an admin command) is no server.
    """
    args = list(argv)
    for i, arg in enumerate(args):
        following = args[i + 1 :]
        if arg == "-m" and following[:1] == ["coordinator"]:
            return Role.COORDINATOR
        if arg == "-m" and following[:1] == ["sender_node"]:
            return Role.NODE
        if os.path.basename(arg) == "mailers" and following:
            command, rest = following[0], [a for a in following[1:] if not a.startswith("-")]
            if command == "coordinator":
                return Role.COORDINATOR
            if command == "node" and not rest:
                return Role.NODE
    return None


def _split_listen(value: str, variable: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise TargetError(f"{variable}={value!r} is not host:port")
    return host, int(port)


def _loopback(value: str, variable: str) -> str:
    """The address a probe in the same network namespace dials for a listen address."""
    host, port = _split_listen(value, variable)
    if port == 0:
        raise TargetError(f"{variable}={value!r} picks a free port; a probe needs a fixed one")
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def local_target(role: Role, environ: Mapping[str, str], *, ready: bool = False) -> Target:
    """Where the process of role, configured by environ, answers health checks. Pure.

    Args:
        role: What the process is.
        environ: Its ``MAILER_*`` environment.
        ready: For a coordinator, ask whether it leads; a node has one question only.

    Raises:
        TargetError: the listen address is malformed, or a node's port is 0 or unset.
    """
    service = LEADER_SERVICE if ready and role is Role.COORDINATOR else ""
    if role is Role.COORDINATOR:
        health = environ.get("MAILER_HEALTH_LISTEN", "").strip()
        if health:
            return Target(_loopback(health, "MAILER_HEALTH_LISTEN"), service, plaintext=True)
        listen = environ.get("MAILER_LISTEN", "").strip() or COORDINATOR_LISTEN
        return Target(_loopback(listen, "MAILER_LISTEN"), service, plaintext=False)
    listen = environ.get("MAILER_LISTEN", "").strip()
    if not listen:
        raise TargetError("MAILER_LISTEN is unset: a node listens on a free port then")
    return Target(_loopback(listen, "MAILER_LISTEN"), service, plaintext=False)


def _pid1_role(path: Path) -> Role | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return role_from_command([a.decode(errors="replace") for a in raw.split(b"\0") if a])


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


def _channel(address: str, tls: TlsFiles | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    material = TlsMaterial.load(tls, settings.variable_names(TlsConfig, "files"))
    options = name_override(tls.server_name)
    return grpc.secure_channel(address, material.channel_credentials(), options=options)


def tls_files(
    environ: Mapping[str, str], overrides: Mapping[str, str | None], server_name: str | None
) -> TlsFiles | None:
    """The files to dial with: the process's own TLS settings from ``environ``, with
    each file in ``overrides`` (by field: ``ca_file``...) replacing its variable (and
    plaintext then off); None for plaintext. The server name checked is
    ``server_name`` (the host dialed when None), never the process's own, which names
    the servers that process dials.

    Raises:
        ConfigError: the TLS settings are malformed or contradictory.
    """
    variables = settings.variable_names(TlsConfig)
    env = dict(environ)
    for field, value in overrides.items():
        if value:
            env[variables[f"files.{field}"]] = value
            env.pop(variables["plaintext"], None)
    files = settings.load(TlsConfig, env).files
    return None if files is None else dataclasses.replace(files, server_name=server_name)


def probe(
    address: str,
    service: str | None,
    timeout_s: float,
    *,
    tls: TlsFiles | None = None,
) -> Verdict:
    """Ask the health service at address once, within timeout_s.

    The channel is closed before returning; nothing is retried (the caller, e.g. the
    kubelet, decides how many failures count).

    Args:
        address: ``host:port``.
        service: The service that must be SERVING; None for liveness.
        timeout_s: Deadline of the call.
        tls: Dial over TLS with these files (also the client certificate), checking
            their ``server_name`` in the server's certificate (the host of address when
            None); None: plaintext.
    """
    request = health_pb2.HealthCheckRequest(service=service or "")
    try:
        channel = _channel(address, tls)
    except ConfigError as exc:
        return Verdict(False, f"TLS: {exc}")
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            return judge(service, None, exc.code())
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return judge(service, name, None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailers_runtime.healthcheck", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "address",
        nargs="?",
        help="host:port of the gRPC server; omitted: this container's coordinator or node, "
        "found from its environment (SERVING required)",
    )
    parser.add_argument(
        "--service",
        help="require this service to be SERVING (readiness); without it, any answer "
        "from the server passes (liveness)",
    )
    parser.add_argument(
        "--role",
        choices=[r.value for r in Role],
        help="without ADDR: what this container runs (default: read from PID 1's command)",
    )
    parser.add_argument(
        "--ready",
        action="store_true",
        help="without ADDR: a coordinator must also lead (a node has no other question)",
    )
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the call")
    parser.add_argument("--tls-ca", help="CA file (default: $MAILER_TLS_CA)")
    parser.add_argument("--tls-cert", help="client certificate (default: $MAILER_TLS_CERT)")
    parser.add_argument("--tls-key", help="its private key (default: $MAILER_TLS_KEY)")
    parser.add_argument(
        "--tls-server-name", default="", help="name in the server's certificate (default: host)"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, pid1_cmdline: Path = PID1_CMDLINE) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    env = dict(os.environ)
    address: str = ns.address or ""
    service: str | None = ns.service
    plaintext = False
    if not address:
        if ns.service is not None:
            parser.error("--service needs ADDR; without it, use --ready")
        role = Role(ns.role) if ns.role else _pid1_role(pid1_cmdline)
        if role is None:
            print("cannot tell whether this runs a coordinator or a node: pass --role or ADDR")
            return 1
        try:
            target = local_target(role, env, ready=ns.ready)
        except TargetError as exc:
            print(f"{role.value}: {exc}")
            return 1
        address, service, plaintext = target.address, target.service, target.plaintext
    elif ns.role or ns.ready:
        parser.error("--role and --ready probe this container's process: drop ADDR")
    tls: TlsFiles | None = None
    if not plaintext:
        files = {"ca_file": ns.tls_ca, "cert_file": ns.tls_cert, "key_file": ns.tls_key}
        try:
            tls = tls_files(env, files, ns.tls_server_name or None)
        except ConfigError as exc:
            print(f"{address}: TLS: {exc}")
            return 1
    verdict = probe(address, service, ns.timeout_s, tls=tls)
    print(f"{address}: {verdict.reason}")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
