"""The request guard: callers are checked before a body is read, and bodies are capped while
they stream (chunked included), through a real server on 127.0.0.1 and raw sockets."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import uuid
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from app.auth import ApiKeys
from app.db import utc_now
from app.limits import DRAIN_BYTES, MULTIPART_ALLOWANCE, RequestGuard
from app.models import Image
from tests.conftest import Service, ServiceFactory, Sim

KEY = "0123456789abcdef0123"
KEYS = f"name:{KEY}"
AUTH = {"Authorization": f"Bearer {KEY}"}
BOUNDARY = "guardboundary1234"
WAIT = 3.0  # the old code waits for the body forever: a reply must come well before this


@pytest.fixture
async def sqlite_services(
    tmp_path: Path, sqlite_template: Path, sim: Sim
) -> AsyncIterator[ServiceFactory]:
    """For checks made before any route runs (no database involved): SQLite only."""
    target = tmp_path / "videorelay.db"
    shutil.copy(sqlite_template, target)
    factory = ServiceFactory(f"sqlite+aiosqlite:///{target}", tmp_path / "videos", sim)
    yield factory
    for service in list(factory.running):
        await factory.stop(service)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def error(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)["error"]
        return data


async def exchange(service: Service, head: str, *parts: bytes) -> Reply:
    """Send a request head and some body bytes, never the rest; read the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.server.port)
    try:
        writer.write(head.encode("latin-1"))
        for part in parts:
            writer.write(part)
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT)
        return Reply(status, headers, body)
    finally:
        writer.close()


def head(path: str, *headers: str) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return "\r\n".join(lines) + "\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def multipart_start(name: str = "still.png") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def multipart(data: bytes) -> bytes:
    return multipart_start() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 80, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


async def nothing_stored(service: Service) -> None:
    images = service.settings.STORAGE_DIR / "images"
    assert not images.exists() or not any(images.iterdir()), "a refused upload was stored"
    async with service.ctx.sessionmaker() as session:
        count = (await session.execute(select(func.count()).select_from(Image))).scalar_one()
    assert count == 0, "a refused upload left an images row"


class TestCallerFirst:
    @pytest.mark.parametrize(
        ("path", "headers"),
        [
            ("/v1/videos", ("Content-Type: application/json", "Content-Length: 400000000")),
            ("/v1/videos", ("Content-Type: application/json", "Transfer-Encoding: chunked")),
            (
                "/v1/images",
                (
                    f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
                    "Content-Length: 300000000",
                ),
            ),
        ],
    )
    async def test_no_or_bad_key_is_401_before_any_body_byte_is_sent(
        self, sqlite_services: ServiceFactory, path: str, headers: tuple[str, ...]
    ):
        service = await sqlite_services.start(API_KEYS=KEYS)
        for auth in ((), ("Authorization: Bearer wrong-key-0123456789abc",)):
            reply = await exchange(service, head(path, *headers, *auth))
            assert reply.status == 401
            assert reply.error()["code"] == "unauthorized"
            assert reply.headers["www-authenticate"] == "Bearer"
            assert reply.headers["connection"] == "close"  # the unread body is not drained
            assert reply.headers["x-content-type-options"] == "nosniff"  # policies still apply

    async def test_small_unauthenticated_body_keeps_the_connection(
        self, sqlite_services: ServiceFactory
    ):
        service = await sqlite_services.start(API_KEYS=KEYS)
        response = await service.client.post("/v1/videos", json={"duration": 3})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert "connection" not in response.headers


