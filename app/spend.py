"""Spend quotas, reserved in the submit transaction and refunded when hiapi refuses a task:

- video-seconds per API key per UTC day (``DAILY_VIDEO_SECONDS_LIMIT``);
- video-seconds per client-token subject of a key per UTC day
  (``DAILY_VIDEO_SECONDS_PER_SUBJECT``);
- video-seconds per client token over its life (its ``max_video_seconds``, the ``cap`` claim).

Each reservation is one conditional upsert, so concurrent submits cannot overshoot: on
Postgres the conflicting row is locked and the ``WHERE`` re-checked after the other
transaction commits; SQLite runs one writer at a time. A refused reservation returns None
and the caller rolls the whole transaction back, the reservations already made included.
Every submit takes its rows in the same order (key, subject, token), so two cannot deadlock.

``quota_uses`` reads the same rows back for ``GET /v1/usage``: a quota without a limit is not
counted (nothing is reserved for it), so it is not reported either.

Rows that can never be charged again (days older than the day before yesterday, tokens expired
more than a day ago) are deleted by ``purge_spend``, a bounded batch per reconciler tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from sqlalchemy import case, delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import dialect_insert
from app.models import DailySpend, SubjectSpend, TokenSpend

__all__ = [
    "QuotaUse",
    "day_resets_at",
    "purge_spend",
    "quota_uses",
    "refund_spend",
    "reserve_spend",
    "reserve_subject_spend",
    "reserve_token_spend",
    "spent",
    "subject_spent",
    "tightest",
    "token_spent",
]

_Table = type[DailySpend] | type[SubjectSpend] | type[TokenSpend]
Scope = Literal["key", "subject", "token"]


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """One quota of a caller: ``used`` of ``limit`` video-seconds. A day's quota resets at
    ``resets_at``; a token's cap never resets (None) and ends when the token does."""

    scope: Scope
    used: int
    limit: int
    resets_at: datetime | None = None
    expires_at: datetime | None = None  # the token's, for a token's cap

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def day_resets_at(now: datetime) -> datetime:
    """When today's (UTC) quotas reset: the next midnight UTC."""
    return datetime.combine(now.astimezone(UTC).date() + timedelta(days=1), time(), tzinfo=UTC)


def tightest(quotas: Sequence[QuotaUse]) -> QuotaUse | None:
    """The quota with the fewest seconds left (the first of equals, in key, subject, token
    order), or None when no quota applies."""
    return min(quotas, key=lambda q: q.remaining, default=None)


async def quota_uses(
    session: AsyncSession,
    *,
    owner: str,
    subject: str | None,
    token_id: str | None,
    token_expires_at: datetime | None,
    cap: int | None,
    now: datetime,
    daily_limit: int,
    subject_daily_limit: int,
) -> list[QuotaUse]:
    """Each quota that applies to a caller, as it stands: the key's day
    (``daily_limit``), a client token's subject's day (``subject_daily_limit``) and the
    token's cap. A limit of 0 (or no cap) applies to nothing, so it is left out."""
    day, resets = now.astimezone(UTC).date(), day_resets_at(now)
    uses: list[QuotaUse] = []
    if daily_limit:
        used = await spent(session, owner=owner, day=day)
        uses.append(QuotaUse("key", used, daily_limit, resets))
    if subject is not None and subject_daily_limit:
        used = await subject_spent(session, owner=owner, subject=subject, day=day)
        uses.append(QuotaUse("subject", used, subject_daily_limit, resets))
    if token_id is not None and cap is not None:
        used = await token_spent(session, token_id=token_id)
        uses.append(QuotaUse("token", used, cap, expires_at=token_expires_at))
    return uses


async def _reserve(
    session: AsyncSession, table: _Table, keys: dict[str, Any], *, seconds: int, limit: int
) -> int | None:
    if seconds > limit:
        return None
    column = table.video_seconds
    stmt = (
        dialect_insert(session)(table)
        .values(**keys, video_seconds=seconds)
        .on_conflict_do_update(
            index_elements=[k for k in keys if k != "expires_at"],
            set_={"video_seconds": column + seconds},
            where=column + seconds <= limit,
        )
        .returning(column)
    )
    total: int | None = (await session.execute(stmt)).scalar_one_or_none()
    return total


