"""Faults: the database going away, hiapi down for a while, storage that cannot be written,
migrations run by two replicas at once, hostile download targets."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url

from app import repository
from app.jobs.hosts import resolves_to_public
from app.models import Video
from app.net import is_public_address
from app.security import webhook_token
from tests.conftest import (
    PG_ADMIN_DSN,
    PG_HOST,
    WEBHOOK_SECRET,
    Service,
    ServiceFactory,
    Sim,
    child_env,
    free_socket,
)


class TcpProxy:
    """Forwards a port of its own on 127.0.0.1 to Postgres; ``cut()`` drops every connection
    and refuses new ones (accepted and closed at once) until ``restore()``, which is what a
    database restart looks like to the service. The listening socket stays bound throughout,
    so no other process can take the port in between."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.server: asyncio.Server | None = None
        self.up = False
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, sock=self.sock)
        self.up = True

    async def restore(self) -> None:
        self.up = True

    async def cut(self) -> None:
        self.up = False
        for writer in list(self.writers):
            writer.close()
        self.writers.clear()

    async def close(self) -> None:
        await self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def database_outage(database_url: str) -> AsyncIterator[tuple[str, object]]:
    """Yields (url the service should use, controller with async cut()/restore())."""
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1]

        class SqliteLock:
            conn: sqlite3.Connection | None = None

            # The service under test shares this event loop: taking the lock must wait in a
            # thread, or a write transaction the service has open could never finish and the
            # lock would time out instead.
            async def cut(self) -> None:
                self.conn = sqlite3.connect(
                    path, isolation_level=None, timeout=30, check_same_thread=False
                )
                await asyncio.to_thread(self.conn.execute, "BEGIN EXCLUSIVE")

            async def restore(self) -> None:
                assert self.conn is not None
                await asyncio.to_thread(self.conn.execute, "ROLLBACK")
                self.conn.close()

        yield database_url, SqliteLock()
        return
    # The Postgres the session's database lives on (TEST_PG_HOST), wherever its port is.
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(False), proxy
    finally:
        await proxy.close()


class TestDatabaseOutage:
    async def test_requests_get_503_webhook_never_acks_and_service_recovers(
        self, database_url: str, tmp_path: Path, sim: Sim
    ):
        async with database_outage(database_url) as (url, outage):
            factory = ServiceFactory(url, tmp_path / "videos", sim)
            service = await factory.start(DATABASE_TIMEOUT_SECONDS=1.0, RECONCILE_AFTER_SECONDS=1.0)
            try:
                sim.set(callback_drop_rate=1.0)
                video = await service.submit()
                await outage.cut()  # type: ignore[attr-defined]

                post = await service.client.post(
                    "/v1/videos", json={"image_url": "https://example.invalid/b.jpg"}
                )
                assert post.status_code == 503
                assert post.json()["error"]["code"] == "database_unavailable"
                assert post.headers["retry-after"]
                creates_before = (await sim.stats())["create_requests"]

                await sim.client.post(f"/_sim/tasks/{video['task_id']}/complete")
                task = (
                    await sim.client.get(
                        f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
                    )
                ).json()["data"]
                token = webhook_token(WEBHOOK_SECRET.encode(), uuid.UUID(video["id"]))
                hook = await service.client.post(
                    f"/webhooks/hiapi/{video['id']}/{token}", json=task
                )
                assert hook.status_code == 503  # hiapi must retry: the callback was not recorded
                if not database_url.startswith("sqlite"):  # SQLite readers still work in WAL mode
                    assert (await service.client.get("/readyz")).status_code == 503

                await outage.restore()  # type: ignore[attr-defined]
                assert (await sim.stats())["create_requests"] == creates_before == 1
                # No restart: the same process serves again, and the lost callback is recovered.
                done = await service.wait_for(video["id"], "ready", timeout=30)
                assert done["sha256"]
                assert (await service.client.get("/readyz")).status_code == 200
                again = await service.client.post(
                    "/v1/videos", json={"image_url": "https://example.invalid/c.jpg"}
                )
                assert again.status_code == 202
            finally:
                for running in list(factory.running):
                    await factory.stop(running)


