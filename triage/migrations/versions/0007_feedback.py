"""radiologists' feedback on the AI's findings

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("finding", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("reader", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("SeriesInstanceUID", sa.String(length=64), nullable=True),
        sa.Column("SOPInstanceUID", sa.String(length=64), nullable=True),
        sa.Column("InstanceNumber", sa.Integer(), nullable=True),
        sa.Column("model_name", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=32), nullable=True),
        sa.Column("weights_sha256", sa.JSON(), nullable=False),
        sa.Column("ai_flag", sa.Boolean(), nullable=True),
        sa.Column("ai_score", sa.Float(), nullable=True),
    )
    op.create_index("ix_feedback_study_id", "feedback", ["study_id"], unique=False)
    op.create_index("ix_feedback_reader", "feedback", ["reader"], unique=False)
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_feedback_created_at", table_name="feedback")
    op.drop_index("ix_feedback_reader", table_name="feedback")
    op.drop_index("ix_feedback_study_id", table_name="feedback")
    op.drop_table("feedback")
