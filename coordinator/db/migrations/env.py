"""Alembic's environment: runs on a connection the coordinator lends it.

Migrations are plain SQL (``op.execute``), all in one transaction, and the first
statement of that transaction takes an advisory lock, so coordinators starting
together apply them once: the others wait, then find the schema at head.
"""

from __future__ import annotations

from alembic import context

MIGRATION_LOCK = 7_414_560_001
"""pg_advisory_xact_lock key held while migrating (any fixed number of our own)."""

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=False)
with context.begin_transaction():
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    context.run_migrations()
