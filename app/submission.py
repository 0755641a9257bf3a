"""Submitting a video: check what the schema cannot, charge the daily quota, store, send.

``POST /v1/videos`` parses and authorizes, then calls ``Submission.submit``, which

1. checks the parts of the request that need the database or the server's settings (an
   uploaded image of the caller's; a ``notify_url`` under ``NOTIFY_ALLOW_LOCAL``, and a
   ``NOTIFY_SECRET`` to sign with). What holds on every server is ``VideoCreate``'s own rule;
2. stores the video (``lifecycle.create_video``; an ``Idempotency-Key`` seen before replays or
   conflicts instead) and, in the same transaction, charges its seconds to each quota that
   applies (the key's day, a client token's subject's day and the token's own cap);
3. sends the first attempt to hiapi (``Submitter``) once that transaction has committed.

A refused request raises (``Invalid``, ``OverLimit``) and leaves nothing behind: the
transaction rolls back and nothing is sent. Anything stored comes back as a ``Submitted``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncSession

from app import images, lifecycle, spend
from app.auth import Caller
from app.hiapi.errors import HiapiRejected
from app.jobs.submitter import Submitter
from app.metrics import METRICS
from app.models import Video
from app.schemas import VideoCreate, notify_url_problem
from app.spend import QuotaUse, day_resets_at

__all__ = ["Invalid", "OverLimit", "Quota", "Submission", "Submitted"]

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


class Quota(StrEnum):
    key = "key"  # DAILY_VIDEO_SECONDS_LIMIT: the API key's day
    subject = "subject"  # DAILY_VIDEO_SECONDS_PER_SUBJECT: the token's subject's day
    token = "token"  # the token's max_video_seconds, over its life


class OverLimit(Exception):
    """The video would take the caller past one of its quotas (``quota``); ``use`` is that
    quota as it stands."""

    def __init__(
        self,
        *,
        now: datetime,
        used: int,
        limit: int,
        asked: int,
        quota: Quota = Quota.key,
        expires_at: datetime | None = None,
    ) -> None:
        super().__init__(f"{quota} limit reached: {used} of {limit} used, {asked} asked")
        self.now = now
        self.used = used
        self.limit = limit
        self.asked = asked
        self.quota = quota
        resets = None if quota == Quota.token else day_resets_at(now)
        self.use = QuotaUse(quota.value, used, limit, resets, expires_at)


@dataclass(frozen=True, slots=True)
class Submitted:
    created: lifecycle.Created  # created, or an Idempotency-Key's replay or conflict
    video: Video
    rejected: HiapiRejected | None = None  # hiapi refused the task: the video is failed
    quotas: tuple[QuotaUse, ...] = ()  # each quota charged, as it stands after the charge


class Submission:
    def __init__(
        self,
        *,
        submitter: Submitter,
        clock: Callable[[], datetime],
        public_base: str,
        daily_limit: int,
        subject_daily_limit: int = 0,
        notify_allow_local: bool,
        notify_signing: bool,
    ) -> None:
        self._submitter = submitter
        self._clock = clock
        self._public_base = public_base
        self._daily_limit = daily_limit  # video-seconds per owner and UTC day; 0: no limit
        self._subject_daily_limit = subject_daily_limit  # per token subject and UTC day
        self._notify_allow_local = notify_allow_local
        self._notify_signing = notify_signing

    async def submit(
        self,
        session: AsyncSession,
        body: VideoCreate,
        *,
        caller: Caller,
        idempotency_key: str | None,
    ) -> Submitted:
        now = self._clock()
        quotas: list[QuotaUse] = []
        async with session.begin():
            params = await self._resolve(session, body, caller=caller)
            video, created = await lifecycle.create_video(
                session,
                params=params,
                owner=caller.owner,
                subject=caller.stored_subject,
                token_id=caller.token_id,
                idempotency_key=idempotency_key,
                now=now,
                submit_hold=self._submitter.policy.in_flight_hold,
            )
            if created == lifecycle.Created.created:
                quotas = await self._charge(session, caller=caller, now=now, seconds=body.duration)
        if created != lifecycle.Created.created:
            METRICS.submits.labels(created.value).inc()
            return Submitted(created, video)
        result = await self._submitter.submit(video)
        return Submitted(
            created, result.video or video, rejected=result.rejected, quotas=tuple(quotas)
        )

    async def usage(self, session: AsyncSession, *, caller: Caller) -> list[QuotaUse]:
        """Each quota that applies to ``caller``, as it stands now (``GET /v1/usage``)."""
        return await spend.quota_uses(
            session,
            owner=caller.owner,
            subject=caller.subject,
            token_id=caller.token_id,
            token_expires_at=caller.token_expires_at,
            cap=caller.cap,
            now=self._clock(),
            daily_limit=self._daily_limit,
            subject_daily_limit=self._subject_daily_limit,
        )

    async def _charge(
        self, session: AsyncSession, *, caller: Caller, now: datetime, seconds: int
    ) -> list[QuotaUse]:
        """Reserve the video's seconds on each quota that applies; return each as it stands
        after. A refusal is raised inside the transaction: the video row and every
        reservation roll back, nothing is sent."""
        day = now.date()
        owner = caller.owner
        resets = day_resets_at(now)
        charged: list[QuotaUse] = []

        def over(quota: Quota, used: int, limit: int) -> OverLimit:
            METRICS.submits.labels("over_limit").inc()
            expires = caller.token_expires_at if quota == Quota.token else None
            return OverLimit(
                now=now, used=used, limit=limit, asked=seconds, quota=quota, expires_at=expires
            )

        if self._daily_limit:
            limit = self._daily_limit
            total = await spend.reserve_spend(
                session, owner=owner, day=day, seconds=seconds, limit=limit
            )
            if total is None:
                used = await spend.spent(session, owner=owner, day=day)
                raise over(Quota.key, used, limit)
            charged.append(QuotaUse("key", total, limit, resets))
        if caller.subject is not None and self._subject_daily_limit:
            limit, subject = self._subject_daily_limit, caller.subject
            total = await spend.reserve_subject_spend(
                session, owner=owner, subject=subject, day=day, seconds=seconds, limit=limit
            )
            if total is None:
                used = await spend.subject_spent(session, owner=owner, subject=subject, day=day)
                raise over(Quota.subject, used, limit)
            charged.append(QuotaUse("subject", total, limit, resets))
        if caller.token_id is not None and caller.cap is not None:
            assert caller.token_expires_at is not None  # a token's caller carries its expiry
            token_id = caller.token_id
            total = await spend.reserve_token_spend(
                session,
                token_id=token_id,
                expires_at=caller.token_expires_at,
                seconds=seconds,
                cap=caller.cap,
            )
            if total is None:
                used = await spend.token_spent(session, token_id=token_id)
                raise over(Quota.token, used, caller.cap)
            charged.append(QuotaUse("token", total, caller.cap, expires_at=caller.token_expires_at))
        return charged

    async def _resolve(
        self, session: AsyncSession, body: VideoCreate, *, caller: Caller
    ) -> lifecycle.NewVideo:
        """What is stored: an uploaded image becomes its public URL."""
        image_url = body.image_url
        if body.image_id is not None:
            image = await images.get_owned(session, body.image_id, caller=caller)
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
            metadata=body.metadata or None,  # {} is stored as none
        )
