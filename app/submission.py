"""Submitting a video: check what the schema cannot, charge the daily quota, store, send.

``POST /v1/videos`` parses and authorizes, then calls ``Submission.submit``, which

1. checks the parts of the request that need the database or the server's settings (an
   uploaded image of the caller's; a ``notify_url`` under ``NOTIFY_ALLOW_LOCAL``, and a
   ``NOTIFY_SECRET`` to sign with). What holds on every server is ``VideoCreate``'s own rule;
2. stores the video (``lifecycle.create_video``; an ``Idempotency-Key`` seen before replays or
   conflicts instead) and, in the same transaction, charges its seconds to the caller's day;
3. sends the first attempt to hiapi (``Submitter``) once that transaction has committed.

A refused request raises (``Invalid``, ``OverLimit``) and leaves nothing behind: the
transaction rolls back and nothing is sent. Anything stored comes back as a ``Submitted``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app import images, lifecycle, spend
from app.hiapi.errors import HiapiRejected
from app.jobs.submitter import Submitter
from app.metrics import METRICS
from app.models import Video
from app.schemas import VideoCreate, notify_url_problem

__all__ = ["Invalid", "OverLimit", "Submission", "Submitted"]

NO_NOTIFY_SECRET = (
    "this server has no NOTIFY_SECRET, so it cannot sign notifications; "
    "leave notify_url out or ask the operator to set NOTIFY_SECRET"
)


class Invalid(Exception):
    """The request names something this server refuses; ``field`` is the field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OverLimit(Exception):
    """The video would take the caller past ``DAILY_VIDEO_SECONDS_LIMIT`` for ``day``."""

    def __init__(self, *, now: datetime, used: int, limit: int, asked: int) -> None:
        super().__init__(f"daily limit reached: {used} of {limit} used, {asked} asked")
        self.now = now
        self.used = used
        self.limit = limit
        self.asked = asked


@dataclass(frozen=True, slots=True)
class Submitted:
    created: lifecycle.Created  # created, or an Idempotency-Key's replay or conflict
    video: Video
    rejected: HiapiRejected | None = None  # hiapi refused the task: the video is failed


class Submission:
    def __init__(
        self,
        *,
        submitter: Submitter,
        clock: Callable[[], datetime],
        public_base: str,
        daily_limit: int,
        notify_allow_local: bool,
        notify_signing: bool,
    ) -> None:
        self._submitter = submitter
        self._clock = clock
        self._public_base = public_base
        self._daily_limit = daily_limit  # video-seconds per owner and UTC day; 0: no limit
        self._notify_allow_local = notify_allow_local
        self._notify_signing = notify_signing

    async def submit(
        self,
        session: AsyncSession,
        body: VideoCreate,
        *,
        owner: str,
        idempotency_key: str | None,
    ) -> Submitted:
        now = self._clock()
        async with session.begin():
            params = await self._resolve(session, body, owner=owner)
            video, created = await lifecycle.create_video(
                session,
                params=params,
                owner=owner,
                idempotency_key=idempotency_key,
                now=now,
                submit_hold=self._submitter.policy.in_flight_hold,
            )
            if created == lifecycle.Created.created and self._daily_limit:
                await self._charge(session, owner=owner, day=now.date(), now=now, body=body)
        if created != lifecycle.Created.created:
            METRICS.submits.labels(created.value).inc()
            return Submitted(created, video)
        result = await self._submitter.submit(video)
        return Submitted(created, result.video or video, rejected=result.rejected)

    async def _charge(
        self, session: AsyncSession, *, owner: str, day: date, now: datetime, body: VideoCreate
    ) -> None:
        limit = self._daily_limit
        total = await spend.reserve_spend(
            session, owner=owner, day=day, seconds=body.duration, limit=limit
        )
        if total is None:
            used = await spend.spent(session, owner=owner, day=day)
            METRICS.submits.labels("over_limit").inc()
            # Raised inside the transaction: the video row is rolled back, nothing is sent.
            raise OverLimit(now=now, used=used, limit=limit, asked=body.duration)

    async def _resolve(
        self, session: AsyncSession, body: VideoCreate, *, owner: str
    ) -> lifecycle.NewVideo:
        """What is stored: an uploaded image becomes its public URL."""
        image_url = body.image_url
        if body.image_id is not None:
            image = await images.get_owned(session, body.image_id, owner=owner)
            if image is None:
                raise Invalid("image_id", f"no uploaded image with id {body.image_id}")
            image_url = images.public_url(self._public_base, image)
        if body.notify_url is not None:
            problem = notify_url_problem(body.notify_url, allow_local=self._notify_allow_local)
            if problem is not None:
                raise Invalid("notify_url", problem)
            if not self._notify_signing:
                raise Invalid("notify_url", NO_NOTIFY_SECRET)
        assert image_url is not None  # VideoCreate holds one of image_url and image_id
        return lifecycle.NewVideo(
            image_url=image_url,
            prompt=body.prompt,
            resolution=body.resolution,
            duration=body.duration,
            image_id=body.image_id,
            notify_url=body.notify_url,
        )
