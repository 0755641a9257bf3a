"""Starting up: settings that would silently lose work are refused, as real processes see them.

Every test runs ``videorelay`` as a subprocess in a temporary folder, the way an operator does:
``LOG_FORMAT=json`` through ``serve --simulate``; a ``PUBLIC_BASE_URL`` hiapi cannot reach;
``serve`` and ``admin`` on a missing or unmigrated database; and the simulator, which fetches
no image from another host unless ``--fetch-images`` says so. Nothing here leaves 127.0.0.1:
the real hiapi's address appears only in settings that are refused before any connection.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from PIL import Image

from app.config import ConfigError, Settings
from tests.conftest import PG_ADMIN_DSN, PG_HOST, free_socket, in_thread

SECRETS = {"HIAPI_KEY": "sk-startup-test-key-0123", "WEBHOOK_SECRET": "startup-test-secret-0123456"}
LOCAL_UPSTREAM = "http://127.0.0.1:9"  # a local simulator address: nothing listens there
MIGRATE_HINT = "videorelay migrate"


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any videorelay setting, plus ``extra``."""
    ours = ("HIAPI_", "WEBHOOK_", "DATABASE_", "PUBLIC_BASE_URL", "LOG_", "API_KEYS", "PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return {**env, **extra}


def run_cli(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    sock = free_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@dataclass
class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that accepts, counts and closes every connection."""

    sock: socket.socket = field(default_factory=free_socket)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def counter() -> Iterator[ConnectionCounter]:
    listener = ConnectionCounter()
    yield listener
    listener.close()


@asynccontextmanager
async def running(
    argv: list[str], *, cwd: Path, env: dict[str, str], url: str, path: str = "/healthz"
) -> AsyncIterator[tuple[subprocess.Popen[str], httpx.AsyncClient]]:
    """Start ``videorelay <argv>``; yield once ``url + path`` answers; stop it on exit."""
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "app.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(300):
                assert proc.poll() is None, proc.communicate()
                try:
                    await client.get(path)
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            yield proc, client
    finally:
        if proc.poll() is None:
            proc.terminate()


async def wait_final(client: httpx.AsyncClient, video_id: str) -> dict[str, Any]:
    for _ in range(400):
        video: dict[str, Any] = (await client.get(f"/v1/videos/{video_id}")).json()
        if video["status"] in ("ready", "failed"):
            return video
        await asyncio.sleep(0.05)
    raise AssertionError(f"video {video_id} never finished: {video}")


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- LOG_FORMAT=json, and the simulator's image fetching, through `serve --simulate` -------


async def test_serve_simulate_logs_json_and_fetches_only_its_own_images(
    tmp_path: Path, counter: ConnectionCounter
) -> None:
    """One `serve --simulate` process with LOG_FORMAT=json: every stderr line is a JSON object,
    the lines about a video carry its `video_id`; an image URL on another host (here a counting
    listener, standing in for https://example.com) is never contacted, while an image uploaded
    to the service itself is read back by the simulator."""
    port = free_port()
    env = clean_env(LOG_FORMAT="json")
    base = f"http://127.0.0.1:{port}"
    async with running(
        ["serve", "--simulate", "--port", str(port)], cwd=tmp_path, env=env, url=base
    ) as (proc, client):
        remote = f"https://127.0.0.1:{counter.port}/still.jpg"
        first = await client.post("/v1/videos", json={"image_url": remote, "duration": 3})
        assert first.status_code == 202, first.text
        upload = await client.post(
            "/v1/images", files={"file": ("still.png", png_bytes(), "image/png")}
        )
        assert upload.status_code == 201, upload.text
        image = upload.json()
        second = await client.post("/v1/videos", json={"image_id": image["id"], "duration": 3})
        assert second.status_code == 202, second.text
        videos = [first.json()["id"], second.json()["id"]]
        for video_id in videos:
            assert (await wait_final(client, video_id))["status"] == "ready"
        proc.terminate()
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)

    assert counter.accepted == 0, "the simulator fetched an image from another host"
    entries = []
    for line in stderr.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a stderr line is not JSON: {line!r}")
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    for video_id in videos:
        about = [e for e in entries if e.get("video_id") == video_id]
        assert about, f"no log line carries video_id={video_id}"
    # The simulator read the uploaded image back from the service (the access log says so).
    image_path = image["url"].removeprefix(base)
    assert any(f"GET {image_path} " in e["message"] for e in entries), image_path


async def test_serve_simulate_with_fetch_images_fetches_remote_images(
    tmp_path: Path, counter: ConnectionCounter
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = ["serve", "--simulate", "--fetch-images", "--port", str(port)]
    async with running(argv, cwd=tmp_path, env=clean_env(), url=base) as (proc, client):
        remote = f"https://127.0.0.1:{counter.port}/still.jpg"
        created = await client.post("/v1/videos", json={"image_url": remote, "duration": 3})
        assert created.status_code == 202, created.text
        for _ in range(200):  # the simulator starts rendering (and fetching) at once
            if counter.accepted:
                break
            await asyncio.sleep(0.02)
        proc.terminate()
        await asyncio.to_thread(proc.communicate, timeout=30)
    assert counter.accepted >= 1


async def test_standalone_simulator_fetches_no_image_unless_asked(
    tmp_path: Path, counter: ConnectionCounter
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = ["simulator", "--port", str(port), "--latency", "0"]
    async with running(argv, cwd=tmp_path, env=clean_env(), url=base, path="/_sim/stats") as (
        proc,
        client,
    ):
        body = {
            "model": "happyhorse-1.1/image-to-video",
            "input": {
                "image_urls": [f"https://127.0.0.1:{counter.port}/still.jpg"],
                "duration": 3,
            },
        }
        headers = {"Authorization": "Bearer sk-anything"}
        created = (await client.post("/v1/tasks", json=body, headers=headers)).json()
        task_id = (created.get("data") or created)["taskId"]
        for _ in range(200):
            task = (await client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
            task = task.get("data") or task
            if task["status"] in ("success", "fail"):
                break
            await asyncio.sleep(0.02)
        assert task["status"] == "success", task
        proc.terminate()
        await asyncio.to_thread(proc.communicate, timeout=30)
    assert counter.accepted == 0


# --- PUBLIC_BASE_URL that hiapi cannot reach -----------------------------------------------


def test_serve_refuses_a_public_base_url_hiapi_cannot_reach(tmp_path: Path) -> None:
    """HIAPI_BASE_URL is the default (the real hiapi): decided from the URLs alone, before
    any connection or file. The default PUBLIC_BASE_URL, and an http one."""
    for public_base_url, reason in (
        (None, "its host 127.0.0.1 is a loopback address"),
        ("http://relay.example.com", "it is not https"),
    ):
        env = clean_env(**SECRETS)
        if public_base_url is not None:
            env["PUBLIC_BASE_URL"] = public_base_url
        started = time.monotonic()
        result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, env=env, timeout=20)
        elapsed = time.monotonic() - started
        assert_one_line_refusal(result, "PUBLIC_BASE_URL", reason, "https://", "--simulate")
        assert SECRETS["HIAPI_KEY"] not in result.stderr
        assert elapsed < 10, f"the refusal took {elapsed:.1f} s"
    assert list(tmp_path.iterdir()) == [], "a refused start created files"


@pytest.mark.parametrize(
    ("hiapi", "public", "refused"),
    [
        ("https://api.hiapi.ai", "https://relay.example.com", None),
        ("https://api.hiapi.ai", "https://relay.example.com.", None),
        ("https://api.hiapi.ai", "https://8.8.8.8", None),
        ("https://api.hiapi.ai", "http://127.0.0.1:8000", "not https"),
        ("https://api.hiapi.ai", "https://localhost:8443", "loopback"),
        ("https://api.hiapi.ai", "https://app.localhost", "loopback"),
        ("https://api.hiapi.ai", "https://10.1.2.3", "private"),
        ("https://api.hiapi.ai", "https://[fd00::1]", "private"),
        ("https://api.hiapi.ai", "https://[::ffff:192.168.0.10]:8443", "private"),
        ("https://api.hiapi.ai", "https://[64:ff9b::7f00:1]", "loopback"),
        ("https://api.hiapi.ai", "https://0177.0.0.1", "loopback"),
        ("https://api.hiapi.ai", "https://2130706433", "loopback"),
        ("https://api.hiapi.ai", "https://100.64.0.1", "not a public address"),
        ("https://api.hiapi.ai", "https://relay", "local network"),
        ("https://api.hiapi.ai", "https://relay.internal", "local network"),
        ("https://8.8.8.8", "http://127.0.0.1:8000", "not https"),
        ("https://hiapi-proxy", "http://127.0.0.1:8000", "not https"),  # a name: maybe public
        ("http://127.0.0.1:9100", "http://127.0.0.1:8000", None),
        ("http://localhost:9100", "http://10.0.0.7:8000", None),
        ("http://10.0.0.2:9100", "http://relay:8000", None),
        ("http://[::1]:9100", "http://127.0.0.1:8000", None),
    ],
)
def test_callback_reachability_is_decided_from_the_urls(
    hiapi: str, public: str, refused: str | None
) -> None:
    settings = Settings(HIAPI_BASE_URL=hiapi, PUBLIC_BASE_URL=public)
    if refused is None:
        settings.require_reachable_callbacks()
        return
    with pytest.raises(ConfigError, match="PUBLIC_BASE_URL") as caught:
        settings.require_reachable_callbacks()
    assert refused in str(caught.value)


def test_serve_accepts_https_public_base_url_and_a_local_upstream(tmp_path: Path) -> None:
    """Each passes the callback check, then stops at the missing database (before any
    connection: the real hiapi is never contacted)."""
    for extra in (
        {"PUBLIC_BASE_URL": "https://relay.example.com"},
        {"HIAPI_BASE_URL": LOCAL_UPSTREAM},  # with the default http://127.0.0.1:8000
    ):
        env = clean_env(**SECRETS, **extra)
        result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, env=env, timeout=20)
        assert_one_line_refusal(result, MIGRATE_HINT)
        assert "PUBLIC_BASE_URL" not in result.stderr, extra


async def test_serve_starts_with_a_local_upstream(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(**SECRETS, HIAPI_BASE_URL=LOCAL_UPSTREAM)
    argv = ["serve", "--migrate", "--port", str(port)]
    async with running(argv, cwd=tmp_path, env=env, url=f"http://127.0.0.1:{port}") as (
        proc,
        client,
    ):
        assert (await client.get("/readyz")).status_code == 200
        proc.terminate()
        await asyncio.to_thread(proc.communicate, timeout=30)


# --- missing or unmigrated database ----------------------------------------------------------


@pytest.fixture(params=["sqlite-missing", "sqlite-empty", "postgres-empty"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL whose database is missing (SQLite) or has no tables."""
    if request.param == "sqlite-missing":
        yield f"sqlite+aiosqlite:///{tmp_path}/nowhere/videorelay.db"
        return
    if request.param == "sqlite-empty":
        (tmp_path / "empty.db").touch()
        yield f"sqlite+aiosqlite:///{tmp_path}/empty.db"
        return
    request.getfixturevalue("postgres_database")  # skips (or fails under CI) without Postgres
    name = f"videorelay_empty_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    in_thread(lambda: asyncio.run(admin(f'CREATE DATABASE "{name}"')))
    try:
        yield f"postgresql+asyncpg://{PG_HOST}/{name}"
    finally:
        in_thread(lambda: asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))


def test_serve_and_admin_refuse_an_unmigrated_database(tmp_path: Path, unmigrated_url: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    serve_env = clean_env(**SECRETS, HIAPI_BASE_URL=LOCAL_UPSTREAM, DATABASE_URL=unmigrated_url)
    with ThreadPoolExecutor(2) as pool:
        serve = pool.submit(
            run_cli, "serve", "--port", str(free_port()), cwd=work, env=serve_env, timeout=20
        )
        admin = pool.submit(
            run_cli, "admin", "stuck", cwd=work, env=clean_env(DATABASE_URL=unmigrated_url)
        )
        assert_one_line_refusal(serve.result(), MIGRATE_HINT, "serve --migrate")
        assert_one_line_refusal(admin.result(), MIGRATE_HINT)
    assert not (tmp_path / "nowhere").exists(), "the missing SQLite database was created"
    assert list(work.iterdir()) == []


def test_admin_in_the_wrong_folder_creates_nothing(tmp_path: Path) -> None:
    result = run_cli("admin", "stuck", cwd=tmp_path, env=clean_env())
    assert_one_line_refusal(result, "no database at data/videorelay.db", "DATABASE_URL")
    assert MIGRATE_HINT in result.stderr
    assert list(tmp_path.iterdir()) == [], "admin created ./data"


def test_admin_works_on_a_migrated_database(tmp_path: Path, database_url: str) -> None:
    result = run_cli("admin", "stuck", cwd=tmp_path, env=clean_env(DATABASE_URL=database_url))
    assert result.returncode == 0, result.stderr
    assert "0 stuck video(s)" in result.stdout
