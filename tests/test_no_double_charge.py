"""The no-double-charge rule, through real HTTP on both databases.

hiapi has no idempotency key, so a create whose answer never arrived (a timeout, or a gateway
502/504 in front of hiapi) may have made a paid task. videorelay then holds the video for
``RECONCILE_AFTER_SECONDS`` so that task's callback can be adopted, and only creates again if
none came (README, "Guarantees"). Here the callback is dropped, so nothing but the hold stands
between the video and a second paid task: ``tasks_created`` must stay 1 until the hold is over.

"Nothing happens before T" is checked by watching the simulator's counters over a bounded
window that ends before the earliest moment the code may create again; every other wait polls
for its condition with a deadline.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy import select

from app.models import Video
from tests.conftest import RunningServer, Service, ServiceFactory, Sim, free_socket

HOLD_SECONDS = 2.0  # RECONCILE_AFTER_SECONDS: the hold after an ambiguous create
HIAPI_TIMEOUT = 0.5
POLL_EVERY = 0.02


async def db_video(service: Service, video_id: str) -> Video:
    async with service.ctx.sessionmaker() as session:
        return (
            await session.execute(select(Video).where(Video.id == uuid.UUID(video_id)))
        ).scalar_one()


async def sim_tasks(sim: Sim) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = (await sim.client.get("/_sim/tasks")).json()["tasks"]
    return sorted(tasks, key=lambda t: float(t["created_at"]))


async def wait_until_tasks(sim: Sim, count: int, *, timeout: float) -> list[dict[str, Any]]:
    """Poll the simulator until it has made ``count`` tasks (fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (created := (await sim.stats())["tasks_created"]) < count:
        assert time.monotonic() < deadline, f"{created} task(s) after {timeout}s, wanted {count}"
        await asyncio.sleep(POLL_EVERY)
    return await sim_tasks(sim)


async def watch_no_new_task(sim: Sim, *, until: float) -> int:
    """Watch ``tasks_created`` until the wall-clock time ``until``; return how often it was read.

    The bounded observation window of "nothing is created before T": it fails at the first
    read that shows a second task.
    """
    reads = 0
    while time.time() < until:
        stats = await sim.stats()
        reads += 1
        assert stats["tasks_created"] == 1, (
            f"a second task was created {until - time.time():.2f}s before the window's end: {stats}"
        )
        await asyncio.sleep(POLL_EVERY)
    return reads


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of Prometheus text format (0 if absent)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(re.escape(f"{name}{{{label_text}}}") + r" ([0-9.e+-]+)", text)
    return float(found.group(1)) if found else 0.0


async def test_ambiguous_create_with_the_callback_dropped_is_held_until_reconcile_after(
    services: ServiceFactory, sim: Sim
) -> None:
    # The create makes task 1 but answers after HIAPI_TIMEOUT_SECONDS: ambiguous. hiapi drops
    # its callback, so videorelay never learns task 1's id.
    sim.set(
        create_timeout_rate=1.0,
        timeout_delay_seconds=HIAPI_TIMEOUT + 0.3,
        callback_drop_rate=1.0,
        latency_seconds=0.05,
    )
    service = await services.start(
        HIAPI_TIMEOUT_SECONDS=HIAPI_TIMEOUT,
        RECONCILE_AFTER_SECONDS=HOLD_SECONDS,
        RECONCILE_INTERVAL_SECONDS=0.05,
    )
    video = await service.submit()
    assert video["status"] == "queued" and video["task_id"] is None, video
    (first,) = await wait_until_tasks(sim, 1, timeout=5)
    sim.set(create_timeout_rate=0.0)  # a create after the hold is answered at once
    row = await db_video(service, video["id"])
    assert (row.ambiguous_submits, row.submit_attempts) == (1, 1)

    # The earliest legitimate second create is HOLD_SECONDS after the timeout, itself at
    # least HIAPI_TIMEOUT after task 1 was made; watch until HOLD_SECONDS after task 1.
    reads = await watch_no_new_task(sim, until=float(first["created_at"]) + HOLD_SECONDS)
    assert reads >= 10  # the window was really watched, not skipped
    held = await service.get(video["id"])
    assert (held["status"], held["task_id"]) == ("queued", None)

    # Only once no callback came is the task created again: a second, paid task.
    first, second = (await wait_until_tasks(sim, 2, timeout=10))[:2]
    assert float(second["created_at"]) - float(first["created_at"]) >= HOLD_SECONDS
    assert first["callback_url"] == second["callback_url"]  # the same video's signed URL
    deadline = time.monotonic() + 10
    while (current := await service.get(video["id"]))["task_id"] is None:
        assert time.monotonic() < deadline, current
        await asyncio.sleep(POLL_EVERY)
    # Task 2 normally; a later one only if that create also outlived HIAPI_TIMEOUT (a loaded
    # machine), and then after another full hold. Never task 1: its id was never known.
    assert current["status"] == "processing" and current["task_id"] != first["task_id"]
    later = [t for t in await sim_tasks(sim) if t["task_id"] != first["task_id"]]
    assert current["task_id"] in {t["task_id"] for t in later}
    assert all(float(t["created_at"]) - float(first["created_at"]) >= HOLD_SECONDS for t in later)


def gateway_app(upstream: str, status: int) -> tuple[FastAPI, dict[str, int]]:
    """A reverse proxy in front of hiapi whose first create is passed on (hiapi makes the
    task) but answered ``status`` with an HTML page, as a gateway that gave up waiting does.
    Everything else is passed through unchanged."""
    app = FastAPI()
    seen = {"creates": 0, "gateway_errors": 0}

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        headers = {
            k: v for k, v in request.headers.items() if k in ("authorization", "content-type")
        }
        async with httpx.AsyncClient(base_url=upstream, timeout=10) as client:
            answer = await client.request(
                request.method, f"/{path}", content=await request.body(), headers=headers
            )
        if request.method == "POST" and path == "v1/tasks":
            seen["creates"] += 1
            if seen["creates"] == 1:
                seen["gateway_errors"] += 1
                page = f"<html><body><h1>{status} Gateway error</h1></body></html>"
                return Response(page, status_code=status, media_type="text/html")
        return Response(
            answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
        )

    return app, seen


@pytest.fixture(params=[502, 504])
async def gateway(request: pytest.FixtureRequest, sim: Sim) -> AsyncIterator[dict[str, Any]]:
    app, seen = gateway_app(sim.url, request.param)
    server = RunningServer(app, free_socket())
    await server.start()
    yield {"url": server.url, "status": request.param, "seen": seen}
    await server.stop()


async def test_gateway_502_504_on_create_is_ambiguous_and_held(
    services: ServiceFactory, sim: Sim, gateway: dict[str, Any]
) -> None:
    sim.set(callback_drop_rate=1.0, latency_seconds=0.05)
    service = await services.start(
        HIAPI_BASE_URL=gateway["url"],
        RECONCILE_AFTER_SECONDS=HOLD_SECONDS,
        RECONCILE_INTERVAL_SECONDS=0.05,
        METRICS_CACHE_SECONDS=0,
    )
    before = (await service.client.get("/metrics")).text
    video = await service.submit()
    # hiapi made the task behind the gateway; videorelay cannot know, so it holds the video.
    assert video["status"] == "queued" and video["task_id"] is None, video
    assert gateway["seen"]["gateway_errors"] == 1
    tasks = await sim_tasks(sim)
    assert len(tasks) == 1, tasks  # not created again at once
    first = tasks[0]
    row = await db_video(service, video["id"])
    assert (row.ambiguous_submits, row.submit_attempts) == (1, 1)
    assert f"hiapi answered {gateway['status']}" in (row.last_error or "")

    after = (await service.client.get("/metrics")).text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("videorelay_submits_total", outcome="ambiguous") == 1
    assert grew("videorelay_submits_total", outcome="retry_later") == 0
    assert (
        grew("videorelay_upstream_requests_total", endpoint="create", result=str(gateway["status"]))
        == 1
    )

    # A plain 5xx would be retried after RETRY_BASE_SECONDS (0.05 s here, at most 0.5 s):
    # watch three quarters of the hold; no second create may come.
    reads = await watch_no_new_task(sim, until=float(first["created_at"]) + HOLD_SECONDS * 0.75)
    assert reads >= 3
    assert gateway["seen"]["creates"] == 1
    assert (await service.get(video["id"]))["status"] == "queued"
