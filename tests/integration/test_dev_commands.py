"""``mailers cluster`` as a process: SIGTERM and SIGHUP stop everything it started, as
Ctrl-C does, and a run finds an earlier one in its work directory (still running:
refused; killed: what it left is stopped).

Each run is the real command (``python -m mailers.cli cluster --plaintext``) with its
real etcd, PostgreSQL, coordinators, nodes and sink; the processes are checked by the
PIDs and start times the run recorded (``mailers_dev.runstate``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailers_dev.procs import free_port
from mailers_dev.runstate import RunRecord
from tests.helpers import require_etcd

UP_S = 120


class Run:
    """One ``mailers cluster`` process; its output goes to a file."""

    def __init__(self, workdir: Path, log: Path) -> None:
        self.workdir = workdir
        self.log = log
        ports = f"{free_port()},{free_port()}"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailers.cli", "cluster", "--plaintext"]
                + ["--workdir", str(workdir), "--ports", ports],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "COLUMNS": "200"},
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self) -> RunRecord:
        """Wait for "cluster up" and the run's record; returns the record."""
        deadline = time.monotonic() + UP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
            record = RunRecord.read(self.workdir)
            if "cluster up" in self.output() and record is not None:
                if record.owner.pid == self.proc.pid:
                    return record
            time.sleep(0.1)
        raise AssertionError(f"not up after {UP_S}s:\n{self.output()}")

    def wait_exit(self, timeout_s: float = 60) -> int:
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[tuple[Run, list[int]]]]:
    """Runs of the test; every process any of them recorded is killed at the end."""
    require_etcd()
    made: list[tuple[Run, list[int]]] = []
    yield made
    for run, _ in made:
        run.kill()
    for _, pids in made:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start(runs: list[tuple[Run, list[int]]], workdir: Path, n: int) -> Run:
    run = Run(workdir, workdir.parent / f"run{n}.log")
    pids: list[int] = []
    runs.append((run, pids))
    return run


def up(runs: list[tuple[Run, list[int]]], run: Run) -> RunRecord:
    record = run.wait_up()
    next(p for r, p in runs if r is run).extend(s.pid for s in record.processes)
    return record


def test_sigterm_stops_every_process_the_cluster_started(
    tmp_path: Path, runs: list[tuple[Run, list[int]]]
) -> None:
    run = start(runs, tmp_path / "work", 0)
    record = up(runs, run)
    # Given the cluster runs: etcd, PostgreSQL, a sink, 2 coordinators, 3 nodes
    assert len(record.processes) == 8, record.processes
    assert all(p.running() for p in record.processes)
    # When the command gets SIGTERM (as from timeout, systemd or a container runtime)
    run.proc.send_signal(signal.SIGTERM)
    # Then it stops every one of them and exits 0
    assert run.wait_exit() == 0, run.output()
    assert [p for p in record.processes if p.running()] == []
    assert "stopping (SIGTERM)" in run.output()
    assert RunRecord.read(tmp_path / "work") is None


def test_a_second_run_refuses_a_running_one_and_cleans_up_after_a_killed_one(
    tmp_path: Path, runs: list[tuple[Run, list[int]]]
) -> None:
    workdir = tmp_path / "work"
    first = start(runs, workdir, 0)
    record = up(runs, first)
    assert [d for d in record.outside if not Path(d).is_dir()] == []
    # When a second run starts in the same directory while the first runs
    second = start(runs, workdir, 1)
    # Then it refuses at once, naming the running one, and touches nothing
    assert second.wait_exit(30) == 1
    assert f"(pid {first.proc.pid}) is running in {workdir}" in second.output()
    assert all(p.running() for p in record.processes)

    # When the first is SIGKILLed (its processes live on) and a third run starts
    first.kill()
    assert all(p.running() for p in record.processes)
    third = start(runs, workdir, 2)
    record3 = up(runs, third)
    # Then the third stopped what the first left, said so, removed the directories it
    # made outside the work directory, and runs a cluster of its own
    assert [p for p in record.processes if p.running()] == []
    assert len(record.outside) == (1 if os.geteuid() == 0 else 0)  # PostgreSQL's, as root
    assert [d for d in record.outside if Path(d).exists()] == []
    assert f"stopped {len(record.processes)} processes an earlier run" in third.output()
    assert all(p.running() for p in record3.processes)
    # When its terminal goes away (SIGHUP), Then it stops everything as well
    third.proc.send_signal(signal.SIGHUP)
    assert third.wait_exit() == 0, third.output()
    assert [p for p in record3.processes if p.running()] == []
    assert "stopping (SIGHUP)" in third.output()
