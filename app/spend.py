"""The daily spend quota: video-seconds submitted per API key per UTC day
(``DAILY_VIDEO_SECONDS_LIMIT``), reserved before a create and refunded when hiapi refuses it."""

from __future__ import annotations

from datetime import date

from sqlalchemy import case, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import dialect_insert
from app.models import DailySpend

__all__ = ["refund_spend", "reserve_spend", "spent"]


async def reserve_spend(
    session: AsyncSession, *, owner: str, day: date, seconds: int, limit: int
) -> int | None:
    """Add ``seconds`` to the owner's total for ``day`` if it stays within ``limit``.

    One statement, so concurrent submits cannot overshoot: on Postgres the conflicting row is
    locked and the ``WHERE`` re-checked after the other transaction commits; SQLite runs one
    writer at a time. Returns the new total, or None when the limit would be exceeded.
    """
    if seconds > limit:
        return None
    insert = dialect_insert(session)
    stmt = insert(DailySpend).values(owner=owner, day=day, video_seconds=seconds)
    stmt = stmt.on_conflict_do_update(
        index_elements=["owner", "day"],
        set_={"video_seconds": DailySpend.video_seconds + seconds},
        where=DailySpend.video_seconds + seconds <= limit,
    ).returning(DailySpend.video_seconds)
    total: int | None = (await session.execute(stmt)).scalar_one_or_none()
    return total


async def spent(session: AsyncSession, *, owner: str, day: date) -> int:
    row = await session.get(DailySpend, (owner, day))
    return row.video_seconds if row is not None else 0


async def refund_spend(session: AsyncSession, *, owner: str, day: date, seconds: int) -> None:
    """Give back the seconds of a video hiapi refused (it was never billed)."""
    await session.execute(
        update(DailySpend)
        .where(DailySpend.owner == owner, DailySpend.day == day)
        .values(
            video_seconds=case(
                (DailySpend.video_seconds > seconds, DailySpend.video_seconds - seconds),
                else_=0,
            )
        )
    )
