"""api key owner and daily spend

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 17:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("videos") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=100), server_default="", nullable=False))
        batch.drop_constraint("videos_idempotency_key_key", type_="unique")
        batch.create_unique_constraint(
            "videos_owner_idempotency_key_key", ["owner", "idempotency_key"]
        )
    op.create_index("ix_videos_owner_created_at_id", "videos", ["owner", "created_at", "id"])
    op.create_table(
        "daily_spend",
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("video_seconds", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("owner", "day", name=op.f("daily_spend_pkey")),
    )


def downgrade() -> None:
    op.drop_table("daily_spend")
    op.drop_index("ix_videos_owner_created_at_id", table_name="videos")
    with op.batch_alter_table("videos") as batch:
        batch.drop_constraint("videos_owner_idempotency_key_key", type_="unique")
        batch.create_unique_constraint("videos_idempotency_key_key", ["idempotency_key"])
        batch.drop_column("owner")
