"""What comes back: bounces, complaints and unsubscribes, kept as received.

Any coordinator (leader or standby) writes a row as soon as a message for the bounce
domain or an unsubscribe request arrives, and then answers: nothing received is lost
while leaders change. The leader reads the rows in order, applies each (an event, the
recipient's outcome, a suppression) in the transaction that marks it processed, and
keeps it with its outcome, so what could not be parsed or matched stays for
inspection until retention.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from alembic import op

from coordinator.db.migrate import split_script

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SCHEMA = """
CREATE TABLE inbound (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL,
    -- 'mail' (a bounce or complaint, with the message) or 'unsubscribe' (a token).
    kind text NOT NULL,
    mail_from text NOT NULL DEFAULT '',
    -- The envelope recipient (a VERP address) or the unsubscribe token.
    rcpt_to text NOT NULL,
    message bytea,
    processed_at timestamptz,
    -- bounced, complained, unsubscribed, unparsed, unmatched, forged.
    outcome text NOT NULL DEFAULT '',
    detail text NOT NULL DEFAULT ''
);
CREATE INDEX inbound_pending ON inbound (id) WHERE processed_at IS NULL;
CREATE INDEX inbound_by_time ON inbound (received_at);

-- What came back about a delivered recipient: hard_bounce, soft_bounce, complaint or
-- unsubscribe (its status stays what the relay said; events tell the story).
ALTER TABLE recipients ADD COLUMN feedback text;
"""


def upgrade() -> None:
    for statement in split_script(SCHEMA):
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
