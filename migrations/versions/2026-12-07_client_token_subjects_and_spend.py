"""client token subjects and spend

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 20:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("videos") as batch:
        batch.add_column(
            sa.Column("subject", sa.String(length=128), server_default="", nullable=False)
        )
        batch.add_column(sa.Column("token_id", sa.String(length=64), nullable=True))
        batch.drop_constraint("videos_owner_idempotency_key_key", type_="unique")
        batch.create_unique_constraint(
            "videos_owner_subject_idempotency_key_key", ["owner", "subject", "idempotency_key"]
        )
    op.create_index(
        "ix_videos_owner_subject_created_at_id", "videos", ["owner", "subject", "created_at", "id"]
    )
    with op.batch_alter_table("images") as batch:
        batch.add_column(
            sa.Column("subject", sa.String(length=128), server_default="", nullable=False)
        )
    op.create_table(
        "subject_spend",
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("video_seconds", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("owner", "subject", "day", name=op.f("subject_spend_pkey")),
    )
    op.create_table(
        "token_spend",
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("video_seconds", sa.Integer(), server_default="0", nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token_id", name=op.f("token_spend_pkey")),
    )


def downgrade() -> None:
    op.drop_table("token_spend")
    op.drop_table("subject_spend")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("subject")
    op.drop_index("ix_videos_owner_subject_created_at_id", table_name="videos")
    with op.batch_alter_table("videos") as batch:
        batch.drop_constraint("videos_owner_subject_idempotency_key_key", type_="unique")
        batch.create_unique_constraint(
            "videos_owner_idempotency_key_key", ["owner", "idempotency_key"]
        )
        batch.drop_column("token_id")
        batch.drop_column("subject")
