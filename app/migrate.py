"""Alembic, driven from code: ``videorelay migrate``, tests, and ``/readyz``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

__all__ = ["alembic_config", "head_revision", "upgrade"]


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
