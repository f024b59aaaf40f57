"""Free ports and waiting for a server's port, with real processes and sockets.

A server given a port that another process took first cannot bind it and exits, while
the other process answers on the port: waiting for the port must not take that answer
for the server's.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from mailers_dev import procs
from mailers_dev.procs import PORT_SLICE_ENV, free_port, listens, wait_for_port

LISTEN = (
    "import socket, sys, time; s = socket.socket(); "
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)"
)
"""A child that listens on the port given as its argument (and exits when it cannot)."""


@contextmanager
def child(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def listening() -> Iterator[int]:
    """A port this test process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_server_listening_on_its_port_is_found() -> None:
    port = free_port()
    with child([sys.executable, "-c", LISTEN, str(port)]) as server:
        wait_for_port(port, 30, server)
        assert listens(server.pid, port) is True


def test_a_listener_in_a_child_of_the_process_counts() -> None:
    port = free_port()
    # The shell forks (a command follows), so the listener is its child.
    script = f'"{sys.executable}" -c "{LISTEN}" {port}; true'
    with child(["sh", "-c", script]) as shell:
        wait_for_port(port, 30, shell)
        assert listens(shell.pid, port) is True


def test_a_port_another_process_answers_is_not_the_servers() -> None:
    with listening() as port, child([sys.executable, "-c", "import time; time.sleep(60)"]) as idle:
        assert listens(idle.pid, port) is False
        with pytest.raises(TimeoutError, match=f"answers, but not from process {idle.pid}"):
            wait_for_port(port, 1.0, idle)


def test_a_server_that_cannot_bind_its_port_is_reported() -> None:
    # Given another process listens on the port first
    with listening() as port, child([sys.executable, "-c", LISTEN, str(port)]) as server:
        # When the server meant for it fails to bind and exits, Then waiting says so
        with pytest.raises(RuntimeError, match="exited with 1"):
            wait_for_port(port, 30, server)


def test_each_slice_draws_from_its_own_part_of_the_span(monkeypatch: pytest.MonkeyPatch) -> None:
    low = procs._ephemeral_low()
    if low - procs._PICK_SPAN < 1024:
        pytest.skip("this machine's ephemeral range leaves no span below it")
    drawn: dict[str, set[int]] = {}
    for value in ("0/2", "1/2"):
        monkeypatch.setenv(PORT_SLICE_ENV, value)
        drawn[value] = {free_port() for _ in range(40)}
    middle = low - procs._PICK_SPAN // 2
    assert all(low - procs._PICK_SPAN <= p < middle for p in drawn["0/2"])
    assert all(middle <= p < low for p in drawn["1/2"])


@pytest.mark.parametrize("value", ["2/2", "1", "a/2", "-1/2"])
def test_a_slice_that_is_not_k_of_n_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(PORT_SLICE_ENV, value)
    with pytest.raises(ValueError, match=PORT_SLICE_ENV):
        free_port()
