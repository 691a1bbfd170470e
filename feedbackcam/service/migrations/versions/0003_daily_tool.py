"""The app as a daily tool (issue 12): token expiry and revocation, the ignore mask of a feedback
item, the originals of uploads, and worklists. Additive only: new nullable columns, new tables.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("expires", sa.DateTime(), nullable=True))
    op.add_column("users", sa.Column("revoked", sa.DateTime(), nullable=True))
    op.add_column("feedback", sa.Column("ignore_mask_path", sa.Text(), nullable=True))
    op.create_table(
        "originals",
        sa.Column("image_id", sa.String(64), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
    )
    op.create_table(
        "worklists",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "worklist_entries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("worklist_id", sa.Integer(), sa.ForeignKey("worklists.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("original_id", sa.String(64), nullable=False),
        sa.Column("image_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("feedback_id", sa.Integer(), sa.ForeignKey("feedback.id"), nullable=True),
        sa.Column("updated", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_worklist_entries_worklist_id", "worklist_entries", ["worklist_id"])


def downgrade() -> None:
    op.drop_index("ix_worklist_entries_worklist_id", table_name="worklist_entries")
    op.drop_table("worklist_entries")
    op.drop_table("worklists")
    op.drop_table("originals")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("ignore_mask_path")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("revoked")
        batch.drop_column("expires")
