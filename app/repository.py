"""Read queries: one video, a video's notification, a page of videos, stuck videos (state
changes live in ``lifecycle``).

List cursors are opaque and signed: ``base64url(JSON [created_at, id]) "." base64url(MAC)``,
the MAC an HMAC-SHA256 (first 16 bytes) over the caller and the payload under a key derived
from ``WEBHOOK_SECRET`` (which every replica already shares and keeps across restarts; without
it, as under ``--simulate``, the key is random per process and cursors end with the process).
A cursor that was altered, forged, issued to another API key, or signed under another secret is
refused with a 422 before anything is parsed, and the payload is still checked strictly after
the MAC, so even a key holder's hand-made cursor cannot reach the database malformed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Uuid, literal, select, tuple_, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Caller
from app.db import UTCDateTime
from app.models import TERMINAL, Notification, Status, Video

__all__ = [
    "BadCursor",
    "cursor_key",
    "decode_cursor",
    "encode_cursor",
    "get",
    "latest_notification",
    "list_videos",
    "notifications_for",
    "seal_cursor",
    "stuck",
]


async def get(session: AsyncSession, video_id: uuid.UUID) -> Video | None:
    """The video as stored now (also when this session has an older copy of it)."""
    return (
        await session.execute(
            select(Video).where(Video.id == video_id).execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def latest_notification(session: AsyncSession, video_id: uuid.UUID) -> Notification | None:
    stmt = (
        select(Notification)
        .where(Notification.video_id == video_id)
        .order_by(Notification.created_at.desc())
        .limit(1)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def stuck(session: AsyncSession, *, now: datetime, older_than: timedelta) -> list[Video]:
    """Videos not yet ready or failed whose last change is older than ``older_than``."""
    stmt = (
        select(Video)
        .where(Video.status.notin_(TERMINAL))
        .where(Video.updated_at < now - older_than)
        .order_by(Video.created_at)
        .limit(500)
    )
    return list((await session.execute(stmt)).scalars())


# --- lists: signed keyset cursors ---------------------------------------------------------

_CURSOR_KEY_LABEL = b"videorelay:list-cursor:v1"
_MAC_BYTES = 16
_CURSOR_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,200}\.[A-Za-z0-9_-]{22}")


class BadCursor(ValueError):
    """The ``cursor`` query parameter is not one this service issued to this caller."""


def cursor_key(secret: bytes) -> bytes:
    """The cursor-signing key: derived from (never equal to) the webhook secret, so a cursor's
    MAC can never serve as a callback token, nor the other way round."""
    return hmac.new(secret, _CURSOR_KEY_LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _framed(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "big") + data


def _mac(key: bytes, owner: str, payload: bytes, subject: str | None = None) -> bytes:
    # A client token's cursor also names its subject (framed like the owner; the JSON payload
    # starts with "[", never with a length's zero byte, so the two shapes cannot collide).
    message = _framed(owner) + (b"" if subject is None else _framed(subject)) + payload
    return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def seal_cursor(key: bytes, owner: str, payload: bytes, subject: str | None = None) -> str:
    """Sign ``payload`` (the cursor's JSON) for ``owner`` (and a client token's ``subject``)."""
    return f"{_b64(payload)}.{_b64(_mac(key, owner, payload, subject))}"


def encode_cursor(key: bytes, owner: str, video: Video, subject: str | None = None) -> str:
    created = video.created_at.astimezone(UTC).isoformat()
    payload = json.dumps([created, str(video.id)], separators=(",", ":")).encode()
    return seal_cursor(key, owner, payload, subject)


_REFUSED = (
    "not a cursor this API issued to this key (altered, from another key, or from before a "
    "restart or WEBHOOK_SECRET change); pass a `next_cursor` exactly as returned, or leave "
    "`cursor` out to start from the newest video"
)


def decode_cursor(
    key: bytes, owner: str, cursor: str, subject: str | None = None
) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` position of a signed cursor; ``BadCursor`` for anything else."""
    if _CURSOR_SHAPE.fullmatch(cursor) is None:
        raise BadCursor(_REFUSED)
    body, _, mac = cursor.partition(".")
    try:
        payload, given = _unb64(body), _unb64(mac)
    except (binascii.Error, ValueError):
        raise BadCursor(_REFUSED) from None
    if not hmac.compare_digest(_mac(key, owner, payload, subject), given):
        raise BadCursor(_REFUSED)
    # Signed by us, so well-formed unless the key leaked; check anyway, whatever JSON it holds.
    try:
        created_text, vid_text = json.loads(payload)
        if not isinstance(created_text, str) or not isinstance(vid_text, str):
            raise TypeError("cursor fields are not strings")
        created = datetime.fromisoformat(created_text)
        if created.utcoffset() is None:
            raise ValueError("cursor time has no time zone")
        return created.astimezone(UTC), uuid.UUID(vid_text)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadCursor("signed cursor holds no valid position; leave `cursor` out") from None


async def list_videos(
    session: AsyncSession,
    *,
    caller: Caller,
    subject: str | None = None,
    status: str | None,
    limit: int,
    cursor: str | None,
    secret: bytes,
    metadata: tuple[str, str] | None = None,
) -> tuple[list[Video], str | None]:
    """The caller's videos, newest first: an API key's all (or one ``subject``'s), a client
    token's own subject's only; with ``metadata=(key, value)``, those whose metadata has it.
    Keyset pagination on ``(created_at, id)`` so pages stay stable and cheap. ``secret`` is the
    webhook secret the cursor key is derived from."""
    key = cursor_key(secret)
    owner, own_subject = caller.owner, caller.subject
    stmt = (
        select(Video)
        .where(Video.owner == owner)
        .order_by(Video.created_at.desc(), Video.id.desc())
        .limit(limit + 1)
    )
    if own_subject is not None:
        stmt = stmt.where(Video.subject == own_subject)
    if subject is not None:
        stmt = stmt.where(Video.subject == subject)
    if status is not None:
        stmt = stmt.where(Video.status == status)
    else:
        stmt = stmt.where(Video.status != Status.deleted)  # tombstones are never listed
    if metadata is not None:
        stmt = stmt.where(_has_pair(session, *metadata))
    if cursor is not None:
        created, vid = decode_cursor(key, owner, cursor, own_subject)
        # Typed binds: a bare datetime would be sent as timestamptz and shifted by the
        # server's time zone when compared with our naive-UTC column.
        bound = tuple_(literal(created, UTCDateTime()), literal(vid, Uuid()))
        stmt = stmt.where(tuple_(Video.created_at, Video.id) < bound)
    rows = list((await session.execute(stmt)).scalars().all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(key, owner, rows[-1], own_subject) if more and rows else None)


def _has_pair(session: AsyncSession, key: str, value: str) -> Any:
    """``metadata[key] == value``. On Postgres as containment (``metadata @> {key: value}``),
    the one operator the GIN ``jsonb_path_ops`` index ``ix_videos_metadata`` answers; on
    SQLite with ``json_extract`` (no index: SQLite serves one node's volumes)."""
    if session.get_bind().dialect.name == "postgresql":
        return type_coerce(Video.meta, JSONB).contains({key: value})
    return Video.meta[key].as_string() == value


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
