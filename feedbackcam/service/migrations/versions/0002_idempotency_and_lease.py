"""Feedback gets an idempotency key (a repeated submission is stored once); a lease table lets
one of several app processes on the database run updates at a time.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("feedback", sa.Column("idempotency_key", sa.String(64), nullable=True))
    op.create_index("ix_feedback_user_key", "feedback", ["user_id", "idempotency_key"], unique=True)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=True),
        sa.Column("expires", sa.DateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_feedback_user_key", table_name="feedback")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("idempotency_key")
