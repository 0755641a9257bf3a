"""S3 storage against a real S3 API: moto's server mode (``ThreadedMotoServer``) on 127.0.0.1.

moto runs in a child process of its own (its own environment, a scratch working folder), so
that its memory (it joins a multipart upload's parts in memory when the upload completes) is
not counted in the flat-memory measurement of the service, which runs in this process. Each
test gets a fresh bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import math
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from app.config import Settings
from app.db import create_engine, create_sessionmaker
from app.models import Video
from app.security import webhook_token
from app.storage import LocalStorage, Storage, parse_storage_url
from app.storage.s3 import PART_SIZE, S3Storage
from tests import clips
from tests.conftest import WEBHOOK_SECRET, Service, ServiceFactory, Sim, child_env

# Under pytest-xdist one worker runs the whole file, so its shared servers start once.
pytestmark = pytest.mark.xdist_group("storage_s3")

MiB = 1024 * 1024
PREFIX = "clips/v1"

_MOTO_CHILD = """
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the test session closes our stdin (or dies)
server.stop()
"""


# --- the S3 server and a bucket per test -----------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    scratch = tmp_path_factory.mktemp("moto")
    log = scratch / "moto.log"
    with log.open("wb") as err:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=child_env(scratch, PYTHONWARNINGS="ignore"),
            cwd=scratch,
        )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = proc.stdout.readline().decode().strip()
        if not line.isdigit():
            pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
        yield f"http://127.0.0.1:{line}"
    finally:
        proc.stdin.close()  # the child exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials the way production passes them (the standard env vars), nothing else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class Bucket:
    """A bucket of its own, and a plain boto3 client to look into it (in a thread)."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing-access-key",
            aws_secret_access_key="testing-secret-key",
        )

    def object_name(self, video_id: str) -> str:
        return f"{PREFIX}/{LocalStorage.key_for(uuid.UUID(video_id))}"

    async def uploads(self) -> list[dict[str, Any]]:
        page = await asyncio.to_thread(self.client.list_multipart_uploads, Bucket=self.name)
        return list(page.get("Uploads", []))

    async def keys(self) -> list[str]:
        page = await asyncio.to_thread(self.client.list_objects_v2, Bucket=self.name)
        return [item["Key"] for item in page.get("Contents", [])]

    async def head(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                await asyncio.to_thread(self.client.head_object, Bucket=self.name, Key=name)
            )
        except self.client.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey"):
                return None
            raise

    async def sha256(self, name: str) -> tuple[str, int]:
        def digest() -> tuple[str, int]:
            body = self.client.get_object(Bucket=self.name, Key=name)["Body"]
            hasher, size = hashlib.sha256(), 0
            for chunk in body.iter_chunks(MiB):
                hasher.update(chunk)
                size += len(chunk)
            return hasher.hexdigest(), size

        return await asyncio.to_thread(digest)


@pytest.fixture
async def bucket(moto_endpoint: str, aws_env: None) -> Bucket:
    created = Bucket(moto_endpoint, f"videorelay-{uuid.uuid4().hex[:12]}")
    await asyncio.to_thread(created.client.create_bucket, Bucket=created.name)
    return created


def s3_settings(bucket: Bucket, endpoint: str | None = None, **more: Any) -> dict[str, Any]:
    return {
        "STORAGE_URL": f"s3://{bucket.name}/{PREFIX}/",
        "S3_ENDPOINT_URL": endpoint or bucket.endpoint,
        **more,
    }


# --- helpers -----------------------------------------------------------------------------


def callback_path(video_id: str) -> str:
    token = webhook_token(WEBHOOK_SECRET.encode(), uuid.UUID(video_id))
    return f"/webhooks/hiapi/{video_id}/{token}"


async def db_video(service: Service, video_id: str) -> Video:
    async with service.ctx.sessionmaker() as session:
        return (
            await session.execute(select(Video).where(Video.id == uuid.UUID(video_id)))
        ).scalar_one()


