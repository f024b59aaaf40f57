"""Webhook endpoints, with the delivery state that makes the events table their outbox.

Each endpoint keeps a cursor (the last event it received). A delivery takes the next
events after it, up to ``pending_last``, which is fixed at the first attempt so that
every retry sends the same events under the same ``webhook-id``; success moves the
cursor there. Nothing is copied per endpoint: the backlog is the events after the
cursor, kept as long as the events are.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from alembic import op

from coordinator.db.migrate import split_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE webhooks (
    webhook_id text PRIMARY KEY,
    tenant text NOT NULL,
    url text NOT NULL,
    -- "whsec_" and the base64 key; shown to the caller once, never logged.
    secret text NOT NULL,
    -- Event types sent (EventType numbers); empty: every type.
    types smallint[] NOT NULL,
    created_at timestamptz NOT NULL,
    cursor bigint NOT NULL,
    pending_last bigint,
    attempts integer NOT NULL DEFAULT 0,
    failing_since timestamptz,
    next_attempt_at timestamptz,
    disabled_at timestamptz,
    last_error text NOT NULL DEFAULT ''
);
CREATE INDEX webhooks_by_tenant ON webhooks (tenant, webhook_id);
"""


def upgrade() -> None:
    for statement in split_script(SCHEMA):
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
