"""notify_url pushes with the notifier's safety on: private answers refused, NOTIFY_MAX_ATTEMPTS
honoured, the ``gave_up`` outcome counted, and a rescued video told twice (issue 11).

Every other notify test sets ``NOTIFY_ALLOW_LOCAL=True``; here it is off wherever the refusal is
what is tested. Receivers are real HTTP servers on 127.0.0.1 that count what reaches them, and
the service is a real one (simulator, webhook, database: SQLite and Postgres). The only names
looked up are ``localhost`` (answered from ``/etc/hosts``, no DNS query leaves the machine) and
names answered by a resolver handed to ``Notifier(resolver=...)``.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import create_engine, create_sessionmaker
from app.jobs.notifier import Notifier
from tests.conftest import RunningServer, Service, ServiceFactory, Sim, free_socket
from tests.test_dns_pinning import (
    Clock,
    CountingServer,
    ScriptedResolver,
    latest,
    notification_for,
)
from tests.test_flow import callback_path
from tests.test_frontend_api import NOTIFY_SECRET


class Receiver:
    """A notify_url receiver on 127.0.0.1: records every POST and answers ``status``."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            self.requests.append((dict(request.headers), json.loads(await request.body())))
            return Response(status_code=self.status)

        self.server = RunningServer(app, free_socket())

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.server.start()
    yield receiver
    await receiver.server.stop()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def notify_of(service: Service, video_id: str) -> dict[str, Any]:
    notify: dict[str, Any] = (await service.get(video_id))["notify"]
    return notify


async def notify_status(
    service: Service, video_id: str, *statuses: str, timeout: float = 10.0
) -> dict[str, Any]:
    async def reached() -> bool:
        return (await notify_of(service, video_id))["status"] in statuses

    await until(reached, f"notify status in {statuses}", timeout)
    return await notify_of(service, video_id)


async def notification_counts(service: Service) -> dict[str, float]:
    """``videorelay_notifications_total`` by outcome, read from ``/metrics`` (process-wide)."""
    text = (await service.client.get("/metrics")).text
    pattern = r'^videorelay_notifications_total\{outcome="(\w+)"\} ([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


# --- the refusal of private addresses, through the service --------------------------------


async def test_a_name_answering_loopback_is_refused_every_attempt_then_the_push_fails(
    services: ServiceFactory, sim: Sim
):
    # NOTIFY_ALLOW_LOCAL is off (the default). `localhost` is a name, so the submit takes it
    # (only IP literals are judged at submit); every delivery resolves it, finds 127.0.0.1
    # and refuses before connecting: the receiver never sees a connection.
    async with CountingServer(body=b"") as internal:
        service = await services.start(NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_MAX_ATTEMPTS=2)
        assert service.settings.NOTIFY_ALLOW_LOCAL is False
        before = await notification_counts(service)
        video = await service.submit(notify_url=f"https://localhost:{internal.port}/hook")
        await service.wait_for(video["id"], "ready")
        notify = await notify_status(service, video["id"], "failed")
        assert notify["attempts"] == 2, notify
        assert notify["last_status_code"] is None, notify
        assert "private or local" in notify["last_error"], notify
        assert "refused before connecting" in notify["last_error"], notify
        assert str(internal.port) not in notify["last_error"], notify
        assert internal.connections == 0
        assert grew(before, await notification_counts(service)) == {"retry": 1, "gave_up": 1}


# --- the refusal, with a resolver we control ----------------------------------------------


@pytest.fixture
async def sm(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url, timeout=10)
    yield create_sessionmaker(engine, timeout=10)
    await engine.dispose()


def notifier(
    sm: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    resolver: ScriptedResolver,
    clock: Clock,
    *,
    allow_local: bool,
    max_attempts: int,
) -> Notifier:
    async def render(video_id: uuid.UUID) -> dict[str, Any]:
        return {"id": str(video_id)}

    return Notifier(
        sessionmaker=sm,
        http=http,
        secret=b"notify-secret",
        render=render,
        max_attempts=max_attempts,
        allow_local=allow_local,
        retry_base=0.01,
        retry_max=0.01,
        interval=1.0,
        clock=clock,
        resolver=resolver,
    )


@pytest.mark.parametrize("answer", ["127.0.0.1", "::ffff:127.0.0.1"])
async def test_a_name_whose_only_answer_is_private_is_refused_until_given_up(
    sm: async_sessionmaker[AsyncSession], answer: str
):
    # The answer leads to a real server on 127.0.0.1 (IPv4-mapped too), so a notifier that
    # did not refuse would be seen connecting. With NOTIFY_ALLOW_LOCAL the same answer is
    # delivered to: the refusal, and nothing else, is what keeps the push away.
    async with CountingServer(body=b"") as internal, httpx.AsyncClient(timeout=5) as http:
        resolver = ScriptedResolver([(answer, internal.port)])
        clock = Clock()
        strict = notifier(sm, http, resolver, clock, allow_local=False, max_attempts=2)
        video_id = await notification_for(sm, f"https://hooks.example:{internal.port}/v")
        assert await strict.tick() == 1
        note = await latest(sm, video_id)
        assert (note.status, note.attempts) == ("pending", 1), note.last_error
        clock.now += timedelta(seconds=5)
        assert await strict.tick() == 1
        note = await latest(sm, video_id)
        assert (note.status, note.attempts) == ("failed", 2)
        assert "private or local" in note.last_error and note.last_status_code is None
        clock.now += timedelta(seconds=5)
        assert await strict.tick() == 0  # given up: never claimed again
        assert resolver.lookups == [("hooks.example", internal.port)] * 2
        assert internal.connections == 0

        lax = notifier(sm, http, resolver, clock, allow_local=True, max_attempts=2)
        other = await notification_for(sm, f"http://hooks.example:{internal.port}/v")
        assert await lax.tick() == 1
        assert (await latest(sm, other)).status == "delivered"
        assert internal.connections == 1


