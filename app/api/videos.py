"""``/v1/videos``: submit, read back, list, and stream the stored clip."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import FileResponse

from app import lifecycle, repository
from app.api.deps import CallerDep, ContextDep, SessionDep
from app.context import AppContext
from app.errors import AppError, Conflict, NotFound, UpstreamRejected
from app.jobs.submitter import submit_video
from app.models import Status, Video
from app.schemas import ErrorOut, VideoCreate, VideoError, VideoOut, VideoPage

__all__ = ["router", "to_out"]

router = APIRouter(prefix="/v1/videos", tags=["videos"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key (when keys are set)."},
    404: {"model": ErrorOut, "description": "No such video (or it belongs to another key)."},
}


def to_out(ctx: AppContext, video: Video) -> VideoOut:
    error = (
        VideoError(code=video.error_code, message=video.error_message or "")
        if video.error_code
        else None
    )
    return VideoOut(
        id=video.id,
        status=video.status,
        image_url=video.image_url,
        prompt=video.prompt,
        resolution=video.resolution,
        duration=video.duration,
        task_id=video.task_id,
        error=error,
        size_bytes=video.size_bytes,
        sha256=video.sha256,
        content_url=ctx.content_url(video.id) if video.status == Status.ready else None,
        created_at=video.created_at,
        updated_at=video.updated_at,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=VideoOut,
    summary="Submit an image to turn into a video",
    description=(
        "Validates the request with hiapi's own rules, stores the video, creates the hiapi task "
        "(with a callback to this service) and answers at once. If hiapi is unreachable the "
        "video stays `queued` and is submitted again later. With an `Idempotency-Key`, a "
        "retried request returns the first video (200) instead of creating and paying for another."
    ),
    responses={
        200: {
            "model": VideoOut,
            "description": "Replay of an earlier request with the same Idempotency-Key.",
        },
        401: ERRORS[401],
        409: {
            "model": ErrorOut,
            "description": "Idempotency-Key reused with different parameters.",
        },
        422: {"model": ErrorOut, "description": "Invalid request; `error.field` names the field."},
        429: {
            "model": ErrorOut,
            "description": "Daily video-seconds limit of this key reached; see `resets_at`.",
        },
        502: {"model": ErrorOut, "description": "hiapi rejected the task; the video is `failed`."},
    },
)
async def create_video(
    body: VideoCreate,
    ctx: ContextDep,
    session: SessionDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            min_length=1,
            description="Any unique string per logical request (a UUID is fine).",
        ),
    ] = None,
) -> VideoOut:
    params = lifecycle.NewVideo(
        image_url=body.image_url,
        prompt=body.prompt,
        resolution=body.resolution,
        duration=body.duration,
    )
    now = ctx.clock()
    limit = ctx.settings.DAILY_VIDEO_SECONDS_LIMIT
    async with session.begin():
        video, created = await lifecycle.create_video(
            session,
            params=params,
            owner=caller,
            idempotency_key=idempotency_key,
            now=now,
            submit_hold=ctx.submit_policy.in_flight_hold,
        )
        if created == lifecycle.Created.created and limit:
            total = await lifecycle.reserve_spend(
                session, owner=caller, day=now.date(), seconds=body.duration, limit=limit
            )
            if total is None:
                used = await lifecycle.spent(session, owner=caller, day=now.date())
                # Raising rolls the transaction back: the video row goes too, nothing is sent.
                raise _over_limit(now, used=used, limit=limit, asked=body.duration)
    if created == lifecycle.Created.conflict:
        raise Conflict(
            "Idempotency-Key was already used with different parameters; use a new key "
            "for a new video",
            code="idempotency_conflict",
            extra={"video": to_out(ctx, video)},
        )
    if created == lifecycle.Created.replayed:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
        return to_out(ctx, video)
    result = await submit_video(
        ctx.sessionmaker,
        video=video,
        hiapi=ctx.hiapi,
        policy=ctx.submit_policy,
        clock=ctx.clock,
        callback_url=ctx.callback_url,
    )
    current = result.video or video
    if result.rejected is not None:
        raise UpstreamRejected(
            f"hiapi rejected the task ({result.rejected.status_code} {result.rejected.code}): "
            f"{result.rejected.message}",
            extra={"video": to_out(ctx, current)},
        )
    return to_out(ctx, current)


@router.get(
    "",
    response_model=VideoPage,
    summary="List videos, newest first",
    description="Only the calling key's videos. Keyset pagination: pass `next_cursor` back.",
    responses={401: ERRORS[401], 422: {"model": ErrorOut, "description": "Bad parameter."}},
)
async def list_videos(
    ctx: ContextDep,
    session: SessionDep,
    caller: CallerDep,
    status_: Annotated[
        Literal["queued", "processing", "downloading", "ready", "failed"] | None,
        Query(alias="status", description="Only videos in this status."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
) -> VideoPage:
    try:
        rows, next_cursor = await repository.list_videos(
            session, owner=caller, status=status_, limit=limit, cursor=cursor
        )
    except repository.BadCursor as exc:
        raise AppError(str(exc), code="bad_cursor", status_code=422) from None
    return VideoPage(items=[to_out(ctx, v) for v in rows], next_cursor=next_cursor)


def _over_limit(now: datetime, *, used: int, limit: int, asked: int) -> AppError:
    resets = datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)
    return AppError(
        f"daily limit reached: {used} of {limit} video-seconds used today, this video needs "
        f"{asked}; the limit resets at {resets.isoformat().replace('+00:00', 'Z')}",
        code="daily_limit_exceeded",
        status_code=429,
        extra={"resets_at": resets},
        headers={"Retry-After": str(max(1, int((resets - now).total_seconds())))},
    )


async def _video_or_404(session: SessionDep, video_id: uuid.UUID, owner: str) -> Video:
    video = await lifecycle.get(session, video_id)
    if video is None or video.owner != owner:
        raise NotFound(f"no video with id {video_id}")
    return video


@router.get("/{video_id}", response_model=VideoOut, responses=ERRORS, summary="Read one video")
async def read_video(
    video_id: uuid.UUID, ctx: ContextDep, session: SessionDep, caller: CallerDep
) -> VideoOut:
    return to_out(ctx, await _video_or_404(session, video_id, caller))


@router.get(
    "/{video_id}/content",
    response_class=FileResponse,
    summary="Stream the stored MP4",
    description="Serves `video/mp4` with HTTP Range support, so a `<video>` tag can seek.",
    responses={
        200: {"content": {"video/mp4": {}}},
        206: {"description": "Partial content for a Range request."},
        401: ERRORS[401],
        404: ERRORS[404],
        409: {"model": ErrorOut, "description": "The video is not ready yet."},
    },
)
async def video_content(
    video_id: uuid.UUID, ctx: ContextDep, session: SessionDep, caller: CallerDep
) -> FileResponse:
    video = await _video_or_404(session, video_id, caller)
    if video.status != Status.ready or video.storage_key is None:
        raise Conflict(
            f"video {video_id} is {video.status}; content is available once it is ready",
            code="not_ready",
        )
    path = await asyncio.to_thread(ctx.storage.path, video.storage_key)
    if not await asyncio.to_thread(path.is_file):
        raise AppError(
            f"the stored file of video {video_id} is missing from storage",
            code="content_missing",
            status_code=500,
        )
    return FileResponse(
        path,
        media_type="video/mp4",
        filename=f"{video_id}.mp4",
        content_disposition_type="inline",
    )
