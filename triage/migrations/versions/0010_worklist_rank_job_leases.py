"""the worklist's rank kept on each study (the policy's sort key, its class, tier, deadline
and reasons, when it must be recomputed, the policy it was computed with, and the study's
modalities and subspecialties for filtering in SQL); job leases for worker processes

The rank is marked stale (``rank_valid_until`` long ago) by triggers, in the transaction of
any change of what the priority policy reads, whichever process or code path makes it: a
finding added, changed or removed; a series added or removed (modalities, subspecialties);
a study's order priority, location class, arrival or AI status. (A study being read gets
its placement after the waiting ones in the completing UPDATE itself.) (On SQLite a
later migration that rebuilds ``studies``, ``series`` or ``findings`` in batch mode must
create these triggers again.)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 08:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# A rank "valid until" long ago: every existing study is ranked again on first read.
_STALE = "1970-01-01 00:00:00"


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("rank_tier", sa.Integer(), nullable=False, server_default="3"))
        batch.add_column(
            sa.Column("rank_severity", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("rank_a", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("rank_b", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("rank_c", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("priority_class", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("tier", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("deadline", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rank_reasons", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column(
                "rank_valid_until",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=_STALE,
            )
        )
        batch.add_column(sa.Column("rank_valid_from", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rank_policy", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("modalities", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("subspecialties", sa.String(length=128), nullable=True))
    op.create_index(
        "ix_studies_rank",
        "studies",
        ["rank_tier", "rank_severity", "rank_a", "rank_b", "rank_c", "StudyInstanceUID"],
    )
    op.create_index("ix_studies_rank_valid_until", "studies", ["rank_valid_until"])
    op.create_index("ix_studies_rank_policy", "studies", ["rank_policy"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_jobs_lease_expires_at", "jobs", ["lease_expires_at"])
    _create_triggers()


_STUDY_COLUMNS = ("order_priority", "location_class", "first_received_at", "ai_status")


def _study_changed(distinct: str) -> str:
    """The WHEN condition of the studies trigger (``distinct``: the dialect's IS DISTINCT)."""
    return " OR ".join(f"OLD.{c} {distinct} NEW.{c}" for c in _STUDY_COLUMNS)


def _create_triggers() -> None:
    dialect = op.get_bind().dialect.name
    columns = ", ".join(_STUDY_COLUMNS)
    if dialect == "postgresql":
        op.execute(
            f"""
            CREATE FUNCTION triage_rank_stale_by_child() RETURNS trigger AS $$
            BEGIN
              IF TG_OP = 'DELETE' THEN
                UPDATE studies SET rank_valid_until = '{_STALE}+00' WHERE id = OLD.study_id;
                RETURN OLD;
              END IF;
              UPDATE studies SET rank_valid_until = '{_STALE}+00' WHERE id = NEW.study_id;
              RETURN NEW;
            END $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            f"""
            CREATE FUNCTION triage_rank_stale_by_study() RETURNS trigger AS $$
            BEGIN
              NEW.rank_valid_until := '{_STALE}+00';
              RETURN NEW;
            END $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER findings_rank_stale AFTER INSERT OR UPDATE OR DELETE ON findings "
            "FOR EACH ROW EXECUTE FUNCTION triage_rank_stale_by_child()"
        )
        op.execute(
            "CREATE TRIGGER series_rank_stale AFTER INSERT OR DELETE ON series "
            "FOR EACH ROW EXECUTE FUNCTION triage_rank_stale_by_child()"
        )
        op.execute(
            f"CREATE TRIGGER studies_rank_stale BEFORE UPDATE OF {columns} ON studies "
            f"FOR EACH ROW WHEN ({_study_changed('IS DISTINCT FROM')}) "
            "EXECUTE FUNCTION triage_rank_stale_by_study()"
        )
        return
    stale = f"UPDATE studies SET rank_valid_until = '{_STALE}'"
    for table, events in (
        ("findings", ("INSERT", "UPDATE", "DELETE")),
        ("series", ("INSERT", "DELETE")),
    ):
        for event in events:
            row = "OLD" if event == "DELETE" else "NEW"
            op.execute(
                f"CREATE TRIGGER {table}_rank_stale_{event.lower()} AFTER {event} ON {table} "
                f"BEGIN {stale} WHERE id = {row}.study_id; END"
            )
    op.execute(
        f"CREATE TRIGGER studies_rank_stale AFTER UPDATE OF {columns} ON studies "
        f"WHEN {_study_changed('IS NOT')} "
        f"BEGIN {stale} WHERE id = NEW.id; END"
    )


def _drop_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS studies_rank_stale ON studies")
        op.execute("DROP TRIGGER IF EXISTS series_rank_stale ON series")
        op.execute("DROP TRIGGER IF EXISTS findings_rank_stale ON findings")
        op.execute("DROP FUNCTION IF EXISTS triage_rank_stale_by_study()")
        op.execute("DROP FUNCTION IF EXISTS triage_rank_stale_by_child()")
        return
    op.execute("DROP TRIGGER IF EXISTS studies_rank_stale")
    for name in (
        "series_rank_stale_insert",
        "series_rank_stale_delete",
        "findings_rank_stale_insert",
        "findings_rank_stale_update",
        "findings_rank_stale_delete",
    ):
        op.execute(f"DROP TRIGGER IF EXISTS {name}")


def downgrade() -> None:
    _drop_triggers()
    op.drop_index("ix_jobs_lease_expires_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("attempts", "heartbeat_at", "lease_expires_at", "worker_id"):
            batch.drop_column(name)
    op.drop_index("ix_studies_rank_policy", table_name="studies")
    op.drop_index("ix_studies_rank_valid_until", table_name="studies")
    op.drop_index("ix_studies_rank", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        for name in (
            "subspecialties",
            "modalities",
            "rank_policy",
            "rank_valid_from",
            "rank_valid_until",
            "rank_reasons",
            "deadline",
            "tier",
            "priority_class",
            "rank_c",
            "rank_b",
            "rank_a",
            "rank_severity",
            "rank_tier",
        ):
            batch.drop_column(name)
