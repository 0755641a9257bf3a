"""Documented settings, set as environment variables on a real ``videorelay serve`` process.

Each check looks at what a user of the setting sees: HTTP answers, the process's output, the
sockets it listens on. The processes run in a scratch folder with an environment built from
scratch (``child_env``), next to a real ``videorelay simulator`` process. To keep the file
fast, one configured process ("relay") serves several checks, and one ``serve --migrate
--workers 2`` process ("workers") several others.

Not here, because other files test them: ``LOG_FORMAT``, ``METRICS_*``, ``EVENTS_MAX_*``,
``EVENTS_HEARTBEAT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.migrate import head_revision
from app.security import webhook_token
from app.storage import LocalStorage
from tests.conftest import (
    HIAPI_KEY,
    WEBHOOK_SECRET,
    ChildServer,
    child_env,
    simulator_child,
    videorelay,
)

# Under pytest-xdist one worker runs the whole file, so its shared servers start once.
pytestmark = pytest.mark.xdist_group("settings_serve")

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
CAROL = "carol-key-0123456789abcdef"  # only in a comment line: not a key
KEYS_FILE = f"""\
# API keys of the relay: one "name key" or "name:key" per line
alice {ALICE}
    # an indented comment is a comment too: carol {CAROL}
bob:{BOB}

