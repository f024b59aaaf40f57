"""The one store read of the console: delivery events per minute for the throughput chart.

The gRPC API has no aggregate over time (its event stream starts at a cursor, not a
time), so this reads the ``events`` table directly, read-only, on any coordinator. It
is bounded twice: it scans at most :data:`MAX_ROWS` of the newest events through an
index (``events_by_tenant`` for a tenant, the primary key for an admin), and it runs
under the pool's ``statement_timeout`` and :data:`TIMEOUT_S`. The rows a caller may see
are the API's rule: a tenant its own events, an admin (or anyone when auth is off)
every tenant's.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg

from coordinator.console.throughput import Throughput, per_minute
from coordinator.db.store import Database, StoreUnavailable
from coordinator.model import EventType

MAX_ROWS = 200_000
"""Newest events scanned at most: about 20 ms of index scan per 10,000 rows."""
TIMEOUT_S = 5.0

_RECENT_OF_TENANT = "SELECT at, type FROM events WHERE tenant = $1 ORDER BY id DESC LIMIT $2"
_RECENT_OF_ALL = "SELECT at, type FROM events WHERE $1::text IS NULL ORDER BY id DESC LIMIT $2"
_PER_MINUTE = """
WITH recent AS MATERIALIZED ({recent})
SELECT b.minute, b.type, b.n, s.scanned, s.oldest
FROM (SELECT count(*) AS scanned, min(at) AS oldest FROM recent) s
LEFT JOIN (
    SELECT floor(extract(epoch FROM at) / 60)::bigint AS minute, type::int AS type,
           count(*)::int AS n
    FROM recent
    WHERE at >= to_timestamp($3) AND type IN ({delivered}, {failed})
    GROUP BY 1, 2
) b ON true
"""


async def throughput(db: Database, tenant: str | None, now_s: float, since_s: float) -> Throughput:
    """Delivered and failed recipients per minute since ``since_s``.

    Args:
        tenant: Whose events; None for every tenant's (admins).

    Raises:
        StoreUnavailable: PostgreSQL did not answer within :data:`TIMEOUT_S`.
    """
    recent = _RECENT_OF_ALL if tenant is None else _RECENT_OF_TENANT
    query = _PER_MINUTE.format(
        recent=recent, delivered=int(EventType.DELIVERED), failed=int(EventType.FAILED)
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            async with db.pool.acquire() as conn:
                records = await conn.fetch(query, tenant, MAX_ROWS, since_s)
    except TimeoutError as exc:
        raise StoreUnavailable(f"throughput read took over {TIMEOUT_S:g} s") from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailable(str(exc)) from exc
    rows = [(r["minute"], r["type"], r["n"]) for r in records if r["minute"] is not None]
    scanned = records[0]["scanned"] if records else 0
    oldest: datetime | None = records[0]["oldest"] if records else None
    cut = scanned >= MAX_ROWS and oldest is not None
    return per_minute(rows, now_s, oldest_read_s=oldest.timestamp() if cut and oldest else None)
