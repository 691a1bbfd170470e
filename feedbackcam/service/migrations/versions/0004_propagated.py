"""One mark, many images (issue 19): a feedback item accepted from a proposal records the item
it was found from. Additive only: one new nullable column.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(
            sa.Column(
                "propagated_from",
                sa.Integer(),
                sa.ForeignKey("feedback.id", name="fk_feedback_propagated_from"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_constraint("fk_feedback_propagated_from", type_="foreignkey")
        batch.drop_column("propagated_from")
