"""The storage interface (:class:`Storage`, :class:`ClipWriter`, :class:`StorageError`) and
``STORAGE_URL`` parsing.

It imports nothing else of ours, so the settings and every backend can depend on it without
depending on one another.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

__all__ = [
    "POSTER_CONTENT_TYPE",
    "ClipWriter",
    "Storage",
    "StorageError",
    "StorageLocation",
    "parse_storage_url",
    "poster_key",
]

POSTER_CONTENT_TYPE = "image/jpeg"


def poster_key(clip_key: str) -> str:
    """Where a clip's poster is kept: beside it, ``<2 hex>/<id>.jpg`` for ``<2 hex>/<id>.mp4``."""
    stem, dot, _ = clip_key.rpartition(".")
    return f"{stem}.jpg" if dot else f"{clip_key}.jpg"


class StorageError(Exception):
    """The store failed (unreachable, refused, timed out). Retried like a network error."""


@runtime_checkable
class ClipWriter(Protocol):
    """One download attempt's bytes on their way into storage."""

    @property
    def key(self) -> str:
        """The final key the clip is published under by ``commit``."""
        ...

    @property
    def poster_key(self) -> str:
        """The key ``commit`` publishes the poster under, if it is given one."""
        ...

    async def write(self, data: bytes) -> None:
        """Append ``data``. Never blocks the event loop."""
        ...

    async def spool(self) -> Path:
        """Stop writing: the whole clip as one complete local file, to check before ``commit``.

        Until ``commit`` the caller may read that file, and replace it with a rewritten clip
        (``os.replace`` of a file in the same directory onto the path); ``commit`` publishes
        whatever the path then holds. Local storage hands back its partial file itself (no
        copy); S3 hands back the local spool it uploads from at ``commit``.
        """
        ...

    async def commit(self, poster: bytes | None = None) -> None:
        """Make the clip durable and visible under ``key``, all at once; ``poster`` (a JPEG)
        is published under ``poster_key`` first, so a ready clip always has it."""
        ...

    async def abort(self) -> None:
        """Throw the bytes away (and a poster already published), leaving nothing behind.
        Idempotent; never raises."""
        ...


@runtime_checkable
class Storage(Protocol):
    @property
    def url(self) -> str:
        """Where clips go, for logs (``file:///…`` or ``s3://bucket/prefix``; no secrets)."""
        ...

    def key_for(self, video_id: uuid.UUID) -> str: ...

    def ensure_dirs(self) -> None:
        """Prepare the store at start. Blocking (run it in a thread)."""
        ...

    async def open_writer(self, video_id: uuid.UUID, owner: str) -> ClipWriter:
        """A writer for the attempt that ``owner`` (the lease holder) makes."""
        ...

    async def discard_leftovers(self, video_id: uuid.UUID, owner: str) -> int:
        """Remove what other, dead attempts at this video left behind; how many were removed.

        The caller holds the lease, so every other attempt has lost it.
        """
        ...

    async def presigned_url(self, key: str) -> str | None:
        """A short-lived URL a client may GET the clip from, or None (serve it ourselves)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file that holds ``key``, or None when it is not on a local filesystem.

        Blocking (it resolves the path).
        """
        ...

    async def put_small(self, key: str, data: bytes, content_type: str) -> None:
        """Store a small object (a poster) under ``key`` at once, replacing any other."""
        ...

    async def delete(self, key: str) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StorageLocation:
    scheme: str  # "file" or "s3"
    path: Path | None = None  # file://
    bucket: str = ""  # s3://
    prefix: str = ""  # s3://, without leading or trailing slashes


def parse_storage_url(url: str) -> StorageLocation:
    """``file://<path>`` or ``s3://bucket[/prefix]``; ``ValueError`` for anything else."""
    if url.startswith("file://"):
        path = unquote(url.removeprefix("file://"))
        if not path:
            raise ValueError("STORAGE_URL file:// needs a path, e.g. file:///data/videos")
        return StorageLocation(scheme="file", path=Path(path))
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError("STORAGE_URL must look like s3://bucket or s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise ValueError("STORAGE_URL s3:// takes no query string or fragment")
        prefix = unquote(parts.path).strip("/")
        return StorageLocation(scheme="s3", bucket=parts.netloc, prefix=prefix)
    raise ValueError("STORAGE_URL must start with file:// or s3://")
