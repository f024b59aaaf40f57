"""A benchmark's directory of logs and data: a temporary one is removed after a run that
succeeds and kept when the run fails; one the user names is never removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.e2e import in_run_directory


def test_a_temporary_directory_goes_when_the_run_succeeds() -> None:
    seen: list[Path] = []

    def run(path: Path) -> int:
        seen.append(path)
        (path / "etcd").mkdir()
        return 0

    assert in_run_directory(None, "mailers-test-run-", run) == 0
    assert seen and not seen[0].exists()


def _fails_by_code(path: Path) -> int:
    (path / "logs").mkdir()
    return 1


def _fails_by_raising(path: Path) -> int:
    (path / "logs").mkdir()
    raise RuntimeError("the cluster did not start")


def test_a_temporary_directory_stays_when_the_run_fails(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert in_run_directory(None, "mailers-test-run-", _fails_by_code) == 1
    with pytest.raises(RuntimeError):
        in_run_directory(None, "mailers-test-run-", _fails_by_raising)
    kept = [Path(line.rsplit(" ", 1)[1]) for line in capsys.readouterr().err.splitlines()]
    assert len(kept) == 2
    for path in kept:
        assert (path / "logs").is_dir()
        (path / "logs").rmdir()
        path.rmdir()


def test_a_named_directory_is_never_removed(tmp_path: Path) -> None:
    given = tmp_path / "run"
    given.mkdir()
    assert in_run_directory(given, "mailers-test-run-", lambda path: int(path != given)) == 0
    assert given.is_dir()
