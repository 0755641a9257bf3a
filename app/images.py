"""Still images uploaded by frontends, so they need not host them publicly themselves.

The type is decided by the file's first bytes (JPEG, PNG or WebP), never by its name or the
client's Content-Type; Pillow then reads the dimensions, which also proves the file decodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Image, Video

__all__ = [
    "ImageInfo",
    "NotAnImage",
    "by_token",
    "create",
    "expire",
    "get_owned",
    "inspect_image",
    "public_url",
    "sniff_type",
]

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding


class NotAnImage(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ImageInfo:
    content_type: str
    extension: str
    width: int
    height: int


def sniff_type(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def inspect_image(data: bytes) -> ImageInfo:
    """Check an upload's type by content and read its size. Blocking (Pillow)."""
    content_type = sniff_type(data[:16])
    if content_type is None:
        raise NotAnImage("file is not a JPEG, PNG or WebP image (checked by content)")
    try:
        with PILImage.open(BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise NotAnImage(f"image is {width}x{height}; at most {MAX_PIXELS} pixels")
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, PILImage.DecompressionBombError) as exc:
        raise NotAnImage(f"image cannot be decoded: {type(exc).__name__}") from None
    return ImageInfo(content_type, EXTENSIONS[content_type], width, height)


# --- storage and rows ---------------------------------------------------------------------


def public_url(public_base: str, image: Image) -> str:
    return f"{public_base}/i/{image.token}.{image.extension}"


def image_path(storage_root: Path, token: str, extension: str) -> Path:
    return storage_root / "images" / f"{token}.{extension}"


def store_file(storage_root: Path, token: str, extension: str, data: bytes) -> str:
    """Write the upload under its final name atomically (temp file, fsync, rename). Blocking."""
    final = image_path(storage_root, token, extension)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_suffix(final.suffix + ".part")
    with temp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, final)
    return f"images/{token}.{extension}"


async def store(storage_root: Path, info: ImageInfo, data: bytes) -> tuple[str, str]:
    """Write the file under a new unguessable token; returns (token, storage key). Called
    before the transaction that records it, so no transaction waits on the disk."""
    token = secrets.token_urlsafe(24)
    key = await asyncio.to_thread(store_file, storage_root, token, info.extension, data)
    return token, key


async def create(
    session: AsyncSession,
    *,
    owner: str,
    info: ImageInfo,
    data: bytes,
    token: str,
    key: str,
    now: datetime,
) -> Image:
    """Record an image ``store`` has written."""
    image = Image(
        id=uuid.uuid4(),
        owner=owner,
        token=token,
        content_type=info.content_type,
        extension=info.extension,
        size_bytes=len(data),
        width=info.width,
        height=info.height,
        sha256=hashlib.sha256(data).hexdigest(),
        storage_key=key,
        created_at=now,
    )
    session.add(image)
    await session.flush()
    return image


async def get_owned(session: AsyncSession, image_id: uuid.UUID, *, owner: str) -> Image | None:
    image = await session.get(Image, image_id)
    if image is None or image.owner != owner or image.deleted_at is not None:
        return None
    return image


async def by_token(session: AsyncSession, token: str) -> Image | None:
    stmt = select(Image).where(Image.token == token, Image.deleted_at.is_(None))
    return (await session.execute(stmt)).scalar_one_or_none()


async def expire(
    session: AsyncSession, *, storage_root: Path, now: datetime, retention: timedelta
) -> int:
    """Delete images nobody needs any more: older than ``retention`` and not used by a video
    that is still running or ended less than ``retention`` ago."""
    cutoff = now - retention
    still_needed = (
        select(Video.id)
        .where(Video.image_id == Image.id)
        .where(or_(Video.status.notin_(("ready", "failed")), Video.updated_at > cutoff))
        .exists()
    )
    stmt = (
        select(Image)
        .where(Image.deleted_at.is_(None), Image.created_at < cutoff, ~still_needed)
        .limit(100)
    )
    expired = list((await session.execute(stmt)).scalars())
    for image in expired:
        await asyncio.to_thread(image_path(storage_root, image.token, image.extension).unlink, True)
        image.deleted_at = now
    await session.flush()
    return len(expired)
