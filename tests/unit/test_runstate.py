"""A stale run record: what the next run removes of what it names."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mailers_dev.runstate import RUN_FILE, RunRecord, Started, find_stale


def test_a_stale_record_removes_only_the_directories_a_run_makes(tmp_path: Path) -> None:
    # Given the record of a run that no longer runs (this PID, but another start time),
    # naming a run's own directory and two that a run never makes
    ours = Path(tempfile.mkdtemp(prefix="mailers-pg-"))
    not_ours = Path(tempfile.mkdtemp(prefix="other-"))
    elsewhere = tmp_path / "mailers-data"
    elsewhere.mkdir()
    workdir = tmp_path / "work"
    workdir.mkdir()
    named = (str(ours), str(not_ours), str(elsewhere))
    try:
        RunRecord(Started("cluster", os.getpid(), 0), "cluster", (), (), named).write(workdir)
        # When the next run checks the work directory
        assert find_stale(workdir) == []
        # Then only the run's own directory (mailers-*, right in the temporary
        # directory) is gone, and so is the record
        assert not ours.exists()
        assert not_ours.is_dir() and elsewhere.is_dir()
        assert not (workdir / RUN_FILE).exists()
    finally:
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(not_ours, ignore_errors=True)
