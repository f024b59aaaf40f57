"""The row type of a node's outcome, so that ``apply_results`` takes one array.

The result writer passed a flush of outcomes as fifteen parallel arrays. The driver
checks every element of every array on its way out, which cost the leader about 14 µs
per outcome; one array of rows is checked once per row (about 8 µs).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The fields in the order of store.outcome_arguments' tuples.
    op.execute(
        """
        CREATE TYPE mailers_outcome AS (
            job_id text, idx integer, status smallint, attempts smallint, code smallint,
            enhanced_code text, reply text, reason text, node_id text, ambiguous boolean,
            updated_at timestamptz, message_id text, relay text, email text, bounce boolean
        )
        """
    )


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
