"""/metrics behind a token or on its own port, its cached gauges, capped event streams, and
Range errors in the JSON error shape. Real servers, real `videorelay serve` processes."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from tests.conftest import (
    HIAPI_KEY,
    WEBHOOK_SECRET,
    ChildServer,
    Service,
    ServiceFactory,
    Sim,
    child_env,
    free_port,
    free_socket,
    videorelay,
)

METRICS_TOKEN = "metrics-token-0123456789abcdef"
ALICE, BOB = "key-alice-0123456789abcdef", "key-bob-0123456789abcdef01"


@dataclass
class ServeEnv:
    """What a `videorelay serve` child of this test gets: its environment (built from
    scratch) for a port, its scratch working folder, its log."""

    settings: dict[str, str]
    home: Path
    log: Path

    def env(self, port: int, **more: str) -> dict[str, str]:
        return child_env(
            self.home, **self.settings, PUBLIC_BASE_URL=f"http://127.0.0.1:{port}", **more
        )


@dataclass
class Serve:
    """A real `videorelay serve` process, and the METRICS_PORT it serves, if any."""

    child: ChildServer
    metrics_port: int | None

    @property
    def url(self) -> str:
        return self.child.url

    def output(self) -> str:
        return self.child.output()

    async def stop(self) -> str:
        await asyncio.to_thread(self.child.terminate)
        return self.child.output()


@pytest.fixture
def serve_env(database_url: str, tmp_path: Path, sim: Sim) -> ServeEnv:
    home = tmp_path / "serve"
    home.mkdir()
    settings = {
        "DATABASE_URL": database_url,
        "STORAGE_DIR": str(tmp_path / "videos"),
        "HIAPI_KEY": HIAPI_KEY,
        "HIAPI_BASE_URL": sim.url,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DOWNLOAD_ALLOWED_HOSTS": sim.url,
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    return ServeEnv(settings, home, tmp_path / "serve.log")


@asynccontextmanager
async def serving(
    serve_env: ServeEnv, *args: str, metrics_port: bool = False, **env: str
) -> AsyncIterator[Serve]:
    """``videorelay serve`` on a port it binds itself (``ChildServer`` tries another one if it
    was taken meanwhile); with ``metrics_port``, also a METRICS_PORT picked here, tried again
    on another one if the child refuses it as taken, and open before this yields."""
    for _ in range(5):
        metrics = free_port() if metrics_port else None
        more = {**env, **({"METRICS_PORT": str(metrics)} if metrics else {})}
        child = ChildServer(
            videorelay("serve", "--port", "{port}", *args),
            lambda port: serve_env.env(port, **more),  # noqa: B023 (started in this turn)
            cwd=serve_env.home,
            log=serve_env.log,
        )
        try:
            await asyncio.to_thread(child.start)
        except AssertionError:
            if metrics and "cannot be bound" in child.output():
                continue  # another process took the metrics port meanwhile
            raise
        break
    else:
        raise AssertionError("no free METRICS_PORT in 5 tries")
    proc = Serve(child, metrics)
    try:
        if metrics:
            await wait_answers(f"http://127.0.0.1:{metrics}/metrics", child)
        yield proc
    finally:
        await proc.stop()


async def wait_answers(url: str, child: ChildServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                await client.get(url)
                return
            except httpx.TransportError:
                assert child.proc is not None and child.proc.poll() is None, child.output()
                assert time.monotonic() < deadline, f"{url} never answered: {child.output()}"
                await asyncio.sleep(0.05)


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


# --- /metrics --------------------------------------------------------------------------------


class TestMetricsThroughServe:
    async def test_metrics_token_is_required_when_set(self, serve_env: ServeEnv):
        async with (
            serving(serve_env, METRICS_TOKEN=METRICS_TOKEN) as proc,
            httpx.AsyncClient(base_url=proc.url) as client,
        ):
            bare = await client.get("/metrics")
            assert_json_error(bare, 401, "unauthorized")
            assert bare.headers["www-authenticate"] == "Bearer"
            assert "METRICS_TOKEN" in bare.json()["error"]["message"]
            wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert_json_error(wrong, 401, "unauthorized")
            basic = await client.get("/metrics", headers={"Authorization": METRICS_TOKEN})
            assert_json_error(basic, 401, "unauthorized")
            good = await client.get(
                "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            )
            assert good.status_code == 200
            assert good.headers["content-type"].startswith("text/plain")
            assert 'videorelay_videos{status="ready"}' in good.text
            # The token guards /metrics only; the API answers as before.
            assert (await client.get("/healthz")).status_code == 200
        assert METRICS_TOKEN not in await proc.stop()

    async def test_metrics_port_serves_metrics_and_the_public_port_does_not(
        self, serve_env: ServeEnv
    ):
        async with (
            serving(serve_env, metrics_port=True) as proc,
            httpx.AsyncClient() as client,
        ):
            metrics_url = f"http://127.0.0.1:{proc.metrics_port}"
            public = await client.get(f"{proc.url}/metrics")
            error = assert_json_error(public, 404, "not_found")
            assert "METRICS_PORT" in error["message"]
            scraped = await client.get(f"{metrics_url}/metrics")
            assert scraped.status_code == 200
            assert scraped.headers["content-type"].startswith("text/plain")
            assert 'videorelay_videos{status="queued"}' in scraped.text
            assert "videorelay_oldest_in_flight_seconds" in scraped.text
            # The metrics port is not a second door into the API.
            assert_json_error(await client.get(f"{metrics_url}/v1/videos"), 404, "not_found")
            assert (await client.get(f"{proc.url}/healthz")).status_code == 200

    # The worker split does not depend on the database: SQLite only.
    @pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
    async def test_metrics_port_and_token_with_workers_served_by_one_of_them(
        self, serve_env: ServeEnv, database_url: str
    ):
        async with (
            serving(
                serve_env, "--workers", "2", metrics_port=True, METRICS_TOKEN=METRICS_TOKEN
            ) as proc,
            httpx.AsyncClient() as client,
        ):
            metrics_url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
            # The token guards the metrics port too.
            bare = await client.get(metrics_url)
            assert_json_error(bare, 401, "unauthorized")
            assert bare.headers["www-authenticate"] == "Bearer"
            good = await client.get(
                metrics_url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            )
            assert good.status_code == 200 and "videorelay_videos" in good.text
            assert_json_error(await client.get(f"{proc.url}/metrics"), 404, "not_found")
            # Both workers started: one serves the port, the other found it taken and went on.
            deadline = time.monotonic() + 30
            while "metrics.port_served_by_another_worker" not in proc.output():
                assert time.monotonic() < deadline, proc.output()
                await asyncio.sleep(0.05)
        log = await proc.stop()
        assert log.count("metrics.listening") == 1, log
        assert log.count("metrics.port_served_by_another_worker") == 1, log
        assert "Traceback" not in log, log

    def test_a_metrics_port_that_cannot_be_bound_is_refused_in_one_line(self, tmp_path: Path):
        env = child_env(tmp_path)

        def serve(metrics_port: int, port: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "app.cli", "serve", "--simulate", "--port", str(port)],
                env={**env, "METRICS_PORT": str(metrics_port)},
                capture_output=True,
                text=True,
                timeout=30,
                cwd=tmp_path,
            )

        port = free_port()
        same = serve(port, port)
        assert same.returncode == 2, same.stdout + same.stderr
        assert "METRICS_PORT" in same.stderr and str(port) in same.stderr
        taken = free_socket()  # another program holds this one
        taken.listen()
        with taken:
            busy = serve(taken.getsockname()[1], free_port())
        assert busy.returncode == 2, busy.stdout + busy.stderr
        assert "METRICS_PORT" in busy.stderr and "cannot be bound" in busy.stderr
        assert "Traceback" not in busy.stdout + busy.stderr


class TestMetricsCache:
    async def test_scrapes_within_the_window_share_one_read(self, services: ServiceFactory):
        # A window far longer than the scrapes take, however loaded the machine: all share
        # the first read. Then a second service with a short window: once it has passed,
        # the next scrape reads again (and sees the video submitted meanwhile).
        service = await services.start(METRICS_CACHE_SECONDS=300)
        reads: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "GROUP BY videos.status" in statement:
                reads.append(statement)

        event.listen(service.ctx.engine.sync_engine, "before_cursor_execute", count)
        try:
            first = await service.client.get("/metrics")
            assert first.status_code == 200
            assert len(reads) == 1
            await service.submit()  # the snapshot is now stale by one video, on purpose
            second = await service.client.get("/metrics")
            storm = await asyncio.gather(*(service.client.get("/metrics") for _ in range(20)))
            assert second.status_code == 200 and all(r.status_code == 200 for r in storm)
            assert len(reads) == 1, f"{len(reads)} reads for 22 scrapes in the window"
            assert 'videorelay_videos{status="processing"} 0.0' in second.text
        finally:
            event.remove(service.ctx.engine.sync_engine, "before_cursor_execute", count)
        await services.stop(service)

        short = await services.start(METRICS_CACHE_SECONDS=0.3)
        event.listen(short.ctx.engine.sync_engine, "before_cursor_execute", count)
        try:
            reads.clear()
            started = time.monotonic()
            assert (await short.client.get("/metrics")).status_code == 200
            assert len(reads) == 1
            while len(reads) == 1:  # scrape until the window has passed (a hang fails)
                assert time.monotonic() - started < 30, "the cached gauges never expired"
                later = await short.client.get("/metrics")
                await asyncio.sleep(0.05)
            assert len(reads) == 2
            assert time.monotonic() - started >= 0.3  # not before the window had passed
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in later.text.splitlines()
                if line.startswith("videorelay_videos{")
            )
            assert total == 1.0
        finally:
            event.remove(short.ctx.engine.sync_engine, "before_cursor_execute", count)


# --- Server-Sent Events ----------------------------------------------------------------------


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, video_id: str, key: str
) -> AsyncIterator[httpx.Response]:
    """An event stream, open once its first line has arrived (the server holds its slot)."""
    async with client.stream(
        "GET", f"/v1/videos/{video_id}/events", headers={"Authorization": f"Bearer {key}"}
    ) as response:
        if response.status_code == 200:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
        yield response


async def submit(service: Service, key: str) -> str:
    response = await service.client.post(
        "/v1/videos",
        json={"image_url": "https://example.invalid/a.jpg", "duration": 3},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 202, response.text
    video_id: str = response.json()["id"]
    return video_id


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


class TestEventStreamLimits:
    async def test_one_stream_over_the_limit_is_429_and_a_closed_one_frees_its_slot(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(latency_seconds=60)  # the videos stay processing: the streams stay open
        service = await services.start(
            API_KEYS=f"alice:{ALICE},bob:{BOB}", EVENTS_MAX_STREAMS=2, EVENTS_POLL_SECONDS=0.05
        )
        slots = service.ctx.event_streams
        alice_video, bob_video = await submit(service, ALICE), await submit(service, BOB)
        async with httpx.AsyncClient(base_url=service.server.url, timeout=10) as client:
            async with open_stream(client, alice_video, ALICE) as one:
                assert one.status_code == 200
                async with open_stream(client, alice_video, ALICE) as two:
                    assert two.status_code == 200
                    assert slots.open_count("alice") == 2
                    async with open_stream(client, alice_video, ALICE) as three:
                        await three.aread()
                        error = assert_json_error(three, 429, "too_many_streams")
                        assert three.headers["retry-after"] == "5"
                        assert "EVENTS_MAX_STREAMS" in error["message"]
                    # Another key has slots of its own.
                    async with open_stream(client, bob_video, BOB) as bobs:
                        assert bobs.status_code == 200
                # The client went away: the server notices and gives the slot back.
                await wait_until(lambda: slots.open_count("alice") == 1)
                async with open_stream(client, alice_video, ALICE) as again:
                    assert again.status_code == 200
                    assert slots.open_count("alice") == 2
        await wait_until(lambda: slots.open_count("alice") == slots.open_count("bob") == 0)

    async def test_streams_that_end_give_their_slot_back(self, services: ServiceFactory):
        service = await services.start(EVENTS_MAX_STREAMS=1, EVENTS_POLL_SECONDS=0.05)
        video = await service.submit()
        await service.wait_for(video["id"], "ready")
        for _ in range(3):  # each ends after the final event; the next one gets the slot
            response = await service.client.get(f"/v1/videos/{video['id']}/events")
            assert response.status_code == 200 and "event: ready" in response.text
        assert service.ctx.event_streams.open_count("client:127.0.0.1") == 0

    async def test_an_open_api_counts_streams_per_client_address(
        self, services: ServiceFactory, sim: Sim
    ):
        # Without API keys every caller is the same owner: one process-wide allowance would let
        # any 20 viewers lock everyone else out. Each client address gets its own instead.
        sim.set(latency_seconds=60)  # the video stays processing: the streams stay open
        service = await services.start(EVENTS_MAX_STREAMS=1, EVENTS_POLL_SECONDS=0.05)
        video = (await service.submit())["id"]
        url = service.server.url
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as first,
            httpx.AsyncClient(base_url=url, timeout=10, transport=other) as second,
        ):
            async with open_stream(first, video, "open") as one:
                assert one.status_code == 200
                async with open_stream(first, video, "open") as same_address:
                    await same_address.aread()
                    assert_json_error(same_address, 429, "too_many_streams")
                async with open_stream(second, video, "open") as other_address:
                    assert other_address.status_code == 200

    async def test_a_stream_ends_after_its_lifetime_and_resumes(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(latency_seconds=60)
        service = await services.start(
            EVENTS_MAX_STREAMS=1, EVENTS_MAX_STREAM_SECONDS=0.5, EVENTS_POLL_SECONDS=0.05
        )
        video = await service.submit()
        started = time.monotonic()
        async with asyncio.timeout(30):  # the video stays processing for 60 s: bounds a hang
            first = await service.client.get(f"/v1/videos/{video['id']}/events")
        assert first.status_code == 200
        assert time.monotonic() - started >= 0.5  # not before its lifetime
        assert "id: 2-processing" in first.text
        assert first.text.rstrip().endswith("reconnect with Last-Event-ID")
        # Reconnecting with the last id: nothing repeated, and the slot was free again.
        again = await service.client.get(
            f"/v1/videos/{video['id']}/events", headers={"Last-Event-ID": "2-processing"}
        )
        assert again.status_code == 200 and "event:" not in again.text
        assert service.ctx.event_streams.open_count("") == 0

    async def test_an_idle_stream_sends_heartbeats(self, services: ServiceFactory, sim: Sim):
        sim.set(latency_seconds=60)
        service = await services.start(EVENTS_HEARTBEAT_SECONDS=0.2, EVENTS_POLL_SECONDS=0.05)
        video = await service.submit()
        # One status event, then only heartbeats while nothing changes: read until the third
        # (at the 15 s default that takes 45 s; the deadline bounds it), then hang up.
        lines: list[str] = []
        async with (
            asyncio.timeout(10),
            service.client.stream("GET", f"/v1/videos/{video['id']}/events") as stream,
        ):
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                lines.append(line)
                if lines.count(": heartbeat") == 3:
                    break
        assert lines.count("event: status") == 1, lines
        after_status = lines[lines.index("event: status") + 1 :]
        assert not [line for line in after_status if line.startswith(("event:", "id:"))], lines


# --- Range errors ----------------------------------------------------------------------------


class TestRangeErrors:
    async def test_range_errors_use_the_json_shape_and_ranges_still_work(self, service: Service):
        video = await service.submit()
        done = await service.wait_for(video["id"], "ready")
        size = done["size_bytes"]
        url = f"/v1/videos/{video['id']}/content"

        beyond = await service.client.get(url, headers={"Range": f"bytes={size + 10}-"})
        error = assert_json_error(beyond, 416, "range_not_satisfiable")
        assert beyond.headers["content-range"] == f"bytes */{size}"
        assert str(size) in error["message"]

        for bad in ("bytes=9-2", "items=0-1", "bytes=abc", "bytes"):
            response = await service.client.get(url, headers={"Range": bad})
            error = assert_json_error(response, 400, "bad_range")
            assert "bytes=START-END" in error["message"], error
            assert response.headers["x-content-type-options"] == "nosniff"

        whole = await service.client.get(url)
        assert whole.status_code == 200
        assert hashlib.sha256(whole.content).hexdigest() == done["sha256"]
        part = await service.client.get(url, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == whole.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{size}"
        tail = await service.client.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == whole.content[-10:]
        multi = await service.client.get(url, headers={"Range": "bytes=0-9,20-29"})
        assert multi.status_code == 206
        assert multi.headers["content-type"].startswith("multipart/byteranges")
