"""Fixtures for real servers: etcd (one member or three) on free loopback ports.

Where etcd is not installed the tests that need it are skipped locally and fail in CI
(CI=true), so a CI machine missing a server can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest

from mailers.etcd import connect
from mailers.procs import EtcdCluster


def _require_etcd() -> None:
    if shutil.which("etcd") is None:
        if os.environ.get("CI"):
            pytest.fail("etcd is not installed on this CI machine")
        pytest.skip("etcd is not installed (apt-get install etcd-server)")


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One real etcd member for the whole session; tests isolate by key prefix."""
    _require_etcd()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh real 3-member etcd cluster for tests about etcd itself."""
    _require_etcd()
    cluster = EtcdCluster(tmp_path / "etcd3", size=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own."""
    return f"/t/{request.node.name}-{os.getpid()}-{id(request)}"


@pytest.fixture
async def etcd(etcd_cluster: EtcdCluster) -> AsyncIterator[aetcd.Client]:
    client = connect(etcd_cluster.endpoints)
    await client.connect()
    yield client
    await client.close()
