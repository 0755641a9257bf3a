"""Signed, expiring ``content_url`` and ``events_url``: what a browser fetches by itself, with
no ``Authorization`` header, reads one video until ``exp`` and nothing else."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.auth import GRANT_OWNER, Caller
from app.db import utc_now
from app.logging import redact
from tests.conftest import ChildServer, Service, ServiceFactory, child_env, videorelay
from tests.test_frontend_api import NOTIFY_SECRET, Receiver

KEY = "signed-urls-key-0123456789"
OTHER = "signed-urls-other-0123456789"
KEYS = f"app:{KEY},other:{OTHER}"
ORIGIN = "https://front.example.com"


class Clock:
    """The service's clock: real time plus an offset the test moves (no sleeping)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utc_now() + self.offset


def split(url: str) -> tuple[str, dict[str, str]]:
    """The path of an absolute URL, and its query parameters."""
    parts = urlsplit(url)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


async def keyed(services: ServiceFactory, clock: Clock | None = None, **more: Any) -> Service:
    service = await services.start(API_KEYS=KEYS, clock=clock, **more)
    service.client.headers["Authorization"] = f"Bearer {KEY}"
    return service


def anonymous(service: Service) -> httpx.AsyncClient:
    """A browser's view: the same server, no Authorization header."""
    return httpx.AsyncClient(base_url=service.server.url, timeout=10)


def local(url: str, service: Service) -> str:
    """``url`` (absolute, on PUBLIC_BASE_URL) as a path and query on the test's client."""
    assert url.startswith(service.settings.public_base + "/"), url
    return url[len(service.settings.public_base) :]


