"""The development tools' port picker never hands the same port out twice, and never
one an outgoing connection could be given meanwhile."""

from __future__ import annotations

import socket
from pathlib import Path

from mailers_dev.procs import free_port


def test_ports_handed_out_are_never_repeated_within_a_process() -> None:
    # When many ports are asked for before any is bound (a test reserving a node's port,
    # then a cluster choosing its own)
    ports = [free_port() for _ in range(300)]
    # Then no two are the same
    assert len(set(ports)) == len(ports)


def test_ports_handed_out_lie_below_the_ephemeral_range_and_are_free() -> None:
    # Given the kernel's range of ports for outgoing connections
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # When ports are asked for
    ports = [free_port() for _ in range(50)]
    # Then none is one an outgoing connection could be given before its server binds it
    assert all(1024 <= port < low for port in ports)
    # And each can be bound right away
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
