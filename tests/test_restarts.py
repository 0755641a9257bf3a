"""Crash and shutdown: a real ``videorelay serve`` process killed mid-download resumes later."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db import create_engine, create_sessionmaker
from app.models import Video
from tests.conftest import HIAPI_KEY, WEBHOOK_SECRET, ChildServer, Sim, child_env, videorelay


@pytest.fixture
async def slow_env(database_url: str, tmp_path: Path, sim: Sim) -> dict[str, Any]:
    # ~8 MB served at 2 MB/s: the download takes seconds, long enough to interrupt it.
    sim.set(pad_bytes=8_000_000, download_bytes_per_second=2_000_000)
    work = tmp_path / "work"  # the child's working folder: no .env of the developer's
    work.mkdir()

    def env(port: int) -> dict[str, str]:
        return child_env(
            work,
            DATABASE_URL=database_url,
            STORAGE_DIR=str(tmp_path / "videos"),
            HIAPI_KEY=HIAPI_KEY,
            HIAPI_BASE_URL=sim.url,
            WEBHOOK_SECRET=WEBHOOK_SECRET,
            PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
            DOWNLOAD_ALLOWED_HOSTS=sim.url,
            DOWNLOAD_LEASE_SECONDS="2",
            RECONCILE_INTERVAL_SECONDS="0.2",
            RETRY_BASE_SECONDS="0.1",
            SHUTDOWN_GRACE_SECONDS="2",
        )

    return {"env": env, "cwd": work, "storage": tmp_path / "videos", "log": tmp_path / "serve.log"}


async def serve(slow_env: dict[str, Any]) -> ChildServer:
    """A real `videorelay serve`, on a port of its own (a restart gets a new one)."""
    child = ChildServer(
        videorelay("serve", "--port", "{port}"),
        slow_env["env"],
        cwd=slow_env["cwd"],
        log=slow_env["log"],
    )
    await asyncio.to_thread(child.start)
    return child


async def read_row(database_url: str, video_id: str) -> Video:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            return (
                await session.execute(select(Video).where(Video.id == uuid.UUID(video_id)))
            ).scalar_one()
    finally:
        await engine.dispose()


async def submit_and_wait_for_partial(proc: ChildServer, storage: Path) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=proc.url) as client:
        video = (
            await client.post("/v1/videos", json={"image_url": "https://example.invalid/a.jpg"})
        ).json()
        # A deadline, not a count of polls: on a busy machine the simulator's render and the
        # child's first download can take longer than 400 short sleeps.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = list((storage / ".partial").glob("*.part"))
            if parts and parts[0].stat().st_size > 1_000_000:
                return dict(video)
            await asyncio.sleep(0.025)
    raise AssertionError("download never started")


async def wait_ready(url: str, video_id: str, timeout: float = 30) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            video = (await client.get(f"/v1/videos/{video_id}")).json()
            if video["status"] in ("ready", "failed"):
                return dict(video)
            await asyncio.sleep(0.1)
    raise AssertionError("video did not finish")


async def expected_sha256(sim: Sim, task_id: str) -> str:
    task = (
        await sim.client.get(f"/v1/tasks/{task_id}", headers={"Authorization": "Bearer sk-x"})
    ).json()
    digest = hashlib.sha256()
    async with sim.client.stream("GET", task["data"]["output"][0]["url"]) as response:
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
    return digest.hexdigest()


class TestCrashDuringDownload:
    async def test_sigkill_mid_download_resumes_after_restart(
        self, slow_env: dict[str, Any], sim: Sim, database_url: str
    ):
        storage: Path = slow_env["storage"]
        first = await serve(slow_env)
        try:
            video = await submit_and_wait_for_partial(first, storage)
            first.signal(signal.SIGKILL)
            await first.wait_exit(30)
        finally:
            first.kill()
        row = await read_row(database_url, video["id"])
        assert row.status == "downloading" and row.lease_owner is not None  # the lease is orphaned
        assert list((storage / ".partial").glob("*.part"))  # the crash left a partial file

        sim.set(download_bytes_per_second=None)
        second = await serve(slow_env)
        try:
            done = await wait_ready(second.url, video["id"])
        finally:
            second.kill()
        assert done["status"] == "ready", done
        assert done["sha256"] == await expected_sha256(sim, video["task_id"])
        assert not list((storage / ".partial").glob("*")), "partial files left behind"
        assert len(list(storage.glob("*/*.mp4"))) == 1
        assert (await sim.stats())["file_requests"] == 3  # killed try, resumed try, our check


class TestGracefulShutdown:
    async def test_sigterm_releases_the_download_and_the_next_start_finishes_it(
        self, slow_env: dict[str, Any], sim: Sim, database_url: str
    ):
        storage: Path = slow_env["storage"]
        first = await serve(slow_env)
        try:
            video = await submit_and_wait_for_partial(first, storage)
            first.signal(signal.SIGTERM)
            # How long the shutdown takes is the bench's business; here: it ends by itself,
            # before the download (4 s of transfer) could have finished, and gives it back.
            await first.wait_exit(60)
        finally:
            first.kill()
        assert "download.stopped reason=shutdown" in first.output()
        row = await read_row(database_url, video["id"])
        assert row.status == "downloading"
        assert row.lease_owner is None  # given back, not left to expire
        assert not list((storage / ".partial").glob("*.part"))

        sim.set(download_bytes_per_second=None)
        second = await serve(slow_env)
        try:
            done = await wait_ready(second.url, video["id"])
        finally:
            second.kill()
        assert done["status"] == "ready"
        assert done["sha256"] == await expected_sha256(sim, video["task_id"])
