"""work queue: read state, claims with leases, patient location class; 64-bit sizes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 16:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("location_class", sa.String(length=16), nullable=True))
        batch.add_column(
            sa.Column("read_state", sa.String(length=16), nullable=False, server_default="unread")
        )
        batch.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("completed_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_studies_read_state", ["read_state"], unique=False)
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("size_bytes", existing_type=sa.Integer(), type_=sa.BigInteger())
    with op.batch_alter_table("quarantine") as batch:
        batch.alter_column("size_bytes", existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    with op.batch_alter_table("quarantine") as batch:
        batch.alter_column("size_bytes", existing_type=sa.BigInteger(), type_=sa.Integer())
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("size_bytes", existing_type=sa.BigInteger(), type_=sa.Integer())
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_read_state")
        for name in (
            "completed_at",
            "completed_by",
            "claim_expires_at",
            "claimed_by",
            "read_state",
            "location_class",
        ):
            batch.drop_column(name)
