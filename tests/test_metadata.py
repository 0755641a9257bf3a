"""``metadata`` on videos through real HTTP, on SQLite and Postgres: the round trip (JSON, list,
events, notify_url push), never reaching hiapi, each 422, and Idempotency-Key replays."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from app.schemas import METADATA_MAX_BYTES
from tests.conftest import Service, ServiceFactory, Sim
from tests.test_client_tokens import ALICE, BOB, KEYS, SECRET, auth, mint
from tests.test_frontend_api import NOTIFY_SECRET, read_events
from tests.test_notify_delivery import Receiver, receiver  # noqa: F401  (the fixture)

IMAGE = "https://example.invalid/still.jpg"
META = {"order_id": "A-1042", "user.plan": "pro", "a-b_c.9": "", "note": 'é "quoted" ✓'}


def sized(total: int) -> dict[str, str]:
    """16 keys of 500-character values whose compact UTF-8 JSON is ``total`` bytes (8145 to
    8545): every 'é' instead of an 'a' adds one byte and no character."""
    metadata = {f"k{i:02}": "a" * 500 for i in range(16)}
    extra = total - len(json.dumps(metadata, separators=(",", ":")).encode())
    assert 0 <= extra <= 500
    metadata["k15"] = "é" * extra + "a" * (500 - extra)
    size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
    assert size == total
    return metadata


async def submit(service: Service, **body: Any) -> Any:
    return await service.client.post("/v1/videos", json={"image_url": IMAGE, **body})


async def listed(service: Service, **params: str) -> list[dict[str, Any]]:
    response = await service.client.get("/v1/videos", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


class TestRoundTrip:
    async def test_metadata_is_echoed_everywhere_and_never_sent_to_hiapi(
        self,
        services: ServiceFactory,
        sim: Sim,
        receiver: Receiver,  # noqa: F811
    ):
        sim.set(latency_seconds=0.4)
        service = await services.start(NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True)
        response = await submit(service, metadata=META, notify_url=receiver.url)
        assert response.status_code == 202, response.text
        video = response.json()
        assert video["metadata"] == META
        assert list(video["metadata"]) == sorted(META)  # sorted keys, on both databases
        events = await read_events(service, video["id"])
        assert events[-1]["event"] == "ready"
        assert all(json.loads(e["data"])["metadata"] == META for e in events)
        assert (await service.get(video["id"]))["metadata"] == META
        assert [v["metadata"] for v in await listed(service)] == [META]
        deadline = asyncio.get_running_loop().time() + 10
        while not receiver.requests:
            assert asyncio.get_running_loop().time() < deadline, "no notify_url push"
            await asyncio.sleep(0.02)
        push = receiver.requests[0][1]
        assert push["type"] == "video.ready" and push["data"]["metadata"] == META
        # The simulator refuses any property hiapi does not know (root or input) with a 400:
        # the task was created and not rejected, so metadata was not in it.
        stats = await sim.stats()
        assert stats["tasks_created"] == 1 and stats["create_rejected"] == 0

    async def test_no_metadata_or_an_empty_object_is_an_empty_object(self, service: Service):
        plain = await service.submit()
        empty = await service.submit(metadata={})
        null = await service.submit(metadata=None)
        assert plain["metadata"] == empty["metadata"] == null["metadata"] == {}

    async def test_the_limits_themselves_are_accepted(self, service: Service):
        exact = sized(METADATA_MAX_BYTES)
        video = await service.submit(metadata=exact)
        assert video["metadata"] == exact
        longest_key = {"k" * 40: "v"}
        assert (await service.submit(metadata=longest_key))["metadata"] == longest_key


TOO_MANY = {f"k{i}": "v" for i in range(17)}


@pytest.mark.parametrize(
    ("metadata", "field", "says"),
    [
        (["a", "b"], "metadata", "must be an object of string keys to string values"),
        ("order=1", "metadata", "(got string)"),
        (7, "metadata", "(got integer)"),
        (TOO_MANY, "metadata", "at most 16 keys (got 17)"),
        ({"": "v"}, "metadata", "key '' must be 1 to 40 characters"),
        ({"k" * 41: "v"}, "metadata", "must be 1 to 40 characters of A-Z, a-z, 0-9"),
        ({"order id": "v"}, "metadata", "key 'order id' must be"),
        ({"ordér": "v"}, "metadata", "key 'ordér' must be"),
        ({"n": 5}, "metadata.n", "must be a string of at most 500 characters (got integer)"),
        ({"n": None}, "metadata.n", "(got null)"),
        ({"n": ["x"]}, "metadata.n", "must be a string of at most 500 characters (got array)"),
        ({"n": "x" * 501}, "metadata.n", "at most 500 characters (got 501)"),
        (sized(METADATA_MAX_BYTES + 1), "metadata", "at most 8192 bytes in all"),
    ],
)
async def test_each_rule_is_a_clear_422_and_nothing_is_stored(
    service: Service, sim: Sim, metadata: Any, field: str, says: str
):
    response = await submit(service, metadata=metadata)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == field
    assert says in error["message"] and error["message"].startswith(f"{field}: ")
    assert await listed(service) == []
    assert (await sim.stats())["tasks_created"] == 0


async def test_an_unknown_field_names_metadata_among_the_allowed(service: Service):
    response = await submit(service, meta={"a": "b"})
    assert response.status_code == 422
    assert "notify_url, metadata" in response.json()["error"]["message"]


class TestIdempotency:
    async def test_same_metadata_in_another_order_replays(self, service: Service, sim: Sim):
        headers = {"Idempotency-Key": "order-7"}
        body = {"image_url": IMAGE, "metadata": {"a": "1", "b": "2"}}
        first = await service.client.post("/v1/videos", json=body, headers=headers)
        body["metadata"] = {"b": "2", "a": "1"}
        again = await service.client.post("/v1/videos", json=body, headers=headers)
        assert (first.status_code, again.status_code) == (202, 200)
        assert again.json()["id"] == first.json()["id"]
        # Left out and {} are the same request.
        plain = {"Idempotency-Key": "order-8"}
        await service.client.post("/v1/videos", json={"image_url": IMAGE}, headers=plain)
        empty = await service.client.post(
            "/v1/videos", json={"image_url": IMAGE, "metadata": {}}, headers=plain
        )
        assert empty.status_code == 200
        assert (await sim.stats())["tasks_created"] == 2

    async def test_other_metadata_is_a_conflict_like_any_other_field(
        self, service: Service, sim: Sim
    ):
        headers = {"Idempotency-Key": "order-9"}
        body = {"image_url": IMAGE, "metadata": {"a": "1"}}
        await service.client.post("/v1/videos", json=body, headers=headers)
        for other in ({"a": "2"}, {"a": "1", "b": "1"}, {}):
            response = await service.client.post(
                "/v1/videos", json={"image_url": IMAGE, "metadata": other}, headers=headers
            )
            assert response.status_code == 409, other
            assert response.json()["error"]["code"] == "idempotency_conflict"
            assert response.json()["video"]["metadata"] == {"a": "1"}
        assert len(await listed(service)) == 1
        assert (await sim.stats())["tasks_created"] == 1


# --- GET /v1/videos?metadata.<key>=<value> ------------------------------------------------


async def pages(
    service: Service, params: dict[str, str], headers: dict[str, str] | None = None
) -> Any:
    """Every page of a listing, followed through ``next_cursor``: the ids, page by page."""
    out: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await service.client.get("/v1/videos", params=query, headers=headers)
        assert response.status_code == 200, response.text
        out.append([v["id"] for v in response.json()["items"]])
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return out


class TestFilter:
    async def test_one_key_filters_and_pages_with_the_cursor(self, service: Service):
        batches = ["x", "y", "x", None, "x", "y", "x", "x", None, "x", "x"]
        made: list[tuple[str, str | None]] = []
        for batch in batches:
            metadata = {"batch": batch, "user.plan": "pro"} if batch else {"other": "x"}
            made.append(((await service.submit(metadata=metadata))["id"], batch))
        newest_first = [vid for vid, batch in reversed(made) if batch == "x"]
        assert len(newest_first) == 7
        got = await pages(service, {"metadata.batch": "x", "limit": "3"})
        assert [len(p) for p in got] == [3, 3, 1]
        assert [vid for page in got for vid in page] == newest_first
        # A key with a dot, a value that only a prefix of which is stored, the empty value.
        both = await pages(service, {"metadata.user.plan": "pro"})
        assert len(both[0]) == 9
        assert await pages(service, {"metadata.batch": "xx"}) == [[]]
        assert await pages(service, {"metadata.batch": ""}) == [[]]
        assert await pages(service, {"metadata.other": "x", "status": "failed"}) == [[]]

    async def test_values_match_exactly_whatever_they_hold(self, service: Service):
        odd = 'é "quoted" \\ back, {"json": 1} ✓'
        wanted = (await service.submit(metadata={"note": odd}))["id"]
        await service.submit(metadata={"note": odd.upper()})
        await service.submit(metadata={"Note": odd})  # keys are case-sensitive
        assert await pages(service, {"metadata.note": odd}) == [[wanted]]

    async def test_subject_and_metadata_together(self, services: ServiceFactory, sim: Sim):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET)
        ann, bea = await mint(service, subject="ann"), await mint(service, subject="bea")
        made: dict[str, list[str]] = {"ann": [], "bea": [], "key": []}
        for i in range(5):
            for who, bearer in (("ann", ann), ("bea", bea), ("key", ALICE)):
                body = {"image_url": IMAGE, "duration": 3, "metadata": {"round": str(i % 2)}}
                response = await service.client.post("/v1/videos", json=body, headers=auth(bearer))
                assert response.status_code == 202, response.text
                made[who].append(response.json()["id"])
        ann_round0 = [made["ann"][i] for i in (4, 2, 0)]
        by_key = await pages(
            service, {"subject": "ann", "limit": "2", "metadata.round": "0"}, auth(ALICE)
        )
        assert by_key == [ann_round0[:2], ann_round0[2:]]
        # The token lists its own subject's only, with the same filter, page by page.
        by_token = await pages(service, {"limit": "2", "metadata.round": "0"}, auth(ann))
        assert by_token == by_key
        everyone = await pages(service, {"limit": "100", "metadata.round": "0"}, auth(ALICE))
        assert len(everyone[0]) == 9
        # Another key's videos never match.
        assert await pages(service, {"metadata.round": "0"}, auth(BOB)) == [[]]


@pytest.mark.parametrize(
    ("query", "field", "says"),
    [
        ("metadata.a=1&metadata.b=2", "metadata", "only one metadata.<key>=<value> filter"),
        ("metadata.a=1&metadata.a=2", "metadata", "(got metadata.a, metadata.a)"),
        ("metadata=a", "metadata", "filter on one key as metadata.<key>=<value>"),
        ("metadata.=a", "metadata", "key '' must be 1 to 40 characters"),
        ("metadata.a%20b=1", "metadata", "key 'a b' must be 1 to 40 characters"),
        (f"metadata.{'k' * 41}=1", "metadata", "must be 1 to 40 characters of A-Z"),
        (f"metadata.k={'v' * 501}", "metadata.k", "at most 500 characters (got 501)"),
    ],
)
async def test_a_bad_filter_is_a_422_naming_it(service: Service, query: str, field: str, says: str):
    await service.submit(metadata={"a": "1"})
    response = await service.client.get(f"/v1/videos?{query}")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["field"] == field
    assert says in error["message"] and error["message"].startswith(f"{field}: ")