async def finished_task(service: Service, sim: Sim) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit with the callback held back, finish the task; the caller delivers the callback."""
    sim.set(callback_drop_rate=1.0)
    video = await service.submit()
    await sim.client.post(f"/_sim/tasks/{video['task_id']}/complete")
    task = (
        await sim.client.get(
            f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
        )
    ).json()["data"]
    return video, task


async def sim_sha256(sim: Sim, url: str) -> tuple[str, int]:
    hasher, size = hashlib.sha256(), 0
    async with sim.client.stream("GET", url) as response:
        async for chunk in response.aiter_bytes():
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def mp4_like(size: int) -> bytes:
    """An ``ftyp`` box then random bytes: what the storage writer is given in a test of its
    own (the downloader would refuse it: it is no playable clip)."""
    head = struct.pack(">I4s4sI", 16, b"ftyp", b"isom", 0)
    return head + os.urandom(size - len(head))


class FlakyOrigin:
    """A file host whose first response is cut off mid-body; later ones wait for ``release``."""

    def __init__(self, body: bytes, cut_at: int) -> None:
        self.body, self.cut_at = body, cut_at
        self.requests = 0
        self.cut = asyncio.Event()
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            first = self.requests == 1
            if not first:
                self.waiting.set()
                await self.release.wait()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n" % len(self.body)
            )
            end = self.cut_at if first else len(self.body)
            view = memoryview(self.body)
            for start in range(0, end, 256 * 1024):
                writer.write(view[start : min(start + 256 * 1024, end)])
                await writer.drain()
            if first:
                writer.transport.abort()  # the connection drops in the middle of the body
                self.cut.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class CuttableProxy:
    """A TCP proxy to the S3 server that can go down (drop every connection, refuse new ones)
    once ``cut_after`` request bytes have passed: the store failing in the middle of an upload."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut_after: int | None = cut_after
        self.sent = 0
        self.down = False
        self.went_down = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self._drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def restore(self) -> None:
        self.down = False
        self.cut_after = None

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(64 * 1024):
                    if count:
                        self.sent += len(data)
                        if self.cut_after is not None and self.sent > self.cut_after:
                            self.down = True
                            self.went_down.set()
                            self._drop_all()
                            return
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        self._writers.discard(writer)
        self._writers.discard(up_writer)


class PeakMemory:
    """tracemalloc's peak (and the peak RSS growth of this process) over a block of code.

    tracemalloc's peak counts Python allocations only (every buffer of the clip is a bytes
    object), whatever else the machine runs: the test asserts on it. The RSS figure counts
    everything in the process (the service, the simulator serving the file, the HTTP clients,
    the allocator's arenas): it is reported, not asserted.

    ``VmHWM`` is reset through ``/proc/self/clear_refs`` where allowed; a thread also samples
    ``VmRSS`` every 5 ms, so the figure holds where the reset is not permitted.
    """

    def __init__(self) -> None:
        self.baseline_kib = 0
        self.peak_kib = 0
        self.traced_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._hwm_reset = False

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_kib = max(self.peak_kib, self._status("VmRSS"))

    def __enter__(self) -> PeakMemory:
        gc.collect()
        # Hand memory that earlier tests freed back to the system; otherwise new allocations
        # reuse it and the peak hides in the baseline (glibc only; elsewhere a no-op).
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current
            self._hwm_reset = True
        except OSError:
            pass
        self.baseline_kib = self._status("VmRSS")
        self.peak_kib = self.baseline_kib
        tracemalloc.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        _, self.traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if self._hwm_reset:
            self.peak_kib = max(self.peak_kib, self._status("VmHWM"))

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.baseline_kib) / 1024

    @property
    def traced_mib(self) -> float:
        return self.traced_peak / MiB


# --- settings and the interface -------------------------------------------------------------


class TestConfiguration:
    def test_default_is_the_storage_dir_as_today(self, tmp_path: Path):
        settings = Settings(_env_file=None, STORAGE_DIR=tmp_path / "v")
        assert settings.STORAGE_URL is None
        assert settings.storage_location.scheme == "file"
        assert settings.storage_location.path == tmp_path / "v"
        assert Settings(_env_file=None, STORAGE_URL="").STORAGE_URL is None

    def test_urls_parse(self):
        assert parse_storage_url("file:///data/videos").path == Path("/data/videos")
        s3 = parse_storage_url("s3://my-bucket/some/prefix/")
        assert (s3.scheme, s3.bucket, s3.prefix) == ("s3", "my-bucket", "some/prefix")
        assert parse_storage_url("s3://my-bucket").prefix == ""

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("STORAGE_URL", "gs://bucket"),
            ("STORAGE_URL", "s3://"),
            ("STORAGE_URL", "s3://key:secret@bucket/x"),
            ("STORAGE_URL", "file://"),
            ("S3_ENDPOINT_URL", "127.0.0.1:9000"),
            ("S3_PRESIGN_SECONDS", 0),
        ],
    )
    def test_bad_settings_are_refused(self, variable: str, value: Any):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **{variable: value})

    def test_both_backends_implement_the_interface(self, tmp_path: Path):
        assert isinstance(LocalStorage(tmp_path), Storage)
        assert isinstance(S3Storage(bucket="b"), Storage)


