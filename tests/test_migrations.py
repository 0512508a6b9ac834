"""The Alembic migrations build exactly the schema the tables declare, on each backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from triage.db import Database
from triage.db.tables import Base


def test_migrations_match_the_declared_tables(db: Database) -> None:
    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []
