"""The private PostgreSQL server of tests, demos and benches (``mailers_dev.procs``):
made by ``initdb``, or copied from a cluster made once (``MAILERS_PG_TEMPLATE``), each
server with a password of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from mailers_dev.procs import PG_TEMPLATE_ENV, PostgresServer
from tests.helpers import require_postgres


@pytest.fixture
def servers() -> Iterator[list[PostgresServer]]:
    require_postgres()
    made: list[PostgresServer] = []
    yield made
    for server in made:
        server.stop()


async def connects(server: PostgresServer, password: str) -> bool:
    try:
        connection = await asyncpg.connect(
            host=server.listen, port=server.port, user="mailers", database="mailers",
            password=password, timeout=30,
        )  # fmt: skip
    except asyncpg.InvalidPasswordError:
        return False
    await connection.close()
    return True


@pytest.mark.parametrize("made_by", ["initdb", "template"])
async def test_each_server_takes_its_own_password_and_no_other(
    tmp_path: Path,
    servers: list[PostgresServer],
    monkeypatch: pytest.MonkeyPatch,
    made_by: str,
) -> None:
    cache = tmp_path / "cache"
    if made_by == "template":
        monkeypatch.setenv(PG_TEMPLATE_ENV, str(cache))
    else:
        monkeypatch.delenv(PG_TEMPLATE_ENV, raising=False)
    servers += [PostgresServer(tmp_path / f"pg{i}", durable=False) for i in range(2)]
    # Given two servers started at once (with a template, both find none and make one)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(server.start) for server in servers]:
            started.result()
    passwords = [s.password_file.read_text().strip() for s in servers]
    assert passwords[0] != passwords[1]
    # Then each takes its own password over TCP, and not the other's
    for server, own, other in zip(servers, passwords, reversed(passwords), strict=True):
        assert await connects(server, own)
        assert not await connects(server, other)
    # And a template, when used, is one directory: the copy that lost the race is gone
    made = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert len(made) == (1 if made_by == "template" else 0), made


async def test_a_copied_server_keeps_its_data_across_a_restart(
    tmp_path: Path, servers: list[PostgresServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PG_TEMPLATE_ENV, str(tmp_path / "cache"))
    server = PostgresServer(tmp_path / "pg", durable=False)
    servers.append(server)
    await asyncio.to_thread(server.start)
    server.sql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)", "mailers")
    # When it is halted and started again (no second copy, no second password)
    server.halt()
    await asyncio.to_thread(server.start)
    # Then its rows and its password are still there
    assert server.sql("SELECT x FROM kept", "mailers").strip() == "7"
    assert await connects(server, server.password_file.read_text().strip())
