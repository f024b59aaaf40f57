"""The development tools' port picker never hands the same port out twice."""

from __future__ import annotations

from mailers_dev.procs import free_port


def test_ports_handed_out_are_never_repeated_within_a_process() -> None:
    # When many ports are asked for before any is bound (a test reserving a node's port,
    # then a cluster choosing its own)
    ports = [free_port() for _ in range(300)]
    # Then no two are the same
    assert len(set(ports)) == len(ports)
