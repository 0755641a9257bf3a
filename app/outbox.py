"""The notify_url outbox: a delivery is queued in the transaction that ends a video, then
claimed and recorded by the notifier loop of any replica (``jobs/notifier.py`` sends it)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import String, Table, Text, Uuid, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import UTCDateTime, claim_due_rows
from app.models import Notification, NotifyStatus

__all__ = ["claim_notifications", "drop_pending", "queue_notification", "record_delivery"]

_notifications = cast(Table, Notification.__table__)
_p_now = bindparam("p_now", type_=UTCDateTime())
# Built once: a burst of failed callbacks queues one delivery each.
_QUEUE_NOTIFICATION = insert(_notifications).values(
    id=bindparam("p_id", type_=Uuid()),
    video_id=bindparam("p_video", type_=Uuid()),
    url=bindparam("p_url", type_=Text()),
    event=bindparam("p_event", type_=String()),
    status=NotifyStatus.pending.value,
    attempts=0,
    due_at=_p_now,
    created_at=_p_now,
)


async def queue_notification(
    session: AsyncSession, *, video_id: uuid.UUID, url: str, status: str, now: datetime
) -> None:
    """Queue the notify_url delivery in the transaction that ended the video: it is sent if
    and only if the video really ended."""
    await session.execute(
        _QUEUE_NOTIFICATION,
        {
            "p_id": uuid.uuid4(),
            "p_video": video_id,
            "p_url": url,
            "p_event": f"video.{status}",
            "p_now": now,
        },
    )


async def claim_notifications(
    session: AsyncSession, *, now: datetime, hold: timedelta, owner: str, limit: int
) -> list[Notification]:
    """Take due deliveries, with the same claim as ``lifecycle.claim_due``."""
    return await claim_due_rows(
        session,
        Notification,
        status=NotifyStatus.pending.value,
        now=now,
        hold=hold,
        owner=owner,
        limit=limit,
    )


async def record_delivery(
    session: AsyncSession,
    *,
    notification_id: uuid.UUID,
    owner: str,
    delivered: bool,
    status_code: int | None,
    error: str | None,
    retry_at: datetime | None,
    now: datetime,
) -> None:
    """Store one delivery attempt; ``retry_at=None`` after a failure means: give up."""
    if delivered:
        status, due = NotifyStatus.delivered, now
    elif retry_at is None:
        status, due = NotifyStatus.failed, now
    else:
        status, due = NotifyStatus.pending, retry_at
    await session.execute(
        update(Notification)
        .where(Notification.id == notification_id, Notification.lease_owner == owner)
        .values(
            status=status.value,
            due_at=due,
            lease_owner=None,
            attempts=Notification.attempts + 1,
            last_attempt_at=now,
            last_status_code=status_code,
            last_error=error,
            delivered_at=now if delivered else None,
        )
    )


async def drop_pending(session: AsyncSession, video_ids: list[uuid.UUID], *, now: datetime) -> None:
    """The videos were deleted: deliveries not yet made are given up (``failed``), so no
    notification describes a clip that is gone. One already being sent may still arrive."""
    await session.execute(
        update(Notification)
        .where(
            Notification.video_id.in_(video_ids),
            Notification.status == NotifyStatus.pending.value,
        )
        .values(status=NotifyStatus.failed.value, lease_owner=None, last_error="video deleted")
    )
