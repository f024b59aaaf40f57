"""Send order apart from submit order: recipients.pos.

A job whose recipients share messages is stored in send order (by domain, so a batch
holds few domains and a transaction takes many recipients); ``pos`` keeps each
recipient's place in the submitted list, which is what callers see as its index. NULL
(every other job): the same as ``idx``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: a catalogue change, no table rewrite.
    op.execute("ALTER TABLE recipients ADD COLUMN pos integer")


def downgrade() -> None:
    raise NotImplementedError("migrations only go forward; restore a backup to go back")
