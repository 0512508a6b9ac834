"""DICOM results (SEG, TID 1500 SR) of the AI and their exports to PACS destinations

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("SOPInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("SeriesInstanceUID", sa.String(length=64), nullable=False),
        sa.Column("SOPClassUID", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("finding", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dicom_results_study_id", "dicom_results", ["study_id"], unique=False)
    op.create_index(
        "ix_dicom_results_SOPInstanceUID", "dicom_results", ["SOPInstanceUID"], unique=True
    )
    op.create_table(
        "result_exports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("result_id", sa.Integer(), sa.ForeignKey("dicom_results.id"), nullable=False),
        sa.Column("destination", sa.String(length=300), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("result_id", "destination"),
    )
    op.create_index("ix_result_exports_result_id", "result_exports", ["result_id"], unique=False)
    op.create_index("ix_result_exports_state", "result_exports", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_result_exports_state", table_name="result_exports")
    op.drop_index("ix_result_exports_result_id", table_name="result_exports")
    op.drop_table("result_exports")
    op.drop_index("ix_dicom_results_SOPInstanceUID", table_name="dicom_results")
    op.drop_index("ix_dicom_results_study_id", table_name="dicom_results")
    op.drop_table("dicom_results")
