"""Alembic environment: async engine, works on SQLite and Postgres.

The URL comes from ``config.attributes["sqlalchemy.url"]`` (set by ``app.migrate``), else
from ``DATABASE_URL``. On Postgres, a transaction-scoped advisory lock serializes replicas
that run ``videorelay migrate`` at the same time.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from app.config import DEFAULT_DATABASE_URL
from app.db import create_engine
from app.models import Base

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
MIGRATION_LOCK_ID = 0x766964656F72  # "vidreo": any fixed number shared by all replicas


def database_url() -> str:
    url = config.attributes.get("sqlalchemy.url")
    return str(url or os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))


def do_run_migrations(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any):
        # An index made for one database only (``info={"only_on": ...}``) is not expected on others.
        only_on = getattr(obj, "info", {}).get("only_on")
        return only_on is None or only_on == connection.dialect.name

    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=sqlite,
        include_object=include_object,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_engine(database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        # Also when the migration fails (a deadlock with a running service, say): the
        # pooled connection is closed inside this event loop, not left to the collector.
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
