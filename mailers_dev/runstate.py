"""What a running ``mailers cluster`` or ``mailers demo`` leaves in its work directory.

``<workdir>/run.json`` names the command's own process and every process it started,
each by PID and start time (``/proc/<pid>/stat``, so a PID the kernel has since given to
another program is not taken for ours). A new run in the same directory reads it before
touching anything (:func:`find_stale`):

- the command that wrote it still runs: the new run refuses, and says how to stop it;
- it is gone but some of its processes are not (it was SIGKILLed, or its terminal
  vanished): the new run stops them, by PID (SIGTERM, then SIGKILL), and says so;
  then it removes the directories the record names outside the work directory (as
  root, PostgreSQL's data lives under /tmp), which that run would have removed, if
  they are ones a run makes (:func:`ours_to_remove`);
- nothing of it runs: the record is stale and the new run goes on.

A process started before the record was written (the command killed while starting the
cluster) is not in it; the normal ways out (Ctrl-C, SIGTERM, SIGHUP, a failed start)
stop every process before the command exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

RUN_FILE = "run.json"


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when no such process runs
    (a zombie, exited but not reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3


@dataclasses.dataclass(frozen=True)
class Started:
    """One process, as the record names it."""

    name: str
    pid: int
    start: int

    @classmethod
    def of(cls, name: str, pid: int) -> Started | None:
        start = start_time(pid)
        return None if start is None else cls(name, pid, start)

    def running(self) -> bool:
        """Whether this very process still runs (not another one with its PID)."""
        return start_time(self.pid) == self.start


@dataclasses.dataclass(frozen=True)
class RunRecord:
    owner: Started
    command: str
    processes: tuple[Started, ...]
    coordinators: tuple[str, ...] = ()
    outside: tuple[str, ...] = ()  # directories the run made outside its work directory

    def write(self, workdir: Path) -> None:
        path = workdir / RUN_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def read(cls, workdir: Path) -> RunRecord | None:
        """The record in ``workdir``, or None when there is none or it is unreadable."""
        try:
            data = json.loads((workdir / RUN_FILE).read_text())
            return cls(
                owner=Started(**data["owner"]),
                command=str(data["command"]),
                processes=tuple(Started(**p) for p in data["processes"]),
                coordinators=tuple(data.get("coordinators", ())),
                outside=tuple(data.get("outside", ())),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def record_run(
    workdir: Path,
    command: str,
    pids: Sequence[tuple[str, int]],
    coordinators: Sequence[str],
    outside: Sequence[Path] = (),
) -> None:
    """Write this process's record of the processes it started and the directories
    outside ``workdir`` it made."""
    owner = Started.of(command, os.getpid())
    assert owner is not None  # this very process runs
    started = tuple(s for name, pid in pids if (s := Started.of(name, pid)) is not None)
    dirs = tuple(str(d) for d in outside)
    RunRecord(owner, command, started, tuple(coordinators), dirs).write(workdir)


class StillRunning(RuntimeError):
    """Another ``mailers cluster`` or ``demo`` runs in this work directory."""


def find_stale(workdir: Path) -> list[Started]:
    """Check ``workdir`` before a new run (see the module docstring).

    Returns:
        The processes of an earlier run that were still running and are now stopped.

    Raises:
        StillRunning: the earlier run's command still runs; the message says how to
            stop it.
    """
    record = RunRecord.read(workdir)
    if record is None:
        return []
    if record.owner.running() and record.owner.pid != os.getpid():
        where = f"; coordinators {', '.join(record.coordinators)}" if record.coordinators else ""
        raise StillRunning(
            f"`mailers {record.command}` (pid {record.owner.pid}) is running in {workdir}"
            f"{where}. Stop it with Ctrl-C in its terminal or `kill {record.owner.pid}`, "
            "or use another --workdir"
        )
    left = [p for p in record.processes if p.running()]
    stop_all(left)
    for directory in record.outside:
        if ours_to_remove(Path(directory)):
            shutil.rmtree(directory, ignore_errors=True)
    (workdir / RUN_FILE).unlink(missing_ok=True)
    return left


def ours_to_remove(directory: Path) -> bool:
    """Whether a directory a record names outside its work directory is one a run makes
    (``mailers-*`` right in the temporary directory): a record is a file anyone could
    edit, and removing what it names must not reach anything else."""
    return directory.parent == Path(tempfile.gettempdir()) and directory.name.startswith("mailers-")


def stop_all(processes: Sequence[Started], grace_s: float = 10.0) -> None:
    """SIGTERM each, then SIGKILL those still running after ``grace_s``."""
    for p in processes:
        if p.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.running() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in processes:
        if p.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
