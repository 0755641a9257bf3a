"""Alembic, driven from code: ``videorelay migrate``, tests, and ``/readyz``.

``require_migrated`` is what ``serve`` and ``admin`` ask before they touch the database: a
missing SQLite file is never created by them, and an unmigrated database is refused with one
line saying what to run.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

__all__ = [
    "DatabaseNotReady",
    "DatabaseUnreachable",
    "alembic_config",
    "head_revision",
    "require_migrated",
    "upgrade",
]

MIGRATE_HINT = "run `videorelay migrate` (or start with `videorelay serve --migrate`)"


class DatabaseNotReady(Exception):
    """The database is missing or not at this code's revision; the message says what to run."""


class DatabaseUnreachable(DatabaseNotReady):
    """The database could not be opened at all (down, refused, wrong credentials)."""


def _project_file(name: str) -> Path:
    """``alembic.ini`` and ``migrations/`` sit at the project root (next to ``app/``)."""
    for base in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"cannot find {name}; run from the project directory")


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(_project_file("alembic.ini")))
    cfg.set_main_option("script_location", str(_project_file("migrations")))
    cfg.attributes["sqlalchemy.url"] = database_url
    cfg.attributes["skip_logging"] = True  # videorelay configures logging itself
    return cfg


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def _describe(database_url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except ArgumentError:
        return "DATABASE_URL"


def _sqlite_file(database_url: str) -> Path | None:
    """The file a SQLite URL names (relative to the working directory), or None."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite"):
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


async def _current_revision(database_url: str, seconds: float) -> str | None:
    # A bare engine: no SQLite pragmas (they would write), no directory created, no pool.
    engine = create_async_engine(
        database_url, poolclass=NullPool, connect_args={"timeout": seconds}
    )

    def read(connection: Connection) -> str | None:
        chatty = logging.getLogger("alembic.runtime.migration")  # "Context impl ..." at INFO
        level = chatty.level
        chatty.setLevel(logging.WARNING)
        try:
            return MigrationContext.configure(connection).get_current_revision()
        finally:
            chatty.setLevel(level)

    try:
        async with asyncio.timeout(seconds + 1), engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        await engine.dispose()


def require_migrated(database_url: str, *, timeout: float = 10.0) -> None:
    """Raise ``DatabaseNotReady`` unless the database exists and is at this code's head.

    A SQLite file that does not exist is reported without being created. A database that
    cannot be opened raises ``DatabaseUnreachable`` (``serve`` starts anyway and waits for it).
    """
    try:
        path = _sqlite_file(database_url)
    except ArgumentError:
        raise DatabaseNotReady("DATABASE_URL is not a database URL") from None
    if path is not None and not path.is_file():
        raise DatabaseNotReady(
            f"no database at {path} (DATABASE_URL={_describe(database_url)}, "
            f"from {Path.cwd()}): run this from the folder the service runs in or set "
            f"DATABASE_URL, or create it: {MIGRATE_HINT}"
        )
    try:
        current = asyncio.run(_current_revision(database_url, timeout))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        cause = getattr(exc, "orig", None) or exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise DatabaseUnreachable(
            f"cannot open the database {_describe(database_url)}: "
            f"{type(cause).__name__}{': ' + reason if reason else ''}"
        ) from None
    head = head_revision(database_url)
    if current == head:
        return
    if current is None:
        raise DatabaseNotReady(
            f"the database {_describe(database_url)} has no tables yet (not migrated): "
            f"{MIGRATE_HINT}"
        )
    known = {
        rev.revision
        for rev in ScriptDirectory.from_config(alembic_config(database_url)).walk_revisions()
    }
    if current in known:
        raise DatabaseNotReady(
            f"the database {_describe(database_url)} is at revision {current}, this version "
            f"needs {head}: {MIGRATE_HINT}"
        )
    raise DatabaseNotReady(
        f"the database {_describe(database_url)} is at revision {current}, which this version "
        f"of videorelay does not know (a newer one migrated it); run the newer version"
    )