# carol {CAROL}
"""
BODY = {"image_url": "https://example.invalid/a.jpg", "duration": 3}
TOKEN_SECRET = "client-token-secret-0123456789abcdef"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        await asyncio.sleep(0.05)


async def wait_status(
    client: httpx.AsyncClient, video_id: str, *statuses: str, key: str | None = None
) -> dict[str, Any]:
    headers = auth(key) if key else {}
    video: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal video
        video = (await client.get(f"/v1/videos/{video_id}", headers=headers)).json()
        return video["status"] in statuses

    await until(reached, f"video {video_id} in {statuses}")
    return video


def relay_env(work: Path, sim: ChildServer, database_url: str, **extra: str) -> dict[str, str]:
    settings = {
        "DATABASE_URL": database_url,
        "STORAGE_DIR": str(work / "videos"),
        "HIAPI_KEY": HIAPI_KEY,
        "HIAPI_BASE_URL": sim.url,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DOWNLOAD_ALLOWED_HOSTS": sim.url,
        "RETRY_BASE_SECONDS": "0.1",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    return child_env(work, **{**settings, **extra})


# --- the processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("settings-serve")


@pytest.fixture(scope="module")
def sim(work: Path) -> Iterator[ChildServer]:
    """``videorelay simulator`` as a process of its own; knobs change with PATCH /_sim/config."""
    child = simulator_child(work, "--latency", "0.05", "--render-scale", "0.2")
    child.start()
    yield child
    child.terminate()


async def sim_config(sim: ChildServer, **knobs: Any) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.patch(f"{sim.url}/_sim/config", json=knobs)
    assert response.status_code == 200, response.text


async def sim_json(sim: ChildServer, path: str) -> Any:
    async with httpx.AsyncClient(headers=auth(HIAPI_KEY)) as client:
        return (await client.get(f"{sim.url}{path}")).json()


@pytest.fixture(scope="module")
def relay(work: Path, sim: ChildServer, sqlite_template: Path) -> Iterator[ChildServer]:
    """``videorelay serve`` (no --port: ``PORT`` says where) with the settings under test."""
    home = work / "relay"
    home.mkdir()
    shutil.copy(sqlite_template, home / "relay.db")
    (home / "keys.txt").write_text(KEYS_FILE)
    child = ChildServer(
        videorelay("serve"),
        lambda port: relay_env(
            home,
            sim,
            f"sqlite+aiosqlite:///{home / 'relay.db'}",
            PORT=str(port),
            PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
            API_KEYS_FILE=str(home / "keys.txt"),
            LOG_LEVEL="DEBUG",
            EVENTS_POLL_SECONDS="60",
            EVENTS_MAX_STREAM_SECONDS="3",
            RECONCILE_BATCH_SIZE="2",
            RECONCILE_AFTER_SECONDS="1",
            RECONCILE_INTERVAL_SECONDS="0.5",
            CLIENT_TOKEN_SECRET=TOKEN_SECRET,
            SIGNED_URL_TTL_SECONDS="120",
            DAILY_VIDEO_SECONDS_PER_SUBJECT="5",
        ),
        cwd=home,
        log=home / "serve.log",
        up_path=None,  # up once uvicorn says where it listens (PORT's test reads that line)
        up_line="Uvicorn running on http://",
    )
    child.start()
    yield child
    child.terminate()


@pytest.fixture(scope="module")
def workers(work: Path, sim: ChildServer) -> Iterator[ChildServer]:
    """``serve --migrate --workers 2`` on a SQLite file that does not exist yet, at
    ``LOG_LEVEL=WARNING``, with an https ``PUBLIC_BASE_URL`` (so hiapi's callbacks cannot
    reach it: videos are found by polling)."""
    home = work / "workers"
    home.mkdir()
    child = ChildServer(
        videorelay("serve", "--migrate", "--workers", "2", "--port", "{port}"),
        lambda port: relay_env(
            home,
            sim,
            f"sqlite+aiosqlite:///{home / 'fresh.db'}",
            PUBLIC_BASE_URL=f"https://127.0.0.1:{port}",
            LOG_LEVEL="WARNING",
            RECONCILE_AFTER_SECONDS="1",
            RECONCILE_INTERVAL_SECONDS="0.3",
        ),
        cwd=home,
        log=home / "serve.log",
    )
    child.start()
    yield child
    child.terminate()


@pytest.fixture
async def relay_client(relay: ChildServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
        yield client


# --- CLIENT_TOKEN_SECRET, SIGNED_URL_TTL_SECONDS, DAILY_VIDEO_SECONDS_PER_SUBJECT -----------


async def test_client_tokens_signed_url_ttl_and_subject_limit_on_serve(
    relay: ChildServer, relay_client: httpx.AsyncClient
) -> None:
    async def mint(subject: str) -> str:
        minted = await relay_client.post(
            "/v1/client-tokens", json={"subject": subject}, headers=auth(ALICE)
        )
        assert minted.status_code == 201, minted.text  # CLIENT_TOKEN_SECRET is set
        token: str = minted.json()["token"]
        return token

    ann = await mint("ann")
    first = await relay_client.post("/v1/videos", json=BODY, headers=auth(ann))
    assert first.status_code == 202, first.text
    video = first.json()
    assert video["subject"] == "ann"
    # Keys are on, so the event URL is signed, for SIGNED_URL_TTL_SECONDS from now.
    query = parse_qs(urlsplit(video["events_url"]).query)
    assert set(query) == {"exp", "sig"}, video["events_url"]
    assert 100 <= int(query["exp"][0]) - time.time() <= 125, query["exp"]
    # DAILY_VIDEO_SECONDS_PER_SUBJECT=5: ann's 3 + 3 seconds would pass it; bea has her own day.
    second = await relay_client.post("/v1/videos", json=BODY, headers=auth(ann))
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "subject_daily_limit_exceeded"
    other = await relay_client.post("/v1/videos", json=BODY, headers=auth(await mint("bea")))
    assert other.status_code == 202, other.text
    assert ann not in relay.output()  # a token never reaches the log


# --- API_KEYS_FILE -----------------------------------------------------------------------


async def test_api_keys_file_admits_each_key_and_nothing_else(
    relay: ChildServer, relay_client: httpx.AsyncClient
) -> None:
    for headers in ({}, auth(CAROL), auth("not-a-key-0123456789abcdef")):
        refused = await relay_client.get("/v1/videos", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
    for key in (ALICE, BOB):  # a "name key" line and a "name:key" line
        assert (await relay_client.get("/v1/videos", headers=auth(key))).status_code == 200
    # The start says how many keys were read: the comment lines were not taken as keys.
    out = relay.output()
    assert "service.api_keys count=2" in out
    assert "API_KEYS is not set" not in out
    assert all(key not in out for key in (ALICE, BOB, CAROL))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "API_KEYS_FILE cannot be read: No such file or directory"),
        ("alice short-key\n", "API key 'alice' is shorter than 16 characters"),
        (f"alice {ALICE}\nalice:{BOB}\n", "API key name 'alice' is used twice"),
    ],
    ids=["missing", "short", "duplicate"],
)
def test_api_keys_file_errors_are_a_one_line_refusal(
    tmp_path: Path, content: str | None, says: str
) -> None:
    keys = tmp_path / "keys.txt"
    if content is not None:
        keys.write_text(content)
    env = child_env(
        tmp_path,
        API_KEYS_FILE=str(keys),
        HIAPI_KEY=HIAPI_KEY,
        WEBHOOK_SECRET=WEBHOOK_SECRET,
        HIAPI_BASE_URL="http://127.0.0.1:9",
    )
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "9"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"videorelay: configuration error: {says}"]
    assert ALICE not in result.stderr and BOB not in result.stderr


# --- EVENTS_POLL_SECONDS -------------------------------------------------------------------


async def test_events_poll_seconds_is_how_often_a_stream_looks(
    relay: ChildServer, sim: ChildServer, relay_client: httpx.AsyncClient
) -> None:
    """At EVENTS_POLL_SECONDS=60 a stream checks the database once, at the start: the video
    becomes ready within its 3 s lifetime (EVENTS_MAX_STREAM_SECONDS), and the stream never
    says so. (At the default 0.5 s the `ready` event comes.)"""
    await sim_config(sim, latency_seconds=600)  # the task finishes when the test says
    try:
        video = (await relay_client.post("/v1/videos", json=BODY, headers=auth(ALICE))).json()
    finally:
        await sim_config(sim, latency_seconds=0.05)
    events: list[str] = []
    ended = False
    async with relay_client.stream(
        "GET", f"/v1/videos/{video['id']}/events", headers=auth(ALICE)
    ) as stream:
        lines = stream.aiter_lines()
        async for line in lines:
            if line.startswith("event:"):
                events.append(line)
                break
        assert events == ["event: status"]
        async with httpx.AsyncClient() as hiapi:
            await hiapi.post(f"{sim.url}/_sim/tasks/{video['task_id']}/complete")
        await wait_status(relay_client, video["id"], "ready", key=ALICE)
        async for line in lines:  # the rest of the stream, until the server ends it
            if line.startswith("event:"):
                events.append(line)
            ended = ended or "stream lifetime reached" in line
    assert events == ["event: status"], "the stream looked again before EVENTS_POLL_SECONDS"
    assert ended


# --- RECONCILE_BATCH_SIZE ------------------------------------------------------------------


TICK = re.compile(r"reconciler\.tick .*\bpolled=(\d+) recovered=(\d+)")


async def test_reconcile_batch_size_caps_the_polls_of_one_tick(
    relay: ChildServer, sim: ChildServer, relay_client: httpx.AsyncClient
) -> None:
    """Five videos whose callbacks are lost fall due together; RECONCILE_BATCH_SIZE=2 polls
    at most two of them per tick (the default 100 would poll all five, or at least three, in
    one tick), and every one is recovered."""
    start = len(relay.output())
    await sim_config(sim, callback_drop_rate=1.0)
    try:
        posted = await asyncio.gather(
            *(relay_client.post("/v1/videos", json=BODY, headers=auth(BOB)) for _ in range(5))
        )
    finally:
        await sim_config(sim, callback_drop_rate=0.0)
    for response in posted:
        await wait_status(relay_client, response.json()["id"], "ready", key=BOB)
    ticks = [tuple(map(int, m)) for m in TICK.findall(relay.output()[start:])]
    assert sum(recovered for _, recovered in ticks) == 5, ticks
    assert max(polled for polled, _ in ticks) <= 2, ticks
    assert len([t for t in ticks if t[1]]) >= 3, ticks


# --- VIDEO_RETENTION_SECONDS ----------------------------------------------------------------


async def test_video_retention_seconds_deletes_old_clips_and_counts_them(
    work: Path, sim: ChildServer, sqlite_template: Path
) -> None:
    """A serve of its own (its videos must not disappear under the other checks): a ready
    video older than VIDEO_RETENTION_SECONDS is deleted by the reconciler, its file is gone,
    and /metrics counts it."""
    home = work / "retention"
    home.mkdir()
    shutil.copy(sqlite_template, home / "relay.db")
    child = ChildServer(
        videorelay("serve", "--port", "{port}"),
        lambda port: relay_env(
            home,
            sim,
            f"sqlite+aiosqlite:///{home / 'relay.db'}",
            PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
            VIDEO_RETENTION_SECONDS="6",
            RECONCILE_INTERVAL_SECONDS="0.3",
        ),
        cwd=home,
        log=home / "serve.log",
    )
    await asyncio.to_thread(child.start)
    try:
        async with httpx.AsyncClient(base_url=child.url, timeout=10) as client:
            posted = await client.post("/v1/videos", json=BODY)
            assert posted.status_code == 202, posted.text
            video_id = posted.json()["id"]
            await wait_status(client, video_id, "ready")
            clip = home / "videos" / LocalStorage.key_for(uuid.UUID(video_id))
            assert clip.is_file()

            async def gone() -> bool:
                return (await client.get(f"/v1/videos/{video_id}")).status_code == 404

            await until(gone, "the video is deleted by retention")
            assert not clip.exists()
            metrics = (await client.get("/metrics")).text
            assert 'videorelay_videos_deleted_total{reason="retention"} 1.0' in metrics
            assert 'videorelay_videos_deleted_total{reason="api"} 0.0' in metrics
            assert "reason=retention" in child.output()
    finally:
        child.terminate()


# --- LOG_LEVEL, PORT -------------------------------------------------------------------------


async def test_log_level_debug_shows_debug_lines(
    relay: ChildServer, sim: ChildServer, relay_client: httpx.AsyncClient
) -> None:
    """A duplicate callback is logged at DEBUG only: at LOG_LEVEL=DEBUG it appears."""
    video = (await relay_client.post("/v1/videos", json=BODY, headers=auth(ALICE))).json()
    await wait_status(relay_client, video["id"], "ready", key=ALICE)
    task = await sim_json(sim, f"/v1/tasks/{video['task_id']}")
    token = webhook_token(WEBHOOK_SECRET.encode(), uuid.UUID(video["id"]))
    again = await relay_client.post(f"/webhooks/hiapi/{video['id']}/{token}", json=task["data"])
    assert again.json()["outcome"] == "duplicate"

    async def logged() -> bool:
        return "DEBUG app.api.webhooks webhook.duplicate" in relay.output()

    await until(logged, "the DEBUG line of the duplicate")
    assert " INFO app.main service.started" in relay.output()


def test_port_is_where_serve_listens_without_port(relay: ChildServer) -> None:
    assert f"Uvicorn running on http://127.0.0.1:{relay.port} " in relay.output()


def listening(host: str, port: int) -> bool:
    """Whether a socket listens on host:port (IPv4), from the kernel's table."""
    a, b, c, d = (int(x) for x in host.split("."))
    want = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
            return True
    return False


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_host_is_the_address_serve_binds(tmp_path: Path, sim: ChildServer) -> None:
    """HOST=127.0.0.2 (another loopback address): serve listens there and not on 127.0.0.1.
    No request is sent to it; the kernel's socket table and the start line say so."""
    child = ChildServer(
        videorelay("serve", "--migrate"),
        lambda port: relay_env(
            tmp_path,
            sim,
            f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
            HOST="127.0.0.2",
            PORT=str(port),
        ),
        cwd=tmp_path,
        log=tmp_path / "serve.log",
        host="127.0.0.2",
        up_path=None,
        up_line="Uvicorn running on http://",
    )
    child.start()
    try:
        assert listening("127.0.0.2", child.port)
        assert not listening("127.0.0.1", child.port)
        assert f"Uvicorn running on http://127.0.0.2:{child.port} " in child.output()
    finally:
        child.terminate()


