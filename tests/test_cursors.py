"""List cursors: opaque, signed for the calling key, and every malformed one is a 422.

``GET /v1/videos?cursor=`` is fed hand-crafted and generated cursors through the real HTTP API
(a real uvicorn server, the real database: SQLite and Postgres). Whatever the string, and
whatever JSON sits inside valid base64 or inside a validly signed envelope, the answer is a
``200`` or a ``422`` in the JSON error shape with ``field: "cursor"``; never a 500. Signed
cursors keep working across replicas and restarts that share ``WEBHOOK_SECRET`` and are refused
by another key or under another secret.

The signed cases build their envelope with ``repository.seal_cursor`` and the test's
``WEBHOOK_SECRET``: they stand for someone who holds the key, the one way past the MAC.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import repository
from app.main import create_app
from app.simulator import SimulatorConfig, create_simulator_app
from tests.conftest import WEBHOOK_SECRET, ServiceFactory, Sim, free_socket, make_settings

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"
EXAMPLES = 40
IMAGE_URL = "https://example.invalid/still.jpg"


class LiveService:
    """The service (simulator mounted) in a thread of its own, for hypothesis' blocking calls."""

    def __init__(self, database_url: str, storage: Path) -> None:
        sock = free_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sim = create_simulator_app(
            SimulatorConfig(
                public_base_url=f"{self.url}/simulator",
                latency_seconds=30,
                fetch_images=False,
                render_scale=0.1,
            )
        )
        app_settings = make_settings(
            database_url,
            storage,
            f"{self.url}/simulator",
            self.url,
            API_KEYS=f"alice:{ALICE},bob:{BOB}",
        )
        app = create_app(app_settings, simulator=sim)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True
        )
        self.client = httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {ALICE}"}
        )

    def __enter__(self) -> LiveService:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def list_with(self, cursor: str) -> httpx.Response:
        return self.client.get("/v1/videos", params={"cursor": cursor, "limit": 2})


@pytest.fixture
def live(database_url: str, tmp_path: Path) -> Iterator[LiveService]:
    with LiveService(database_url, tmp_path / "videos") as server:
        for _ in range(3):  # a few rows, so a valid position has something on either side
            response = server.client.post("/v1/videos", json={"image_url": IMAGE_URL})
            assert response.status_code == 202, response.text
        yield server


def unsigned(value: Any) -> str:
    """The pre-signing cursor format: unpadded urlsafe base64 of JSON."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def signed(value: Any, owner: str = "alice") -> str:
    """``value`` as JSON in an envelope signed with the service's own key for ``owner``."""
    key = repository.cursor_key(WEBHOOK_SECRET.encode())
    return repository.seal_cursor(key, owner, json.dumps(value).encode())


def refusal_problem(response: httpx.Response) -> str | None:
    """Why ``response`` is not a 422 in the JSON error shape naming ``cursor`` (None if it is)."""
    if response.status_code != 422:
        return f"expected 422, got {response.status_code}: {response.text[:200]}"
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"422 is not JSON: {response.text[:200]}"
    error = response.json().get("error")
    if not isinstance(error, dict) or not error.get("code"):
        return f"not the error shape: {response.text[:200]}"
    if error.get("field") != "cursor":
        return f"error.field is {error.get('field')!r}, not 'cursor'"
    if "cursor" not in str(error.get("message")):
        return f"message {error.get('message')!r} does not name cursor"
    return None


# The three cursors from issue 10, each a 500 before, and their neighbours.
CRAFTED = {
    "naive datetime": ["2020-01-01T00:00:00", str(uuid.uuid4())],
    "year 9999 at -14:00 overflows UTC": ["9999-12-31T23:59:59-14:00", str(uuid.uuid4())],
    "year 1 at +14:00 underflows UTC": ["0001-01-01T00:00:00+14:00", str(uuid.uuid4())],
    "object instead of id": ["2020-01-01", {"x": 1}],
    "list instead of id": ["2020-01-01T00:00:00+00:00", [1]],
    "three items": ["2020-01-01T00:00:00+00:00", str(uuid.uuid4()), 3],
    "not a list": {"created": "2020-01-01T00:00:00+00:00"},
    "null": None,
}


def test_crafted_cursors_are_422_naming_cursor(live: LiveService) -> None:
    failures = []
    for case, value in CRAFTED.items():
        problem = refusal_problem(live.list_with(unsigned(value)))
        if problem:
            failures.append(f"unsigned {case}: {problem}")
        problem = refusal_problem(live.list_with(signed(value)))
        if problem:
            failures.append(f"signed {case}: {problem}")
    assert not failures, "\n".join(failures)


