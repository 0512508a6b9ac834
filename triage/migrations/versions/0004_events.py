"""events: the outbox for live updates, the webhook and FHIR Task messages

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("StudyInstanceUID", sa.String(length=64), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("webhook_state", sa.String(length=16), nullable=True),
        sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("webhook_error", sa.Text(), nullable=True),
        sqlite_autoincrement=True,  # ids are never reused after old events are pruned
    )
    op.create_index("ix_events_kind", "events", ["kind"], unique=False)
    op.create_index("ix_events_webhook_state", "events", ["webhook_state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_events_webhook_state", table_name="events")
    op.drop_index("ix_events_kind", table_name="events")
    op.drop_table("events")
