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
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
from tests.conftest import (
    PG_ADMIN_DSN,
    PG_HOST,
    ChildServer,
    child_env,
    free_port,
    free_socket,
    in_thread,
    videorelay,
)

SECRETS = {"HIAPI_KEY": "sk-startup-test-key-0123", "WEBHOOK_SECRET": "startup-test-secret-0123456"}
LOCAL_UPSTREAM = "http://127.0.0.1:9"  # a local simulator address: nothing listens there
MIGRATE_HINT = "videorelay migrate"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment built from scratch (``child_env``): no videorelay setting but
    ``extra``, ``HOME`` at ``home``."""
    return child_env(home, **extra)


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
    args: list[str], *, cwd: Path, env: dict[str, str], path: str = "/healthz"
) -> AsyncIterator[tuple[ChildServer, httpx.AsyncClient]]:
    """Start ``videorelay <args> --port P`` in ``cwd`` (a port it binds itself: ``ChildServer``
    tries another one if it was taken meanwhile); yield once ``path`` answers; stop it on
    exit. Its output (stdout and stderr) is in ``child.output()``."""
    child = ChildServer(
        videorelay(*args, "--port", "{port}"),
        lambda port: env,
        cwd=cwd,
        log=cwd.parent / f"{cwd.name}-child.log",
        up_path=path,
    )
    await asyncio.to_thread(child.start)
    try:
        async with httpx.AsyncClient(base_url=child.url, timeout=10) as client:
            yield child, client
    finally:
        await asyncio.to_thread(child.terminate)


async def until(condition: Callable[[], Awaitable[bool]], what: str, limit: float = 30) -> None:
    """Poll ``condition`` until it holds; fail after ``limit`` seconds (a bound on a hang)."""
    deadline = time.monotonic() + limit
    while not await condition():
        assert time.monotonic() < deadline, f"{what}: not within {limit}s"
        await asyncio.sleep(0.05)


async def wait_final(client: httpx.AsyncClient, video_id: str) -> dict[str, Any]:
    video: dict[str, Any] = {}

    async def final() -> bool:
        nonlocal video
        video = (await client.get(f"/v1/videos/{video_id}")).json()
        return video["status"] in ("ready", "failed")

    await until(final, f"video {video_id} finished")
    return video


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
    env = clean_env(tmp_path, LOG_FORMAT="json")
    argv = ["serve", "--simulate", "--render-scale", "0.2"]
    async with running(argv, cwd=tmp_path, env=env) as (child, client):
        base = child.url
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
        await asyncio.to_thread(child.terminate)
        output = child.output()

    assert counter.accepted == 0, "the simulator fetched an image from another host"
    entries = []
    # The child's stdout and stderr share one file: set aside the banner serve --simulate
    # prints on stdout (blank lines, "videorelay..." and the indented curl hints).
    banner = ("videorelay: ", "videorelay is running ", "  API docs:", "  try it:", "  then:")
    for line in output.splitlines():
        if not line.strip() or line.startswith(banner):
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
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
    argv = ["serve", "--simulate", "--fetch-images", "--render-scale", "0.2"]
    async with running(argv, cwd=tmp_path, env=clean_env(tmp_path)) as (_, client):
        remote = f"https://127.0.0.1:{counter.port}/still.jpg"
        created = await client.post("/v1/videos", json={"image_url": remote, "duration": 3})
        assert created.status_code == 202, created.text

        async def fetched() -> bool:  # the simulator starts rendering (and fetching) at once
            return counter.accepted >= 1

        await until(fetched, "the remote image fetched")


async def test_standalone_simulator_fetches_no_image_unless_asked(
    tmp_path: Path, counter: ConnectionCounter
) -> None:
    argv = ["simulator", "--latency", "0", "--render-scale", "0.2"]
    env = clean_env(tmp_path)
    async with running(argv, cwd=tmp_path, env=env, path="/_sim/stats") as (_, client):
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
        task: dict[str, Any] = {}

        async def finished() -> bool:
            nonlocal task
            answer = (await client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
            task = answer.get("data") or answer
            return task["status"] in ("success", "fail")

        await until(finished, f"task {task_id} finished")
        assert task["status"] == "success", task
    assert counter.accepted == 0


# --- PUBLIC_BASE_URL that hiapi cannot reach -----------------------------------------------


def test_serve_refuses_a_public_base_url_hiapi_cannot_reach(tmp_path: Path) -> None:
    """HIAPI_BASE_URL is the default (the real hiapi): decided from the URLs alone, before
    any connection or file. The default PUBLIC_BASE_URL, and an http one."""
    for public_base_url, reason in (
        (None, "its host 127.0.0.1 is a loopback address"),
        ("http://relay.example.com", "it is not https"),
    ):
        env = clean_env(tmp_path, **SECRETS)
        if public_base_url is not None:
            env["PUBLIC_BASE_URL"] = public_base_url
        # Refused before any connection (the real hiapi is never tried): a connection attempt
        # would end in HIAPI_TIMEOUT_SECONDS, not in this one-line refusal.
        result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, env=env, timeout=20)
        assert_one_line_refusal(result, "PUBLIC_BASE_URL", reason, "https://", "--simulate")
        assert SECRETS["HIAPI_KEY"] not in result.stderr
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
        ("https://api.hiapi.ai", "https://[64:ff9b::7f00:1]", "not a public address"),
        # The same classification as the downloader's and notifier's (it once drifted):
        ("https://api.hiapi.ai", "https://[2001:0:4136:e378::1]", "private"),
        ("https://api.hiapi.ai", "https://[64:ff9b:1::a00:1]", "not a public address"),
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
        env = clean_env(tmp_path, **SECRETS, **extra)
        result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, env=env, timeout=20)
        assert_one_line_refusal(result, MIGRATE_HINT)
        assert "PUBLIC_BASE_URL" not in result.stderr, extra


async def test_serve_starts_with_a_local_upstream(tmp_path: Path) -> None:
    env = clean_env(tmp_path, **SECRETS, HIAPI_BASE_URL=LOCAL_UPSTREAM)
    async with running(["serve", "--migrate"], cwd=tmp_path, env=env) as (_, client):
        assert (await client.get("/readyz")).status_code == 200


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
    serve_env = clean_env(
        tmp_path, **SECRETS, HIAPI_BASE_URL=LOCAL_UPSTREAM, DATABASE_URL=unmigrated_url
    )
    with ThreadPoolExecutor(2) as pool:
        serve = pool.submit(
            run_cli, "serve", "--port", str(free_port()), cwd=work, env=serve_env, timeout=20
        )
        admin = pool.submit(
            run_cli,
            "admin",
            "stuck",
            cwd=work,
            env=clean_env(tmp_path, DATABASE_URL=unmigrated_url),
        )
        assert_one_line_refusal(serve.result(), MIGRATE_HINT, "serve --migrate")
        assert_one_line_refusal(admin.result(), MIGRATE_HINT)
    assert not (tmp_path / "nowhere").exists(), "the missing SQLite database was created"
    assert list(work.iterdir()) == []


def test_admin_in_the_wrong_folder_creates_nothing(tmp_path: Path) -> None:
    result = run_cli("admin", "stuck", cwd=tmp_path, env=clean_env(tmp_path))
    assert_one_line_refusal(result, "no database at data/videorelay.db", "DATABASE_URL")
    assert MIGRATE_HINT in result.stderr
    assert list(tmp_path.iterdir()) == [], "admin created ./data"


def test_admin_works_on_a_migrated_database(tmp_path: Path, database_url: str) -> None:
    result = run_cli(
        "admin", "stuck", cwd=tmp_path, env=clean_env(tmp_path, DATABASE_URL=database_url)
    )
    assert result.returncode == 0, result.stderr
    assert "0 stuck video(s)" in result.stdout
