"""A flush of outcomes carries each shared result once.

``apply_results`` took one ``mailers_outcome`` row per recipient, the result's twelve
fields repeated for each recipient of a shared message. It now takes the results once,
as rows of ``mailers_result`` (the same fields without the recipient's index and
address), and the recipients' indexes beside them. The address was only read for hard
bounces; the recipient's own row has it.

``mailers_outcome`` stays: a leader of the previous version, still running while its
successor migrates the database, goes on writing with it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The fields in the order of store.outcome_arguments' tuples.
    op.execute(
        """
        CREATE TYPE mailers_result AS (
            job_id text, status smallint, attempts smallint, code smallint,
            enhanced_code text, reply text, reason text, node_id text, ambiguous boolean,
            updated_at timestamptz, message_id text, relay text, bounce boolean
        )
        """
    )


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
