"""Where finished clips live: a local (or mounted) directory, or an S3-compatible bucket.

``STORAGE_URL`` picks the backend: ``file://<path>`` (the default, ``STORAGE_DIR``) or
``s3://bucket/prefix``. Both implement :class:`Storage`, and the downloader only talks to that
interface. The contract every backend keeps:

- A clip is written through a :class:`ClipWriter` and is invisible to readers until
  ``commit()``, which publishes it under its final key atomically (a rename; a
  CompleteMultipartUpload). ``abort()`` leaves nothing behind, and never raises.
- A crashed attempt may leave leftovers (a partial file; an unfinished multipart upload).
  The next attempt, holding the lease, removes them with ``discard_leftovers``.
- Before ``commit`` the writer's ``spool()`` gives the whole clip as a local file, so the
  downloader can verify it (and remux it to fast-start) before anything is published: local
  storage's own partial file (no copy), or S3's local spool that ``commit`` uploads.
- A clip's poster (a JPEG) is published by the same ``commit`` under ``poster_key(key)``
  (``<2 hex>/<id>.jpg``), before the clip; ``abort`` removes it too.
- Keys are relative (``<2 hex>/<id>.mp4``) and stored in ``videos.storage_key``; a backend
  maps them to a path or an object name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.storage.base import (
    POSTER_CONTENT_TYPE,
    ClipWriter,
    Storage,
    StorageError,
    StorageLocation,
    parse_storage_url,
    poster_key,
)
from app.storage.local import LocalStorage, LocalWriter

if TYPE_CHECKING:
    from app.config import Settings

__all__ = [
    "POSTER_CONTENT_TYPE",
    "ClipWriter",
    "LocalStorage",
    "LocalWriter",
    "Storage",
    "StorageError",
    "StorageLocation",
    "open_storage",
    "parse_storage_url",
    "poster_key",
]


def open_storage(settings: Settings) -> Storage:
    """The backend ``STORAGE_URL`` names (``STORAGE_DIR`` when unset). Connects to nothing."""
    location = settings.storage_location
    if location.path is not None:
        return LocalStorage(location.path)
    from app.storage.s3 import S3Storage  # needs the `s3` extra (aioboto3)

    return S3Storage(
        bucket=location.bucket,
        prefix=location.prefix,
        endpoint_url=settings.S3_ENDPOINT_URL,
        region=settings.S3_REGION,
        presign_seconds=settings.S3_PRESIGN_SECONDS,
        spool_dir=settings.STORAGE_DIR / ".partial",
    )
