"""``HEAD`` on the two URLs a browser or a proxy fetches by itself: the clip answers as ``GET``
would without the body, the event stream answers ``200 text/event-stream`` without opening."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import httpx

from tests.conftest import Service, ServiceFactory
from tests.test_signed_urls import KEY, ORIGIN, anonymous, keyed, local


async def raw_head(service: Service, path: str, **headers: str) -> tuple[str, bytes]:
    """``HEAD path`` on a socket of its own: the response head, and every byte the server sent
    after it before closing (``Connection: close``), which must be none."""
    host, port = urlsplit(service.server.url).hostname, urlsplit(service.server.url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [f"HEAD {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, rest = received.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


class TestHead:
    async def test_head_on_content_answers_like_get_without_the_body(
        self, services: ServiceFactory
    ):
        service = await keyed(services)
        video = await service.submit()
        ready = await service.wait_for(video["id"], "ready")
        path = f"/v1/videos/{video['id']}/content"
        whole = await service.client.get(path)
        assert whole.status_code == 200

        head = await service.client.head(path)
        assert head.status_code == 200, head.text
        assert head.content == b""
        assert head.headers["content-length"] == str(len(whole.content)) == str(ready["size_bytes"])
        assert head.headers["content-type"] == "video/mp4"
        assert head.headers["accept-ranges"] == "bytes"
        assert head.headers["etag"] == whole.headers["etag"]

        part = await service.client.head(path, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == b""
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
        assert part.headers["content-length"] == "100"

        # The signed content_url, with no Authorization header, as a browser sends it.
        async with anonymous(service) as browser:
            signed = await browser.head(local(ready["content_url"], service))
            assert signed.status_code == 200
            assert signed.headers["content-length"] == str(len(whole.content))
            assert (await browser.head(path)).status_code == 401
        assert (await service.client.head(f"/v1/videos/{uuid.uuid4()}/content")).status_code == 404

        status, rest = await raw_head(service, path, Authorization=f"Bearer {KEY}")
        assert status.startswith("HTTP/1.1 200 "), status
        assert rest == b""

    async def test_head_on_events_is_200_event_stream_with_no_body(self, services: ServiceFactory):
        service = await keyed(services, EVENTS_MAX_STREAMS=1)
        video = await service.submit()
        ready = await service.wait_for(video["id"], "ready")
        path = f"/v1/videos/{video['id']}/events"

        head = await service.client.head(path)
        assert head.status_code == 200, head.text
        assert head.headers["content-type"].startswith("text/event-stream")
        assert head.headers["cache-control"] == "no-cache"
        assert "content-length" not in head.headers  # GET streams with no length
        # The server sends nothing after the head and closes: no stream was opened.
        status, rest = await raw_head(service, path, Authorization=f"Bearer {KEY}")
        assert status.startswith("HTTP/1.1 200 ") and "text/event-stream" in status, status
        assert rest == b""

        async with anonymous(service) as browser:
            signed = local(ready["events_url"], service)
            assert (await browser.head(signed)).status_code == 200
            tampered = signed.replace("sig=", "sig=A")
            refused = await browser.head(tampered)
            assert refused.status_code == 403 and refused.content == b""
            assert (await browser.head(path)).status_code == 401
            # HEAD holds no stream slot: with EVENTS_MAX_STREAMS=1, a GET still streams.
            for _ in range(3):
                assert (await browser.head(signed)).status_code == 200
            async with browser.stream("GET", signed) as stream:
                assert stream.status_code == 200
        assert (await service.client.head(f"/v1/videos/{uuid.uuid4()}/events")).status_code == 404

    async def test_cross_origin_head_is_allowed(self, services: ServiceFactory):
        service = await keyed(services, CORS_ORIGINS=ORIGIN)
        video = await service.submit()
        async with httpx.AsyncClient(base_url=service.server.url, timeout=10) as browser:
            preflight = await browser.options(
                f"/v1/videos/{video['id']}/content",
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": "HEAD",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
        assert preflight.status_code == 200, preflight.text
        assert "HEAD" in preflight.headers["access-control-allow-methods"]
