"""clip facts, poster, metadata and deletion

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 22:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "'queued', 'processing', 'downloading', 'ready', 'failed'"


def upgrade() -> None:
    with op.batch_alter_table("videos") as batch:
        batch.add_column(sa.Column("width", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("height", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("duration_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("codec", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("fps", sa.Float(), nullable=True))
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("faststart_remuxed", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("poster_key", sa.String(length=255), nullable=True))
        batch.add_column(
            sa.Column("metadata", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True)
        )
        batch.add_column(sa.Column("deleted_at", sa.DateTime(), nullable=True))
        batch.drop_constraint(op.f("videos_status_check"), type_="check")
        batch.create_check_constraint(op.f("videos_status_check"), f"status IN ({STATUSES}, 'deleted')")
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_videos_metadata",
            "videos",
            ["metadata"],
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_videos_metadata", table_name="videos")
    op.execute("DELETE FROM videos WHERE status = 'deleted'")
    with op.batch_alter_table("videos") as batch:
        batch.drop_constraint(op.f("videos_status_check"), type_="check")
        batch.create_check_constraint(op.f("videos_status_check"), f"status IN ({STATUSES})")
        for column in (
            "deleted_at",
            "metadata",
            "poster_key",
            "faststart_remuxed",
            "warnings",
            "fps",
            "codec",
            "duration_seconds",
            "height",
            "width",
        ):
            batch.drop_column(column)