class TestHiapiOutage:
    async def test_submits_wait_out_an_outage_without_a_retry_storm(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(error_5xx_rate=1.0)
        service = await services.start(RETRY_BASE_SECONDS=0.2, RETRY_MAX_SECONDS=1.0)
        videos = [await service.submit() for _ in range(10)]
        assert all(v["status"] == "queued" for v in videos)
        start = (await sim.stats())["create_requests"]
        outage = 3.0
        await asyncio.sleep(outage)
        during = (await sim.stats())["create_requests"] - start
        # Backoff 0.2 s doubling to a 1 s cap: each video retries at most ~1/0.5 s = 2/s at
        # worst; without backoff the reconciler (0.1 s ticks) would send 10 x 30 = 300.
        assert during <= 10 * outage / 0.5, f"{during} create calls in {outage}s for 10 videos"
        sim.set(error_5xx_rate=0.0)
        for video in videos:
            await service.wait_for(video["id"], "ready", timeout=20)
        assert (await sim.stats())["tasks_created"] == 10


class TestStorageFailure:
    async def test_unwritable_storage_is_retried_and_never_marked_ready(
        self, services: ServiceFactory, sim: Sim
    ):
        service = await services.start(RETRY_BASE_SECONDS=0.1, RETRY_MAX_SECONDS=0.2)
        partial_dir = service.ctx.storage.partial_dir
        partial_dir.rmdir()
        partial_dir.write_text("not a directory")  # every partial file open now fails
        try:
            video = await service.submit()
            # Wait until writes were really tried and failed (not merely until a second has
            # passed): two failed attempts on record, the video still waiting for a good one.
            row = await wait_for_row(
                service,
                video["id"],
                lambda row: row.download_attempts >= 2 and row.last_error is not None,
            )
            assert row.status == "downloading" and "Not a directory" in (row.last_error or "")
            current = await service.get(video["id"])
            assert current["status"] == "downloading"
            assert current["sha256"] is None and current["content_url"] is None
            assert not list(service.ctx.storage.root.glob("*/*.mp4"))
        finally:
            partial_dir.unlink()
            partial_dir.mkdir()
        done = await service.wait_for(video["id"], "ready")
        assert done["size_bytes"] > 0


async def wait_for_row(
    service: Service, video_id: str, condition: Callable[[Video], bool], timeout: float = 20.0
) -> Video:
    """Poll the video's row until ``condition`` holds (or fail at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        async with service.ctx.sessionmaker() as session:
            row = await repository.get(session, uuid.UUID(video_id))
        assert row is not None
        if condition(row):
            return row
        assert time.monotonic() < deadline, (
            f"not reached in {timeout}s: status={row.status} "
            f"download_attempts={row.download_attempts} last_error={row.last_error}"
        )
        await asyncio.sleep(0.05)


class TestConcurrentMigrations:
    async def test_two_replicas_migrating_at_once_on_postgres(self, tmp_path: Path):
        try:
            admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
        except OSError:
            pytest.skip("Postgres not reachable")
        name = f"videorelay_mig_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            env = child_env(tmp_path, DATABASE_URL=f"postgresql+asyncpg://{PG_HOST}/{name}")
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "app.cli",
                    "migrate",
                    env=env,
                    cwd=tmp_path,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                for _ in range(3)
            ]
            outputs = [await p.communicate() for p in procs]
            assert [p.returncode for p in procs] == [0, 0, 0], outputs
            check = await asyncpg.connect(PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}")
            versions = await check.fetch("SELECT version_num FROM alembic_version")
            await check.close()
            from app.migrate import head_revision

            assert [r["version_num"] for r in versions] == [
                await in_thread_async(head_revision, env["DATABASE_URL"])
            ]
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


async def in_thread_async(fn, *args):
    return await asyncio.to_thread(fn, *args)


class TestPrivateAddresses:
    @pytest.mark.parametrize(
        ("address", "public"),
        [
            ("127.0.0.1", False),
            ("10.1.2.3", False),
            ("192.168.0.1", False),
            ("169.254.169.254", False),
            ("::1", False),
            ("fc00::1", False),
            ("0.0.0.0", False),
            ("100.64.0.1", False),
            ("8.8.8.8", True),
            ("2606:4700:4700::1111", True),
        ],
    )
    def test_is_public_address(self, address: str, public: bool):
        assert is_public_address(address) is public

    async def test_localhost_name_is_not_public(self):
        assert await resolves_to_public("localhost", 443) is False

    async def test_allowlisted_name_resolving_to_loopback_is_refused_before_connecting(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(DOWNLOAD_ALLOWED_HOSTS="localhost")
        video = await service.submit()
        task = {
            "taskId": video["task_id"],
            "status": "success",
            "output": [
                {"type": "video", "url": "https://localhost/clip.mp4", "expireAt": 4102444800}
            ],
        }
        token = webhook_token(WEBHOOK_SECRET.encode(), uuid.UUID(video["id"]))
        ack = await service.client.post(f"/webhooks/hiapi/{video['id']}/{token}", json=task)
        assert ack.status_code == 200
        done = await service.wait_for(video["id"], "failed")
        assert done["error"]["code"] == "host_not_allowed"
        assert "private or local" in done["error"]["message"]