class TestCaps:
    @pytest.mark.parametrize("keys", ["", KEYS], ids=["open-api", "with-keys"])
    async def test_over_cap_chunked_json_is_413_while_it_streams(
        self, sqlite_services: ServiceFactory, keys: str
    ):
        service = await sqlite_services.start(API_KEYS=keys, MAX_JSON_BODY_BYTES=1024)
        auth = (f"Authorization: Bearer {KEY}",) if keys else ()
        # No Content-Length and no final chunk: the guard must end it by itself, once it has
        # read (and dropped) DRAIN_BYTES past the cap, closing the connection.
        reply = await exchange(
            service,
            head(
                "/v1/videos", "Content-Type: application/json", "Transfer-Encoding: chunked", *auth
            ),
            chunk(b"{" + b" " * 1023),
            chunk(b" " * (DRAIN_BYTES + 1)),
        )
        assert reply.status == 413
        error = reply.error()
        assert error["code"] == "too_large"
        assert "1024 bytes" in error["message"] and "MAX_JSON_BODY_BYTES" in error["message"]
        assert reply.headers["connection"] == "close"

        async def body() -> AsyncIterator[bytes]:  # 512 KiB: within the drain, a clean 413
            yield b'{"prompt": "'
            for _ in range(32):
                yield b"x" * 16384

        response = await service.client.post(
            "/v1/videos",
            content=body(),
            headers={"Content-Type": "application/json", **(AUTH if keys else {})},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"

    async def test_declared_length_over_cap_is_413_before_reading(
        self, sqlite_services: ServiceFactory
    ):
        service = await sqlite_services.start(API_KEYS=KEYS, IMAGE_MAX_BYTES=10_000)
        for path, content_type, limit, setting in (
            ("/v1/videos", "application/json", 65536, "MAX_JSON_BODY_BYTES"),
            ("/v1/images", f"multipart/form-data; boundary={BOUNDARY}", 10_000, "IMAGE_MAX_BYTES"),
        ):
            reply = await exchange(
                service,
                head(
                    path,
                    f"Content-Type: {content_type}",
                    "Content-Length: 400000000",
                    f"Authorization: Bearer {KEY}",
                ),
            )
            assert reply.status == 413
            assert f"{limit} bytes ({setting})" in reply.error()["message"]

    async def test_over_cap_upload_is_413_mid_stream_and_nothing_is_stored(
        self, services: ServiceFactory
    ):
        limit = 50_000
        service = await services.start(API_KEYS=KEYS, IMAGE_MAX_BYTES=limit)
        content_type = f"Content-Type: multipart/form-data; boundary={BOUNDARY}"
        # Chunked and unfinished: the reply cannot wait for the end of the body.
        start = multipart_start()
        reply = await exchange(
            service,
            head(
                "/v1/images",
                content_type,
                "Transfer-Encoding: chunked",
                f"Authorization: Bearer {KEY}",
            ),
            chunk(start),
            chunk(b"\0" * (limit + MULTIPART_ALLOWANCE + DRAIN_BYTES + 1 - len(start))),
        )
        assert reply.status == 413
        assert reply.error()["code"] == "too_large"
        assert f"{limit} bytes (IMAGE_MAX_BYTES)" in reply.error()["message"]
        assert reply.headers["connection"] == "close"

        async def big() -> AsyncIterator[bytes]:  # a whole 1 MiB upload, streamed chunked
            yield multipart_start()
            for _ in range(16):
                yield b"\0" * 65536
            yield f"\r\n--{BOUNDARY}--\r\n".encode()

        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **AUTH}
        response = await service.client.post("/v1/images", content=big(), headers=headers)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"
        # Within the framing allowance the stream passes; the route holds the file to the limit.
        just_over = multipart(png_bytes() + b"\0" * limit)
        response = await service.client.post("/v1/images", content=just_over, headers=headers)
        assert response.status_code == 413
        assert f"{limit} bytes (IMAGE_MAX_BYTES)" in response.json()["error"]["message"]
        await nothing_stored(service)

    async def test_normal_upload_and_submit_still_work(self, services: ServiceFactory, sim: Sim):
        sim.set(allow_http_image_urls=True)
        service = await services.start(API_KEYS=KEYS, IMAGE_MAX_BYTES=50_000)
        upload = await service.client.post(
            "/v1/images", files={"file": ("s.png", png_bytes(), "image/png")}, headers=AUTH
        )
        assert upload.status_code == 201, upload.text
        image = upload.json()
        response = await service.client.post(
            "/v1/videos",
            json={"image_id": image["id"], "duration": 3, "prompt": "p" * 1000},
            headers=AUTH,
        )
        assert response.status_code == 202, response.text

        async def chunked() -> AsyncIterator[bytes]:  # chunked and under the cap: accepted
            yield json.dumps({"image_id": image["id"], "duration": 3}).encode()

        response = await service.client.post(
            "/v1/videos",
            content=chunked(),
            headers={"Content-Type": "application/json", **AUTH},
        )
        assert response.status_code == 202, response.text

    async def test_webhook_is_not_guarded(self, sqlite_services: ServiceFactory):
        service = await sqlite_services.start(MAX_JSON_BODY_BYTES=1024)
        body = json.dumps({"id": "t", "status": "completed", "pad": "x" * 10_000})
        response = await service.client.post(
            f"/webhooks/hiapi/{uuid.uuid4()}/not-the-token",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 404  # its own token check, not the /v1 cap


async def test_no_second_response_once_one_has_started():
    """A reader that has already started its response gets the error, not a second reply."""
    sent: list[MutableMapping[str, Any]] = []
    errors: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while (await receive())["more_body"]:
                pass
        except Exception as exc:
            errors.append(exc)
            raise

    pieces = [b"x" * 600, b"x" * 600, b"x" * 600]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": pieces.pop(), "more_body": bool(pieces)}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    guard = RequestGuard(app, json_max_bytes=1000, image_max_bytes=1000)
    scope = {
        "type": "http",
        "path": "/v1/videos",
        "method": "POST",
        "headers": [(b"transfer-encoding", b"chunked")],
        # The members of the service's context the guard reads (an open API, no tokens).
        "app": SimpleNamespace(
            state=SimpleNamespace(
                ctx=SimpleNamespace(
                    api_keys=ApiKeys({}), client_tokens=None, url_signer=None, clock=utc_now
                )
            )
        ),
    }
    await guard(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start"]
    assert errors and getattr(errors[0], "status_code", None) == 413
