"""Client tokens through HTTP on a real server: minting, verifying (expiry on a clock the test
controls, signatures, rotation), scopes, ownership by subject and the spend caps."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from app import spend
from app.logging import redact
from app.models import DailySpend, SubjectSpend, TokenSpend
from app.schemas import ALL_SCOPES
from app.tokens import SCOPES
from tests.conftest import ServiceFactory, Sim

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
KEYS = f"alice:{ALICE},bob:{BOB}"
SECRET = "client-token-secret-" + "0123456789abcdef" * 3
OTHER_SECRET = "another-token-secret-" + "fedcba9876543210" * 3
BODY = {"image_url": "https://example.invalid/a.jpg", "duration": 3}


def auth(bearer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer}"}


class Clock:
    """The service's clock, moved by the test: real time plus an offset."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def mint(service: Any, key: str | None = ALICE, **body: Any) -> str:
    headers = auth(key) if key else {}
    response = await service.client.post(
        "/v1/client-tokens", json={"subject": "user-1", **body}, headers=headers
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def png() -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (64, 48), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def forge(claims: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def unsigned(claims: dict[str, Any]) -> str:
    """An ``alg: none`` token: a header and claims, no signature."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def claims_now(**extra: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    return {
        "iss": "videorelay",
        "sub": "user-1",
        "key": "alice",
        "scp": list(SCOPES),
        "jti": "forged-id",
        "iat": now,
        "exp": now + 600,
        **extra,
    }


def test_the_scope_lists_agree():
    assert tuple(ALL_SCOPES) == SCOPES


class TestMinting:
    async def test_a_key_mints_and_the_token_is_a_bearer(self, services: ServiceFactory):
        clock = Clock()
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET, clock=clock)
        response = await service.client.post(
            "/v1/client-tokens",
            json={"subject": "user-42", "ttl_seconds": 120, "max_video_seconds": 9},
            headers=auth(ALICE),
        )
        assert response.status_code == 201, response.text
        out = response.json()
        assert set(out) == {"token", "expires_at", "subject", "scopes"}
        assert out["subject"] == "user-42" and out["scopes"] == list(SCOPES)
        expires = datetime.fromisoformat(out["expires_at"].replace("Z", "+00:00"))
        assert abs((expires - clock()).total_seconds() - 120) < 5
        header = jwt.get_unverified_header(out["token"])
        assert header == {"alg": "HS256", "typ": "JWT"}
        claims = jwt.decode(out["token"], SECRET, algorithms=["HS256"])
        assert claims["iss"] == "videorelay" and claims["key"] == "alice"
        assert claims["sub"] == "user-42" and claims["cap"] == 9 and claims["jti"]
        created = await service.client.post("/v1/videos", json=BODY, headers=auth(out["token"]))
        assert created.status_code == 202, created.text
        assert created.json()["subject"] == "user-42"

    async def test_only_an_api_key_mints(self, services: ServiceFactory):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        token = await mint(service)
        again = await service.client.post(
            "/v1/client-tokens", json={"subject": "user-2"}, headers=auth(token)
        )
        assert again.status_code == 403
        assert again.json()["error"]["code"] == "api_key_required"
        anonymous = await service.client.post("/v1/client-tokens", json={"subject": "u"})
        assert anonymous.status_code == 401

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"subject": ""}, "subject"),
            ({"subject": "x" * 129}, "subject"),
            ({"subject": "u", "ttl_seconds": 59}, "ttl_seconds"),
            ({"subject": "u", "ttl_seconds": 86401}, "ttl_seconds"),
            ({"subject": "u", "scopes": ["videos:delete"]}, "scopes.0"),
            ({"subject": "u", "scopes": []}, "scopes"),
            ({"subject": "u", "max_video_seconds": 0}, "max_video_seconds"),
            ({"subject": "u", "owner": "bob"}, "owner"),
            ({}, "subject"),
        ],
    )
    async def test_bad_requests_are_clear_422s(
        self, services: ServiceFactory, body: dict[str, Any], field: str
    ):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        response = await service.client.post("/v1/client-tokens", json=body, headers=auth(ALICE))
        assert response.status_code == 422
        assert response.json()["error"]["field"] == field

    async def test_without_a_secret_minting_says_what_to_set(self, services: ServiceFactory):
        service = await services.start(API_KEYS=KEYS)
        response = await service.client.post(
            "/v1/client-tokens", json={"subject": "u"}, headers=auth(ALICE)
        )
        assert response.status_code == 501
        error = response.json()["error"]
        assert (
            error["code"] == "client_tokens_disabled" and "CLIENT_TOKEN_SECRET" in error["message"]
        )
        # A JWT-shaped bearer is then just an unknown credential.
        bearer = forge(claims_now())
        refused = await service.client.get("/v1/videos", headers=auth(bearer))
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"

    async def test_an_open_api_mints_and_honours_tokens(self, services: ServiceFactory):
        service = await services.start(CLIENT_TOKEN_SECRET=SECRET)
        ann = await mint(service, key=None, subject="ann")
        bea = await mint(service, key=None, subject="bea")
        video = (await service.client.post("/v1/videos", json=BODY, headers=auth(ann))).json()
        assert video["subject"] == "ann"
        other = await service.client.get(f"/v1/videos/{video['id']}", headers=auth(bea))
        assert other.status_code == 404
        anonymous = await service.client.get(f"/v1/videos/{video['id']}")
        assert anonymous.status_code == 200  # no credential: the open API's key itself
        # A token is checked even where no credential is needed.
        bad = await service.client.get(
            "/v1/videos", headers=auth(forge(claims_now(key=""), OTHER_SECRET))
        )
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_token"

    def test_a_short_secret_is_a_clear_startup_error(self):
        from pydantic import ValidationError

        from app.config import Settings

        with pytest.raises(ValidationError, match="CLIENT_TOKEN_SECRET.*2.*32 characters"):
            Settings(_env_file=None, CLIENT_TOKEN_SECRET=f"{SECRET},short-one")


class TestVerifying:
    async def test_expiry_follows_the_service_clock(self, services: ServiceFactory):
        clock = Clock()
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET, clock=clock)
        token = await mint(service, ttl_seconds=60)
        assert (await service.client.get("/v1/videos", headers=auth(token))).status_code == 200
        # Real time passes too since the mint: a margin of seconds, not one, on a busy machine.
        clock.offset = timedelta(seconds=50)
        assert (await service.client.get("/v1/videos", headers=auth(token))).status_code == 200
        clock.offset = timedelta(seconds=61)
        expired = await service.client.get("/v1/videos", headers=auth(token))
        assert expired.status_code == 401
        assert expired.json()["error"]["code"] == "token_expired"
        assert "expired" in expired.json()["error"]["message"]
        upload = await service.client.post(
            "/v1/images", files={"file": ("a.png", png(), "image/png")}, headers=auth(token)
        )
        assert upload.status_code == 401  # refused before the body is read, as a bad key is

    @pytest.mark.parametrize(
        "make",
        [
            pytest.param(lambda: forge(claims_now(), OTHER_SECRET), id="other-secret"),
            pytest.param(lambda: forge(claims_now(), alg="HS512"), id="hs512"),
            pytest.param(lambda: unsigned(claims_now()), id="alg-none"),
            pytest.param(lambda: forge(claims_now(iss="someone")), id="issuer"),
            pytest.param(lambda: forge(claims_now(scp=["videos:delete"])), id="scope"),
            pytest.param(lambda: forge(claims_now(sub="")), id="empty-subject"),
            pytest.param(lambda: forge(claims_now(key="carol")), id="unknown-key"),
            pytest.param(lambda: forge(claims_now(exp="soon")), id="bad-exp"),
            pytest.param(lambda: tamper(forge(claims_now())), id="tampered"),
            pytest.param(lambda: "eyJhbGciOiJIUzI1NiJ9.e30.", id="malformed"),
            pytest.param(lambda: "eyJub3QganNvbg.eyJ9.abc", id="garbage"),
        ],
    )
    async def test_bad_tokens_are_invalid_token(self, services: ServiceFactory, make: Any):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        token = make()
        response = await service.client.get("/v1/videos", headers=auth(token))
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_token"
        assert token not in response.text

    async def test_rotation_keeps_listed_secrets_only(self, services: ServiceFactory):
        old = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        token = await mint(old)
        await services.stop(old)
        rotated = await services.start(
            API_KEYS=KEYS, CLIENT_TOKEN_SECRET=f"{OTHER_SECRET},{SECRET}"
        )
        assert (await rotated.client.get("/v1/videos", headers=auth(token))).status_code == 200
        new_token = await mint(rotated)
        assert jwt.decode(new_token, OTHER_SECRET, algorithms=["HS256"])["sub"] == "user-1"
        await services.stop(rotated)
        retired = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=OTHER_SECRET)
        refused = await retired.client.get("/v1/videos", headers=auth(token))
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_token"
        assert (await retired.client.get("/v1/videos", headers=auth(new_token))).status_code == 200

    async def test_a_removed_keys_tokens_stop_working(self, services: ServiceFactory):
        first = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        token = await mint(first, key=BOB)
        await services.stop(first)
        without_bob = await services.start(API_KEYS=f"alice:{ALICE}", CLIENT_TOKEN_SECRET=SECRET)
        refused = await without_bob.client.get("/v1/videos", headers=auth(token))
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_token"

    async def test_scopes_are_enforced_per_route(self, services: ServiceFactory):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        reader = await mint(service, scopes=["videos:read"])
        maker = await mint(service, scopes=["videos:create"])
        created = await service.client.post("/v1/videos", json=BODY, headers=auth(maker))
        assert created.status_code == 202
        video_id = created.json()["id"]
        refusals = [
            (
                await service.client.post("/v1/videos", json=BODY, headers=auth(reader)),
                "videos:create",
            ),
            (
                await service.client.post(
                    "/v1/images",
                    files={"file": ("a.png", png(), "image/png")},
                    headers=auth(reader),
                ),
                "images:create",
            ),
            (await service.client.get("/v1/videos", headers=auth(maker)), "videos:read"),
            (
                await service.client.get(f"/v1/videos/{video_id}", headers=auth(maker)),
                "videos:read",
            ),
            (
                await service.client.get(f"/v1/videos/{video_id}/events", headers=auth(maker)),
                "videos:read",
            ),
            (
                await service.client.get(f"/v1/videos/{video_id}/content", headers=auth(maker)),
                "videos:read",
            ),
        ]
        for response, scope in refusals:
            assert response.status_code == 403, response.text
            error = response.json()["error"]
            assert error["code"] == "insufficient_scope" and scope in error["message"]
            assert response.json()["scope"] == scope
        assert (
            await service.client.get(f"/v1/videos/{video_id}", headers=auth(reader))
        ).status_code == 200

    async def test_tokens_never_reach_the_logs(
        self, services: ServiceFactory, caplog: pytest.LogCaptureFixture
    ):
        caplog.set_level(logging.DEBUG)
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET, log_level="debug")
        # uvicorn's access log does not propagate to the root logger (and starting a server
        # resets its handlers): listen to it directly, once the server runs, so the line
        # checked below is the service's own, not the test client's.
        access = logging.getLogger("uvicorn.access")
        access.addHandler(caplog.handler)
        try:
            token = await mint(service)
            await service.client.get(f"/v1/videos?access_token={token}", headers=auth(token))
            await service.client.get("/v1/videos", headers=auth(tamper(token)))
        finally:
            access.removeHandler(caplog.handler)
        # Each record as the service's log handler writes it (with its redaction).
        lines = [redact(record.getMessage()) for record in caplog.records]
        assert not any(token in line or tamper(token) in line for line in lines)
        served = [
            redact(record.getMessage())
            for record in caplog.records
            if record.name == "uvicorn.access"
        ]
        assert any("access_token=***" in line for line in served), served
        assert redact(f"GET /v1/videos?t={token} authorization: Bearer {token}").count(token) == 0
        assert "Bearer ***" in redact(f"Authorization: Bearer {ALICE}")


def tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


class TestOwnershipBySubject:
    async def test_subjects_of_one_key_are_isolated(self, services: ServiceFactory, sim: Sim):
        sim.set(allow_http_image_urls=True)  # the test server is plain http
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        ann = await mint(service, subject="ann")
        bea = await mint(service, subject="bea")
        upload = await service.client.post(
            "/v1/images", files={"file": ("a.png", png(), "image/png")}, headers=auth(ann)
        )
        assert upload.status_code == 201
        image_id = upload.json()["id"]
        created = await service.client.post(
            "/v1/videos", json={"image_id": image_id, "duration": 3}, headers=auth(ann)
        )
        assert created.status_code == 202, created.text
        video = created.json()
        assert video["subject"] == "ann"
        await wait_ready(service, video["id"], ann)
        for path in ("", "/content", "/events"):
            mine = await service.client.get(f"/v1/videos/{video['id']}{path}", headers=auth(ann))
            assert mine.status_code == 200, (path, mine.text)
            theirs = await service.client.get(f"/v1/videos/{video['id']}{path}", headers=auth(bea))
            assert theirs.status_code == 404, (path, theirs.text)
            other_key = await service.client.get(
                f"/v1/videos/{video['id']}{path}", headers=auth(BOB)
            )
            assert other_key.status_code == 404, path
            key = await service.client.get(f"/v1/videos/{video['id']}{path}", headers=auth(ALICE))
            assert key.status_code == 200, path
        # Another subject cannot use the image either (nor can another key).
        stolen = await service.client.post(
            "/v1/videos", json={"image_id": image_id, "duration": 3}, headers=auth(bea)
        )
        assert stolen.status_code == 422 and stolen.json()["error"]["field"] == "image_id"
        by_key = await service.client.post(
            "/v1/videos", json={"image_id": image_id, "duration": 3}, headers=auth(ALICE)
        )
        assert by_key.status_code == 202  # the key may use any of its subjects' images
        assert by_key.json()["subject"] is None
        # Lists: a token sees its own subject's only, whatever it asks for.
        assert await ids(service, ann) == [video["id"]]
        assert await ids(service, bea) == []
        assert await ids(service, bea, subject="ann") == []
        assert await ids(service, ALICE) == [by_key.json()["id"], video["id"]]
        assert await ids(service, ALICE, subject="ann") == [video["id"]]
        assert await ids(service, ALICE, subject="bea") == []
        assert await ids(service, BOB) == []

    async def test_idempotency_keys_are_scoped_per_subject(self, services: ServiceFactory):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        ann = await mint(service, subject="ann")
        bea = await mint(service, subject="bea")
        same = {"Idempotency-Key": "order-1"}
        first = await service.client.post("/v1/videos", json=BODY, headers={**auth(ann), **same})
        replay = await service.client.post("/v1/videos", json=BODY, headers={**auth(ann), **same})
        assert (first.status_code, replay.status_code) == (202, 200)
        # The same key and body from another subject is a new video, not ann's replay ...
        other = await service.client.post("/v1/videos", json=BODY, headers={**auth(bea), **same})
        assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
        # ... and a different body is no conflict that would show ann's video either.
        changed = {**BODY, "duration": 5}
        fresh = await service.client.post(
            "/v1/videos", json=changed, headers={**auth(ALICE), **same}
        )
        assert fresh.status_code == 202
        assert first.json()["id"] not in fresh.text

    async def test_each_subject_has_its_own_event_streams(self, services: ServiceFactory, sim: Sim):
        sim.set(latency_seconds=60)  # the videos stay processing: the streams stay open
        service = await services.start(
            API_KEYS=KEYS,
            CLIENT_TOKEN_SECRET=SECRET,
            EVENTS_MAX_STREAMS=1,
            EVENTS_POLL_SECONDS=0.05,
        )
        ann = await mint(service, subject="ann")
        bea = await mint(service, subject="bea")
        videos = {}
        for token in (ann, bea):
            created = await service.client.post("/v1/videos", json=BODY, headers=auth(token))
            videos[token] = created.json()["id"]

        def stream(token: str) -> Any:
            url = f"/v1/videos/{videos[token]}/events"
            return service.client.stream("GET", url, headers=auth(token))

        async with stream(ann) as one:
            assert one.status_code == 200
            async with stream(bea) as other_subject:
                assert other_subject.status_code == 200  # not held back by ann's stream
                async with stream(ann) as again:
                    await again.aread()
                    assert again.status_code == 429
                    assert again.json()["error"]["code"] == "too_many_streams"

    async def test_cursors_are_signed_per_subject(self, services: ServiceFactory):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        ann = await mint(service, subject="ann")
        bea = await mint(service, subject="bea")
        for _ in range(3):
            assert (
                await service.client.post("/v1/videos", json=BODY, headers=auth(ann))
            ).status_code == 202
        page = (await service.client.get("/v1/videos?limit=2", headers=auth(ann))).json()
        cursor = page["next_cursor"]
        assert cursor
        more = await service.client.get(f"/v1/videos?limit=2&cursor={cursor}", headers=auth(ann))
        assert more.status_code == 200 and len(more.json()["items"]) == 1
        for other in (bea, ALICE):
            refused = await service.client.get(f"/v1/videos?cursor={cursor}", headers=auth(other))
            assert refused.status_code == 422 and refused.json()["error"]["field"] == "cursor"


async def wait_ready(service: Any, video_id: str, bearer: str) -> None:
    for _ in range(400):
        response = await service.client.get(f"/v1/videos/{video_id}", headers=auth(bearer))
        if response.json()["status"] == "ready":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"video {video_id} is not ready: {response.text}")


async def ids(service: Any, bearer: str, **params: str) -> list[str]:
    response = await service.client.get("/v1/videos", params=params, headers=auth(bearer))
    assert response.status_code == 200, response.text
    return [v["id"] for v in response.json()["items"]]


class TestSpendCaps:
    async def test_per_subject_daily_limit_under_concurrency(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(latency_seconds=5)
        service = await services.start(
            API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET, DAILY_VIDEO_SECONDS_PER_SUBJECT=15
        )
        ann = await mint(service, subject="ann")
        ann_again = await mint(service, subject="ann")  # a second token: the same subject's day
        responses = await asyncio.gather(
            *(
                service.client.post("/v1/videos", json=BODY, headers=auth(t))
                for t in [ann, ann_again] * 10
            )
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] * 5 + [429] * 15  # 5 x 3 s = 15 <= 15 < 18
        over = next(r for r in responses if r.status_code == 429)
        assert over.json()["error"]["code"] == "subject_daily_limit_exceeded"
        assert over.json()["resets_at"].endswith(("Z", "+00:00"))
        assert int(over.headers["retry-after"]) > 0
        assert len(await ids(service, ALICE, subject="ann")) == 5
        # Another subject, and the key itself, have their own allowance.
        bea = await mint(service, subject="bea")
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(bea))
        ).status_code == 202
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(ALICE))
        ).status_code == 202

    async def test_a_tokens_cap_under_concurrency(self, services: ServiceFactory, sim: Sim):
        sim.set(latency_seconds=5)
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        capped = await mint(service, subject="ann", max_video_seconds=12)
        responses = await asyncio.gather(
            *(service.client.post("/v1/videos", json=BODY, headers=auth(capped)) for _ in range(20))
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] * 4 + [429] * 16  # 4 x 3 s = 12 <= 12 < 15
        over = next(r for r in responses if r.status_code == 429)
        assert over.json()["error"]["code"] == "token_limit_exceeded"
        assert "resets_at" not in over.json() and "retry-after" not in over.headers
        # A new token of the same subject has its own cap.
        fresh = await mint(service, subject="ann", max_video_seconds=3)
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(fresh))
        ).status_code == 202

    async def test_the_keys_limit_still_applies_to_its_tokens(self, services: ServiceFactory):
        service = await services.start(
            API_KEYS=KEYS,
            CLIENT_TOKEN_SECRET=SECRET,
            DAILY_VIDEO_SECONDS_LIMIT=6,
            DAILY_VIDEO_SECONDS_PER_SUBJECT=100,
        )
        ann = await mint(service, subject="ann", max_video_seconds=100)
        bea = await mint(service, subject="bea")
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(ann))
        ).status_code == 202
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(bea))
        ).status_code == 202
        over = await service.client.post("/v1/videos", json=BODY, headers=auth(ann))
        assert over.status_code == 429 and over.json()["error"]["code"] == "daily_limit_exceeded"

    async def test_a_refusal_rolls_back_every_reservation(self, services: ServiceFactory):
        # The key's day has room, the token's cap does not: the key's reservation is undone.
        service = await services.start(
            API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET, DAILY_VIDEO_SECONDS_LIMIT=6
        )
        capped = await mint(service, subject="ann", max_video_seconds=3)
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(capped))
        ).status_code == 202
        for _ in range(3):
            refused = await service.client.post("/v1/videos", json=BODY, headers=auth(capped))
            assert refused.json()["error"]["code"] == "token_limit_exceeded"
        assert (
            await service.client.post("/v1/videos", json=BODY, headers=auth(ALICE))
        ).status_code == 202

    async def test_hiapi_refusals_are_refunded_to_every_quota(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(api_key="sk-some-other-key")
        service = await services.start(
            API_KEYS=KEYS,
            CLIENT_TOKEN_SECRET=SECRET,
            DAILY_VIDEO_SECONDS_LIMIT=5,
            DAILY_VIDEO_SECONDS_PER_SUBJECT=5,
        )
        capped = await mint(service, subject="ann", max_video_seconds=5)
        body = {**BODY, "duration": 5}
        for _ in range(3):  # each is refused by hiapi (502) and refunded, so none hits 429
            response = await service.client.post("/v1/videos", json=body, headers=auth(capped))
            assert response.status_code == 502, response.text


class TestSpendCleanup:
    async def test_the_reconciler_deletes_spend_rows_that_can_no_longer_be_charged(
        self, services: ServiceFactory
    ):
        # The service's own ticks run at start and then an hour apart: the test runs the next.
        service = await services.start(
            API_KEYS=KEYS,
            CLIENT_TOKEN_SECRET=SECRET,
            DAILY_VIDEO_SECONDS_LIMIT=60,
            DAILY_VIDEO_SECONDS_PER_SUBJECT=60,
            RECONCILE_INTERVAL_SECONDS=3600,
        )
        token = await mint(service, subject="ann", max_video_seconds=12)
        response = await service.client.post("/v1/videos", json=BODY, headers=auth(token))
        assert response.status_code == 202  # today's rows, and the live token's
        now = datetime.now(UTC)
        today = now.date()
        async with service.ctx.sessionmaker() as session, session.begin():
            for days in (2, 3, 30):
                day = today - timedelta(days=days)
                session.add(DailySpend(owner="alice", day=day, video_seconds=6))
                session.add(SubjectSpend(owner="alice", subject="ann", day=day, video_seconds=6))
            for name, age in (("recent", timedelta(hours=23)), ("old", timedelta(hours=25))):
                session.add(TokenSpend(token_id=name, expires_at=now - age, video_seconds=3))

        await service.ctx.reconciler.tick()

        # Counted over every tick: on a busy machine the service's own first tick may run
        # after the rows above went in, and take some of them before this one does.
        assert service.ctx.reconciler.totals.spend_purged == 5
        async with service.ctx.sessionmaker() as session:
            days = (await session.execute(select(DailySpend.day))).scalars().all()
            subject_days = (await session.execute(select(SubjectSpend.day))).scalars().all()
            tokens = (await session.execute(select(TokenSpend.token_id))).scalars().all()
        kept = sorted([today, today - timedelta(days=2)])
        assert sorted(days) == kept and sorted(subject_days) == kept
        assert sorted(tokens) == sorted(["recent", jwt.decode(token, SECRET, ["HS256"])["jti"]])
        assert (await service.ctx.reconciler.tick()).spend_purged == 0
        # Bounded: each call deletes at most ``limit`` rows of a table.
        async with service.ctx.sessionmaker() as session, session.begin():
            for days in (3, 4):
                session.add(DailySpend(owner="bob", day=today - timedelta(days=days)))
        for expected in (1, 1, 0):
            async with service.ctx.sessionmaker() as session, session.begin():
                assert await spend.purge_spend(session, now=now, limit=1) == expected