async def reserve_spend(
    session: AsyncSession, *, owner: str, day: date, seconds: int, limit: int
) -> int | None:
    """Add ``seconds`` to the owner's total for ``day`` if it stays within ``limit``.
    Returns the new total, or None when the limit would be exceeded."""
    keys = {"owner": owner, "day": day}
    return await _reserve(session, DailySpend, keys, seconds=seconds, limit=limit)


async def reserve_subject_spend(
    session: AsyncSession, *, owner: str, subject: str, day: date, seconds: int, limit: int
) -> int | None:
    """As ``reserve_spend``, for one subject of the owner's client tokens."""
    keys = {"owner": owner, "subject": subject, "day": day}
    return await _reserve(session, SubjectSpend, keys, seconds=seconds, limit=limit)


async def reserve_token_spend(
    session: AsyncSession, *, token_id: str, expires_at: datetime, seconds: int, cap: int
) -> int | None:
    """As ``reserve_spend``, for one client token over its whole life."""
    keys = {"token_id": token_id, "expires_at": expires_at}
    return await _reserve(session, TokenSpend, keys, seconds=seconds, limit=cap)


async def spent(session: AsyncSession, *, owner: str, day: date) -> int:
    row = await session.get(DailySpend, (owner, day))
    return row.video_seconds if row is not None else 0


async def subject_spent(session: AsyncSession, *, owner: str, subject: str, day: date) -> int:
    row = await session.get(SubjectSpend, (owner, subject, day))
    return row.video_seconds if row is not None else 0


async def token_spent(session: AsyncSession, *, token_id: str) -> int:
    row = await session.get(TokenSpend, token_id)
    return row.video_seconds if row is not None else 0


def _minus(column: Any, seconds: int) -> Any:
    return case((column > seconds, column - seconds), else_=0)


async def refund_spend(
    session: AsyncSession,
    *,
    owner: str,
    day: date,
    seconds: int,
    subject: str = "",
    token_id: str | None = None,
) -> None:
    """Give back the seconds of a video hiapi refused (it was never billed), to each quota
    it was charged to."""
    await session.execute(
        update(DailySpend)
        .where(DailySpend.owner == owner, DailySpend.day == day)
        .values(video_seconds=_minus(DailySpend.video_seconds, seconds))
    )
    if subject:
        await session.execute(
            update(SubjectSpend)
            .where(
                SubjectSpend.owner == owner,
                SubjectSpend.subject == subject,
                SubjectSpend.day == day,
            )
            .values(video_seconds=_minus(SubjectSpend.video_seconds, seconds))
        )
    if token_id is not None:
        await session.execute(
            update(TokenSpend)
            .where(TokenSpend.token_id == token_id)
            .values(video_seconds=_minus(TokenSpend.video_seconds, seconds))
        )


async def _purge(
    session: AsyncSession, table: _Table, keys: list[Any], condition: Any, *, limit: int
) -> int:
    rows = (await session.execute(select(*keys).where(condition).limit(limit))).all()
    if not rows:
        return 0
    # Counted from RETURNING: another replica's tick may have deleted some of them first.
    stmt = delete(table).where(tuple_(*keys).in_([tuple(r) for r in rows])).returning(keys[0])
    return len((await session.execute(stmt)).all())


async def purge_spend(session: AsyncSession, *, now: datetime, limit: int = 500) -> int:
    """Delete spend rows nothing can charge any more: ``daily_spend`` and ``subject_spend``
    for days more than two days before today (UTC), ``token_spend`` of tokens expired more
    than a day ago. At most ``limit`` rows per table; returns how many went."""
    before = now.astimezone(UTC).date() - timedelta(days=2)
    expired = now - timedelta(days=1)
    daily = [DailySpend.owner, DailySpend.day]
    subject = [SubjectSpend.owner, SubjectSpend.subject, SubjectSpend.day]
    return (
        await _purge(session, DailySpend, daily, DailySpend.day < before, limit=limit)
        + await _purge(session, SubjectSpend, subject, SubjectSpend.day < before, limit=limit)
        + await _purge(
            session, TokenSpend, [TokenSpend.token_id], TokenSpend.expires_at < expired, limit=limit
        )
    )
