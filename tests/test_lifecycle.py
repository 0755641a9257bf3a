"""State transitions against the real databases, including races between sessions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lifecycle
from app.db import create_engine, create_sessionmaker, utc_now
from app.hiapi.schemas import Task
from app.models import Status, Via, Video

LEASE = timedelta(seconds=30)
PARAMS = lifecycle.NewVideo(
    image_url="https://example.invalid/a.jpg", prompt=None, resolution="1080p", duration=5
)


@pytest.fixture
async def sm(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    yield create_sessionmaker(engine)
    await engine.dispose()


async def new_video(
    sm: async_sessionmaker[AsyncSession], *, task_id: str | None = None, hold: float = 0
) -> Video:
    now = utc_now()
    async with sm() as session, session.begin():
        video, _ = await lifecycle.create_video(
            session,
            params=PARAMS,
            idempotency_key=None,
            now=now,
            submit_hold=timedelta(seconds=hold),
        )
        if task_id is not None:
            await lifecycle.record_submit_success(
                session, video_id=video.id, task_id=task_id, now=now, poll_after=timedelta(0)
            )
    return video


def success(task_id: str) -> Task:
    return Task.model_validate(
        {
            "taskId": task_id,
            "status": "success",
            "output": [
                {"type": "video", "url": "https://temp.hiapi.ai/a.mp4", "expireAt": 4102444800}
            ],
        }
    )


async def apply(
    sm: async_sessionmaker[AsyncSession], video_id: uuid.UUID, task: Task
) -> lifecycle.ApplyOutcome:
    async with sm() as session, session.begin():
        outcome, _ = await lifecycle.apply_task(
            session,
            video_id=video_id,
            task=task,
            via=Via.callback,
            owner=uuid.uuid4().hex,
            now=utc_now(),
            lease=LEASE,
        )
    return outcome


async def reload(sm: async_sessionmaker[AsyncSession], video_id: uuid.UUID) -> Video:
    async with sm() as session:
        video = await lifecycle.get(session, video_id)
    assert video is not None
    return video


class TestApplyTask:
    async def test_concurrent_duplicates_have_exactly_one_winner(self, sm):
        video = await new_video(sm, task_id="tk-1")
        outcomes = await asyncio.gather(*(apply(sm, video.id, success("tk-1")) for _ in range(12)))
        assert outcomes.count(lifecycle.ApplyOutcome.download_claimed) == 1
        assert outcomes.count(lifecycle.ApplyOutcome.duplicate) == 11
        row = await reload(sm, video.id)
        assert row.status == Status.downloading and row.lease_owner is not None

    async def test_callback_before_task_id_is_stored_is_adopted(self, sm):
        video = await new_video(sm, hold=60)  # the submit request is still waiting on hiapi
        assert (
            await apply(sm, video.id, success("tk-early"))
            == lifecycle.ApplyOutcome.download_claimed
        )
        async with sm() as session, session.begin():
            late = await lifecycle.record_submit_success(
                session,
                video_id=video.id,
                task_id="tk-early",
                now=utc_now(),
                poll_after=timedelta(0),
            )
        assert late is None  # the create response arrives late and changes nothing
        row = await reload(sm, video.id)
        assert row.status == Status.downloading and row.task_id == "tk-early"

    async def test_fail_then_success_keeps_the_first_terminal_state(self, sm):
        video = await new_video(sm, task_id="tk-2")
        failed = Task.model_validate(
            {"taskId": "tk-2", "status": "fail", "error": {"code": "nsfw", "message": "refused"}}
        )
        assert await apply(sm, video.id, failed) == lifecycle.ApplyOutcome.failed
        assert await apply(sm, video.id, success("tk-2")) == lifecycle.ApplyOutcome.duplicate
        row = await reload(sm, video.id)
        assert (row.status, row.error_code, row.error_message) == (Status.failed, "nsfw", "refused")

    async def test_task_of_another_video_is_foreign(self, sm):
        video = await new_video(sm, task_id="tk-3")
        await new_video(sm, task_id="tk-other")
        assert await apply(sm, video.id, success("tk-other")) == lifecycle.ApplyOutcome.foreign_task
        assert (await reload(sm, video.id)).status == Status.processing

    async def test_success_of_an_unstored_task_of_this_video_is_kept(self, sm):
        video = await new_video(sm, task_id="tk-b")
        failed = Task.model_validate({"taskId": "tk-b", "status": "fail"})
        assert await apply(sm, video.id, failed) == lifecycle.ApplyOutcome.failed
        assert await apply(sm, video.id, success("tk-a")) == lifecycle.ApplyOutcome.download_claimed
        row = await reload(sm, video.id)
        assert (row.status, row.task_id, row.error_code) == (Status.downloading, "tk-a", None)
        # and once a clip is on its way, neither task can change that
        assert await apply(sm, video.id, success("tk-b")) == lifecycle.ApplyOutcome.stale_task

    async def test_handling_task_adopts_missing_task_id_only(self, sm):
        video = await new_video(sm, hold=60)
        handling = Task.model_validate({"taskId": "tk-4", "status": "handling"})
        assert await apply(sm, video.id, handling) == lifecycle.ApplyOutcome.adopted
        assert await apply(sm, video.id, handling) == lifecycle.ApplyOutcome.pending
        row = await reload(sm, video.id)
        assert (row.status, row.task_id) == (Status.processing, "tk-4")


class TestClaims:
    async def test_concurrent_claimers_get_disjoint_rows(self, sm):
        ids = {(await new_video(sm, task_id=f"tk-c{i}")).id for i in range(20)}

        async def claim() -> list[uuid.UUID]:
            async with sm() as session, session.begin():
                rows = await lifecycle.claim_due(
                    session,
                    status=Status.processing,
                    now=utc_now(),
                    hold=LEASE,
                    owner=uuid.uuid4().hex,
                    limit=7,
                )
            return [r.id for r in rows]

        batches = await asyncio.gather(*(claim() for _ in range(5)))
        claimed = [vid for batch in batches for vid in batch]
        assert len(claimed) == len(set(claimed)) == 20
        assert set(claimed) == ids

    async def test_rows_not_yet_due_are_not_claimed(self, sm):
        await new_video(sm, hold=60)
        async with sm() as session, session.begin():
            rows = await lifecycle.claim_due(
                session, status=Status.queued, now=utc_now(), hold=LEASE, owner="x", limit=10
            )
        assert rows == []

    async def test_download_lease_is_exclusive_until_it_expires(self, sm):
        video = await new_video(sm, task_id="tk-l")
        assert await apply(sm, video.id, success("tk-l")) == lifecycle.ApplyOutcome.download_claimed
        async with sm() as session, session.begin():
            stolen = await lifecycle.claim_download(
                session, video_id=video.id, owner="other", now=utc_now(), lease=LEASE
            )
        assert stolen is None
        async with sm() as session, session.begin():
            later = await lifecycle.claim_download(
                session, video_id=video.id, owner="other", now=utc_now() + LEASE * 2, lease=LEASE
            )
        assert later is not None and later.lease_owner == "other"
        original = await reload(sm, video.id)
        async with sm() as session, session.begin():
            ready = await lifecycle.mark_ready(
                session,
                video_id=video.id,
                owner="not-the-owner",
                size_bytes=1,
                sha256="0" * 64,
                storage_key="k",
                now=utc_now(),
            )
        assert ready is None and original.status == Status.downloading


class TestIdempotentCreate:
    async def test_concurrent_creates_with_one_key_make_one_row(self, sm):
        async def create() -> lifecycle.Created:
            async with sm() as session, session.begin():
                _, created = await lifecycle.create_video(
                    session, params=PARAMS, idempotency_key="same", now=utc_now(), submit_hold=LEASE
                )
            return created

        results = await asyncio.gather(*(create() for _ in range(6)))
        assert sorted(results) == sorted(
            [lifecycle.Created.created] + [lifecycle.Created.replayed] * 5
        )
