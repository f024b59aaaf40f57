"""The data plane: jobs, recipients, batches, suppressions, quotas, and the leader fence.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

from alembic import op

from coordinator.db.migrate import split_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA = """
-- The leader fence. A coordinator that wins the etcd election raises the epoch to its
-- election revision; every write transaction of a leader ends with
-- mailers_check_fence(its epoch), which takes a share lock on this row and fails with
-- SQLSTATE ML001 once a newer leader has raised it. The raise waits for the share
-- locks of transactions in flight, so a deposed leader's writes either committed
-- before the new leader read anything, or fail.
CREATE TABLE fence (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch bigint NOT NULL,
    leader text NOT NULL,
    raised_at timestamptz NOT NULL
);
INSERT INTO fence VALUES (true, 0, '', now());

CREATE FUNCTION mailers_check_fence(p_epoch bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    current_epoch bigint;
BEGIN
    SELECT epoch INTO current_epoch FROM fence FOR SHARE;
    IF current_epoch IS DISTINCT FROM p_epoch THEN
        RAISE EXCEPTION 'fenced: epoch % is not the leader epoch %', p_epoch, current_epoch
            USING ERRCODE = 'ML001';
    END IF;
END $$;

-- One row per job. Counts are kept by the statements that change recipients, in the
-- same transaction, so they always match the recipient rows.
CREATE TABLE jobs (
    job_no bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    job_id text PRIMARY KEY,
    tenant text NOT NULL,
    idempotency_key text NOT NULL,
    spec jsonb NOT NULL,
    total integer NOT NULL CHECK (total > 0),
    batch_size integer NOT NULL CHECK (batch_size > 0),
    priority integer NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'running', 'paused', 'completed', 'cancelled')),
    delivered integer NOT NULL DEFAULT 0,
    failed integer NOT NULL DEFAULT 0,
    deferred integer NOT NULL DEFAULT 0,
    cancelled integer NOT NULL DEFAULT 0,
    suppressed integer NOT NULL DEFAULT 0,
    duplicates integer NOT NULL DEFAULT 0,
    -- Batches with seq below the cursor have been dispatched at least once and have a
    -- row in batches; those at or above it were never handed out.
    cursor integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,
    purged_at timestamptz,
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, job_id DESC);
-- A job is unfinished until finished_at is set: completed, or cancelled and settled
-- (a cancelled job whose batches are still held by nodes is not finished yet).
CREATE INDEX jobs_unfinished ON jobs (job_id) WHERE finished_at IS NULL;
CREATE INDEX jobs_to_purge ON jobs (finished_at)
    WHERE purged_at IS NULL AND finished_at IS NOT NULL;

-- One row per recipient, from submit until the retention period after its job ended.
-- status: 0 queued, 1 delivered, 2 failed, 3 deferred, 4 cancelled, 5 suppressed.
CREATE TABLE recipients (
    job_no bigint NOT NULL,
    idx integer NOT NULL,
    email text NOT NULL,
    name text NOT NULL,
    variables jsonb,
    status smallint NOT NULL DEFAULT 0,
    attempts smallint NOT NULL DEFAULT 0,
    code smallint NOT NULL DEFAULT 0,
    enhanced_code text,
    reply text,
    reason text,
    node_id text,
    ambiguous boolean NOT NULL DEFAULT false,
    updated_at timestamptz,
    message_id text,
    relay text,
    PRIMARY KEY (job_no, idx)
);
CREATE INDEX recipients_by_status ON recipients (job_no, status, idx);

-- Batches that have been handed out at least once (see jobs.cursor): who holds one
-- (node_id, with the dispatch attempt it came with), when it may go again
-- (retry_at), and whether every recipient in it is final.
CREATE TABLE batches (
    job_no bigint NOT NULL,
    seq integer NOT NULL,
    node_id text,
    attempt integer NOT NULL DEFAULT 0,
    lost smallint NOT NULL DEFAULT 0,
    retry_at timestamptz,
    done boolean NOT NULL DEFAULT false,
    PRIMARY KEY (job_no, seq)
);
CREATE INDEX batches_open ON batches (job_no, seq) WHERE NOT done;

-- Addresses a tenant never sends to (email normalised: trimmed, lower-cased).
CREATE TABLE suppressions (
    tenant text NOT NULL,
    email text NOT NULL,
    reason text NOT NULL,
    created_at timestamptz NOT NULL,
    code smallint NOT NULL DEFAULT 0,
    enhanced_code text NOT NULL DEFAULT '',
    reply text NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, email)
);

-- Recipients accepted per tenant and minute, for the messages-per-hour quota.
CREATE TABLE quota_usage (
    tenant text NOT NULL,
    minute timestamptz NOT NULL,
    recipients bigint NOT NULL,
    PRIMARY KEY (tenant, minute)
);
"""


def upgrade() -> None:
    for statement in split_script(SCHEMA):
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
