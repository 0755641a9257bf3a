"""Fuzz the REST API and the webhook from the service's own OpenAPI document.

Schemathesis generates requests (valid and invalid) for every operation; none may produce a
5xx, and every 4xx must be our JSON error shape with a message. Bounded examples per
operation keep it CI-sized. The service runs with API keys on, so auth paths are fuzzed too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from app.main import create_app
from app.simulator import SimulatorConfig, create_simulator_app
from tests.conftest import free_socket, make_settings

API_KEY = "fuzz-key-0123456789abcdef"
EXAMPLES = 40


class ThreadedServer:
    """The service (with the simulator mounted) in a thread of its own, for blocking callers."""

    def __init__(self, database_url: str, storage: Path) -> None:
        sock = free_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sim = create_simulator_app(
            SimulatorConfig(
                public_base_url=f"{self.url}/simulator",
                latency_seconds=0.05,
                fetch_images=False,
                render_scale=0.1,
            )
        )
        app_settings = make_settings(
            database_url,
            storage,
            f"{self.url}/simulator",
            self.url,
            API_KEYS=f"fuzz:{API_KEY}",
            # Client tokens on, so the fuzz reaches the minting itself (without a secret the
            # route answers 501 to every body).
            CLIENT_TOKEN_SECRET="fuzz-client-token-secret-0123456789abcdef",
        )
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(app_settings, simulator=sim), log_level="warning")
        )
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True
        )

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            threading.Event().wait(0.01)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live(database_url: str, tmp_path: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(database_url, tmp_path / "videos") as server:
        yield server


def test_no_5xx_and_every_error_is_json(live: ThreadedServer) -> None:
    spec = httpx.get(f"{live.url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results]  # type: ignore[union-attr]  # Err raises
    assert len(operations) >= 6
    auth_headers = st.sampled_from(
        [{"Authorization": f"Bearer {API_KEY}"}, {}, {"Authorization": "Bearer nope"}]
    )
    failures: list[str] = []
    with httpx.Client(base_url=live.url, timeout=30) as client:
        for operation in operations:

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=operation.as_strategy(), extra=auth_headers)
            def check(case: Any, extra: dict[str, str]) -> None:
                kwargs = case.as_transport_kwargs()
                headers = {**(kwargs.get("headers") or {}), **extra}
                try:
                    response = client.request(
                        case.method,
                        case.formatted_path,
                        headers=headers,
                        params=kwargs.get("params"),
                        json=kwargs.get("json"),
                        content=kwargs.get("data") if "json" not in kwargs else None,
                    )
                except httpx.LocalProtocolError:
                    # The client refused to send it (the bearer scheme's generated "Bearer "
                    # with an empty token ends in a space): nothing reached the service.
                    reject()
                label = f"{case.method} {case.formatted_path} -> {response.status_code}"
                if response.status_code >= 500:
                    failures.append(f"{label}: {response.text[:200]}")
                elif response.status_code >= 400:
                    body = response.json()
                    if not (isinstance(body.get("error"), dict) and body["error"].get("message")):
                        failures.append(f"{label}: not our error shape: {response.text[:200]}")

            check()
    assert failures == [], "\n".join(failures[:20])
