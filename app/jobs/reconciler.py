"""The reconciler: the safety net for callbacks that never come.

Every ``RECONCILE_INTERVAL_SECONDS`` each replica runs one tick:

1. resubmit ``queued`` videos whose retry time has come;
2. poll ``GET /v1/tasks/{task_id}`` for ``processing`` videos still waiting
   ``RECONCILE_AFTER_SECONDS`` after submit, and hand the answer to ``app.intake`` (the
   webhook's own path). A terminal answer found this way is a *recovered* video: its callback
   never arrived. Operators watch that number;
3. resume downloads whose lease expired (a crashed or stopped replica) or whose retry time
   came (``JobRunner.refill``);
4. expire uploaded images past their retention, and delete spend rows that can never be
   charged again (``app.spend.purge_spend``), a bounded batch of each;
5. with ``VIDEO_RETENTION_SECONDS``, delete ready and failed videos created longer ago than
   that, ``RECONCILE_BATCH_SIZE`` per tick, the way ``DELETE /v1/videos/{id}`` does
   (``app.deletion``); and retry removing the files of deleted videos whose removal failed.

Rows are claimed with one conditional UPDATE (``FOR UPDATE SKIP LOCKED`` on Postgres), so
replicas running the same tick never work on the same video.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import images, lifecycle, spend
from app.deletion import Deleter
from app.hiapi.client import HiapiClient
from app.hiapi.errors import HiapiError, HiapiRejected
from app.hiapi.schemas import TaskStatus
from app.intake import Intake
from app.jobs.runner import JobRunner
from app.jobs.submitter import Submitter
from app.logging import bind
from app.metrics import METRICS
from app.models import Status, Via, Video
from app.retry import backoff_seconds

__all__ = ["ReconcileStats", "Reconciler"]

log = logging.getLogger(__name__)

SUBMIT_CONCURRENCY = 8


@dataclass
class ReconcileStats:
    resubmitted: int = 0
    polled: int = 0
    recovered: int = 0  # terminal results found by polling: their callback never came
    still_running: int = 0
    poll_errors: int = 0
    downloads_resumed: int = 0
    images_expired: int = 0
    spend_purged: int = 0
    videos_expired: int = 0  # deleted by VIDEO_RETENTION_SECONDS
    files_removed: int = 0  # of deleted videos, whose first removal had failed


class Reconciler:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        hiapi: HiapiClient,
        submitter: Submitter,
        intake: Intake,
        runner: JobRunner,
        interval: float,
        batch_size: int,
        clock: Callable[[], datetime],
        task_timeout: timedelta = timedelta(days=1),
        poll_hold: timedelta = timedelta(seconds=60),
        images_root: Path | None = None,
        image_retention: timedelta = timedelta(days=7),
        deleter: Deleter | None = None,
        video_retention: timedelta = timedelta(0),
    ) -> None:
        self._sm = sessionmaker
        self._hiapi = hiapi
        self._submitter = submitter
        self._policy = submitter.policy
        self._intake = intake
        self._runner = runner
        self._interval = interval
        self._batch = batch_size
        self._clock = clock
        self._task_timeout = task_timeout
        # A claimed poll is retried by anyone after this: long enough for one GET to time
        # out, short enough that a replica killed after claiming delays little.
        self._poll_hold = poll_hold
        self._images_root = images_root
        self._image_retention = image_retention
        self._deleter = deleter
        self._video_retention = video_retention  # 0: keep videos forever
        self.totals = ReconcileStats()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                stats = await self.tick()
                if any(asdict(stats).values()):
                    log.info(
                        "reconciler.tick %s", " ".join(f"{k}={v}" for k, v in asdict(stats).items())
                    )
            except Exception:
                log.exception("reconciler.tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def tick(self) -> ReconcileStats:
        stats = ReconcileStats()
        await self._resubmit(stats)
        await self._poll(stats)
        await self._resume_downloads(stats)
        if self._images_root is not None:
            async with self._sm() as session, session.begin():
                stats.images_expired = await images.expire(
                    session,
                    storage_root=self._images_root,
                    now=self._clock(),
                    retention=self._image_retention,
                )
        async with self._sm() as session, session.begin():
            stats.spend_purged = await spend.purge_spend(session, now=self._clock())
        if self._deleter is not None:
            if self._video_retention > timedelta(0):
                stats.videos_expired = await self._deleter.expire(
                    retention=self._video_retention, limit=self._batch
                )
            stats.files_removed = await self._deleter.remove_pending(limit=self._batch)
        for key, value in asdict(stats).items():
            setattr(self.totals, key, getattr(self.totals, key) + value)
        return stats

    async def _claim(self, status: Status, hold: timedelta) -> list[Video]:
        async with self._sm() as session, session.begin():
            return await lifecycle.claim_due(
                session,
                status=status,
                now=self._clock(),
                hold=hold,
                owner=uuid.uuid4().hex,
                limit=self._batch,
            )

    async def _resubmit(self, stats: ReconcileStats) -> None:
        videos = await self._claim(Status.queued, self._policy.in_flight_hold)
        slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def submit(video: Video) -> None:
            async with slots:
                await self._submitter.submit(video)
            stats.resubmitted += 1

        await asyncio.gather(*(submit(video) for video in videos))

    async def _poll(self, stats: ReconcileStats) -> None:
        videos = await self._claim(Status.processing, self._poll_hold)
        slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def poll(video: Video) -> None:
            async with slots:
                await self._poll_one(video, stats)

        await asyncio.gather(*(poll(video) for video in videos))

    async def _poll_one(self, video: Video, stats: ReconcileStats) -> None:
        if video.task_id is None:
            return
        with bind(video_id=video.id, task_id=video.task_id):
            stats.polled += 1
            error: str | None = None
            try:
                task = await self._hiapi.get_task(video.task_id)
            except HiapiRejected as exc:
                if exc.status_code == 404:
                    await self._give_up(video, "task_not_found", "hiapi no longer knows this task")
                    return
                error, task = f"{exc.code}: {exc.message}", None
            except HiapiError as exc:
                error, task = exc.message, None
            submitted = video.submitted_at or video.created_at
            if (task is None or task.status == TaskStatus.handling) and (
                self._clock() - submitted > self._task_timeout
            ):
                await self._give_up(
                    video, "task_timeout", "hiapi did not finish the task in TASK_TIMEOUT_SECONDS"
                )
                return
            if task is not None and task.status != TaskStatus.handling:
                # The webhook's path: an output URL we won't fetch fails the video here and
                # now, and the download is ours only if a slot is free here.
                outcome = await self._intake.accept(video.id, task, via=Via.poll)
                if outcome in (
                    lifecycle.ApplyOutcome.download_claimed,
                    lifecycle.ApplyOutcome.download_queued,
                    lifecycle.ApplyOutcome.failed,
                ):
                    stats.recovered += 1
                    METRICS.recovered.inc()
                    log.warning("reconciler.recovered status=%s (no callback arrived)", task.status)
                return
            if error is None:
                stats.still_running += 1
            else:
                stats.poll_errors += 1
                log.warning("reconciler.poll_failed error=%s", error)
            delay = backoff_seconds(
                video.poll_attempts,
                base=self._interval,
                cap=max(self._interval, self._policy.poll_after.total_seconds()),
            )
            now = self._clock()
            async with self._sm() as session, session.begin():
                await lifecycle.record_poll_pending(
                    session,
                    video_id=video.id,
                    next_poll_at=now + timedelta(seconds=delay),
                    error=error,
                    now=now,
                )

    async def _give_up(self, video: Video, code: str, message: str) -> None:
        async with self._sm() as session, session.begin():
            failed = await lifecycle.fail_processing(
                session, video_id=video.id, code=code, message=message, now=self._clock()
            )
        if failed is not None:
            log.warning("reconciler.gave_up code=%s", code)

    async def _resume_downloads(self, stats: ReconcileStats) -> None:
        stats.downloads_resumed += await self._runner.refill()
