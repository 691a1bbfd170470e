"""The database schema's history (Alembic): ``connect`` upgrades every database it opens.

A database made before migrations existed (``create_all`` of release 0.1.0) has today's first
schema, ``0001``; it is stamped as such and upgraded like any other. Change the schema only by
adding a revision here, additive where it can be (new tables, new nullable columns).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

HERE = Path(__file__).parent
FIRST = "0001"
_LOCK_ID = 0x66656564  # the PostgreSQL advisory lock that serialises concurrent upgrades


def config(connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision``; safe when several app processes start at once."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        tables = set(inspect(connection).get_table_names())
        cfg = config(connection)
        if "alembic_version" not in tables and "versions" in tables:
            command.stamp(cfg, FIRST)  # made by create_all before there were migrations
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
