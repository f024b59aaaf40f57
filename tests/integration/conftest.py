"""Whole clusters of real processes for the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import require_etcd


def start_cluster(base: Path, spec: ClusterSpec) -> LocalCluster:
    require_etcd()
    cluster = LocalCluster(base, spec)
    cluster.start()
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two coordinators, three nodes, one etcd, one sink; shared by a module's tests."""
    c = start_cluster(
        tmp_path_factory.mktemp("cluster"),
        # Mail to @tempfail.example is refused with 451, for the expiry test. The
        # coordinators migrate the empty database themselves, together, as in production.
        ClusterSpec(sink_args=("--tempfail-pattern", r"@tempfail\.example$"), migrate_first=False),
    )
    yield c
    c.stop()


@pytest.fixture
def fresh_cluster_factory(tmp_path: Path) -> Iterator[list[LocalCluster]]:
    """For tests that kill processes: each gets its own cluster, stopped afterwards."""
    made: list[LocalCluster] = []
    yield made
    for c in made:
        c.stop()
