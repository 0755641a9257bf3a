"""``GET /v1/usage``: the caller's quotas as they stand (``POST /v1/videos`` sends the same
figures as ``RateLimit-*`` headers: ``app.api.responses.rate_limit_headers``)."""

from __future__ import annotations

from datetime import UTC

from fastapi import APIRouter

from app.api.deps import CallerDep, ClockDep, SessionDep, SubmissionDep
from app.api.videos import ERRORS
from app.schemas import QuotaOut, UsageOut
from app.spend import QuotaUse, tightest

__all__ = ["router"]

router = APIRouter(prefix="/v1/usage", tags=["usage"])


def _out(quota: QuotaUse) -> QuotaOut:
    return QuotaOut(
        scope=quota.scope,
        used_video_seconds=quota.used,
        limit_video_seconds=quota.limit,
        remaining_video_seconds=quota.remaining,
        resets_at=quota.resets_at,
        expires_at=quota.expires_at,
    )


@router.get(
    "",
    response_model=UsageOut,
    summary="The caller's video-seconds quotas today",
    description=(
        "What this caller has used of each limit that applies to it, and what is left: the "
        "API key's `DAILY_VIDEO_SECONDS_LIMIT`; for a client token also its end user's "
        "`DAILY_VIDEO_SECONDS_PER_SUBJECT` and the token's own `max_video_seconds`. The "
        "top-level figures are those of the limit with the fewest seconds left (`scope`); "
        "`limits` lists each. With no limit configured, `limits` is empty and the figures are "
        "null (nothing is counted). Any valid API key or client token may call it (no scope "
        "needed). `POST /v1/videos` answers with the same figures as `RateLimit-Limit`, "
        "`RateLimit-Remaining` and `RateLimit-Reset` (seconds) headers."
    ),
    responses={401: ERRORS[401]},
)
async def get_usage(
    submission: SubmissionDep, session: SessionDep, caller: CallerDep, clock: ClockDep
) -> UsageOut:
    now = clock()
    quotas = await submission.usage(session, caller=caller)
    top = tightest(quotas)
    return UsageOut(
        day=now.astimezone(UTC).date().isoformat(),
        scope=top.scope if top else None,
        used_video_seconds=top.used if top else None,
        limit_video_seconds=top.limit if top else None,
        remaining_video_seconds=top.remaining if top else None,
        resets_at=top.resets_at if top else None,
        limits=[_out(q) for q in quotas],
    )