# --- the backend on its own -----------------------------------------------------------------


class TestS3Writer:
    async def test_spooled_clip_is_invisible_until_commit(self, bucket: Bucket, tmp_path: Path):
        storage = S3Storage(
            bucket=bucket.name, prefix=PREFIX, endpoint_url=bucket.endpoint, spool_dir=tmp_path
        )
        video_id = uuid.uuid4()
        name = bucket.object_name(str(video_id))
        data = mp4_like(2 * PART_SIZE + 12345)
        try:
            writer = await storage.open_writer(video_id, "owner-a")
            for start in range(0, len(data), MiB):
                await writer.write(data[start : start + MiB])
            # Spooled locally (to be checked whole): nothing in the bucket yet.
            spool = await writer.spool()
            assert spool.read_bytes() == data
            assert await bucket.uploads() == []
            assert await bucket.head(name) is None
            await writer.commit()
            assert not spool.exists()
            assert await bucket.uploads() == []
            head = await bucket.head(name)
            assert head is not None and head["ContentType"] == "video/mp4"
            assert head["ETag"].endswith('-3"')  # three parts
            assert await bucket.sha256(name) == (hashlib.sha256(data).hexdigest(), len(data))
            url = await storage.presigned_url(writer.key)
            assert url is not None and url.startswith(f"{bucket.endpoint}/{bucket.name}/{name}?")
        finally:
            await storage.aclose()

    async def test_abort_leaves_nothing_and_leftovers_are_discarded(
        self, bucket: Bucket, tmp_path: Path
    ):
        storage = S3Storage(
            bucket=bucket.name, prefix=PREFIX, endpoint_url=bucket.endpoint, spool_dir=tmp_path
        )
        video_id = uuid.uuid4()
        name = bucket.object_name(str(video_id))
        try:
            writer = await storage.open_writer(video_id, "owner-a")
            await writer.write(mp4_like(PART_SIZE + 10))
            spool = await writer.spool()
            assert spool.stat().st_size == PART_SIZE + 10
            await writer.abort()
            await writer.abort()  # idempotent
            assert not spool.exists()
            assert await bucket.uploads() == []
            assert await bucket.keys() == []

            # A crashed attempt's upload (and one on another video) are left over...
            other = bucket.object_name(str(uuid.uuid4()))
            for key in (name, name, other):
                await asyncio.to_thread(
                    bucket.client.create_multipart_upload, Bucket=bucket.name, Key=key
                )
            # ...and the next attempt at this video removes exactly its own.
            assert await storage.discard_leftovers(video_id, "owner-b") == 2
            assert [u["Key"] for u in await bucket.uploads()] == [other]

            small = await storage.open_writer(video_id, "owner-b")
            await small.write(mp4_like(1000))
            await small.commit()  # smaller than a part: one PutObject, no multipart upload
            assert await bucket.keys() == [name]
            await storage.delete(small.key)
            assert await bucket.keys() == []
        finally:
            await storage.aclose()


# --- the service on S3 ----------------------------------------------------------------------


