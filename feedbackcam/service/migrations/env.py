"""Alembic's entry point: it migrates the connection that ``migrations.upgrade`` hands it."""

from __future__ import annotations

from alembic import context

from feedbackcam.service.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
