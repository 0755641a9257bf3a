"""Clips in an S3-compatible bucket (AWS S3, MinIO, R2), through aioboto3.

A download is spooled to a local file first (``<spool_dir>/<video_id>.<owner>.part``, the same
partial file local storage writes; ``spool_dir`` is ``STORAGE_DIR/.partial``), because the clip
must be checked whole (and maybe remuxed) before it is published, and a multipart upload
streamed while downloading would have to be published or thrown away before that. At ``commit``
the spool is uploaded to the clip's final object name (the poster is put just before the upload
completes) with a multipart upload, in parts of ``PART_SIZE`` bytes read from the file one at a
time: at most one part is held in memory, whatever the clip's size. The object exists for
readers only once ``CompleteMultipartUpload`` succeeds (a clip smaller than one part is sent
with a single ``PutObject``, just as atomic); the spool is removed then. A failed or stopped
attempt removes its spool, deletes a poster it put, and calls ``AbortMultipartUpload``; if even
that cannot reach the store (it is down, or the process died), the unfinished upload stays until
the next attempt's ``discard_leftovers`` lists the uploads on that object name and aborts them
(and removes this machine's leftover spools of the video). A bucket lifecycle rule
(``AbortIncompleteMultipartUpload``) is the backstop for a video that is never retried.

Credentials come from botocore's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and the shared files, web identity, ECS/EC2 roles); they are never logged.
Reads are served by the store itself: ``presigned_url`` signs a short-lived GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import POSTER_CONTENT_TYPE, StorageError, poster_key
from app.storage.local import LocalStorage, SpooledWriter, discard_partials_in
from app.threads import run_bulk

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = ["PART_SIZE", "S3Storage", "S3Writer"]

log = logging.getLogger(__name__)

# S3 parts are 5 MiB .. 5 GiB (except the last) and at most 10,000 per upload: 8 MiB parts
# allow clips of up to ~78 GiB, far above MAX_VIDEO_BYTES.
PART_SIZE = 8 * 1024 * 1024
MAX_PARTS = 10_000
# An abort runs on the way out of a failed or stopped attempt, possibly during shutdown.
ABORT_TIMEOUT_SECONDS = 10.0
CONTENT_TYPE = "video/mp4"

_ERRORS = (BotoCoreError, ClientError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class S3Storage:
    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        presign_seconds: int = 300,
        part_size: int = PART_SIZE,
        spool_dir: Path | None = None,
    ) -> None:
        self.bucket = bucket
        self.spool_dir = (spool_dir or Path(tempfile.gettempdir()) / "videorelay-spool").resolve()
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.presign_seconds = presign_seconds
        self.part_size = part_size
        self._session = aioboto3.Session()
        self._client: S3Client | None = None
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @staticmethod
    def key_for(video_id: uuid.UUID) -> str:
        return LocalStorage.key_for(video_id)

    def object_name(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError("storage key escapes the storage prefix")
        return f"{self.prefix}/{key}" if self.prefix else key

    def ensure_dirs(self) -> None:
        # A bucket has no directories (it must exist already); the local spool does.
        self.spool_dir.mkdir(parents=True, exist_ok=True)

    def spool_path(self, video_id: uuid.UUID, owner: str) -> Path:
        return self.spool_dir / f"{video_id}.{owner}.part"

    async def client(self) -> S3Client:
        """The one S3 client of this process, created on first use (in the running loop)."""
        client = self._client
        if client is None:
            async with self._lock:
                client = self._client
                if client is None:
                    created: S3Client = await self._stack.enter_async_context(
                        self._session.client(
                            "s3",
                            region_name=self.region,
                            endpoint_url=self.endpoint_url,
                            config=self._config(),
                        )
                    )
                    self._client = client = created
        return client

    def _config(self) -> AioConfig:
        return AioConfig(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            signature_version="s3v4",  # presigned URLs too (botocore may pick SigV2 for them)
            # Third-party stores (older MinIO, R2, ...) reject the CRC32 checksums botocore
            # adds by default; the clip's sha256 is checked by the downloader anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Custom endpoints (MinIO, moto, an IP address) want path-style URLs.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )

    async def open_writer(self, video_id: uuid.UUID, owner: str) -> S3Writer:
        return S3Writer(self, self.key_for(video_id), self.spool_path(video_id, owner))

    async def discard_leftovers(self, video_id: uuid.UUID, owner: str) -> int:
        """Abort every unfinished multipart upload to this video's object name, delete a
        poster a dead attempt put, and remove this machine's other spools of the video."""
        key = self.key_for(video_id)
        name = self.object_name(key)
        removed = await asyncio.to_thread(
            discard_partials_in,
            self.spool_dir,
            video_id,
            keep=self.spool_path(video_id, owner),
        )
        try:
            s3 = await self.client()
            await s3.delete_object(Bucket=self.bucket, Key=self.object_name(poster_key(key)))
            key_marker: str | None = None
            upload_marker = ""
            while True:
                if key_marker is None:
                    page = await s3.list_multipart_uploads(Bucket=self.bucket, Prefix=name)
                else:
                    page = await s3.list_multipart_uploads(
                        Bucket=self.bucket,
                        Prefix=name,
                        KeyMarker=key_marker,
                        UploadIdMarker=upload_marker,
                    )
                for upload in page.get("Uploads", []):
                    if upload.get("Key") != name or "UploadId" not in upload:
                        continue
                    with contextlib.suppress(ClientError):  # NoSuchUpload: gone meanwhile
                        await s3.abort_multipart_upload(
                            Bucket=self.bucket, Key=name, UploadId=upload["UploadId"]
                        )
                        removed += 1
                if not page.get("IsTruncated"):
                    break
                key_marker = page.get("NextKeyMarker", "")
                upload_marker = page.get("NextUploadIdMarker", "")
        except _ERRORS as exc:
            raise StorageError(f"listing unfinished uploads failed: {_describe(exc)}") from exc
        if removed:
            log.info("storage.leftovers_aborted count=%d", removed)
        return removed

    async def presigned_url(self, key: str) -> str | None:
        """Signed locally (no request to the store); fails only without usable credentials."""
        try:
            s3 = await self.client()
            return await s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self.object_name(key)},
                ExpiresIn=self.presign_seconds,
            )
        except _ERRORS as exc:
            raise StorageError(f"presigning failed: {_describe(exc)}") from exc

    def local_path(self, key: str) -> Path | None:
        return None

    async def put_small(self, key: str, data: bytes, content_type: str) -> None:
        try:
            s3 = await self.client()
            await s3.put_object(
                Bucket=self.bucket,
                Key=self.object_name(key),
                Body=data,
                ContentType=content_type,
            )
        except _ERRORS as exc:
            raise StorageError(
                f"storing {posixpath.basename(key)} failed: {_describe(exc)}"
            ) from exc

    async def delete(self, key: str) -> None:
        try:
            s3 = await self.client()
            await s3.delete_object(Bucket=self.bucket, Key=self.object_name(key))
        except _ERRORS as exc:
            raise StorageError(f"delete failed: {_describe(exc)}") from exc

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None


