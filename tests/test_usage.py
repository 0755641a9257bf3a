"""``GET /v1/usage`` and the ``RateLimit-*`` headers of ``POST /v1/videos``, through real HTTP
on SQLite and Postgres: a key's day, a client token's subject's day and its cap, the 202 and
the 429, the day rolling over on the service's clock, and CORS letting a page read them."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

from app.http_policies import RATE_LIMIT_HEADERS
from tests.conftest import Service, ServiceFactory
from tests.test_client_tokens import ALICE, KEYS, SECRET, Clock, auth, mint

BODY = {"image_url": "https://example.invalid/a.jpg", "duration": 3}
ORIGIN = "https://app.example.com"


def seconds_to_midnight(now: datetime) -> float:
    midnight = datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)
    return (midnight - now).total_seconds()


def near(header: str, expected: float) -> bool:
    """A ``RateLimit-Reset`` (whole seconds) within the few seconds a busy test takes."""
    return abs(int(header) - expected) <= 5


async def usage(service: Service, bearer: str | None = None) -> dict[str, Any]:
    response = await service.client.get("/v1/usage", headers=auth(bearer) if bearer else {})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def post(service: Service, bearer: str | None = None, **headers: str) -> Any:
    given = {**(auth(bearer) if bearer else {}), **headers}
    return await service.client.post("/v1/videos", json=BODY, headers=given)


def quota(used: int, limit: int) -> dict[str, int]:
    return {"used_video_seconds": used, "limit_video_seconds": limit,
            "remaining_video_seconds": max(0, limit - used)}  # fmt: skip


def figures(out: dict[str, Any]) -> dict[str, Any]:
    keys = ("used_video_seconds", "limit_video_seconds", "remaining_video_seconds")
    return {k: out[k] for k in keys}


def limits(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["scope"]: figures(q) for q in out["limits"]}


def rate(response: Any) -> tuple[int, int]:
    return int(response.headers["ratelimit-limit"]), int(response.headers["ratelimit-remaining"])


async def test_with_no_limit_nothing_is_counted_or_announced(services: ServiceFactory):
    service = await services.start()
    before = await usage(service)
    assert before["day"] == datetime.now(UTC).date().isoformat()
    assert before["limits"] == [] and before["scope"] is None
    assert figures(before) == {k: None for k in figures(before)}
    assert before["resets_at"] is None
    created = await post(service)
    assert created.status_code == 202
    assert not {h.lower() for h in RATE_LIMIT_HEADERS} & set(created.headers)


async def test_a_keys_day_on_usage_and_on_the_202_and_the_429(services: ServiceFactory):
    clock = Clock()
    service = await services.start(API_KEYS=KEYS, DAILY_VIDEO_SECONDS_LIMIT=10, clock=clock)
    assert (await service.client.get("/v1/usage")).status_code == 401
    before = await usage(service, ALICE)
    assert before["scope"] == "key" and figures(before) == quota(0, 10)
    assert limits(before) == {"key": quota(0, 10)}
    midnight = datetime.combine(clock().date() + timedelta(days=1), time(), tzinfo=UTC)
    assert datetime.fromisoformat(before["resets_at"]) == midnight
    assert before["limits"][0]["resets_at"] == before["resets_at"]
    for left in (7, 4, 1):
        created = await post(service, ALICE)
        assert created.status_code == 202
        assert rate(created) == (10, left)
        assert near(created.headers["ratelimit-reset"], seconds_to_midnight(clock()))
    refused = await post(service, ALICE)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "daily_limit_exceeded"
    assert rate(refused) == (10, 1)
    assert near(refused.headers["ratelimit-reset"], seconds_to_midnight(clock()))
    assert figures(await usage(service, ALICE)) == quota(9, 10)
    # A replay charges nothing and answers no quota.
    first = await post(service, ALICE, **{"Idempotency-Key": "r-1"})
    assert first.status_code == 429  # over the limit: nothing stored under the key either
    # The next UTC day on the service's clock starts from zero.
    clock.offset = timedelta(days=1)
    tomorrow = await usage(service, ALICE)
    assert tomorrow["day"] == clock().date().isoformat() and figures(tomorrow) == quota(0, 10)
    created = await post(service, ALICE, **{"Idempotency-Key": "r-1"})
    assert created.status_code == 202 and rate(created) == (10, 7)
    replay = await post(service, ALICE, **{"Idempotency-Key": "r-1"})
    assert replay.status_code == 200 and "ratelimit-limit" not in replay.headers


async def test_a_tokens_subject_day_and_cap_each_show_and_the_tightest_leads(
    services: ServiceFactory,
):
    service = await services.start(
        API_KEYS=KEYS,
        CLIENT_TOKEN_SECRET=SECRET,
        DAILY_VIDEO_SECONDS_LIMIT=100,
        DAILY_VIDEO_SECONDS_PER_SUBJECT=9,
    )
    ann = await mint(service, subject="ann", max_video_seconds=12)
    out = await usage(service, ann)
    assert limits(out) == {"key": quota(0, 100), "subject": quota(0, 9), "token": quota(0, 12)}
    assert out["scope"] == "subject" and figures(out) == quota(0, 9)
    token = next(q for q in out["limits"] if q["scope"] == "token")
    assert token["resets_at"] is None and token["expires_at"]
    subject = next(q for q in out["limits"] if q["scope"] == "subject")
    assert subject["resets_at"] == out["resets_at"] and subject["expires_at"] is None
    for left in (6, 3, 0):
        created = await post(service, ann)
        assert created.status_code == 202 and rate(created) == (9, left)
    refused = await post(service, ann)
    assert refused.json()["error"]["code"] == "subject_daily_limit_exceeded"
    assert rate(refused) == (9, 0)
    out = await usage(service, ann)
    assert limits(out) == {"key": quota(9, 100), "subject": quota(9, 9), "token": quota(9, 12)}
    # The key itself has only its own day.
    assert limits(await usage(service, ALICE)) == {"key": quota(9, 100)}

    # Another end user whose token's cap is the tightest: Reset is when the token expires.
    bea = await mint(service, subject="bea", max_video_seconds=4, ttl_seconds=600)
    out = await usage(service, bea)
    assert out["scope"] == "token" and figures(out) == quota(0, 4) and out["resets_at"] is None
    created = await post(service, bea)
    assert created.status_code == 202 and rate(created) == (4, 1)
    assert near(created.headers["ratelimit-reset"], 600)
    refused = await post(service, bea)
    assert refused.json()["error"]["code"] == "token_limit_exceeded"
    assert rate(refused) == (4, 1) and near(refused.headers["ratelimit-reset"], 600)
    # A token with no video scope at all may still read its usage.
    viewer = await mint(service, subject="cy", scopes=["images:create"])
    assert limits(await usage(service, viewer)) == {"key": quota(12, 100), "subject": quota(0, 9)}


async def test_cors_lets_a_page_read_the_headers(services: ServiceFactory):
    service = await services.start(DAILY_VIDEO_SECONDS_LIMIT=3, CORS_ORIGINS=ORIGIN)
    created = await post(service, Origin=ORIGIN)
    refused = await post(service, Origin=ORIGIN)
    assert (created.status_code, refused.status_code) == (202, 429)
    for response in (created, refused):
        assert response.headers["access-control-allow-origin"] == ORIGIN
        exposed = {
            h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")
        }
        assert {h.lower() for h in RATE_LIMIT_HEADERS} <= exposed
        assert "ratelimit-reset" in response.headers
