"""REST validation through the real service, on SQLite and Postgres.

Every bad body must be refused with 422 before anything is stored or sent to hiapi (a request
hiapi would refuse is never sent, and never billed). The error names the offending field and
says how to fix it. Listing validates its query and pages with an opaque cursor.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from app.repository import BadCursor, cursor_key, decode_cursor, seal_cursor
from tests.conftest import Service, Sim

IMAGE_URL = "https://example.invalid/still.jpg"


@dataclass(frozen=True)
class BadBody:
    """A request body that must be refused, the field it must be blamed on, and fix hints.

    ``hints`` say what the message must tell the caller so they can fix the request: every
    hint must appear in the message (case-insensitive); a hint given as a tuple is satisfied
    by any one of its alternatives, so the test does not pin one exact wording.
    """

    body: Any
    field: str
    hints: tuple[str | tuple[str, ...], ...]
    raw: bytes | None = None  # sent as-is (with a JSON content type) instead of ``body``


BAD_BODIES: dict[str, BadBody] = {
    "missing image_url": BadBody({"duration": 5}, "image_url", ("required",)),
    "image_url http not https": BadBody(
        {"image_url": "http://example.invalid/still.jpg"}, "image_url", ("https",)
    ),
    "image_url list of two": BadBody(
        {"image_url": [IMAGE_URL, "https://example.invalid/other.jpg"]},
        "image_url",
        ("string",),
    ),
    "image_url not a string": BadBody({"image_url": 12345}, "image_url", ("string",)),
    "image_url empty string": BadBody({"image_url": ""}, "image_url", ("https",)),
    "resolution 4k": BadBody(
        {"image_url": IMAGE_URL, "resolution": "4k"}, "resolution", ("720p", "1080p")
    ),
    "duration 2 below minimum": BadBody(
        {"image_url": IMAGE_URL, "duration": 2}, "duration", ("3",)
    ),
    "duration 16 above maximum": BadBody(
        {"image_url": IMAGE_URL, "duration": 16}, "duration", ("15",)
    ),
    "duration string": BadBody(
        {"image_url": IMAGE_URL, "duration": "5"}, "duration", (("integer", "whole number"),)
    ),
    "duration float": BadBody(
        {"image_url": IMAGE_URL, "duration": 5.5}, "duration", (("integer", "whole number"),)
    ),
    "duration boolean": BadBody(
        {"image_url": IMAGE_URL, "duration": True}, "duration", (("integer", "whole number"),)
    ),
    "prompt not a string": BadBody({"image_url": IMAGE_URL, "prompt": 42}, "prompt", ("string",)),
    "unknown field seed": BadBody(
        {"image_url": IMAGE_URL, "seed": 7}, "seed", ("unknown", "image_url", "duration")
    ),
    "unknown field identity_preserving": BadBody(
        {"image_url": IMAGE_URL, "identity_preserving": True},
        "identity_preserving",
        ("unknown", "image_url", "duration"),
    ),
    "body not JSON": BadBody(None, "body", ("json",), raw=b"image_url=https://x.invalid/a.jpg"),
    "body a JSON array": BadBody([{"image_url": IMAGE_URL}], "body", ("object",)),
}


def mentions(message: str, hint: str | tuple[str, ...]) -> bool:
    alternatives = (hint,) if isinstance(hint, str) else hint
    return any(a.lower() in message.lower() for a in alternatives)


async def assert_nothing_stored_or_sent(service: Service, sim: Sim, case: str) -> None:
    listing = await service.client.get("/v1/videos")
    assert listing.status_code == 200, f"{case}: listing failed: {listing.text}"
    assert listing.json()["items"] == [], f"{case}: a refused request stored a video"
    sent = (await sim.stats())["create_requests"]
    assert sent == 0, f"{case}: a refused request was sent to hiapi ({sent} create requests)"


def cursor_of(value: Any) -> str:
    """Encode ``value`` the way the API encodes cursors (unpadded urlsafe base64 of JSON)."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


