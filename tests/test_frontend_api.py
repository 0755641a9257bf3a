"""Uploads, live status (SSE) and notify_url pushes, through the real service."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from PIL import Image

from tests.conftest import RunningServer, Service, ServiceFactory, Sim, free_socket

NOTIFY_SECRET = "whsec_" + base64.b64encode(b"receiver-shared-secret-0123456789").decode()


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(service: Service, data: bytes, name: str = "still.png") -> Any:
    return await service.client.post("/v1/images", files={"file": (name, data, "image/png")})


class TestImages:
    async def test_upload_then_video_from_image_id(self, service: Service, sim: Sim):
        sim.set(allow_http_image_urls=True)  # the test server is plain http
        data = png_bytes()
        response = await upload(service, data)
        assert response.status_code == 201, response.text
        image = response.json()
        assert (image["content_type"], image["width"], image["height"]) == ("image/png", 64, 48)
        assert image["sha256"] == hashlib.sha256(data).hexdigest()
        served = await service.client.get(image["url"].removeprefix(service.settings.public_base))
        assert served.status_code == 200
        assert served.content == data and served.headers["content-type"] == "image/png"

        video = (
            await service.client.post("/v1/videos", json={"image_id": image["id"], "duration": 3})
        ).json()
        assert video["image_id"] == image["id"] and video["image_url"] == image["url"]
        await service.wait_for(video["id"], "ready")

    @pytest.mark.parametrize(
        ("data", "name"),
        [
            (b"just some text, not an image", "fake.png"),
            (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "broken.png"),
            (b"GIF89a" + b"\0" * 40, "anim.gif"),
        ],
    )
    async def test_non_images_are_415_and_nothing_is_stored(
        self, service: Service, data: bytes, name: str
    ):
        response = await upload(service, data, name)
        assert response.status_code == 415
        assert response.json()["error"]["code"] == "unsupported_image"
        images = service.settings.STORAGE_DIR / "images"
        assert not images.exists() or not any(images.iterdir()), "a rejected upload was stored"

    async def test_too_large_is_413(self, services: ServiceFactory):
        service = await services.start(IMAGE_MAX_BYTES=1000)
        response = await upload(service, png_bytes(400, 400))
        assert response.status_code == 413

    async def test_missing_file_part_is_422(self, service: Service):
        response = await service.client.post("/v1/images", data={"nope": "x"})
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "file"

    async def test_image_of_another_key_cannot_be_used(self, services: ServiceFactory, sim: Sim):
        keys = "a:key-a-0123456789abcdef,b:key-b-0123456789abcdef"
        service = await services.start(API_KEYS=keys)
        image = (
            await service.client.post(
                "/v1/images",
                files={"file": ("s.png", png_bytes(), "image/png")},
                headers={"Authorization": "Bearer key-a-0123456789abcdef"},
            )
        ).json()
        response = await service.client.post(
            "/v1/videos",
            json={"image_id": image["id"]},
            headers={"Authorization": "Bearer key-b-0123456789abcdef"},
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "image_id"

    async def test_images_are_removed_after_retention_once_the_video_ended(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(allow_http_image_urls=True)
        service = await services.start(IMAGE_RETENTION_SECONDS=0.5)
        image = (await upload(service, png_bytes())).json()
        video = (await service.client.post("/v1/videos", json={"image_id": image["id"]})).json()
        await service.wait_for(video["id"], "ready")
        path = image["url"].removeprefix(service.settings.public_base)
        for _ in range(100):
            if (await service.client.get(path)).status_code == 404:
                break
            await asyncio.sleep(0.1)
        assert (await service.client.get(path)).status_code == 404
        assert not list((service.settings.STORAGE_DIR / "images").glob("*"))


async def read_events(
    service: Service, video_id: str, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with service.client.stream(
        "GET", f"/v1/videos/{video_id}/events", headers=headers, timeout=30
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":") and ":" in line:
                key, _, value = line.partition(":")
                current[key] = value.strip()
    return events


class TestEvents:
    async def test_stream_follows_status_to_the_final_event(self, service: Service, sim: Sim):
        sim.set(latency_seconds=0.6)
        video = await service.submit()
        events = await read_events(service, video["id"])
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "ready"
        assert set(kinds[:-1]) <= {"status"}
        statuses = [json.loads(e["data"])["status"] for e in events]
        assert statuses[-1] == "ready" and "processing" in statuses
        assert statuses == sorted(
            statuses, key=["queued", "processing", "downloading", "ready"].index
        )
        final = json.loads(events[-1]["data"])
        assert final["sha256"] and final["content_url"]

    async def test_resume_with_last_event_id_sends_only_what_changed(
        self, service: Service, sim: Sim
    ):
        video = await service.submit()
        await service.wait_for(video["id"], "ready")
        assert await read_events(service, video["id"], last_event_id="4-ready") == []
        again = await read_events(service, video["id"], last_event_id="2-processing")
        assert [e["event"] for e in again] == ["ready"]

    async def test_events_of_unknown_video_is_404_json(self, service: Service):
        response = await service.client.get(
            "/v1/videos/00000000-0000-0000-0000-000000000000/events"
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            self.requests.append((dict(request.headers), await request.body()))
            if len(self.requests) <= self.fail_first:
                return Response(status_code=500)
            return Response(status_code=204)

        self.server = RunningServer(app, free_socket())

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(headers["webhook-signature"], f"v1,{expected}")


class TestNotify:
    @pytest.fixture
    async def receiver(self) -> Any:
        receiver = Receiver(fail_first=2)
        await receiver.server.start()
        yield receiver
        await receiver.server.stop()

    async def test_ready_video_is_pushed_signed_and_retried_until_delivered(
        self, services: ServiceFactory, sim: Sim, receiver: Receiver
    ):
        service = await services.start(NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True)
        video = await service.submit(notify_url=receiver.url)
        assert video["notify"]["status"] == "waiting"
        await service.wait_for(video["id"], "ready")
        for _ in range(200):
            current = await service.get(video["id"])
            if current["notify"]["status"] == "delivered":
                break
            await asyncio.sleep(0.05)
        assert current["notify"]["status"] == "delivered"
        assert current["notify"]["attempts"] == 3
        assert len(receiver.requests) == 3
        ids = {headers["webhook-id"] for headers, _ in receiver.requests}
        assert len(ids) == 1  # the same message id on every retry, so receivers can dedupe
        headers, body = receiver.requests[-1]
        assert verify(NOTIFY_SECRET, headers, body)
        assert not verify("whsec_" + base64.b64encode(b"another secret").decode(), headers, body)
        payload = json.loads(body)
        assert payload["type"] == "video.ready"
        assert payload["data"]["id"] == video["id"] and payload["data"]["sha256"]

    async def test_failed_video_is_pushed_too(
        self, services: ServiceFactory, sim: Sim, receiver: Receiver
    ):
        sim.set(fail_rate=1.0)
        receiver.fail_first = 0
        service = await services.start(NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True)
        video = await service.submit(notify_url=receiver.url)
        await service.wait_for(video["id"], "failed")
        for _ in range(200):
            if receiver.requests:
                break
            await asyncio.sleep(0.05)
        assert json.loads(receiver.requests[0][1])["type"] == "video.failed"

    async def test_notify_url_needs_a_secret_and_https(self, services: ServiceFactory, sim: Sim):
        plain = await services.start()
        response = await plain.client.post(
            "/v1/videos",
            json={
                "image_url": "https://example.invalid/a.jpg",
                "notify_url": "https://x.example/h",
            },
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "notify_url"
        assert "NOTIFY_SECRET" in response.json()["error"]["message"]
        strict = await services.start(NOTIFY_SECRET=NOTIFY_SECRET)
        response = await strict.client.post(
            "/v1/videos",
            json={"image_url": "https://example.invalid/a.jpg", "notify_url": "http://x.example/h"},
        )
        assert response.status_code == 422
        assert "https" in response.json()["error"]["message"]
        assert (await sim.stats())["create_requests"] == 0
