"""Delivery events: one row per state change of a recipient, read by StreamEvents.

Event ids come from the table's identity, taken under a transaction-scoped advisory
lock (``events_lock`` in queries.sql) that every transaction writing events holds
until it commits, so ids become visible in increasing order: a reader that has seen
id N never later finds a new event below N, and ``id > cursor`` resumes without gaps.
The recipient's address, metadata and the job's tags are joined when read, not copied.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from alembic import op

from coordinator.db.migrate import split_script

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text NOT NULL,
    job_no bigint NOT NULL,
    idx integer NOT NULL,
    -- 1 accepted, 2 deferred, 3 delivered, 4 failed, 5 suppressed, 6 cancelled,
    -- 7 bounced, 8 complained, 9 unsubscribed (EventType's numbers).
    type smallint NOT NULL,
    at timestamptz NOT NULL,
    attempt smallint NOT NULL DEFAULT 0,
    code smallint NOT NULL DEFAULT 0,
    enhanced_code text,
    reply text,
    reason text,
    node_id text,
    relay text,
    message_id text
);
CREATE INDEX events_by_tenant ON events (tenant, id);
CREATE INDEX events_by_job ON events (job_no, idx);

-- The event a recipient's new status makes (none for queued again).
CREATE FUNCTION mailers_event_type(status smallint) RETURNS smallint
LANGUAGE sql IMMUTABLE AS $$
    SELECT (CASE status WHEN 1 THEN 3 WHEN 2 THEN 4 WHEN 3 THEN 2 WHEN 4 THEN 6
                        WHEN 5 THEN 5 END)::smallint
$$;
"""


def upgrade() -> None:
    for statement in split_script(SCHEMA):
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