class TestCreateValidation:
    @pytest.mark.parametrize("case", list(BAD_BODIES))
    async def test_bad_body_is_422_naming_the_field_and_stores_and_sends_nothing(
        self, service: Service, sim: Sim, case: str
    ):
        bad = BAD_BODIES[case]
        if bad.raw is not None:
            response = await service.client.post(
                "/v1/videos", content=bad.raw, headers={"Content-Type": "application/json"}
            )
        else:
            response = await service.client.post("/v1/videos", json=bad.body)

        assert response.status_code == 422, (
            f"{case}: expected 422, got {response.status_code}: {response.text}"
        )
        assert response.headers["content-type"].startswith("application/json"), (
            f"{case}: error is not JSON: {response.headers['content-type']}"
        )
        error = response.json().get("error")
        assert isinstance(error, dict), f"{case}: no error object in {response.text}"
        assert error.get("code") == "validation_error", (
            f"{case}: error.code is {error.get('code')!r}"
        )
        assert error.get("field") == bad.field, (
            f"{case}: error.field is {error.get('field')!r}, expected {bad.field!r}: {error}"
        )
        message = str(error.get("message", ""))
        assert bad.field in message, f"{case}: message does not name {bad.field!r}: {message!r}"
        missing_hints = [h for h in bad.hints if not mentions(message, h)]
        assert not missing_hints, (
            f"{case}: message {message!r} does not say how to fix it (missing {missing_hints})"
        )
        details = error.get("details")
        assert isinstance(details, list), f"{case}: error.details missing: {error}"
        assert any(d.get("field") == bad.field for d in details), (
            f"{case}: no entry in error.details names {bad.field!r}: {details}"
        )

        await assert_nothing_stored_or_sent(service, sim, case)

    async def test_edge_values_are_accepted(self, service: Service, sim: Sim):
        sim.set(latency_seconds=5)
        accepted: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
            "duration 3 (minimum)": ({"image_url": IMAGE_URL, "duration": 3}, {"duration": 3}),
            "duration 15 (maximum)": ({"image_url": IMAGE_URL, "duration": 15}, {"duration": 15}),
            "resolution 720p": (
                {"image_url": IMAGE_URL, "resolution": "720p"},
                {"resolution": "720p"},
            ),
            "no prompt, defaults": (
                {"image_url": IMAGE_URL},
                {"prompt": None, "resolution": "1080p", "duration": 5},
            ),
        }
        for case, (body, expected) in accepted.items():
            response = await service.client.post("/v1/videos", json=body)
            assert response.status_code == 202, (
                f"{case}: expected 202, got {response.status_code}: {response.text}"
            )
            video = response.json()
            got = {key: video[key] for key in expected}
            assert got == expected, f"{case}: stored {got}, expected {expected}"
            assert video["image_url"] == IMAGE_URL, f"{case}: image_url changed: {video}"

        listing = (await service.client.get("/v1/videos")).json()
        assert len(listing["items"]) == len(accepted)
        assert (await sim.stats())["create_requests"] == len(accepted)


class TestListValidation:
    """Query errors are cheap GETs, so each group runs in one service and reports every case."""

    async def test_bad_query_is_422_naming_the_parameter(self, service: Service):
        cases = {
            "limit=0": "limit",
            "limit=101": "limit",
            "limit=ten": "limit",
            "status=bogus": "status",
        }
        failures = []
        for query, field in cases.items():
            response = await service.client.get(f"/v1/videos?{query}")
            if response.status_code != 422:
                failures.append(f"{query}: expected 422, got {response.status_code}")
                continue
            error = response.json().get("error", {})
            if error.get("code") != "validation_error":
                failures.append(f"{query}: error.code is {error.get('code')!r}")
            if error.get("field") != field:
                failures.append(f"{query}: error.field is {error.get('field')!r}, not {field!r}")
            if field not in str(error.get("message")):
                failures.append(f"{query}: message {error.get('message')!r} does not name {field}")
        assert not failures, "\n".join(failures)

    async def test_bad_cursor_is_422_with_json_error(self, service: Service):
        cases = {
            "not base64 JSON": "garbage",
            "JSON but not a pair": cursor_of(5),
            "pair of wrong types": cursor_of([1, 2]),
            "not a date": cursor_of(["yesterday", str(uuid.uuid4())]),
            "not a uuid": cursor_of(["2024-01-01T00:00:00+00:00", "nope"]),
        }
        failures = []
        for case, cursor in cases.items():
            response = await service.client.get("/v1/videos", params={"cursor": cursor})
            if response.status_code != 422:
                failures.append(f"{case}: expected 422, got {response.status_code}")
                continue
            if not response.headers["content-type"].startswith("application/json"):
                failures.append(f"{case}: error is not JSON")
                continue
            error = response.json().get("error", {})
            if not error.get("code"):
                failures.append(f"{case}: no error.code in {response.text}")
            if "cursor" not in str(error.get("message")):
                failures.append(f"{case}: message {error.get('message')!r} does not name cursor")
        assert not failures, "\n".join(failures)


