"""The probe's decision table (liveness takes any answer, readiness needs SERVING), and
how the container probe finds its own process: the role from PID 1's command, the
address from the process's environment."""

from __future__ import annotations

import grpc
import pytest

from mailers_runtime.healthcheck import (
    LEADER_SERVICE,
    Role,
    Target,
    TargetError,
    judge,
    local_target,
    role_from_command,
)


@pytest.mark.parametrize("status", ["SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "UNKNOWN"])
def test_liveness_passes_on_any_health_status(status: str) -> None:
    # Given a server that answered the health call (a standby says NOT_SERVING)
    # Then the process counts as alive
    assert judge(None, status, None).ok


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        (grpc.StatusCode.UNIMPLEMENTED, True),  # no health service (an older node): alive
        (grpc.StatusCode.NOT_FOUND, True),
        (grpc.StatusCode.UNAVAILABLE, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False),
        (grpc.StatusCode.INTERNAL, False),
    ],
)
def test_liveness_on_rpc_errors(code: grpc.StatusCode, ok: bool) -> None:
    assert judge(None, None, code).ok is ok


def test_readiness_needs_serving() -> None:
    service = "mailer.v1.MailerService"
    assert judge(service, "SERVING", None).ok
    assert not judge(service, "NOT_SERVING", None).ok
    assert not judge(service, None, grpc.StatusCode.UNIMPLEMENTED).ok
    assert not judge(service, None, grpc.StatusCode.UNAVAILABLE).ok


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["/opt/mailers/bin/python", "/opt/mailers/bin/mailers", "coordinator"], Role.COORDINATOR),
        (["/opt/mailers/bin/python", "/opt/mailers/bin/mailers", "node"], Role.NODE),
        (["/sbin/docker-init", "--", "mailers", "node"], Role.NODE),
        (["python", "-m", "coordinator"], Role.COORDINATOR),
        (["/usr/bin/python3", "-m", "sender_node"], Role.NODE),
        (["mailers", "node", "drain", "node-1"], None),  # an admin command, no server
        (["mailers", "status"], None),
        (["python", "-m", "mailers_dev.sink"], None),
        (["etcd", "--name", "node"], None),
        ([], None),
    ],
)
def test_role_from_the_command_of_pid_1(argv: list[str], role: Role | None) -> None:
    assert role_from_command(argv) is role


def test_a_coordinator_with_a_health_port_is_asked_there_in_plaintext() -> None:
    # Given a coordinator whose health-only port listens on every address
    env = {"MAILER_LISTEN": "0.0.0.0:7701", "MAILER_HEALTH_LISTEN": "0.0.0.0:7702"}
    # Then the probe asks loopback on that port, without TLS: alive, or leading with --ready
    assert local_target(Role.COORDINATOR, env) == Target("127.0.0.1:7702", "", plaintext=True)
    ready = local_target(Role.COORDINATOR, env, ready=True)
    assert ready == Target("127.0.0.1:7702", LEADER_SERVICE, plaintext=True)


def test_a_coordinator_without_one_is_asked_on_its_api_port_over_tls() -> None:
    assert local_target(Role.COORDINATOR, {}) == Target("127.0.0.1:7701", "", plaintext=False)
    env = {"MAILER_LISTEN": "[::]:7711"}
    assert local_target(Role.COORDINATOR, env).address == "127.0.0.1:7711"


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("0.0.0.0:7800", "127.0.0.1:7800"),
        ("10.0.30.11:7800", "10.0.30.11:7800"),
        ("::1:7800", "[::1]:7800"),
        ("[::1]:7800", "[::1]:7800"),
    ],
)
def test_a_node_is_asked_on_its_own_port_over_tls(listen: str, address: str) -> None:
    # Given a node's listen address (a coordinator's health port set in the same
    # environment by mistake changes nothing)
    env = {"MAILER_LISTEN": listen, "MAILER_HEALTH_LISTEN": "0.0.0.0:7702"}
    # Then the probe asks the whole server ("") at that port, over TLS, never 7701/7702,
    # and --ready asks nothing more of a node
    assert local_target(Role.NODE, env) == Target(address, "", plaintext=False)
    assert local_target(Role.NODE, env, ready=True) == Target(address, "", plaintext=False)


@pytest.mark.parametrize("listen", ["", "0.0.0.0:0", "7800", "host:port"])
def test_a_node_without_a_fixed_port_cannot_be_probed(listen: str) -> None:
    with pytest.raises(TargetError):
        local_target(Role.NODE, {"MAILER_LISTEN": listen})
