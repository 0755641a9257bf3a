"""create videos

Revision ID: 0001
Revises:
Create Date: 2026-11-28 16:42:32
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Timestamps are naive UTC in the database (app.db.UTCDateTime adds the zone back).
    op.create_table(
        "videos",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("image_url", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("resolution", sa.String(length=8), nullable=False),
        sa.Column("duration", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("task_id", sa.String(length=200), nullable=True),
        sa.Column("error_code", sa.String(length=100), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("submit_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("ambiguous_submits", sa.Integer(), server_default="0", nullable=False),
        sa.Column("poll_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("download_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("output_url", sa.Text(), nullable=True),
        sa.Column("output_expires_at", sa.DateTime(), nullable=True),
        sa.Column("completed_via", sa.String(length=16), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("storage_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(), nullable=True),
        sa.Column("task_finished_at", sa.DateTime(), nullable=True),
        sa.Column("ready_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'processing', 'downloading', 'ready', 'failed')",
            name=op.f("videos_status_check"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("videos_pkey")),
        sa.UniqueConstraint("idempotency_key", name=op.f("videos_idempotency_key_key")),
        sa.UniqueConstraint("task_id", name=op.f("videos_task_id_key")),
    )
    op.create_index("ix_videos_created_at_id", "videos", ["created_at", "id"])
    op.create_index("ix_videos_status_created_at_id", "videos", ["status", "created_at", "id"])
    op.create_index("ix_videos_status_due_at", "videos", ["status", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_videos_status_due_at", table_name="videos")
    op.drop_index("ix_videos_status_created_at_id", table_name="videos")
    op.drop_index("ix_videos_created_at_id", table_name="videos")
    op.drop_table("videos")
