"""Fixtures shared by the chaos tests: whole clusters of real processes, always stopped.

``cluster_factory`` starts a :class:`LocalCluster` per call (in a worker thread, as
starting blocks for a second or more) under the test's ``tmp_path`` and stops every one
it started at teardown, also when the test fails. When a test fails, the tail of each
of its clusters' process logs is attached to the failure report.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path

import pytest

from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import require_etcd

ClusterFactory = Callable[[ClusterSpec], Awaitable[LocalCluster]]

_CLUSTERS = pytest.StashKey[list[LocalCluster]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        clusters: list[LocalCluster] = item.stash.get(_CLUSTERS, [])
        for i, cluster in enumerate(clusters):
            report.sections.append((f"cluster{i} process logs", cluster.logs()))
    return report


@pytest.fixture
async def cluster_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ClusterFactory]:
    """``await cluster_factory(spec)`` starts a cluster; all are stopped after the test."""
    made: list[LocalCluster] = []
    request.node.stash[_CLUSTERS] = made

    async def start(spec: ClusterSpec) -> LocalCluster:
        require_etcd()
        cluster = LocalCluster(tmp_path / f"cluster{len(made)}", spec)
        made.append(cluster)
        await asyncio.to_thread(cluster.start)
        return cluster

    yield start
    for cluster in made:
        await asyncio.to_thread(cluster.stop)