# --- serve --migrate --workers 2, LOG_LEVEL=WARNING, HSTS ----------------------------------


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes under ``parent`` (spawned: ``multiprocessing.spawn``)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


async def test_serve_migrate_makes_a_fresh_sqlite_file_and_serves(workers: ChildServer) -> None:
    database = workers.cwd / "fresh.db"
    assert database.exists()
    async with httpx.AsyncClient(base_url=workers.url) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["revision"] == head_revision(f"sqlite+aiosqlite:///{database}")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
async def test_workers_2_runs_two_workers_that_share_the_work(
    workers: ChildServer, sim: ChildServer
) -> None:
    assert workers.proc is not None
    assert len(worker_pids(workers.proc.pid)) == 2

    async def both_started() -> bool:  # each worker's app warns that the API is open
        return workers.output().count("service.open_api") >= 2

    await until(both_started, "both workers' apps started")
    assert workers.output().count("service.open_api") == 2
    before = (await sim_json(sim, "/_sim/stats"))["file_requests"]
    async with httpx.AsyncClient(base_url=workers.url) as client:
        videos = [(await client.post("/v1/videos", json=BODY)).json() for _ in range(3)]
        for video in videos:  # callbacks cannot reach https://127.0.0.1: found by polling
            done = await wait_status(client, video["id"], "ready", "failed")
            assert done["status"] == "ready", done
    # Both workers' reconcilers polled and claimed: still one download per video.
    assert (await sim_json(sim, "/_sim/stats"))["file_requests"] - before == 3


