"""Bring the schema to the newest revision, with Alembic, under an advisory lock.

Every coordinator calls :func:`upgrade` at start, before it campaigns: the first one
applies what is missing (all revisions in one transaction, so a failure leaves the
schema as it was), the others wait on the lock and then find nothing to do.

Alembic and SQLAlchemy are imported only when a revision is missing: a database at
:data:`HEAD` is recognised with one query, and those imports were more than half of a
coordinator's start (1.3 of 2.4 s of CPU here), paid again at every restart.
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD = "0008"
"""The newest revision under ``migrations/versions`` (a unit test holds the two equal)."""


def split_script(script: str) -> list[str]:
    """The statements of an SQL script, split at semicolons that end a line outside
    dollar-quoted bodies (prepared statements take one command each)."""
    statements: list[str] = []
    current: list[str] = []
    quoted = False
    for line in script.splitlines():
        if line.lstrip().startswith("--") and not quoted:
            continue
        current.append(line)
        quoted ^= line.count("$$") % 2 == 1
        if not quoted and line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement:
                statements.append(statement)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return statements


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest revision in the code, as Alembic reads it from the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def upgrade(connect: Any) -> None:
    """Apply every missing revision; nothing (one query) when the database is at HEAD.

    Args:
        connect: An async callable returning a new asyncpg connection (the store's
            own connector, so TLS and the password file apply).
    Raises:
        asyncpg.PostgresError, OSError: the database refused or could not be reached;
            nothing was changed.
    """
    probe = await connect()
    try:
        if await current_revision(probe) == HEAD:
            return
    finally:
        await probe.close()
    # On a thread: a coordinator answers health checks by now, and these imports take
    # over a second of CPU that would otherwise stall its event loop.
    await asyncio.to_thread(_import_alembic)
    from alembic import command
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine("postgresql+asyncpg://", async_creator=connect, poolclass=NullPool)
    config = alembic_config()

    def run(sync_connection: Any) -> None:
        config.attributes["connection"] = sync_connection
        command.upgrade(config, "head")

    try:
        async with engine.connect() as connection:
            await connection.run_sync(run)
            await connection.commit()
    finally:
        await engine.dispose()


def _import_alembic() -> None:
    for module in ("alembic.command", "alembic.script", "sqlalchemy.ext.asyncio"):
        importlib.import_module(module)


async def current_revision(connection: asyncpg.Connection) -> str | None:
    """The revision a database is at (None before the first migration)."""
    exists = await connection.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
    if not exists:
        return None
    value: str | None = await connection.fetchval("SELECT version_num FROM alembic_version")
    return value
