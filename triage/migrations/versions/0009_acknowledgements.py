"""acknowledgements of critical-finding alerts: who acknowledged which alert, and when

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acknowledgements",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("finding", sa.String(length=64), nullable=False),
        sa.Column("reader", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_acknowledgements_study_id", "acknowledgements", ["study_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_acknowledgements_study_id", table_name="acknowledgements")
    op.drop_table("acknowledgements")
