"""API keys, ownership, the daily spend guard, CORS and security headers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.conftest import ServiceFactory, Sim

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
KEYS = f"alice:{ALICE},bob:{BOB}"
BODY = {"image_url": "https://example.invalid/a.jpg", "duration": 3}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class TestApiKeys:
    async def test_requests_without_a_valid_key_get_401_json(
        self, services: ServiceFactory, sim: Sim
    ):
        service = await services.start(API_KEYS=KEYS)
        for headers in ({}, auth("wrong-key-0123456789abc"), {"Authorization": ALICE}):
            response = await service.client.post("/v1/videos", json=BODY, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
            assert ALICE not in response.text
            listing = await service.client.get("/v1/videos", headers=headers)
            assert listing.status_code == 401
        assert (await sim.stats())["create_requests"] == 0

    async def test_videos_belong_to_the_key_that_created_them(
        self, services: ServiceFactory, sim: Sim
    ):
        service = await services.start(API_KEYS=KEYS)
        created = await service.client.post("/v1/videos", json=BODY, headers=auth(ALICE))
        assert created.status_code == 202
        video_id = created.json()["id"]
        await asyncio.sleep(0)
        assert (
            await service.client.get(f"/v1/videos/{video_id}", headers=auth(ALICE))
        ).status_code == 200
        other = await service.client.get(f"/v1/videos/{video_id}", headers=auth(BOB))
        assert other.status_code == 404
        assert (
            await service.client.get(f"/v1/videos/{video_id}/content", headers=auth(BOB))
        ).status_code == 404
        assert (await service.client.get("/v1/videos", headers=auth(BOB))).json()["items"] == []
        mine = (await service.client.get("/v1/videos", headers=auth(ALICE))).json()["items"]
        assert [v["id"] for v in mine] == [video_id]

    async def test_idempotency_keys_are_scoped_per_api_key(
        self, services: ServiceFactory, sim: Sim
    ):
        service = await services.start(API_KEYS=KEYS)
        same = {"Idempotency-Key": "order-1"}
        a = await service.client.post("/v1/videos", json=BODY, headers={**auth(ALICE), **same})
        b = await service.client.post("/v1/videos", json=BODY, headers={**auth(BOB), **same})
        assert a.status_code == b.status_code == 202
        assert a.json()["id"] != b.json()["id"]

    async def test_keys_never_reach_logs(
        self, services: ServiceFactory, sim: Sim, caplog: pytest.LogCaptureFixture
    ):
        caplog.set_level(logging.DEBUG)
        # uvicorn's access log is on (INFO) and read directly: its log config (applied when
        # the server is made) keeps it from propagating to the root logger caplog listens on.
        service = await services.start(API_KEYS=KEYS, log_level="info")
        access = logging.getLogger("uvicorn.access")
        access.addHandler(caplog.handler)
        try:
            ok = await service.client.post("/v1/videos", json=BODY, headers=auth(ALICE))
            bad = await service.client.post(
                "/v1/videos", json=BODY, headers=auth("bad-key-0123456789abcdef")
            )
            await service.client.get("/v1/videos", headers=auth(ALICE))
        finally:
            access.removeHandler(caplog.handler)
        assert (ok.status_code, bad.status_code) == (202, 401)
        # The test sees the access log (and every other line) it checks for keys.
        lines = [r for r in caplog.records if r.name == "uvicorn.access"]
        assert any("POST /v1/videos" in r.getMessage() and "202" in r.getMessage() for r in lines)
        assert any("401" in r.getMessage() for r in lines)
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert ALICE not in text and "bad-key-0123456789abcdef" not in text

    async def test_open_api_warns_loudly_at_start(
        self, services: ServiceFactory, caplog: pytest.LogCaptureFixture
    ):
        caplog.set_level(logging.INFO)
        await services.start()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("API_KEYS is not set" in r.getMessage() for r in warnings)


class TestDailyLimit:
    async def test_over_the_limit_is_429_with_reset_time_and_nothing_stored(
        self, services: ServiceFactory, sim: Sim
    ):
        service = await services.start(API_KEYS=KEYS, DAILY_VIDEO_SECONDS_LIMIT=10)
        for duration in (5, 5):
            ok = await service.client.post(
                "/v1/videos", json={**BODY, "duration": duration}, headers=auth(ALICE)
            )
            assert ok.status_code == 202
        over = await service.client.post(
            "/v1/videos", json={**BODY, "duration": 3}, headers=auth(ALICE)
        )
        assert over.status_code == 429
        error = over.json()["error"]
        assert error["code"] == "daily_limit_exceeded"
        assert "10 of 10" in error["message"] and "resets at" in error["message"]
        assert over.json()["resets_at"].endswith(("Z", "+00:00"))
        assert int(over.headers["retry-after"]) > 0
        assert (
            len((await service.client.get("/v1/videos", headers=auth(ALICE))).json()["items"]) == 2
        )
        assert (await sim.stats())["create_requests"] == 2
        # Another key has its own budget.
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(BOB))
        ).status_code == 202

    async def test_concurrent_submits_cannot_overshoot(self, services: ServiceFactory, sim: Sim):
        sim.set(latency_seconds=5)
        service = await services.start(API_KEYS=KEYS, DAILY_VIDEO_SECONDS_LIMIT=20)
        responses = await asyncio.gather(
            *(
                service.client.post("/v1/videos", json={**BODY, "duration": 3}, headers=auth(ALICE))
                for _ in range(10)
            )
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] * 6 + [429] * 4  # 6 x 3 s = 18 <= 20 < 21
        items = (await service.client.get("/v1/videos", headers=auth(ALICE))).json()["items"]
        assert len(items) == 6

    async def test_rejected_submit_is_refunded(self, services: ServiceFactory, sim: Sim):
        sim.set(api_key="sk-some-other-key")
        service = await services.start(API_KEYS=KEYS, DAILY_VIDEO_SECONDS_LIMIT=5)
        for _ in range(3):  # each is refused by hiapi (502) and refunded, so none hits 429
            response = await service.client.post(
                "/v1/videos", json={**BODY, "duration": 5}, headers=auth(ALICE)
            )
            assert response.status_code == 502

    async def test_idempotent_replay_is_not_charged_twice(self, services: ServiceFactory, sim: Sim):
        service = await services.start(API_KEYS=KEYS, DAILY_VIDEO_SECONDS_LIMIT=5)
        headers = {**auth(ALICE), "Idempotency-Key": "same"}
        first = await service.client.post(
            "/v1/videos", json={**BODY, "duration": 5}, headers=headers
        )
        again = await service.client.post(
            "/v1/videos", json={**BODY, "duration": 5}, headers=headers
        )
        assert (first.status_code, again.status_code) == (202, 200)


class TestHttpPolicies:
    async def test_cors_admits_configured_origins_only(self, services: ServiceFactory):
        service = await services.start(CORS_ORIGINS="https://app.example.com")
        preflight: dict[str, Any] = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,idempotency-key,authorization",
        }
        ok = await service.client.options(
            "/v1/videos", headers={"Origin": "https://app.example.com", **preflight}
        )
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
        bad = await service.client.options(
            "/v1/videos", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in bad.headers

    async def test_security_headers_on_json_and_errors(self, service):
        for path in ("/v1/videos", "/v1/videos/00000000-0000-0000-0000-000000000000", "/healthz"):
            response = await service.client.get(path)
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert "default-src 'none'" in response.headers["content-security-policy"]
        docs = await service.client.get("/docs")
        assert "content-security-policy" not in docs.headers