async def read_sse(client: httpx.AsyncClient, url: str, **headers: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    current: dict[str, str] = {}
    async with client.stream("GET", url, headers=headers, timeout=30) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                if "event" in current:
                    events.append({**current, "data": json.loads(current["data"])})
                current = {}
            elif not line.startswith(":") and ":" in line:
                key, _, value = line.partition(":")
                current[key] = value.strip()
    return events


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == code
    assert response.headers["content-type"] == "application/json"


class TestSignedUrls:
    async def test_signed_content_plays_and_seeks_with_no_authorization(
        self, services: ServiceFactory
    ):
        service = await keyed(services)
        video = await service.submit()
        assert video["content_url"] is None
        ready = await service.wait_for(video["id"], "ready")
        path, query = split(ready["content_url"])
        assert path == f"/v1/videos/{video['id']}/content" and set(query) == {"exp", "sig"}
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", query["sig"])  # base64url, no padding
        lifetime = int(query["exp"]) - utc_now().timestamp()
        assert 3590 < lifetime <= 3600

        whole = (await service.client.get(f"/v1/videos/{video['id']}/content")).content
        async with anonymous(service) as browser:
            url = local(ready["content_url"], service)
            played = await browser.get(url)
            assert played.status_code == 200 and played.content == whole
            assert played.headers["content-type"] == "video/mp4"
            part = await browser.get(url, headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.content == whole[100:200]
            assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"

            # The plain URL still needs the key.
            plain = await browser.get(f"/v1/videos/{video['id']}/content")
            assert plain.status_code == 401

        # Each read hands out a freshly signed URL.
        again = await service.get(video["id"])
        assert again["content_url"].startswith(service.settings.public_base + path + "?exp=")

    async def test_events_url_streams_cross_origin_with_no_credentials(
        self, services: ServiceFactory
    ):
        service = await keyed(services, CORS_ORIGINS=ORIGIN)
        video = await service.submit()
        path, query = split(video["events_url"])
        assert path == f"/v1/videos/{video['id']}/events" and set(query) == {"exp", "sig"}
        async with anonymous(service) as browser:
            response_headers: dict[str, str] = {}
            events = await read_sse(browser, local(video["events_url"], service), Origin=ORIGIN)
            async with browser.stream(
                "GET", local(video["events_url"], service), headers={"Origin": ORIGIN}
            ) as r:
                response_headers = dict(r.headers)
        assert events[-1]["event"] == "ready"
        assert response_headers["access-control-allow-origin"] == ORIGIN
        assert "access-control-allow-credentials" not in response_headers
        # Every event's video carries signed URLs that work in turn.
        final = events[-1]["data"]
        assert split(final["events_url"])[0] == path
        async with anonymous(service) as browser:
            clip = await browser.get(local(final["content_url"], service))
            assert clip.status_code == 200 and clip.content[4:8] == b"ftyp"

    async def test_tampered_urls_are_bad_signature_and_serve_nothing(
        self, services: ServiceFactory
    ):
        service = await keyed(services)
        first = await service.submit()
        second = await service.submit()
        ready = await service.wait_for(first["id"], "ready")
        await service.wait_for(second["id"], "ready")
        path, query = split(ready["content_url"])
        exp, sig = query["exp"], query["sig"]
        flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
        events_path = f"/v1/videos/{first['id']}/events"
        tampered = [
            f"/v1/videos/{second['id']}/content?exp={exp}&sig={sig}",  # another video
            f"/v1/videos/{first['id']}/events?exp={exp}&sig={sig}",  # another path
            f"{path}?exp={int(exp) + 1}&sig={sig}",  # a later expiry
            f"{path}?exp={exp}&sig={flipped}",
            f"{path}?exp={exp}&sig={sig}A",
            f"{path}?exp={exp}&sig={sig}%21",  # a stray character base64 decoders skip
            f"{path}?exp={exp}&sig={sig}=",  # padding
            f"{path}?exp={exp}",
            f"{path}?sig={sig}",
            f"{path}?exp={exp}&sig={sig}&sig={sig}",
            f"{path}?exp=+{exp}&sig={sig}",
            f"{path}?exp=&sig=",
            f"{events_path}?exp={exp}&sig=",
        ]
        async with anonymous(service) as browser:
            for url in tampered:
                response = await browser.get(url, headers={"Range": "bytes=0-99"})
                assert_refused(response, "bad_signature")
                assert b"ftyp" not in response.content
            head = await browser.head(f"/v1/videos/{second['id']}/content?exp={exp}&sig={sig}")
            assert head.status_code == 403
            # The untouched URL still plays.
            assert (await browser.get(f"{path}?exp={exp}&sig={sig}")).status_code == 200

    async def test_expired_url_says_get_the_video_again(self, services: ServiceFactory):
        clock = Clock()
        service = await keyed(services, clock=clock, SIGNED_URL_TTL_SECONDS=60)
        video = await service.submit()
        ready = await service.wait_for(video["id"], "ready")
        content, events = local(ready["content_url"], service), local(ready["events_url"], service)
        async with anonymous(service) as browser:
            clock.offset = timedelta(seconds=50)
            assert (await browser.get(content)).status_code == 200
            clock.offset = timedelta(seconds=61)
            for url in (content, events):
                response = await browser.get(url)
                assert_refused(response, "url_expired")
                assert "GET the video again" in response.json()["error"]["message"]
            # A tampered and expired URL is a bad signature, not an expired one.
            stale_exp = split(ready["content_url"])[1]["exp"]
            forged = content.replace(f"exp={stale_exp}", f"exp={int(stale_exp) + 3600}")
            assert_refused(await browser.get(forged), "bad_signature")
            # A fresh read hands out URLs valid from the service's now.
            fresh = await service.get(video["id"])
            assert (await browser.get(local(fresh["content_url"], service))).status_code == 200

    async def test_a_signed_url_opens_nothing_else(self, services: ServiceFactory):
        service = await keyed(services)
        video = await service.submit()
        ready = await service.wait_for(video["id"], "ready")
        _, query = split(ready["content_url"])
        signed = f"exp={query['exp']}&sig={query['sig']}"
        vid = video["id"]
        async with anonymous(service) as browser:
            for method, url in [
                ("GET", f"/v1/videos/{vid}?{signed}"),
                ("GET", f"/v1/videos?{signed}"),
                ("POST", f"/v1/videos/{vid}/content?{signed}"),
                ("DELETE", f"/v1/videos/{vid}/content?{signed}"),
                ("GET", f"/v1/videos/{vid}/content/?{signed}"),
            ]:
                response = await browser.request(method, url)
                assert response.status_code == 401, (method, url, response.text)
            # With an Authorization header, the header is what counts.
            url = local(ready["content_url"], service)
            wrong = await browser.get(url, headers={"Authorization": "Bearer nope-nope-nope"})
            assert wrong.status_code == 401
            other = await browser.get(url, headers={"Authorization": f"Bearer {OTHER}"})
            assert other.status_code == 404
            owner = await browser.get(url, headers={"Authorization": f"Bearer {KEY}"})
            assert owner.status_code == 200

    async def test_keys_off_hands_out_plain_urls(self, services: ServiceFactory):
        service = await services.start()
        video = await service.submit()
        ready = await service.wait_for(video["id"], "ready")
        base = f"{service.settings.public_base}/v1/videos/{video['id']}"
        assert ready["content_url"] == f"{base}/content"
        assert ready["events_url"] == f"{base}/events"
        listed = (await service.client.get("/v1/videos")).json()["items"]
        assert listed[0]["events_url"] == f"{base}/events"
        # exp and sig mean nothing on an open API.
        assert (
            await service.client.get(f"/v1/videos/{video['id']}/content?exp=1&sig=x")
        ).is_success

    async def test_list_items_carry_signed_urls(self, services: ServiceFactory):
        service = await keyed(services)
        video = await service.submit()
        await service.wait_for(video["id"], "ready")
        (item,) = (await service.client.get("/v1/videos")).json()["items"]
        async with anonymous(service) as browser:
            for field in ("content_url", "events_url"):
                assert "sig=" in item[field]
                assert (await browser.get(local(item[field], service))).status_code == 200


def test_redact_masks_a_signature_wherever_it_is() -> None:
    line = '127.0.0.1:5 - "GET /v1/videos/x/content?exp=17&sig=ab-_Cd HTTP/1.1" 206'
    assert redact(line) == '127.0.0.1:5 - "GET /v1/videos/x/content?exp=17&sig=*** HTTP/1.1" 206'
    assert redact("/v1/videos/x/events?sig=ab&exp=1") == "/v1/videos/x/events?sig=***&exp=1"


async def test_serve_never_logs_a_signature(tmp_path: Path) -> None:
    """``videorelay serve`` at INFO writes uvicorn's access log, path and query included: the
    signature in it is masked."""
    child = ChildServer(
        videorelay("serve", "--simulate", "--port", "{port}", "--render-scale", "0.2"),
        lambda port: child_env(tmp_path, API_KEYS=f"app:{KEY}", LOG_LEVEL="INFO"),
        cwd=tmp_path,
        log=tmp_path / "serve.log",
    )
    await asyncio.to_thread(child.start)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=child.url, timeout=10, headers=auth) as client:
            body = {"image_url": "https://example.invalid/a.jpg", "duration": 3}
            video = (await client.post("/v1/videos", json=body)).json()
            for _ in range(600):
                video = (await client.get(f"/v1/videos/{video['id']}")).json()
                if video["status"] in ("ready", "failed"):
                    break
                await asyncio.sleep(0.05)
            assert video["status"] == "ready", video
        path, query = split(video["content_url"])
        async with httpx.AsyncClient(base_url=child.url, timeout=10) as browser:
            played = await browser.get(path, params=query)
            assert played.status_code == 200
            forged = await browser.get(path, params={**query, "sig": query["sig"][::-1]})
            assert forged.status_code == 403
    finally:
        child.terminate()
    out = child.output()
    logged = re.findall(r"/v1/videos/[0-9a-f-]{36}/content\?\S+", out)
    assert len(logged) >= 2, out[-2000:]
    assert all(line.endswith("sig=***") for line in logged), logged
    assert query["sig"] not in out and query["sig"][::-1] not in out


@pytest.mark.parametrize("ttl", ["59", "604801"])
def test_ttl_is_bounded(ttl: str) -> None:
    from pydantic import ValidationError

    from app.config import Settings

    with pytest.raises(ValidationError, match="SIGNED_URL_TTL_SECONDS"):
        Settings(_env_file=None, SIGNED_URL_TTL_SECONDS=ttl)


async def test_notify_push_carries_signed_urls(services: ServiceFactory) -> None:
    receiver = Receiver()
    await receiver.server.start()
    try:
        service = await keyed(services, NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True)
        video = await service.submit(notify_url=receiver.url)
        await service.wait_for(video["id"], "ready")
        for _ in range(200):
            if receiver.requests:
                break
            await asyncio.sleep(0.05)
        pushed = json.loads(receiver.requests[0][1])["data"]
    finally:
        await receiver.server.stop()
    async with anonymous(service) as browser:
        for field in ("content_url", "events_url"):
            assert "&sig=" in pushed[field]
            assert (await browser.get(local(pushed[field], service))).status_code == 200


def test_a_grant_reads_its_video_only() -> None:
    video, other = uuid.uuid4(), uuid.uuid4()
    grant = Caller(GRANT_OWNER, video_id=video)
    assert grant.may_read("app", video) and grant.may_read("other", video)
    assert not grant.may_read("app", other) and not grant.may_read(GRANT_OWNER, other)
    assert Caller("app").may_read("app", other) and not Caller("app").may_read("b", other)
