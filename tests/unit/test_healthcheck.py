"""The probe's decision table: liveness takes any answer, readiness needs SERVING."""

from __future__ import annotations

import grpc
import pytest

from mailers.healthcheck import judge


@pytest.mark.parametrize("status", ["SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "UNKNOWN"])
def test_liveness_passes_on_any_health_status(status: str) -> None:
    # Given a server that answered the health call (a standby says NOT_SERVING)
    # Then the process counts as alive
    assert judge(None, status, None).ok


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        (grpc.StatusCode.UNIMPLEMENTED, True),  # a sender node: no health service, alive
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
