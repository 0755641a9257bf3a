"""The one path a task report takes (``app.intake``): the download slot it reserves is used
or given back, whatever the write says. Built with the service's own wiring
(``app.context.open_context``) against the real databases."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from app import lifecycle
from app.context import AppContext, open_context
from app.db import create_engine, create_sessionmaker, utc_now
from app.hiapi.schemas import Task
from app.models import Via
from tests.conftest import make_settings

SLOTS = 2


def success(task_id: str) -> Task:
    return Task.model_validate(
        {
            "taskId": task_id,
            "status": "success",
            "output": [{"type": "video", "url": "https://temp.hiapi.ai/a.mp4"}],
        }
    )


def failure(task_id: str) -> Task:
    return Task.model_validate(
        {"taskId": task_id, "status": "fail", "error": {"code": "x", "message": "no"}}
    )


async def context(database_url: str, storage: Path) -> AsyncIterator[AppContext]:
    settings = make_settings(
        database_url,
        storage,
        "http://127.0.0.1:9",  # nothing here is sent to hiapi
        "https://relay.example.com",
        DOWNLOAD_CONCURRENCY=SLOTS,
    )
    engine = create_engine(database_url)
    try:
        async with open_context(
            settings,
            engine=engine,
            sessionmaker=create_sessionmaker(engine),
            clock=utc_now,
            head_revision=None,
        ) as ctx:
            yield ctx
    finally:
        await engine.dispose()


@pytest.fixture
async def ctx(database_url: str, tmp_path: Path) -> AsyncIterator[AppContext]:
    async for built in context(database_url, tmp_path):
        yield built


class TestAccept:
    async def test_a_success_that_changes_nothing_gives_its_slot_back(self, ctx: AppContext):
        now = utc_now()
        async with ctx.sessionmaker() as session, session.begin():
            video, _ = await lifecycle.create_video(
                session,
                params=lifecycle.NewVideo("https://example.invalid/a.jpg", None, "1080p", 5),
                idempotency_key=None,
                now=now,
                submit_hold=timedelta(0),
            )
            await lifecycle.record_submit_success(
                session, video_id=video.id, task_id="in-1", now=now, poll_after=timedelta(0)
            )
        failed = await ctx.intake.accept(video.id, failure("in-1"), via=Via.callback)
        assert failed == lifecycle.ApplyOutcome.failed
        # A late success of the ended video reserves a slot, loses, and returns the slot.
        late = await ctx.intake.accept(video.id, success("in-1"), via=Via.poll)
        assert late == lifecycle.ApplyOutcome.duplicate
        assert ctx.runner.free_slots == SLOTS and ctx.runner.active == 0

    async def test_an_unknown_video_gives_its_slot_back(self, ctx: AppContext):
        outcome = await ctx.intake.accept(uuid.uuid4(), success("in-2"), via=Via.callback)
        assert outcome == lifecycle.ApplyOutcome.unknown_video
        assert ctx.runner.free_slots == SLOTS and ctx.runner.active == 0

    async def test_a_failed_write_gives_its_slot_back(self, tmp_path: Path):
        # A database without the schema: the write raises, as with a database that is down.
        empty = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        async for ctx in context(empty, tmp_path):
            with pytest.raises(OperationalError):
                await ctx.intake.accept(uuid.uuid4(), success("in-3"), via=Via.callback)
            assert ctx.runner.free_slots == SLOTS and ctx.runner.active == 0
