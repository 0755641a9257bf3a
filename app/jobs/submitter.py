"""Create the hiapi task for a queued video and record the outcome.

Used by ``POST /v1/videos`` for the first attempt and by the reconciler for retries, so both
follow the same rules:

* created → ``processing`` (unless a callback already adopted the task);
* rejected (400/401) → ``failed`` with hiapi's code and message, never retried;
* unreachable, 5xx or 429 → still ``queued``; no task exists, so a retry cannot pay twice;
* timeout after sending → still ``queued``, but the task *may* exist. The next try waits at
  least ``RECONCILE_AFTER_SECONDS`` so that task's callback (which carries this video's
  callback URL) can arrive and be adopted instead. Only if none comes is the task created
  again, which may then be a second paid task.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lifecycle, repository
from app.hiapi.client import HiapiClient
from app.hiapi.errors import HiapiRejected, HiapiTimeout, HiapiUnavailable
from app.logging import bind
from app.metrics import METRICS
from app.models import Video
from app.retry import backoff_seconds

__all__ = ["SubmitPolicy", "SubmitResult", "Submitter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SubmitPolicy:
    poll_after: timedelta
    retry_base: float
    retry_max: float
    # How long a row stays untouchable while its create call is in flight. If the process
    # dies mid-call, the task may exist: this is as long as an ambiguous timeout waits.
    in_flight_hold: timedelta


@dataclass(frozen=True, slots=True)
class SubmitResult:
    video: Video | None
    rejected: HiapiRejected | None = None


class Submitter:
    """One attempt to create the task of a queued video, with the rules above. The first
    attempt comes from ``app.submission``, the retries from the reconciler."""

    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        hiapi: HiapiClient,
        policy: SubmitPolicy,
        clock: Callable[[], datetime],
        callback_url: Callable[[uuid.UUID], str],
    ) -> None:
        self._sm = sessionmaker
        self._hiapi = hiapi
        self.policy = policy
        self._clock = clock
        self._callback_url = callback_url

    async def submit(self, video: Video) -> SubmitResult:
        """No transaction is held during I/O."""
        with bind(video_id=video.id):
            try:
                task_id = await self._hiapi.create_task(
                    image_url=video.image_url,
                    prompt=video.prompt,
                    resolution=video.resolution,
                    duration=video.duration,
                    callback_url=self._callback_url(video.id),
                )
            except HiapiRejected as exc:
                async with self._sm() as session, session.begin():
                    failed = await lifecycle.record_submit_rejected(
                        session,
                        video_id=video.id,
                        code=exc.code,
                        message=exc.message,
                        now=self._clock(),
                    )
                log.warning("submit.rejected status=%s code=%s", exc.status_code, exc.code)
                METRICS.submits.labels("rejected").inc()
                return SubmitResult(failed or await _reload(self._sm, video.id), rejected=exc)
            except HiapiUnavailable as exc:
                ambiguous = isinstance(exc, HiapiTimeout)
                METRICS.submits.labels("ambiguous" if ambiguous else "retry_later").inc()
                now = self._clock()
                delay = timedelta(
                    seconds=backoff_seconds(
                        video.submit_attempts,
                        base=self.policy.retry_base,
                        cap=self.policy.retry_max,
                    )
                )
                if ambiguous:
                    delay = max(delay, self.policy.poll_after)
                async with self._sm() as session, session.begin():
                    queued = await lifecycle.record_submit_retry(
                        session,
                        video_id=video.id,
                        error=exc.message,
                        ambiguous=ambiguous,
                        retry_at=now + delay,
                        now=now,
                    )
                log.warning(
                    "submit.retry in=%.1fs ambiguous=%s error=%s",
                    delay.total_seconds(),
                    ambiguous,
                    exc.message,
                )
                return SubmitResult(queued or await _reload(self._sm, video.id))
            with bind(task_id=task_id):
                async with self._sm() as session, session.begin():
                    stored = await lifecycle.record_submit_success(
                        session,
                        video_id=video.id,
                        task_id=task_id,
                        now=self._clock(),
                        poll_after=self.policy.poll_after,
                    )
                METRICS.submits.labels("created").inc()
                if stored is None:
                    log.info("submit.created_after_callback")
                else:
                    log.info("submit.created")
            return SubmitResult(stored or await _reload(self._sm, video.id))


async def _reload(
    sessionmaker: async_sessionmaker[AsyncSession], video_id: uuid.UUID
) -> Video | None:
    async with sessionmaker() as session:
        return await repository.get(session, video_id)
