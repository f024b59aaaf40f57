"""PostgreSQL: where jobs, recipients, outcomes, suppressions and quotas live.

- :mod:`coordinator.db.settings`: connection settings (``MAILER_DATABASE_*``).
- :mod:`coordinator.db.migrate`: the schema, kept by Alembic and applied at start under
  an advisory lock (``migrations/versions/``).
- :mod:`coordinator.db.store`: every query (named in ``queries.sql``), run by one class;
  rows become :mod:`coordinator.model` objects here and protos never come this far.
"""