async def test_log_level_warning_drops_info_lines(workers: ChildServer) -> None:
    async with httpx.AsyncClient(base_url=workers.url) as client:
        for path in ("/healthz", "/v1/videos", "/v1/videos/nope"):
            await client.get(path)  # at INFO each would be an access-log line
    out = workers.output()
    assert "WARNING app.main service.open_api" in out
    assert " INFO " not in out and " DEBUG " not in out, out[-2000:]


async def test_security_headers_and_hsts_with_an_https_public_base_url(
    workers: ChildServer, relay: ChildServer
) -> None:
    async with httpx.AsyncClient(base_url=workers.url) as client:
        api = await client.get("/v1/videos")
        missing = await client.get("/v1/videos/00000000-0000-0000-0000-000000000000")
        page = await client.get("/")
        docs = await client.get("/docs")
    for response in (api, missing, page, docs):
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"
    for response in (api, missing):
        assert response.headers["content-security-policy"] == (
            "default-src 'none'; frame-ancestors 'none'; sandbox"
        )
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "content-security-policy" not in docs.headers
    # An http PUBLIC_BASE_URL: no HSTS (it would pin a host that has no TLS).
    async with httpx.AsyncClient(base_url=relay.url) as client:
        plain = await client.get("/healthz")
    assert "strict-transport-security" not in plain.headers
    assert plain.headers["referrer-policy"] == "no-referrer"