class TestListPagination:
    async def test_cursor_pages_are_newest_first_without_overlap(self, service: Service, sim: Sim):
        sim.set(latency_seconds=5)
        created = [(await service.submit(prompt=f"clip {i}"))["id"] for i in range(5)]

        pages: list[list[str]] = []
        cursor: str | None = None
        for _ in range(5):
            params: dict[str, Any] = {"limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            response = await service.client.get("/v1/videos", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            pages.append([item["id"] for item in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break

        assert [len(p) for p in pages] == [2, 2, 1], f"page sizes: {pages}"
        seen = [vid for page in pages for vid in page]
        assert len(set(seen)) == len(seen), f"pages overlap: {pages}"
        assert seen == list(reversed(created)), "pages are not newest first"

    async def test_exact_multiple_of_limit_ends_with_null_cursor(self, service: Service, sim: Sim):
        sim.set(latency_seconds=5)
        for _ in range(2):
            await service.submit()
        page = (await service.client.get("/v1/videos", params={"limit": 2})).json()
        assert len(page["items"]) == 2
        assert page["next_cursor"] is None

    async def test_status_filter_lists_only_that_status_and_pages(self, service: Service, sim: Sim):
        sim.set(latency_seconds=5)
        processing = [(await service.submit())["id"] for _ in range(3)]
        sim.set(api_key="sk-some-other-key")  # hiapi now refuses our key: the video fails
        failed = []
        for _ in range(2):
            response = await service.client.post("/v1/videos", json={"image_url": IMAGE_URL})
            assert response.status_code == 502, response.text
            failed.append(response.json()["video"]["id"])
        sim.set(api_key=None)

        only_failed = (await service.client.get("/v1/videos", params={"status": "failed"})).json()
        assert [v["id"] for v in only_failed["items"]] == list(reversed(failed))
        assert all(v["status"] == "failed" for v in only_failed["items"])
        assert only_failed["next_cursor"] is None

        first = (
            await service.client.get("/v1/videos", params={"status": "processing", "limit": 2})
        ).json()
        assert first["next_cursor"] is not None
        second = (
            await service.client.get(
                "/v1/videos",
                params={"status": "processing", "limit": 2, "cursor": first["next_cursor"]},
            )
        ).json()
        assert second["next_cursor"] is None
        ids = [v["id"] for v in first["items"] + second["items"]]
        assert ids == list(reversed(processing))

        none_ready = (await service.client.get("/v1/videos", params={"status": "ready"})).json()
        assert none_ready == {"items": [], "next_cursor": None}


def test_cursor_helper_builds_unsigned_cursors_the_api_refuses():
    """``cursor_of`` builds the unsigned cursors of before signing, which the API refuses even
    for a well-formed position; tests/test_cursors.py checks signed ones with bad content."""
    key = cursor_key(b"any-secret-0123456789")
    position = json.dumps(["2024-01-01T00:00:00+00:00", str(uuid.uuid4())]).encode()
    sealed = seal_cursor(key, "", position)
    assert decode_cursor(key, "", sealed)[0] == datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(BadCursor):
        decode_cursor(key, "", cursor_of(["2024-01-01T00:00:00+00:00", str(uuid.uuid4())]))