class TestFlowOnS3:
    async def test_submit_to_object_with_matching_sha256_and_presigned_redirect(
        self, services: ServiceFactory, sim: Sim, bucket: Bucket
    ):
        key = "s3-flow-key-0123456789"
        service = await services.start(
            **s3_settings(bucket, S3_PRESIGN_SECONDS=120), API_KEYS=f"app:{key}"
        )
        service.client.headers["Authorization"] = f"Bearer {key}"
        video = await service.submit(duration=4)
        done = await service.wait_for(video["id"], "ready")

        task = (
            await sim.client.get(
                f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
            )
        ).json()["data"]
        original = (await sim.client.get(task["output"][0]["url"])).content
        assert hashlib.sha256(original).hexdigest() == done["sha256"]

        # The object and its poster are in the bucket under the prefix, and nothing is on the
        # local disk.
        name = bucket.object_name(video["id"])
        assert await bucket.keys() == [name.removesuffix(".mp4") + ".jpg", name]
        assert await bucket.sha256(name) == (done["sha256"], len(original))
        assert await bucket.uploads() == []
        assert not list(Path(service.settings.STORAGE_DIR).rglob("*.mp4"))
        row = await db_video(service, video["id"])
        assert row.storage_key == LocalStorage.key_for(uuid.UUID(video["id"]))

        content = await service.client.get(f"/v1/videos/{video['id']}/content")
        assert content.status_code == 307
        assert content.headers["cache-control"] == "no-store"
        location = content.headers["location"]
        assert location.startswith(f"{bucket.endpoint}/{bucket.name}/{name}?")
        assert "X-Amz-Expires=120" in location and "X-Amz-Signature=" in location
        assert "testing-secret-key" not in location

        async with httpx.AsyncClient() as anyone:  # the link needs no API key
            fetched = await anyone.get(location)
            assert fetched.status_code == 200
            assert fetched.content == original
            assert fetched.headers["content-type"] == "video/mp4"
            part = await anyone.get(location, headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.content == original[100:200]

        # A client that follows redirects gets the clip; its API key is not sent to S3.
        followed = await service.client.get(
            f"/v1/videos/{video['id']}/content", follow_redirects=True
        )
        assert followed.status_code == 200 and followed.content == original
        assert "authorization" not in followed.request.headers

        other = await service.client.get(f"/v1/videos/{uuid.uuid4()}/content")
        assert other.status_code == 404

        # The signed content_url (no Authorization, as a <video> sends it) answers the same
        # redirect; altered, it answers nothing.
        signed = done["content_url"][len(service.settings.public_base) :]
        assert "&sig=" in signed
        async with httpx.AsyncClient(base_url=service.server.url) as browser:
            redirect = await browser.get(signed)
            assert redirect.status_code == 307
            assert redirect.headers["location"].startswith(f"{bucket.endpoint}/{bucket.name}/")
            played = await browser.get(signed, follow_redirects=True)
            assert played.status_code == 200 and played.content == original
            part = await browser.get(
                signed, headers={"Range": "bytes=10-19"}, follow_redirects=True
            )
            assert part.status_code == 206 and part.content == original[10:20]
            forged = await browser.get(signed.replace("exp=", "exp=1"))
            assert forged.status_code == 403 and "location" not in forged.headers
            # HEAD answers the same redirect (a link checker's probe), with no body.
            head = await browser.head(signed)
            assert head.status_code == 307 and head.content == b""
            assert head.headers["location"].startswith(f"{bucket.endpoint}/{bucket.name}/")

    async def test_source_dropping_mid_upload_aborts_it_then_retries_to_success(
        self, services: ServiceFactory, sim: Sim, bucket: Bucket
    ):
        body = clips.padded(3 * PART_SIZE + 4321)
        origin = FlakyOrigin(body, cut_at=2 * PART_SIZE + MiB)  # cut short, mid-body
        await origin.start()
        try:
            service = await services.start(
                **s3_settings(bucket), DOWNLOAD_ALLOWED_HOSTS=f"{sim.url},{origin.url}"
            )
            video, task = await finished_task(service, sim)
            task["output"][0]["url"] = f"{origin.url}/clip.mp4"
            response = await service.client.post(callback_path(video["id"]), json=task)
            assert response.status_code == 200

            # The first attempt lost its source mid-body; the retry is being held.
            await asyncio.wait_for(origin.waiting.wait(), 30)
            assert origin.cut.is_set()
            row = await db_video(service, video["id"])
            assert row.status == "downloading" and row.download_attempts >= 1
            assert "ClientPayloadError" in (row.last_error or "")  # body cut short
            assert await bucket.uploads() == []  # aborted, not left dangling
            assert await bucket.keys() == []  # and nothing was published

            origin.release.set()
            done = await service.wait_for(video["id"], "ready", timeout=60)
            assert done["sha256"] == hashlib.sha256(body).hexdigest()
            name = bucket.object_name(video["id"])
            assert await bucket.sha256(name) == (done["sha256"], len(body))
            assert await bucket.uploads() == []
        finally:
            await origin.stop()

    async def test_store_failing_mid_upload_leaves_nothing_after_the_retry(
        self, services: ServiceFactory, sim: Sim, bucket: Bucket
    ):
        sim.set(pad_bytes=3 * PART_SIZE)
        proxy = CuttableProxy(bucket.endpoint, cut_after=PART_SIZE + 4 * MiB)
        await proxy.start()
        try:
            service = await services.start(**s3_settings(bucket, endpoint=proxy.url))
            video = await service.submit()
            name = bucket.object_name(video["id"])

            # The store goes away in the middle of the second part.
            await asyncio.wait_for(proxy.went_down.wait(), 30)

            async def failed_once() -> bool:
                row = await db_video(service, video["id"])
                return row.download_attempts >= 1 and "StorageError" in (row.last_error or "")

            await wait_until(failed_once, 30, "the upload to fail")
            assert (await service.get(video["id"]))["status"] == "downloading"
            # Its abort could not reach the store either: the upload dangles, unpublished.
            assert [u["Key"] for u in await bucket.uploads()] == [name]
            assert await bucket.keys() == []

            proxy.restore()
            done = await service.wait_for(video["id"], "ready", timeout=60)
            task = (
                await sim.client.get(
                    f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
                )
            ).json()["data"]
            expected = await sim_sha256(sim, task["output"][0]["url"])
            assert (done["sha256"], done["size_bytes"]) == expected
            assert await bucket.sha256(name) == expected
            # The retry removed the dangling upload before starting its own.
            assert await bucket.uploads() == []
        finally:
            await proxy.stop()

    async def test_shutdown_mid_download_removes_its_spool_and_the_next_start_finishes(
        self, services: ServiceFactory, sim: Sim, bucket: Bucket
    ):
        sim.set(pad_bytes=3 * PART_SIZE, download_bytes_per_second=8 * MiB)
        service = await services.start(**s3_settings(bucket))
        video = await service.submit()
        spools = Path(service.settings.STORAGE_DIR) / ".partial"

        async def spooling() -> bool:
            return any(p.stat().st_size > MiB for p in spools.glob(f"{video['id']}.*.part"))

        await wait_until(spooling, 30, "the download to be spooling")
        await services.stop(service)  # SIGTERM's path: lifespan shutdown
        assert not list(spools.glob("*.part"))
        assert await bucket.uploads() == []
        assert await bucket.keys() == []
        engine = create_engine(services.database_url)
        try:
            async with create_sessionmaker(engine)() as session:
                row = (
                    await session.execute(select(Video).where(Video.id == uuid.UUID(video["id"])))
                ).scalar_one()
        finally:
            await engine.dispose()
        assert row.status == "downloading" and row.lease_owner is None  # given back

        sim.set(download_bytes_per_second=None)
        again = await services.start(**s3_settings(bucket))
        done = await again.wait_for(video["id"], "ready", timeout=60)
        assert await bucket.sha256(bucket.object_name(video["id"])) == (
            done["sha256"],
            done["size_bytes"],
        )
        assert await bucket.uploads() == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
class TestLargeFile:
    async def test_200_mb_clip_streams_to_s3_with_flat_memory(
        self,
        services: ServiceFactory,
        sim: Sim,
        bucket: Bucket,
        record_property: Any,
    ):
        service = await services.start(**s3_settings(bucket), DOWNLOAD_LEASE_SECONDS=30.0)
        # Warm up with a small clip: the S3 client's one-time cost (botocore loads the S3 API
        # model, aiohttp opens its pool) is not what this test measures.
        warm = await service.submit()
        await service.wait_for(warm["id"], "ready")

        pad = 200_000_000
        sim.set(pad_bytes=pad)
        video, task = await finished_task(service, sim)
        # The clip is rendered; only the download and upload happen from here.
        started = time.monotonic()
        with PeakMemory() as memory:
            response = await service.client.post(callback_path(video["id"]), json=task)
            assert response.status_code == 200
            done = await service.wait_for(video["id"], "ready", timeout=240)
        took = time.monotonic() - started

        size = done["size_bytes"]
        assert size > pad
        sys.stdout.write(
            f"\n200 MB to S3: {size} bytes in {took:.1f}s; peak RSS growth "
            f"{memory.growth_mib:.1f} MiB (baseline {memory.baseline_kib / 1024:.0f} MiB); "
            f"tracemalloc peak {memory.traced_mib:.1f} MiB\n"
        )
        record_property("rss_growth_mib", round(memory.growth_mib, 1))
        record_property("tracemalloc_peak_mib", round(memory.traced_mib, 1))
        record_property("seconds", round(took, 1))
        # The streaming property, measured on what this code allocates (every bytes object it
        # holds is traced): the clip never sits in memory whole, nor any large part of it. The
        # whole-process RSS growth is reported above but not asserted: it also counts the
        # allocator's and the kernel's view of a loaded machine; the bench's download scenario
        # holds the RSS figure (TARGET_RSS_GROWTH_MIB).
        assert memory.traced_mib < 64, f"tracemalloc peak {memory.traced_mib:.1f} MiB"

        name = bucket.object_name(video["id"])
        head = await bucket.head(name)
        assert head is not None and head["ContentLength"] == size
        assert head["ETag"].endswith(f'-{math.ceil(size / PART_SIZE)}"')
        assert await bucket.sha256(name) == (done["sha256"], size)
        assert await sim_sha256(sim, task["output"][0]["url"]) == (done["sha256"], size)
        assert await bucket.uploads() == []
        assert len(await bucket.keys()) == 4  # two clips, two posters