# --- /readyz while shutting down -------------------------------------------------------------


async def test_sigterm_stops_taking_connections_at_once_while_a_download_drains(
    tmp_path: Path, sim: ChildServer
) -> None:
    """README: on SIGTERM the service stops taking requests (a probe sees a refused
    connection, not a 200) while its running download gives its lease back."""
    child = ChildServer(
        videorelay("serve", "--migrate", "--port", "{port}"),
        lambda port: relay_env(
            tmp_path,
            sim,
            f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
            PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
            SHUTDOWN_GRACE_SECONDS="5",
        ),
        cwd=tmp_path,
        log=tmp_path / "serve.log",
    )
    await asyncio.to_thread(child.start)
    seen: list[str] = []
    try:
        # A download that takes seconds is running when SIGTERM comes.
        await sim_config(sim, pad_bytes=8_000_000, download_bytes_per_second=2_000_000)
        async with httpx.AsyncClient(base_url=child.url, timeout=2) as client:
            video = (await client.post("/v1/videos", json=BODY)).json()
            await wait_status(client, video["id"], "downloading")
            assert (await client.get("/readyz")).status_code == 200
            child.signal(signal.SIGTERM)
            while child.proc is not None and child.proc.poll() is None:
                try:
                    ready = await client.get("/readyz")
                    seen.append(f"{ready.status_code} {ready.json().get('error', {}).get('code')}")
                except httpx.TransportError as exc:
                    seen.append(type(exc).__name__)
                await asyncio.sleep(0.02)
    finally:
        await sim_config(sim, pad_bytes=0, download_bytes_per_second=None)
        child.kill()
    # Some probes may still be answered 200 while the signal is delivered (or find their
    # kept-alive connection closed under them); after the first refused connection, none is
    # answered again, and no probe ever saw an error status.
    assert "ConnectError" in seen, seen
    first_refused = seen.index("ConnectError")
    assert all(entry == "ConnectError" for entry in seen[first_refused:]), seen
    assert all(
        entry.startswith("200") or entry in ("RemoteProtocolError", "ReadError")
        for entry in seen[:first_refused]
    ), seen
