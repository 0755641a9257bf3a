"""Still images uploaded by frontends, so they need not host them publicly themselves.

The type is decided by the file's first bytes (JPEG, PNG or WebP), never by its name or the
client's Content-Type. ``inspect_image`` then proves the file decodes before anything is stored
or handed to hiapi, with bounded work:

- at most ``MAX_PIXELS`` pixels, read from the header before any pixel is decoded;
- a PNG's chunks are walked and their CRCs checked, and its pixel data (IDAT) is inflated in
  64 KiB steps, stopping as soon as it passes what the dimensions, bit depth and interlacing
  need (plus ``_INFLATE_SLACK``): a tiny PNG carrying a huge zlib stream is refused after
  inflating little more than its pixels need, where Pillow alone would stop reading after
  those few bytes and accept it. Compressed text and ICC chunks get the same bounded inflate
  (1 MiB each, Pillow's own limit); animated PNGs (``acTL``), whose later frames Pillow never
  reads, are refused;
- the first frame is then fully decoded with Pillow (``load()``), so a truncated or corrupt
  file (a JPEG cut short, a PNG with a broken IDAT, a truncated WebP) is refused here, not by
  hiapi after it has paid to fetch it. JPEGs decode at 1/8 scale (every coefficient is still
  read), so the check costs a fraction of a full decode's memory.

``ImageTooLarge`` (too many pixels, or pixel data inflating beyond the dimensions: a
decompression bomb) is answered ``413 image_too_large``; ``NotAnImage`` (not one of the three
types, or it does not decode) ``415 unsupported_image``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import struct
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Caller
from app.models import TERMINAL, Image, Video

__all__ = [
    "ImageInfo",
    "ImageTooLarge",
    "NotAnImage",
    "by_token",
    "create",
    "expire",
    "get_owned",
    "inspect_image",
    "png_pixel_bytes",
    "public_url",
    "sniff_type",
]

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
PILLOW_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding
_INFLATE_STEP = 64 * 1024  # largest piece of inflated output held at once
_INFLATE_SLACK = 4096  # tolerated inflated bytes beyond what the dimensions need
_MAX_TEXT_INFLATED = 1024 * 1024  # per compressed text/ICC chunk, as Pillow's MAX_TEXT_CHUNK
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


class NotAnImage(ValueError):
    """Not a JPEG, PNG or WebP that decodes: ``415``."""

    status_code = 415
    code = "unsupported_image"


class ImageTooLarge(NotAnImage):
    """More pixels than ``MAX_PIXELS``, or pixel data that inflates far beyond what the image's
    dimensions need (a decompression bomb): ``413``."""

    status_code = 413
    code = "image_too_large"


@dataclass(frozen=True, slots=True)
class ImageInfo:
    content_type: str
    extension: str
    width: int
    height: int


def sniff_type(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "image/png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(
            f"image is {width}x{height} ({width * height} pixels); at most {MAX_PIXELS} "
            "pixels are accepted: scale it down and upload it again"
        )


def png_pixel_bytes(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines (one filter byte per row) a PNG's IDAT inflates to."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if cols and rows:
            total += rows * (1 + (cols * bits_per_pixel + 7) // 8)
    return total


def _inflate_bounded(pieces: list[memoryview], limit: int) -> tuple[int, bool]:
    """Inflate a zlib stream split over ``pieces``, holding at most ``_INFLATE_STEP`` bytes of
    output at a time. Returns (inflated size, stream complete), stopping once past ``limit``."""
    inflater = zlib.decompressobj()
    total = 0
    for piece in pieces:
        pending: bytes | memoryview = piece
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, _INFLATE_STEP))
            if total > limit:
                return total, inflater.eof
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    return total, inflater.eof


def _check_png(data: bytes) -> None:
    """Walk the chunks (CRCs checked) and inflate the compressed ones within bounds."""
    view = memoryview(data)
    pos = len(_PNG_SIGNATURE)
    header: tuple[int, int, int, int, int, int, int] | None = None
    idat: list[memoryview] = []
    ended = False
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > len(data) - pos - 12:
            raise NotAnImage("PNG is truncated: a chunk runs past the end of the file")
        body = view[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + body) != crc:
            raise NotAnImage(
                f"PNG is corrupt: bad checksum on its {kind.decode('latin-1')!r} chunk"
            )
        pos += 12 + length
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise NotAnImage("PNG is corrupt: it does not start with an IHDR chunk")
            header = struct.unpack(">IIBBBBB", body)
            width, height, depth, colour, method, filtering, interlace = header
            if (
                not (0 < width < 2**31 and 0 < height < 2**31)
                or depth not in _PNG_DEPTHS.get(colour, ())
                or (method, filtering) != (0, 0)
                or interlace not in (0, 1)
            ):
                raise NotAnImage("PNG is corrupt: its IHDR header is invalid")
            _check_pixels(width, height)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"acTL":
            raise NotAnImage("animated PNGs are not accepted: upload a still image")
        elif kind in (b"zTXt", b"iCCP", b"iTXt"):
            _check_text_chunk(kind, data, pos - 4 - length, pos - 4)
        elif kind == b"IEND":
            ended = True
            break
    if header is None or not idat:
        raise NotAnImage("PNG is truncated: it has no pixel data")
    if not ended:
        raise NotAnImage("PNG is truncated: it has no IEND chunk")
    width, height, depth, colour, _, _, interlace = header
    needed = png_pixel_bytes(width, height, depth * _PNG_CHANNELS[colour], interlace == 1)
    try:
        inflated, complete = _inflate_bounded(idat, needed + needed // 64 + _INFLATE_SLACK)
    except zlib.error:
        raise NotAnImage("PNG is corrupt: its pixel data does not inflate") from None
    if inflated > needed + needed // 64 + _INFLATE_SLACK:
        raise ImageTooLarge(
            f"PNG pixel data inflates to more than the {needed} bytes its {width}x{height} "
            "pixels need (a decompression bomb); re-encode the image and upload it again"
        )
    if inflated < needed or not complete:
        raise NotAnImage("PNG is truncated: its pixel data ends early")


def _check_text_chunk(kind: bytes, data: bytes, start: int, end: int) -> None:
    """zTXt and iCCP: keyword, NUL, method byte, zlib stream. iTXt: keyword, NUL, compressed
    flag, method byte, language tag, NUL, translated keyword, NUL, then text (zlib if flagged)."""
    name = kind.decode()
    keyword_end = data.find(b"\0", start, min(end, start + 80))  # keywords are <= 79 bytes
    if keyword_end < 0:
        raise NotAnImage(f"PNG is corrupt: bad {name} chunk")
    stream_start = keyword_end + 2
    if kind == b"iTXt":
        if data[keyword_end + 1 : keyword_end + 2] != b"\x01":
            return  # stored uncompressed
        stream_start = keyword_end + 3
        for _ in range(2):  # language tag, translated keyword
            nul = data.find(b"\0", stream_start, end)
            if nul < 0:
                raise NotAnImage("PNG is corrupt: bad iTXt chunk")
            stream_start = nul + 1
    try:
        inflated, _ = _inflate_bounded([memoryview(data)[stream_start:end]], _MAX_TEXT_INFLATED)
    except zlib.error:
        raise NotAnImage(f"PNG is corrupt: its {name} chunk does not inflate") from None
    if inflated > _MAX_TEXT_INFLATED:
        raise ImageTooLarge(
            f"PNG {name} chunk inflates to more than {_MAX_TEXT_INFLATED} bytes "
            "(a decompression bomb); strip its metadata and upload it again"
        )


def inspect_image(data: bytes) -> ImageInfo:
    """Check an upload's type by content, bound its decoded size, and decode it once.
    Blocking and CPU-bound: run it in a worker thread."""
    content_type = sniff_type(data[:16])
    if content_type is None:
        raise NotAnImage("file is not a JPEG, PNG or WebP image (checked by content)")
    if content_type == "image/png":
        _check_png(data)
    try:
        with PILImage.open(BytesIO(data), formats=[PILLOW_FORMATS[content_type]]) as image:
            width, height = image.size
            _check_pixels(width, height)
            if content_type == "image/jpeg":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except NotAnImage:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image has too many pixels: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise NotAnImage(
            f"image cannot be decoded ({type(exc).__name__}): it may be truncated or corrupt"
        ) from None
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
    subject: str = "",
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
        subject=subject,
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


async def get_owned(session: AsyncSession, image_id: uuid.UUID, *, caller: Caller) -> Image | None:
    """The caller's image: its key's, and its subject's when the caller is a client token
    (the key itself may use any of its subjects' images)."""
    image = await session.get(Image, image_id)
    if image is None or image.owner != caller.owner or image.deleted_at is not None:
        return None
    if caller.subject is not None and image.subject != caller.subject:
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
        .where(or_(Video.status.notin_(TERMINAL), Video.updated_at > cutoff))
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
