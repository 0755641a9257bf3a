"""Every failure code, produced through the service's own doors (issue 11).

Each code below is reached from outside only: the API, the webhook (a POST on the video's
signed callback URL, as hiapi sends it), the reconciler's poll of a real hiapi-like server,
and the downloader fetching from a real file server on 127.0.0.1. Nothing is seeded by
calling lifecycle functions; what is asserted is the JSON a user sees. SQLite and Postgres.

(``/readyz`` once had a ``shutting_down`` answer that no request could see: uvicorn stops
listening before the lifespan's shutdown begins. It is gone; tests/test_settings_serve.py
checks that SIGTERM stops the service taking connections.)
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from app.simulator import SimulatorConfig, create_simulator_app
from tests import clips
from tests.conftest import RunningServer, Service, ServiceFactory, Sim, free_socket
from tests.test_flow import callback_path, db_video
from tests.test_storage_s3 import (  # noqa: F401  (fixtures)
    Bucket,
    aws_env,
    bucket,
    moto_endpoint,
    s3_settings,
)

MP4 = clips.good_mp4()  # a real clip: every download is opened with PyAV
FAR = 4102444800  # 2100-01-01: an expireAt that does not matter


def assert_error_shape(body: dict[str, Any], code: str) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"], body
    return error


class Origin:
    """The clip host: a real HTTP server on 127.0.0.1 that records every request path."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        app = FastAPI()

        @app.middleware("http")
        async def record(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            self.requests.append(request.url.path)
            return await call_next(request)

        @app.get("/status/{code}.mp4")
        async def answer(code: int) -> Response:
            return Response(b"no", status_code=code)

        @app.get("/no-location.mp4")
        async def no_location() -> Response:
            return Response(status_code=302)

        @app.get("/chain/{left}.mp4")
        async def chain(left: int) -> Response:
            # ``left`` redirects to go, then the clip.
            if left == 0:
                return Response(MP4, media_type="video/mp4")
            return Response(status_code=302, headers={"Location": f"/chain/{left - 1}.mp4"})

        self.server = RunningServer(app, free_socket())

    @property
    def origin(self) -> str:
        return self.server.url

    def url(self, path: str) -> str:
        return f"{self.server.url}{path}"


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    origin = Origin()
    await origin.server.start()
    yield origin
    await origin.server.stop()


async def finished_callback(
    service: Service, video: dict[str, Any], url: str, expire_at: int = FAR
) -> dict[str, Any]:
    """hiapi's success callback for the video's task, with ``url`` as its output."""
    task = {
        "taskId": video["task_id"],
        "status": "success",
        "output": [{"type": "video", "url": url, "expireAt": expire_at}],
    }
    ack = await service.client.post(callback_path(video["id"]), json=task)
    assert ack.status_code == 200, ack.text
    body: dict[str, Any] = ack.json()
    return body


async def clip_host_service(services: ServiceFactory, sim: Sim, origin: Origin) -> Service:
    sim.set(callback_drop_rate=1.0)  # the test delivers the callback itself
    return await services.start(DOWNLOAD_ALLOWED_HOSTS=f"{sim.url},{origin.origin}")


# --- no_output ------------------------------------------------------------------------------


async def test_a_success_callback_without_output_fails_the_video_with_no_output(
    service: Service, sim: Sim
):
    sim.set(callback_drop_rate=1.0)
    empty, missing = await service.submit(), await service.submit()
    for video, task in (
        (empty, {"taskId": empty["task_id"], "status": "success", "output": []}),
        (missing, {"taskId": missing["task_id"], "status": "success"}),
    ):
        ack = await service.client.post(callback_path(video["id"]), json=task)
        assert (ack.status_code, ack.json()["outcome"]) == (200, "failed"), ack.text
        done = await service.get(video["id"])
        assert done["status"] == "failed"
        error = assert_error_shape({"error": done["error"]}, "no_output")
        assert "without an output URL" in error["message"]
        assert done["content_url"] is None and done["sha256"] is None
    assert (await sim.stats())["file_requests"] == 0


class PollAnswers:
    """A hiapi API on 127.0.0.1 whose ``GET /v1/tasks/{id}`` reports every task as a success
    without output (the simulator never does)."""

    def __init__(self) -> None:
        self.polls: list[str] = []
        app = FastAPI()

        @app.get("/v1/tasks/{task_id}")
        async def get_task(task_id: str) -> JSONResponse:
            self.polls.append(task_id)
            data = {"taskId": task_id, "status": "success", "output": []}
            return JSONResponse({"code": 200, "data": data, "message": "success"})

        self.server = RunningServer(app, free_socket())


async def test_a_polled_success_without_output_fails_the_video_with_no_output(
    services: ServiceFactory, sim: Sim
):
    # Replica A creates the task and never polls again (one tick at start); replica B's hiapi
    # answers the poll with a success that has no output.
    sim.set(callback_drop_rate=1.0, latency_seconds=30)
    hiapi = PollAnswers()
    await hiapi.server.start()
    try:
        front = await services.start(RECONCILE_AFTER_SECONDS=0.3, RECONCILE_INTERVAL_SECONDS=3600)
        video = await front.submit()
        poller = await services.start(RECONCILE_AFTER_SECONDS=0.3, HIAPI_BASE_URL=hiapi.server.url)
        done = await poller.wait_for(video["id"], "failed", timeout=10)
        assert_error_shape({"error": done["error"]}, "no_output")
        assert hiapi.polls == [video["task_id"]]
        assert (await db_video(poller, video["id"])).completed_via == "poll"
    finally:
        await hiapi.server.stop()


# --- task_not_found ---------------------------------------------------------------------------


async def start_simulator(sock: socket.socket) -> RunningServer:
    port = sock.getsockname()[1]
    config = SimulatorConfig(
        public_base_url=f"http://127.0.0.1:{port}",
        latency_seconds=30,
        callback_drop_rate=1.0,
        fetch_images=False,
        render_scale=0.1,
        seed=7,
    )
    server = RunningServer(create_simulator_app(config), sock)
    await server.start()
    return server


async def test_a_task_hiapi_forgot_fails_with_task_not_found_on_a_real_poll(
    services: ServiceFactory,
):
    # hiapi (the simulator) is restarted and has forgotten every task: the reconciler's poll
    # gets a real 404 for the video's task.
    # The second simulator serves the very socket the first one listened on (a duplicate of
    # its descriptor outlives the first server), so no other process can take the port in
    # between; a poll that arrives meanwhile waits in the backlog for the second.
    sock = free_socket()
    held = sock.dup()
    first = await start_simulator(sock)
    service = await services.start(
        HIAPI_BASE_URL=first.url,
        DOWNLOAD_ALLOWED_HOSTS=first.url,
        RECONCILE_AFTER_SECONDS=0.3,
    )
    video = await service.submit()
    assert video["status"] == "processing" and video["task_id"]
    await first.stop()
    second = await start_simulator(held)
    try:
        done = await service.wait_for(video["id"], "failed", timeout=10)
        error = assert_error_shape({"error": done["error"]}, "task_not_found")
        assert "no longer knows" in error["message"]
        assert done["task_id"] == video["task_id"]
        stats = (await service.client.get(f"{second.url}/_sim/stats")).json()
        assert stats["polls"] >= 1 and stats["tasks_created"] == 0
    finally:
        await second.stop()


# --- conflict -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["fail", "handling", "success"])
async def test_a_callback_naming_another_videos_task_on_a_queued_video_is_409_conflict(
    service: Service, sim: Sim, status: str
):
    # The video has no task id yet (hiapi answers 503 to every create, so it stays queued).
    # A callback on its signed URL names the task of another video: recording it would
    # give two videos one task id, which the unique index refuses.
    sim.set(callback_drop_rate=1.0, latency_seconds=30)
    other = await service.submit()
    sim.set(error_5xx_rate=1.0)
    video = await service.submit()
    assert video["status"] == "queued" and video["task_id"] is None
    task: dict[str, Any] = {"taskId": other["task_id"], "status": status}
    if status == "fail":
        task["error"] = {"code": "generation_failed", "message": "no"}
    if status == "success":
        url = f"{sim.url}/files/whatever.mp4"
        task["output"] = [{"type": "video", "url": url, "expireAt": FAR}]
    response = await service.client.post(callback_path(video["id"]), json=task)
    assert response.status_code == 409, response.text
    error = assert_error_shape(response.json(), "conflict")
    assert "retry" in error["message"]
    # Nothing changed: the video still waits for its own task, the other keeps its own.
    now = await service.get(video["id"])
    assert (now["status"], now["task_id"], now["error"]) == ("queued", None, None)
    assert (await service.get(other["id"]))["status"] == "processing"
    assert (await service.get(other["id"]))["task_id"] == other["task_id"]
    assert (await sim.stats())["file_requests"] == 0


# --- content_missing ------------------------------------------------------------------------


async def test_a_ready_video_whose_file_was_removed_is_content_missing(service: Service, sim: Sim):
    video = await service.submit()
    await service.wait_for(video["id"], "ready")
    stored = service.ctx.storage.path(service.ctx.storage.key_for(uuid.UUID(video["id"])))
    stored.unlink()
    for headers in ({}, {"Range": "bytes=0-99"}):
        response = await service.client.get(f"/v1/videos/{video['id']}/content", headers=headers)
        assert response.status_code == 500, response.text
        assert response.headers["content-type"] == "application/json"
        error = assert_error_shape(response.json(), "content_missing")
        assert video["id"] in error["message"]
        assert str(stored) not in error["message"]  # no server paths
    assert (await service.get(video["id"]))["status"] == "ready"


# --- storage_unavailable ------------------------------------------------------------------


async def test_a_replica_without_s3_credentials_answers_storage_unavailable(
    services: ServiceFactory,
    sim: Sim,
    bucket: Bucket,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    # Replica A stores the clip in S3 (moto on 127.0.0.1). Replica B starts without any
    # credentials: signing the content link fails, and the caller is told the store is down.
    writer = await services.start(**s3_settings(bucket))
    video = await writer.submit()
    await writer.wait_for(video["id"], "ready")
    assert (await writer.client.get(f"/v1/videos/{video['id']}/content")).status_code == 307
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    reader = await services.start(**s3_settings(bucket))
    response = await reader.client.get(f"/v1/videos/{video['id']}/content")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    error = assert_error_shape(response.json(), "storage_unavailable")
    assert "retry" in error["message"]
    assert "testing-" not in response.text and "credential" not in response.text.lower()
    assert (await reader.get(video["id"]))["status"] == "ready"


# --- the downloader against a real clip host --------------------------------------------------


@pytest.mark.parametrize("code", [400, 401])
async def test_a_clip_host_refusing_the_request_fails_with_download_http_code(
    services: ServiceFactory, sim: Sim, origin: Origin, code: int
):
    service = await clip_host_service(services, sim, origin)
    video = await service.submit()
    await finished_callback(service, video, origin.url(f"/status/{code}.mp4"))
    done = await service.wait_for(video["id"], "failed", timeout=5)
    error = assert_error_shape({"error": done["error"]}, f"download_http_{code}")
    assert f"HTTP {code}" in error["message"]
    row = await db_video(service, video["id"])
    assert row.download_attempts == 1 and row.lease_owner is None  # never retried
    assert origin.requests == [f"/status/{code}.mp4"]


async def test_a_redirect_without_location_is_bad_redirect(
    services: ServiceFactory, sim: Sim, origin: Origin
):
    service = await clip_host_service(services, sim, origin)
    video = await service.submit()
    await finished_callback(service, video, origin.url("/no-location.mp4"))
    done = await service.wait_for(video["id"], "failed", timeout=5)
    error = assert_error_shape({"error": done["error"]}, "bad_redirect")
    assert "without a Location" in error["message"]
    assert (await db_video(service, video["id"])).download_attempts == 1
    assert origin.requests == ["/no-location.mp4"]


async def test_five_redirects_are_followed_and_a_sixth_is_too_many_redirects(
    services: ServiceFactory, sim: Sim, origin: Origin
):
    service = await clip_host_service(services, sim, origin)
    followed, looping = await service.submit(), await service.submit()
    await finished_callback(service, followed, origin.url("/chain/5.mp4"))
    ready = await service.wait_for(followed["id"], "ready", "failed", timeout=5)
    assert ready["status"] == "ready", ready["error"]
    assert ready["size_bytes"] == len(MP4)
    assert origin.requests == [f"/chain/{n}.mp4" for n in range(5, -1, -1)]

    origin.requests.clear()
    await finished_callback(service, looping, origin.url("/chain/6.mp4"))
    done = await service.wait_for(looping["id"], "failed", timeout=5)
    error = assert_error_shape({"error": done["error"]}, "too_many_redirects")
    assert "more than 5 redirects" in error["message"]
    assert origin.requests == [f"/chain/{n}.mp4" for n in range(6, 0, -1)]  # /chain/0 never
    assert (await db_video(service, looping["id"])).download_attempts == 1


async def test_a_clip_host_failing_until_expire_at_ends_expired_after_retries(
    services: ServiceFactory, sim: Sim, origin: Origin
):
    # Every attempt gets a 503 (transient: retried with backoff); the URL's expireAt comes
    # first, and the retry that would fall after it is not made: the video ends expired.
    service = await clip_host_service(services, sim, origin)
    video = await service.submit()
    expire_at = int(time.time()) + 2
    await finished_callback(service, video, origin.url("/status/503.mp4"), expire_at=expire_at)
    done = await service.wait_for(video["id"], "failed", timeout=10)
    error = assert_error_shape({"error": done["error"]}, "expired")
    row = await db_video(service, video["id"])
    # Retries ran out: at least two requests were made and refused with 503 before the video
    # was given up, whether the last retry was not scheduled past the deadline ("gave up
    # before ...", naming the last error) or a retry claimed on a busy machine found the
    # deadline already past (its error names the expiry; the 503 is the last error before).
    assert len(origin.requests) >= 2, origin.requests
    assert set(origin.requests) == {"/status/503.mp4"}
    assert len(origin.requests) <= row.download_attempts and row.lease_owner is None
    if error["message"].startswith("gave up before the output URL expired"):
        assert "HTTP 503" in error["message"], error
    else:
        assert error["message"].startswith("the output URL expired"), error
