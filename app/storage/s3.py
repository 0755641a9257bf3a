"""Clips in an S3-compatible bucket (AWS S3, MinIO, R2), through aioboto3.

A clip is uploaded straight to its final object name with a multipart upload, in parts of
``PART_SIZE`` bytes: at most one part is held in memory, whatever the clip's size. The object
exists for readers only once ``CompleteMultipartUpload`` succeeds (a clip smaller than one part
is sent with a single ``PutObject``, just as atomic). A failed or stopped attempt calls
``AbortMultipartUpload``; if even that cannot reach the store (it is down, or the process
died), the unfinished upload stays until the next attempt's ``discard_leftovers`` lists the
uploads on that object name and aborts them. A bucket lifecycle rule
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
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import StorageError
from app.storage.local import LocalStorage

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
    ) -> None:
        self.bucket = bucket
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
        return None  # a bucket has no directories; it must exist already

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
        return S3Writer(self, self.key_for(video_id))

    async def discard_leftovers(self, video_id: uuid.UUID, owner: str) -> int:
        """Abort every unfinished multipart upload to this video's object name."""
        name = self.object_name(self.key_for(video_id))
        removed = 0
        try:
            s3 = await self.client()
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

    async def delete(self, key: str) -> None:
        try:
            s3 = await self.client()
            await s3.delete_object(Bucket=self.bucket, Key=self.object_name(key))
        except _ERRORS as exc:
            raise StorageError(f"delete failed: {_describe(exc)}") from exc

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None


class S3Writer:
    """Buffers one part at a time; starts the multipart upload when the first part is full."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._name = storage.object_name(key)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._finished = False

    @property
    def key(self) -> str:
        return self._key

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def _object_args(self) -> dict[str, Any]:
        filename = posixpath.basename(self._key)
        return {
            "ContentType": CONTENT_TYPE,
            "ContentDisposition": f'inline; filename="{filename}"',
        }

    async def write(self, data: bytes) -> None:
        if self._finished:
            raise StorageError("write after commit or abort")
        self._buffer += data
        if len(self._buffer) >= self._storage.part_size:
            await self._send_part()

    async def _send_part(self) -> None:
        storage = self._storage
        # Hand the buffer over, so at most one part (plus the chunk being added) is in memory.
        body = bytes(self._buffer)
        self._buffer = bytearray()
        try:
            s3 = await storage.client()
            if self._upload_id is None:
                created = await s3.create_multipart_upload(
                    Bucket=storage.bucket, Key=self._name, **self._object_args()
                )
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            if number > MAX_PARTS:
                raise StorageError(f"more than {MAX_PARTS} parts")
            sent = await s3.upload_part(
                Bucket=storage.bucket,
                Key=self._name,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
        except _ERRORS as exc:
            raise StorageError(f"uploading a part failed: {_describe(exc)}") from exc
        self._parts.append({"ETag": sent["ETag"], "PartNumber": number})

    async def commit(self) -> None:
        if self._finished:
            raise StorageError("commit after commit or abort")
        storage = self._storage
        try:
            s3 = await storage.client()
            if self._upload_id is None:
                body = bytes(self._buffer)
                self._buffer = bytearray()
                await s3.put_object(
                    Bucket=storage.bucket, Key=self._name, Body=body, **self._object_args()
                )
            else:
                if self._buffer:
                    await self._send_part()  # the last part may be smaller than 5 MiB
                await s3.complete_multipart_upload(
                    Bucket=storage.bucket,
                    Key=self._name,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        except _ERRORS as exc:
            raise StorageError(f"completing the upload failed: {_describe(exc)}") from exc
        self._finished = True
        self._upload_id = None

    async def abort(self) -> None:
        self._finished = True
        self._buffer = bytearray()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        storage = self._storage
        try:
            async with asyncio.timeout(ABORT_TIMEOUT_SECONDS):
                s3 = await storage.client()
                await s3.abort_multipart_upload(
                    Bucket=storage.bucket, Key=self._name, UploadId=upload_id
                )
        except Exception as exc:  # never raise from an abort: the caller is already failing
            log.warning(
                "storage.abort_failed key=%s error=%s (the next attempt removes the upload)",
                self._name,
                _describe(exc),
            )
