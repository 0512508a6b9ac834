"""Engine, sessions and start-up migration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_MAX_THREADS = 40
"""A connection for each of the HTTP server's worker threads (AnyIO's default limit of 40):
a request never waits for a connection another is not using (PostgreSQL's
``max_connections`` must cover this per process; docs/deployment.md)."""
_MIGRATION_LOCK = 0x7472_6961_6765_0000
"""The PostgreSQL advisory lock held while migrating ("triage" + 0)."""


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, full fsync on commit and a busy timeout."""
    if url.startswith("sqlite"):
        # No pre-ping: a local file has no connection to lose, and the ping is a query per
        # session (one per received instance).
        # A file's pool: a connection per HTTP thread (WAL lets readers run beside the one
        # writer). An in-memory database keeps SQLAlchemy's one-connection pool.
        in_memory = make_url(url).database in (None, "", ":memory:")
        pool: dict[str, Any] = (
            {} if in_memory else {"pool_size": 10, "max_overflow": _MAX_THREADS - 10}
        )
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed index row survives power loss, matching the fsync'ed file.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=_MAX_THREADS - 10)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (run at start-up)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several processes starting at once on one database: one migrates, the others
            # wait and then find the schema current (the lock ends with the transaction).
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """An engine plus a session factory."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        migrate(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on error."""
        with self._factory() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
