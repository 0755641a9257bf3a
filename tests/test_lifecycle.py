"""State transitions against the real databases, including races between sessions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lifecycle, repository
from app.db import create_engine, create_sessionmaker, utc_now
from app.group_commit import GroupCommit
from app.hiapi.schemas import Task
from app.metrics import METRICS
from app.models import Notification, Status, Via, Video

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
    sm: async_sessionmaker[AsyncSession],
    video_id: uuid.UUID,
    task: Task,
    owner: str | None = "default",
) -> lifecycle.ApplyOutcome:
    async with sm() as session, session.begin():
        outcome = await lifecycle.apply_task(
            session,
            video_id=video_id,
            task=task,
            via=Via.callback,
            owner=uuid.uuid4().hex if owner == "default" else owner,
            now=utc_now(),
            lease=LEASE,
        )
    return outcome


async def reload(sm: async_sessionmaker[AsyncSession], video_id: uuid.UUID) -> Video:
    async with sm() as session:
        video = await repository.get(session, video_id)
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


def failure(task_id: str) -> Task:
    return Task.model_validate(
        {"taskId": task_id, "status": "fail", "error": {"code": "boom", "message": "no clip"}}
    )


def handling(task_id: str) -> Task:
    return Task.model_validate({"taskId": task_id, "status": "handling"})


async def row_state(sm: async_sessionmaker[AsyncSession], video_id: uuid.UUID) -> tuple[Any, ...]:
    row = await reload(sm, video_id)
    return (
        row.status,
        row.task_id,
        row.error_code,
        row.error_message,
        row.output_url,
        row.output_expires_at,
        row.completed_via,
        row.download_attempts,
        row.lease_owner is not None,
    )


class TestApplyReports:
    """The webhook's group commit writes a burst with ``apply_reports``; every report must
    end exactly as it would through ``apply_task`` one at a time."""

    async def _scenario(self, sm, run: str) -> list[tuple[uuid.UUID, Task, str | None]]:
        """One report per outcome, plus copies of the same report within the batch."""
        fresh_fail = await new_video(sm, task_id=f"{run}-f")
        fresh_success = await new_video(sm, task_id=f"{run}-s")
        no_task_yet = await new_video(sm, hold=60)
        adopt_me = await new_video(sm, hold=60)
        already_failed = await new_video(sm, task_id=f"{run}-d")
        await apply(sm, already_failed.id, failure(f"{run}-d"))
        other = await new_video(sm, task_id=f"{run}-other")
        rescuable = await new_video(sm, task_id=f"{run}-new")  # an earlier task still finishes
        no_slot = await new_video(sm, task_id=f"{run}-q")
        reports = [
            (fresh_fail.id, failure(f"{run}-f")),
            (fresh_success.id, success(f"{run}-s")),
            (fresh_success.id, success(f"{run}-s")),  # a duplicate in the same batch
            (no_task_yet.id, success(f"{run}-early")),  # overtakes the create response
            (adopt_me.id, handling(f"{run}-h")),
            (adopt_me.id, handling(f"{run}-h")),
            (already_failed.id, failure(f"{run}-d")),  # a duplicate of a stored callback
            (fresh_fail.id, failure(f"{run}-f")),
            (other.id, success(f"{run}-s")),  # another video's task
            (rescuable.id, success(f"{run}-old")),  # an earlier task of this video
            (rescuable.id, failure(f"{run}-stale")),
            (uuid.uuid4(), failure(f"{run}-nobody")),  # no such video
        ]
        owner = uuid.uuid4().hex
        return [(v, t, owner) for v, t in reports] + [(no_slot.id, success(f"{run}-q"), None)]

    async def test_a_batch_ends_like_one_report_at_a_time(self, sm):
        one_by_one = await self._scenario(sm, "seq")
        expected = [await apply(sm, video_id, task, owner) for video_id, task, owner in one_by_one]

        batch = await self._scenario(sm, "batch")
        async with sm() as session, session.begin():
            outcomes = await lifecycle.apply_reports(
                session,
                [lifecycle.TaskReport(v, t, Via.callback, owner) for v, t, owner in batch],
                now=utc_now(),
                lease=LEASE,
            )
        assert outcomes == expected
        assert set(outcomes) == set(lifecycle.ApplyOutcome)  # every outcome is exercised
        for (seq_id, seq_task, _), (batch_id, _, _) in zip(one_by_one, batch, strict=True):
            if seq_task.task_id.endswith("-nobody"):
                continue
            seq, got = await row_state(sm, seq_id), await row_state(sm, batch_id)
            # Same state, same columns; task ids differ only by the run prefix.
            assert got[0] == seq[0]
            assert (got[1] or "").removeprefix("batch") == (seq[1] or "").removeprefix("seq")
            assert got[2:] == seq[2:]

    async def _notified_video(self, sm, task_id: str) -> Video:
        async with sm() as session, session.begin():
            video, _ = await lifecycle.create_video(
                session,
                params=lifecycle.NewVideo(
                    image_url="https://example.invalid/a.jpg",
                    prompt=None,
                    resolution="720p",
                    duration=3,
                    notify_url="https://hooks.example.invalid/v",
                ),
                idempotency_key=None,
                now=utc_now(),
                submit_hold=timedelta(0),
            )
            await lifecycle.record_submit_success(
                session, video_id=video.id, task_id=task_id, now=utc_now(), poll_after=timedelta(0)
            )
        return video

    async def test_only_an_ended_video_queues_its_notification(self, sm):
        failing = await self._notified_video(sm, "n-1")
        succeeding = await self._notified_video(sm, "n-2")
        fail = lifecycle.TaskReport(failing.id, failure("n-1"), Via.callback, "owner")
        claim = lifecycle.TaskReport(succeeding.id, success("n-2"), Via.callback, "owner")
        async with sm() as session, session.begin():
            outcomes = await lifecycle.apply_reports(
                session, [fail, claim, fail], now=utc_now(), lease=LEASE
            )
        assert outcomes == [
            lifecycle.ApplyOutcome.failed,
            lifecycle.ApplyOutcome.download_claimed,
            lifecycle.ApplyOutcome.duplicate,
        ]
        async with sm() as session:
            note = await repository.latest_notification(session, failing.id)
            pending = await repository.latest_notification(session, succeeding.id)
            count = await session.scalar(select(func.count()).select_from(Notification))
        assert note is not None and note.event == "video.failed" and note.status == "pending"
        assert pending is None  # downloading is not an end: nothing is pushed yet
        assert count == 1

    async def test_a_claim_keeps_expiry_and_lease_exactly(self, sm):
        video = await new_video(sm, task_id="x-1")
        now = utc_now()
        async with sm() as session, session.begin():
            (outcome,) = await lifecycle.apply_reports(
                session,
                [lifecycle.TaskReport(video.id, success("x-1"), Via.callback, "me")],
                now=now,
                lease=LEASE,
            )
        row = await reload(sm, video.id)
        assert outcome == lifecycle.ApplyOutcome.download_claimed
        assert row.lease_owner == "me" and row.due_at == now + LEASE
        assert row.output_expires_at is not None and row.output_expires_at.timestamp() == 4102444800
        # The claimed row is due for the reconciler exactly when its lease ends.
        async with sm() as session, session.begin():
            early = await lifecycle.claim_download(
                session, video_id=video.id, owner="thief", now=now + LEASE / 2, lease=LEASE
            )
            late = await lifecycle.claim_download(
                session, video_id=video.id, owner="next", now=now + LEASE, lease=LEASE
            )
        assert early is None and late is not None


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

    async def test_a_claim_takes_at_most_its_limit_oldest_first(self, sm):
        videos = [await new_video(sm, task_id=f"tk-m{i}") for i in range(5)]
        taken: list[uuid.UUID] = []
        for _ in range(3):
            async with sm() as session, session.begin():
                rows = await lifecycle.claim_due(
                    session,
                    status=Status.processing,
                    now=utc_now(),
                    hold=LEASE,
                    owner=uuid.uuid4().hex,
                    limit=2,
                )
            assert len(rows) <= 2  # Postgres took all 5 in one claim before (issue 14)
            taken += [r.id for r in rows]
        assert taken == [v.id for v in videos]  # due first, claimed first

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
        assert ready is None
        # Read after the attempt: the row is untouched, still the lease holder's to finish.
        after = await reload(sm, video.id)
        assert after.status == Status.downloading and after.lease_owner == "other"
        assert after.sha256 is None and after.storage_key is None and after.ready_at is None


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


class TestGroupCommit:
    """Callbacks arriving together share a transaction; each caller still gets its own
    outcome, only after the commit, and one bad report cannot fail the others."""

    def committer(self, sm) -> GroupCommit[lifecycle.TaskReport, lifecycle.ApplyOutcome]:
        return GroupCommit(
            sm,
            lambda session, reports: lifecycle.apply_reports(
                session, reports, now=utc_now(), lease=LEASE
            ),
            key=lambda report: report.video_id.hex,
            name="test",
        )

    async def test_a_burst_is_written_in_few_transactions(self, sm):
        videos = [await new_video(sm, task_id=f"g-{i}") for i in range(40)]
        before = METRICS.group_commit_size.labels("test")._sum.get()
        committer = self.committer(sm)
        reports = [
            lifecycle.TaskReport(v.id, failure(f"g-{i}"), Via.callback, "o")
            for i, v in enumerate(videos)
        ]
        outcomes = await asyncio.gather(*(committer.submit(r) for r in reports + reports))
        assert outcomes[:40] == [lifecycle.ApplyOutcome.failed] * 40
        assert outcomes[40:] == [lifecycle.ApplyOutcome.duplicate] * 40
        assert METRICS.group_commit_size.labels("test")._sum.get() - before == 80
        for video in videos:
            assert (await reload(sm, video.id)).status == Status.failed

    async def test_one_conflicting_report_fails_alone(self, sm):
        taken = await new_video(sm, task_id="c-taken")
        waiting = await new_video(sm, hold=60)  # no task id yet
        fine = [await new_video(sm, task_id=f"c-{i}") for i in range(5)]
        committer = self.committer(sm)
        # hiapi says the waiting video runs a task that is already another video's: the
        # unique task id refuses it, and only that report fails.
        poison = lifecycle.TaskReport(waiting.id, handling("c-taken"), Via.callback, "o")
        good = [
            lifecycle.TaskReport(v.id, failure(f"c-{i}"), Via.callback, "o")
            for i, v in enumerate(fine)
        ]
        results = await asyncio.gather(
            *(committer.submit(r) for r in [*good, poison]), return_exceptions=True
        )
        assert results[:5] == [lifecycle.ApplyOutcome.failed] * 5
        assert isinstance(results[5], IntegrityError)
        assert (await reload(sm, waiting.id)).task_id is None
        assert (await reload(sm, taken.id)).task_id == "c-taken"
        for video in fine:
            assert (await reload(sm, video.id)).status == Status.failed

    async def test_a_database_error_reaches_every_caller_and_nothing_is_written(self, sm, tmp_path):
        video = await new_video(sm, task_id="e-1")
        # A database without the schema: every statement fails.
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
        broken = create_sessionmaker(engine)
        committer: GroupCommit[lifecycle.TaskReport, lifecycle.ApplyOutcome] = GroupCommit(
            broken,
            lambda session, reports: lifecycle.apply_reports(
                session, reports, now=utc_now(), lease=LEASE
            ),
            key=lambda report: report.video_id.hex,
        )
        report = lifecycle.TaskReport(video.id, failure("e-1"), Via.callback, "o")
        results = await asyncio.gather(
            committer.submit(report), committer.submit(report), return_exceptions=True
        )
        await engine.dispose()
        assert all(isinstance(r, OperationalError) for r in results)
        assert (await reload(sm, video.id)).status == Status.processing


class TestSqliteWriteTurns:
    """On SQLite, one process's write transactions take turns instead of meeting in SQLite's
    busy handler (which polls with sleeps of up to 100 ms, or fails at busy_timeout)."""

    @pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
    async def test_concurrent_writers_all_commit_with_a_tiny_lock_timeout(self, database_url: str):
        # A 20 ms busy timeout: writers left to SQLite would fail with "database is locked".
        engine = create_engine(database_url, timeout=0.02)
        sm = create_sessionmaker(engine)
        try:

            async def writer() -> None:
                async with sm() as session, session.begin():
                    await lifecycle.create_video(
                        session,
                        params=PARAMS,
                        idempotency_key=None,
                        now=utc_now(),
                        submit_hold=timedelta(0),
                    )
                    await asyncio.sleep(0.01)  # holds the write lock across an await

            await asyncio.gather(*(writer() for _ in range(20)))
            async with sm() as session:
                assert await session.scalar(select(func.count()).select_from(Video)) == 20
        finally:
            await engine.dispose()

    @pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
    async def test_a_transaction_opened_inside_another_by_the_same_task_does_not_wait_for_it(
        self, database_url: str, sm: async_sessionmaker[AsyncSession]
    ):
        async def nested() -> int | None:
            async with sm() as outer, outer.begin():
                async with sm() as inner, inner.begin():
                    return await inner.scalar(select(func.count()).select_from(Video))

        assert await asyncio.wait_for(nested(), 5) == 0

    @pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
    async def test_a_turn_that_does_not_come_in_time_fails_instead_of_queueing_on(
        self, database_url: str
    ):
        engine = create_engine(database_url, timeout=0.1)
        sm = create_sessionmaker(engine, timeout=0.1)
        holding = asyncio.Event()
        try:

            async def long_writer() -> None:
                async with sm() as session, session.begin():
                    holding.set()
                    await asyncio.sleep(0.6)  # six of the other's timeouts

            slow = asyncio.create_task(long_writer())
            await holding.wait()
            with pytest.raises(TimeoutError):
                async with sm() as session, session.begin():
                    pass
            # It failed while the turn was still held, instead of queueing until it came.
            # (How soon is for the bench; the loop's timers fire in deadline order.)
            assert not slow.done()
            await slow
            async with sm() as session, session.begin():  # the turns were given back
                pass
        finally:
            await engine.dispose()
