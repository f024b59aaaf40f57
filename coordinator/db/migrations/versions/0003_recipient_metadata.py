"""The caller's own data per recipient: recipients.metadata.

A small JSON object of strings given at submit and returned with the recipient's
results (and, later, its events); NULL when none was given.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: a catalogue change, no table rewrite.
    op.execute("ALTER TABLE recipients ADD COLUMN metadata jsonb")


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
