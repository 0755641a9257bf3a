"""Read queries for the API (state changes live in ``lifecycle``)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from sqlalchemy import Uuid, literal, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import UTCDateTime
from app.models import Notification, Video

__all__ = ["BadCursor", "decode_cursor", "encode_cursor", "list_videos"]


class BadCursor(ValueError):
    pass


def encode_cursor(video: Video) -> str:
    raw = json.dumps([video.created_at.isoformat(), str(video.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, vid = json.loads(raw)
        return datetime.fromisoformat(created), uuid.UUID(vid)
    except (ValueError, TypeError) as exc:
        raise BadCursor("cursor: not a cursor returned by this API") from exc


async def list_videos(
    session: AsyncSession, *, owner: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Video], str | None]:
    """Newest first; keyset pagination on ``(created_at, id)`` so pages stay stable and cheap."""
    stmt = (
        select(Video)
        .where(Video.owner == owner)
        .order_by(Video.created_at.desc(), Video.id.desc())
        .limit(limit + 1)
    )
    if status is not None:
        stmt = stmt.where(Video.status == status)
    if cursor is not None:
        created, vid = decode_cursor(cursor)
        # Typed binds: a bare datetime would be sent as timestamptz and shifted by the
        # server's time zone when compared with our naive-UTC column.
        bound = tuple_(literal(created, UTCDateTime()), literal(vid, Uuid()))
        stmt = stmt.where(tuple_(Video.created_at, Video.id) < bound)
    rows = list((await session.execute(stmt)).scalars().all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1]) if more and rows else None)


async def notifications_for(
    session: AsyncSession, video_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Notification]:
    """The notify_url delivery of each video (a video ends, and is notified, once)."""
    if not video_ids:
        return {}
    rows = await session.execute(
        select(Notification)
        .where(Notification.video_id.in_(video_ids))
        .order_by(Notification.created_at)
    )
    return {note.video_id: note for note in rows.scalars()}
