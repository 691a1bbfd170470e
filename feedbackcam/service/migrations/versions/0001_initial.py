"""The schema of release 0.1.0: users, model versions, feedback, the current version.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_users_token_hash", "users", ["token_hash"], unique=True)
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("versions.id"), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    op.create_index("ix_versions_sha256", "versions", ["sha256"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_path", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("predicted", sa.String(64), nullable=False),
        sa.Column("agree", sa.Boolean(), nullable=False),
        sa.Column("mask_path", sa.Text(), nullable=True),
        sa.Column("shown_version_id", sa.Integer(), sa.ForeignKey("versions.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("update_id", sa.Integer(), sa.ForeignKey("versions.id"), nullable=True),
    )
    op.create_index("ix_feedback_status", "feedback", ["status"])
    op.create_table(
        "current_version",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id"), nullable=False),
        sa.Column("changed", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("current_version", "feedback", "versions", "users"):
        op.drop_table(table)
