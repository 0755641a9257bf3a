"""Crash and shutdown: a real ``videorelay serve`` process killed mid-download resumes later."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db import create_engine, create_sessionmaker
from app.models import Video
from tests.conftest import HIAPI_KEY, WEBHOOK_SECRET, Sim, free_socket


class ServeProcess:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited
                [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                try:
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"serve did not start: {self.log.read_text()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> float:
        assert self.proc is not None
        start = time.monotonic()
        while self.proc.poll() is None:
            if time.monotonic() - start > timeout:
                raise AssertionError("process did not exit in time")
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def slow_env(database_url: str, tmp_path: Path, sim: Sim) -> dict[str, Any]:
    # ~8 MB served at 2 MB/s: the download takes seconds, long enough to interrupt it.
    sim.set(pad_bytes=8_000_000, download_bytes_per_second=2_000_000)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "STORAGE_DIR": str(tmp_path / "videos"),
        "HIAPI_KEY": HIAPI_KEY,
        "HIAPI_BASE_URL": sim.url,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "DOWNLOAD_ALLOWED_HOSTS": sim.url,
        "DOWNLOAD_LEASE_SECONDS": "2",
        "RECONCILE_INTERVAL_SECONDS": "0.2",
        "RETRY_BASE_SECONDS": "0.1",
        "SHUTDOWN_GRACE_SECONDS": "2",
    }
    return {"env": env, "port": port, "storage": tmp_path / "videos", "log": tmp_path / "serve.log"}


async def read_row(database_url: str, video_id: str) -> Video:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            return (
                await session.execute(select(Video).where(Video.id == uuid.UUID(video_id)))
            ).scalar_one()
    finally:
        await engine.dispose()


async def submit_and_wait_for_partial(proc: ServeProcess, storage: Path) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=proc.url) as client:
        video = (
            await client.post("/v1/videos", json={"image_url": "https://example.invalid/a.jpg"})
        ).json()
        for _ in range(400):
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
        first = ServeProcess(slow_env["env"], slow_env["port"], slow_env["log"])
        await first.start()
        try:
            video = await submit_and_wait_for_partial(first, storage)
            first.signal(signal.SIGKILL)
            await first.wait_exit(5)
        finally:
            first.stop()
        row = await read_row(database_url, video["id"])
        assert row.status == "downloading" and row.lease_owner is not None  # the lease is orphaned
        assert list((storage / ".partial").glob("*.part"))  # the crash left a partial file

        sim.set(download_bytes_per_second=None)
        second = ServeProcess(slow_env["env"], slow_env["port"], slow_env["log"])
        await second.start()
        try:
            done = await wait_ready(second.url, video["id"])
        finally:
            second.stop()
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
        first = ServeProcess(slow_env["env"], slow_env["port"], slow_env["log"])
        await first.start()
        try:
            video = await submit_and_wait_for_partial(first, storage)
            first.signal(signal.SIGTERM)
            took = await first.wait_exit(10)
        finally:
            first.stop()
        assert took < 7, f"shutdown took {took:.1f}s"
        row = await read_row(database_url, video["id"])
        assert row.status == "downloading"
        assert row.lease_owner is None  # given back, not left to expire
        assert not list((storage / ".partial").glob("*.part"))

        sim.set(download_bytes_per_second=None)
        second = ServeProcess(slow_env["env"], slow_env["port"], slow_env["log"])
        await second.start()
        try:
            done = await wait_ready(second.url, video["id"])
        finally:
            second.stop()
        assert done["status"] == "ready"
        assert done["sha256"] == await expected_sha256(sim, video["task_id"])
