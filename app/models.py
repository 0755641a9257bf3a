"""Tables: ``videos`` (one row per requested clip, from submit to stored file), ``images``
(uploaded stills), ``notifications`` (the notify_url outbox) and ``daily_spend``."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import UTCDateTime

__all__ = [
    "TERMINAL",
    "Base",
    "DailySpend",
    "Image",
    "Notification",
    "NotifyStatus",
    "Status",
    "SubjectSpend",
    "TokenSpend",
    "Via",
    "Video",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "%(table_name)s_%(column_0_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "pk": "%(table_name)s_pkey",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Status(StrEnum):
    """A video's state. ``ready`` and ``failed`` end the work; ``deleted`` (a tombstone kept so
    a late callback or poll finds the row and does nothing) is final: no transition leaves it."""

    queued = "queued"  # stored; the hiapi task is not created yet (or must be created again)
    processing = "processing"  # hiapi has the task; waiting for its callback (or a poll)
    downloading = "downloading"  # hiapi finished; the clip is being copied into storage
    ready = "ready"
    failed = "failed"
    deleted = "deleted"  # DELETE /v1/videos/{id} or VIDEO_RETENTION_SECONDS; files removed


TERMINAL = (Status.ready, Status.failed, Status.deleted)


class Via(StrEnum):
    """How we learned that hiapi finished a task."""

    callback = "callback"
    poll = "poll"


class Video(Base):
    __tablename__ = "videos"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'processing', 'downloading', 'ready', 'failed', 'deleted')",
            name="status",
        ),
        # The reconciler's only query shape: rows of one status whose due_at has passed.
        Index("ix_videos_status_due_at", "status", "due_at"),
        Index("ix_videos_created_at_id", "created_at", "id"),
        Index("ix_videos_status_created_at_id", "status", "created_at", "id"),
        Index("ix_videos_owner_created_at_id", "owner", "created_at", "id"),
        Index("ix_videos_owner_subject_created_at_id", "owner", "subject", "created_at", "id"),
        # ``GET /v1/videos?metadata.<key>=<value>`` is ``metadata @> {key: value}`` on Postgres,
        # which this index answers (jsonb_path_ops: containment only, smaller than the default).
        Index(
            "ix_videos_metadata",
            "metadata",
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
            info={"only_on": "postgresql"},  # migrations/env.py compares it only there
        ).ddl_if(dialect="postgresql"),
        # An Idempotency-Key is scoped to the key (owner) and the end user (subject) that sent
        # it, so one subject can never reach another's video by replaying its key.
        UniqueConstraint(
            "owner", "subject", "idempotency_key", name="videos_owner_subject_idempotency_key_key"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    image_url: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str | None] = mapped_column(Text)
    resolution: Mapped[str] = mapped_column(String(8))
    duration: Mapped[int] = mapped_column(Integer)
    # The API key name that created the video ('' when the API is open). Other keys get 404.
    owner: Mapped[str] = mapped_column(String(100), default="", server_default="")
    # The client token's end user that created it ('' when the key itself did). Other
    # subjects of the same key get 404; the key sees all of them.
    subject: Mapped[str] = mapped_column(String(128), default="", server_default="")
    # The client token that created it (its own spend is refunded if hiapi refuses the task).
    token_id: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))

    image_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("images.id"))
    notify_url: Mapped[str | None] = mapped_column(Text)

    task_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)

    # When someone may next act on the row: the next submit try (queued), the next poll
    # (processing), the end of the download lease or the next download try (downloading).
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    submit_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ambiguous_submits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    poll_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    download_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)

    output_url: Mapped[str | None] = mapped_column(Text)
    output_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_via: Mapped[str | None] = mapped_column(String(16))

    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    storage_key: Mapped[str | None] = mapped_column(String(255))

    # The stored clip's facts, read from the file once it is downloaded.
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    codec: Mapped[str | None] = mapped_column(String(32))
    fps: Mapped[float | None] = mapped_column(Float)
    # Findings that did not fail the clip, e.g. ["duration_mismatch"].
    warnings: Mapped[list[str] | None] = mapped_column(JSON)
    # True when the clip's moov box was moved to the front (remuxed, not re-encoded).
    faststart_remuxed: Mapped[bool | None] = mapped_column(Boolean)
    poster_key: Mapped[str | None] = mapped_column(String(255))

    # The caller's own key/value pairs, echoed back and filterable.
    meta: Mapped[dict[str, str] | None] = mapped_column(
        "metadata", JSON().with_variant(JSONB(), "postgresql")
    )
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    task_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DailySpend(Base):
    """Video-seconds submitted per API key per UTC day, for ``DAILY_VIDEO_SECONDS_LIMIT``."""

    __tablename__ = "daily_spend"

    owner: Mapped[str] = mapped_column(String(100), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    video_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class SubjectSpend(Base):
    """Video-seconds submitted per client-token subject of a key per UTC day, for
    ``DAILY_VIDEO_SECONDS_PER_SUBJECT``."""

    __tablename__ = "subject_spend"

    owner: Mapped[str] = mapped_column(String(100), primary_key=True)
    subject: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    video_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class TokenSpend(Base):
    """Video-seconds submitted with one client token (its ``jti``), for its ``cap``."""

    __tablename__ = "token_spend"

    token_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    video_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Image(Base):
    """A still uploaded through ``POST /v1/images``, served to hiapi at an unguessable URL."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_created_at", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), default="", server_default="")
    subject: Mapped[str] = mapped_column(String(128), default="", server_default="")
    token: Mapped[str] = mapped_column(String(64), unique=True)
    content_type: Mapped[str] = mapped_column(String(32))
    extension: Mapped[str] = mapped_column(String(8))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class NotifyStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class Notification(Base):
    """Outbox of ``notify_url`` deliveries: written in the transaction that ends the video,
    delivered (signed, retried with backoff) by the notifier loop of any replica."""

    __tablename__ = "notifications"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        Index("ix_notifications_status_due_at", "status", "due_at"),
        Index("ix_notifications_video_id", "video_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    video_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("videos.id"))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
