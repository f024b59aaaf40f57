"""Fixtures for real servers: etcd (one member or three) and PostgreSQL, on free
loopback ports.

Where etcd or PostgreSQL is not installed the tests that need it are skipped locally and
fail in CI (CI=true), so a CI machine missing a server can never pass by skipping.

PostgreSQL: one server per session; a database migrated once serves as the template of
a fresh database per test (``database``), so tests never see each other's rows.

Every PostgreSQL server a test starts (clusters' included) copies one ``initdb``'d
cluster made once per run (``MAILERS_PG_TEMPLATE``) instead of running ``initdb`` itself.

Each pytest-xdist worker draws free ports from a slice of its own
(``MAILERS_PORT_SLICE``), so two workers never pick the same port.

Real-world bounce samples (``flufl_samples``) are downloaded once per session.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest

from coordinator.db import migrate
from coordinator.db.settings import DatabaseConfig
from coordinator.db.store import Database
from coordinator.db.store import connect as pg_connect
from mailers_dev.procs import PG_TEMPLATE_ENV, PORT_SLICE_ENV, EtcdCluster, PostgresServer
from mailers_runtime.etcd import connect
from tests.bounce_samples import Samples, SamplesUnavailable, fetch
from tests.helpers import require_etcd, require_postgres, unavailable

PG_TEMPLATE = "mailers_template"
_databases = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def pg_template_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where PostgreSQL servers of this run find the cluster they copy: the run's
    directory, shared by pytest-xdist's workers (each has a directory of its own in it)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "pg-template"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PG_TEMPLATE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One real etcd member for the whole session; tests isolate by key prefix."""
    require_etcd()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh real 3-member etcd cluster for tests about etcd itself."""
    require_etcd()
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


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session, with a migrated template database."""
    require_postgres()
    server = PostgresServer(tmp_path_factory.mktemp("pg"), durable=False)
    server.start()
    server.sql(f'CREATE DATABASE "{PG_TEMPLATE}"')
    config = DatabaseConfig(
        url=server.database_url(PG_TEMPLATE), password_file=str(server.password_file)
    )
    asyncio.run(migrate.upgrade(lambda: pg_connect(config)))
    yield server
    server.stop()


@pytest.fixture
def database_config(pg_server: PostgresServer) -> DatabaseConfig:
    """A fresh, migrated database of this test's own."""
    name = f"t{os.getpid()}_{next(_databases)}"
    pg_server.create_database(name, template=PG_TEMPLATE)
    return DatabaseConfig(
        url=pg_server.database_url(name), password_file=str(pg_server.password_file)
    )


@pytest.fixture(scope="session")
def flufl_samples() -> Samples:
    """flufl.bounce's real-world bounce samples (downloaded once, see
    ``tests/bounce_samples.py``); skipped offline, a failure in CI."""
    try:
        return fetch()
    except SamplesUnavailable as error:
        unavailable(
            f"{error} (offline? the real-world bounce samples are downloaded)",
            f"{error}: CI must reach the package index to fetch bounce samples",
        )


@pytest.fixture
async def database(database_config: DatabaseConfig) -> AsyncIterator[Database]:
    db = await Database.open(database_config, migrate_schema=False)
    yield db
    await db.close()


_GROUPED_BY_MODULE = {"integration", "component"}


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker (``gw<k>`` of n) takes the k-th slice of the free ports.
    Without it, both workers drew from one span: a port one worker had picked for a
    server could be picked by the other before that server bound it, and a server of
    the other worker's then answered there."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and count:
        os.environ[PORT_SLICE_ENV] = f"{worker.removeprefix('gw')}/{count}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """For pytest-xdist (``dev.sh test`` runs ``-n 2 --dist loadgroup``): the tests of an
    integration or component module stay on one worker (they share the module's servers),
    tests marked with the same ``xdist_group`` run one after another on one worker (the
    network-namespace tests, the distribution builds), and every other test goes to
    whichever worker is free."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        parts = item.path.resolve().relative_to(tests_dir).parts
        if parts[0] in _GROUPED_BY_MODULE:
            item.add_marker(pytest.mark.xdist_group(f"{parts[0]}/{parts[-1]}"))
