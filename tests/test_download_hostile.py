"""Hostile download targets: redirects off the allowlist, bodies that lie about their size,
files that are not MP4s. A callback's URL is never trusted, even with a valid token."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from app.security import webhook_token
from tests import clips
from tests.conftest import WEBHOOK_SECRET, RunningServer, ServiceFactory, Sim, free_socket

MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


def origin_app() -> FastAPI:
    app = FastAPI()

    @app.get("/clip.mp4")
    async def clip() -> Response:
        return Response(clips.good_mp4(), media_type="video/mp4")

    @app.get("/redirect-out.mp4")
    async def redirect_out() -> RedirectResponse:
        return RedirectResponse("http://169.254.169.254/latest/meta-data", status_code=302)

    @app.get("/redirect-in.mp4")
    async def redirect_in() -> RedirectResponse:
        return RedirectResponse("/clip.mp4", status_code=302)

    @app.get("/endless.mp4")
    async def endless() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield MP4_HEAD
            for _ in range(10_000):  # ~640 MB if nobody stops reading; no Content-Length
                yield b"\0" * 65536

        return StreamingResponse(body(), media_type="video/mp4")

    @app.get("/page.mp4")
    async def page() -> Response:
        return Response(b"<html>not a video</html>" * 10, media_type="video/mp4")

    return app


@pytest.fixture
async def origin() -> AsyncIterator[RunningServer]:
    server = RunningServer(origin_app(), free_socket())
    await server.start()
    yield server
    await server.stop()


async def deliver(service: Any, video: dict[str, Any], url: str) -> None:
    token = webhook_token(WEBHOOK_SECRET.encode(), uuid.UUID(video["id"]))
    task = {
        "taskId": video["task_id"],
        "status": "success",
        "output": [{"type": "video", "url": url, "expireAt": 4102444800}],
    }
    ack = await service.client.post(f"/webhooks/hiapi/{video['id']}/{token}", json=task)
    assert ack.status_code == 200


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/redirect-out.mp4", "host_not_allowed"),
        ("/endless.mp4", "too_large"),
        ("/page.mp4", "not_mp4"),
    ],
)
async def test_hostile_targets_fail_cleanly(
    services: ServiceFactory, sim: Sim, origin: RunningServer, path: str, code: str
):
    sim.set(callback_drop_rate=1.0)
    service = await services.start(DOWNLOAD_ALLOWED_HOSTS=origin.url, MAX_VIDEO_BYTES=2_000_000)
    video = await service.submit()
    await deliver(service, video, f"{origin.url}{path}")
    done = await service.wait_for(video["id"], "failed")
    assert done["error"]["code"] == code
    assert done["content_url"] is None
    assert not list(service.settings.STORAGE_DIR.glob("*/*.mp4"))  # nothing stored
    partials = service.settings.STORAGE_DIR / ".partial"
    assert not partials.exists() or not list(partials.iterdir())


async def test_redirect_within_the_allowlist_is_followed(
    services: ServiceFactory, sim: Sim, origin: RunningServer
):
    sim.set(callback_drop_rate=1.0)
    service = await services.start(DOWNLOAD_ALLOWED_HOSTS=origin.url)
    video = await service.submit()
    await deliver(service, video, f"{origin.url}/redirect-in.mp4")
    done = await service.wait_for(video["id"], "ready")
    assert done["size_bytes"] == len(clips.good_mp4())