def test_unsigned_and_tampered_cursors_are_refused(live: LiveService) -> None:
    first = live.client.get("/v1/videos", params={"limit": 2}).json()
    cursor = first["next_cursor"]
    assert cursor is not None
    assert live.list_with(cursor).status_code == 200
    body, _, mac = cursor.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    cases = {
        "a well-formed but unsigned position": unsigned(payload),
        "the same payload, MAC cut off": body,
        "one MAC character changed": f"{body}.{('A' if mac[0] != 'A' else 'B') + mac[1:]}",
        "the payload's id changed under the same MAC": (
            f"{unsigned([payload[0], str(uuid.uuid4())])}.{mac}"
        ),
        "signed for another key": signed(payload, owner="bob"),
    }
    failures = [
        f"{case}: {problem}"
        for case, forged in cases.items()
        if (problem := refusal_problem(live.list_with(forged)))
    ]
    assert not failures, "\n".join(failures)


def check_examples(live: LiveService, strategy: st.SearchStrategy[Any], verdict: Any) -> None:
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(strategy)
    def check(value: Any) -> None:
        problem = verdict(value)
        if problem:
            failures.append(f"{value!r}: {problem}")

    check()
    assert not failures, "\n".join(failures[:10])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23))
zones = st.none() | offsets.map(timezone)
times = st.builds(
    lambda moment, zone: moment.replace(tzinfo=zone).isoformat(),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    zones,
)
ids = st.uuids().map(str) | st.text(max_size=40)
# Near misses: pairs that parse as far as the date or the id, with extreme years and offsets.
positions = st.lists(times | json_values, min_size=2, max_size=2) | st.tuples(times, ids).map(list)


def is_position(value: Any) -> bool:
    """Whether ``value`` is ``[aware ISO time inside UTC's range, UUID string]``."""
    if not (isinstance(value, list) and len(value) == 2):
        return False
    if not all(isinstance(item, str) for item in value):
        return False
    try:
        created = datetime.fromisoformat(value[0])
        uuid.UUID(value[1])
        return created.utcoffset() is not None and bool(created.astimezone(UTC))
    except (ValueError, OverflowError):
        return False


def test_arbitrary_cursor_strings_are_422(live: LiveService) -> None:
    strings = (
        st.text(max_size=200)
        | st.from_regex(r"[A-Za-z0-9_-]{1,150}\.[A-Za-z0-9_-]{22}", fullmatch=True)
        | st.binary(max_size=120).map(lambda b: base64.urlsafe_b64encode(b).decode())
    )
    check_examples(live, strings, lambda text: refusal_problem(live.list_with(text)))


def test_arbitrary_json_in_base64_is_422(live: LiveService) -> None:
    check_examples(
        live,
        json_values | positions,
        lambda value: refusal_problem(live.list_with(unsigned(value))),
    )


def test_arbitrary_json_in_a_signed_envelope_is_200_or_422(live: LiveService) -> None:
    def verdict(value: Any) -> str | None:
        response = live.list_with(signed(value))  # over 200 characters: the query cap's 422
        if response.status_code == 200 and not is_position(value):
            return f"a signed non-position paged: {response.text[:200]}"
        return None if response.status_code == 200 else refusal_problem(response)

    check_examples(live, json_values | positions, verdict)


async def test_cursors_survive_replicas_and_restarts_only_under_the_same_secret(
    services: ServiceFactory, sim: Sim
) -> None:
    sim.set(latency_seconds=30)
    one = await services.start(API_KEYS=f"alice:{ALICE},bob:{BOB}")
    alice = {"Authorization": f"Bearer {ALICE}"}
    made = []
    for _ in range(3):
        response = await one.client.post("/v1/videos", json={"image_url": IMAGE_URL}, headers=alice)
        assert response.status_code == 202, response.text
        made.append(response.json()["id"])
    first = (await one.client.get("/v1/videos", params={"limit": 2}, headers=alice)).json()
    cursor = first["next_cursor"]
    assert [v["id"] for v in first["items"]] == made[:0:-1]

    replica = await services.start(API_KEYS=f"alice:{ALICE},bob:{BOB}")
    await services.stop(one)  # a restart: the first process is gone, the replica answers
    second = await replica.client.get(
        "/v1/videos", params={"limit": 2, "cursor": cursor}, headers=alice
    )
    assert second.status_code == 200, second.text
    assert [v["id"] for v in second.json()["items"]] == made[:1]
    assert second.json()["next_cursor"] is None

    bob = await replica.client.get(
        "/v1/videos", params={"cursor": cursor}, headers={"Authorization": f"Bearer {BOB}"}
    )
    assert refusal_problem(bob) is None, "another key's cursor was accepted"

    rotated = await services.start(
        API_KEYS=f"alice:{ALICE},bob:{BOB}", WEBHOOK_SECRET="another-secret-0123456789abcdef"
    )
    refused = await rotated.client.get("/v1/videos", params={"cursor": cursor}, headers=alice)
    assert refusal_problem(refused) is None, "a cursor signed under another secret was accepted"
    message = refused.json()["error"]["message"]
    assert WEBHOOK_SECRET not in message and cursor not in message
