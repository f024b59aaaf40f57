"""The schema revision a coordinator checks for without loading Alembic."""

from __future__ import annotations

import subprocess
import sys

from coordinator.db import migrate


def test_head_is_the_newest_revision_alembic_finds() -> None:
    assert migrate.HEAD == migrate.head_revision()


def test_a_coordinator_starts_without_importing_alembic() -> None:
    probe = (
        "import sys, coordinator.__main__\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'sqlalchemy')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