class S3Writer(SpooledWriter):
    """Spools to a local file; ``commit`` uploads the spool (and puts the poster)."""

    def __init__(self, storage: S3Storage, key: str, spool: Path) -> None:
        super().__init__(key, spool)
        self._storage = storage
        self._name = storage.object_name(key)
        self._upload_id: str | None = None
        self._finished = False

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def _object_args(self) -> dict[str, Any]:
        filename = posixpath.basename(self._key)
        return {
            "ContentType": CONTENT_TYPE,
            "ContentDisposition": f'inline; filename="{filename}"',
        }

    async def commit(self, poster: bytes | None = None) -> None:
        if self._finished:
            raise StorageError("commit after commit or abort")
        storage = self._storage
        path = await asyncio.to_thread(self._file.close)
        size = (await asyncio.to_thread(path.stat)).st_size
        try:
            s3 = await storage.client()
            if size <= storage.part_size:
                body = await run_bulk(path.read_bytes)
                await self._put_poster(poster)
                await s3.put_object(
                    Bucket=storage.bucket, Key=self._name, Body=body, **self._object_args()
                )
            else:
                await self._upload_parts(s3, path, size, poster)
        except _ERRORS as exc:
            raise StorageError(f"uploading the clip failed: {_describe(exc)}") from exc
        self._finished = True
        self._upload_id = None
        await asyncio.to_thread(self._file.discard)  # uploaded: the spool has done its job

    async def _put_poster(self, poster: bytes | None) -> None:
        """Just before the clip is published, so a failed upload seldom leaves one behind."""
        if poster is not None:
            await self._storage.put_small(self._poster_key, poster, POSTER_CONTENT_TYPE)
            self._poster_stored = True

    async def _upload_parts(
        self, s3: S3Client, path: Path, size: int, poster: bytes | None
    ) -> None:
        storage = self._storage
        count = -(-size // storage.part_size)
        if count > MAX_PARTS:
            raise StorageError(f"more than {MAX_PARTS} parts")
        created = await s3.create_multipart_upload(
            Bucket=storage.bucket, Key=self._name, **self._object_args()
        )
        self._upload_id = upload_id = created["UploadId"]
        parts: list[CompletedPartTypeDef] = []
        with path.open("rb") as fh:  # reads go to a worker thread; opening does not block
            for number in range(1, count + 1):
                # One part in memory at a time, whatever the clip's size.
                body = await run_bulk(fh.read, storage.part_size)
                sent = await s3.upload_part(
                    Bucket=storage.bucket,
                    Key=self._name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                parts.append({"ETag": sent["ETag"], "PartNumber": number})
        await self._put_poster(poster)
        await s3.complete_multipart_upload(
            Bucket=storage.bucket,
            Key=self._name,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def abort(self) -> None:
        self._finished = True
        await asyncio.to_thread(self._file.discard)
        upload_id, self._upload_id = self._upload_id, None
        stored, self._poster_stored = self._poster_stored, False
        if upload_id is None and not stored:
            return
        storage = self._storage
        try:
            async with asyncio.timeout(ABORT_TIMEOUT_SECONDS):
                s3 = await storage.client()
                if upload_id is not None:
                    await s3.abort_multipart_upload(
                        Bucket=storage.bucket, Key=self._name, UploadId=upload_id
                    )
                if stored:
                    await s3.delete_object(
                        Bucket=storage.bucket, Key=storage.object_name(self._poster_key)
                    )
        except Exception as exc:  # never raise from an abort: the caller is already failing
            log.warning(
                "storage.abort_failed key=%s error=%s (the next attempt removes the upload)",
                self._name,
                _describe(exc),
            )
