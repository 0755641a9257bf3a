"""images and notifications

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 17:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(length=100), server_default="", nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("content_type", sa.String(length=32), nullable=False),
        sa.Column("extension", sa.String(length=8), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("images_pkey")),
        sa.UniqueConstraint("token", name=op.f("images_token_key")),
    )
    op.create_index("ix_images_created_at", "images", ["created_at"])
    with op.batch_alter_table("videos") as batch:
        batch.add_column(sa.Column("image_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("notify_url", sa.Text(), nullable=True))
        batch.create_foreign_key("videos_image_id_fkey", "images", ["image_id"], ["id"])
    op.create_table(
        "notifications",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("video_id", sa.Uuid(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')", name=op.f("notifications_status_check")
        ),
        sa.ForeignKeyConstraint(["video_id"], ["videos.id"], name=op.f("notifications_video_id_fkey")),
        sa.PrimaryKeyConstraint("id", name=op.f("notifications_pkey")),
    )
    op.create_index("ix_notifications_status_due_at", "notifications", ["status", "due_at"])
    op.create_index("ix_notifications_video_id", "notifications", ["video_id"])


def downgrade() -> None:
    op.drop_index("ix_notifications_video_id", table_name="notifications")
    op.drop_index("ix_notifications_status_due_at", table_name="notifications")
    op.drop_table("notifications")
    with op.batch_alter_table("videos") as batch:
        batch.drop_constraint("videos_image_id_fkey", type_="foreignkey")
        batch.drop_column("notify_url")
        batch.drop_column("image_id")
    op.drop_index("ix_images_created_at", table_name="images")
    op.drop_table("images")