# --- NOTIFY_MAX_ATTEMPTS and the give-up -------------------------------------------------


async def test_a_receiver_answering_500_gets_exactly_max_attempts_then_the_push_fails(
    services: ServiceFactory, sim: Sim, receiver: Receiver
):
    receiver.status = 500
    service = await services.start(
        NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True, NOTIFY_MAX_ATTEMPTS=3
    )
    before = await notification_counts(service)
    video = await service.submit(notify_url=receiver.url)
    await service.wait_for(video["id"], "ready")
    notify = await notify_status(service, video["id"], "failed")
    assert (notify["attempts"], notify["last_status_code"]) == (3, 500), notify
    assert notify["last_error"] == "receiver answered HTTP 500", notify
    assert len(receiver.requests) == 3
    # One message, retried: the same webhook-id every time.
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1
    assert {body["type"] for _, body in receiver.requests} == {"video.ready"}
    # Nothing is due any more: a further tick claims nothing, and nothing more arrives.
    assert await service.ctx.notifier.tick() == 0
    assert len(receiver.requests) == 3
    assert grew(before, await notification_counts(service)) == {"retry": 2, "gave_up": 1}


async def test_a_receiver_that_recovers_before_the_last_attempt_gets_the_push(
    services: ServiceFactory, sim: Sim, receiver: Receiver
):
    # The bound counts attempts, not failures in a row that were followed by a success.
    receiver.status = 503
    service = await services.start(
        NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True, NOTIFY_MAX_ATTEMPTS=3
    )
    video = await service.submit(notify_url=receiver.url)

    async def tried_twice() -> bool:
        return len(receiver.requests) >= 2

    await until(tried_twice, "two failed deliveries")
    receiver.status = 204
    notify = await notify_status(service, video["id"], "delivered", "failed")
    assert (notify["status"], notify["attempts"]) == ("delivered", 3), notify
    assert len(receiver.requests) == 3


# --- a rescued video is notified twice ----------------------------------------------------


async def test_a_rescued_video_is_notified_failed_then_ready(
    services: ServiceFactory, sim: Sim, receiver: Receiver
):
    # README, "A success that comes late": the video failed on its task B; the success of its
    # earlier task A (an ambiguous create, id never stored) still arrives on its signed URL,
    # and the video ends ready. Both ends are pushed: video.failed, then video.ready.
    sim.set(callback_drop_rate=1.0, latency_seconds=30)
    service = await services.start(NOTIFY_SECRET=NOTIFY_SECRET, NOTIFY_ALLOW_LOCAL=True)
    video = await service.submit(notify_url=receiver.url)
    earlier = (await service.submit())["task_id"]  # a real task with a real output
    auth = {"Authorization": "Bearer sk-x"}
    await sim.client.post(f"/_sim/tasks/{video['task_id']}/complete?outcome=fail")
    failed_task = (await sim.client.get(f"/v1/tasks/{video['task_id']}", headers=auth)).json()
    ack = await service.client.post(callback_path(video["id"]), json=failed_task)
    assert ack.json()["outcome"] == "failed"

    def pushed(count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len(receiver.requests) >= count

        return check

    await until(pushed(1), "the video.failed push")
    # The notifier records the delivery once the receiver has answered: wait for the record.
    await notify_status(service, video["id"], "delivered")

    done = (await sim.client.post(f"/_sim/tasks/{earlier}/complete?outcome=success")).json()
    rescue = {**done["data"], "taskId": "tk-ambiguous-first-create"}
    ack = await service.client.post(callback_path(video["id"]), json=rescue)
    assert ack.json()["outcome"] == "download_claimed"
    await service.wait_for(video["id"], "ready")
    await until(pushed(2), "the video.ready push")

    (first_headers, first), (second_headers, second) = receiver.requests
    assert (first["type"], first["data"]["status"]) == ("video.failed", "failed")
    assert first["data"]["error"]["code"] == "generation_failed"
    assert (second["type"], second["data"]["status"]) == ("video.ready", "ready")
    assert second["data"]["task_id"] == "tk-ambiguous-first-create"
    assert first["data"]["id"] == second["data"]["id"] == video["id"]
    assert first_headers["webhook-id"] != second_headers["webhook-id"]  # two messages
    notify = await notify_status(service, video["id"], "delivered")
    assert notify["attempts"] == 1  # the latest push (video.ready), delivered at once
    assert len(receiver.requests) == 2
