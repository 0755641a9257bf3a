"""``/v1/videos``: submit, read back, list, and stream the stored clip."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.responses import FileResponse

from app import lifecycle, repository
from app.api.deps import ContextDep, SessionDep
from app.context import AppContext
from app.errors import AppError, Conflict, NotFound, UpstreamRejected
from app.jobs.submitter import submit_video
from app.models import Status, Video
from app.schemas import ErrorOut, VideoCreate, VideoError, VideoOut, VideoPage

__all__ = ["router", "to_out"]

router = APIRouter(prefix="/v1/videos", tags=["videos"])

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such video."},
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
        409: {
            "model": ErrorOut,
            "description": "Idempotency-Key reused with different parameters.",
        },
        422: {"model": ErrorOut, "description": "Invalid request; `error.field` names the field."},
        502: {"model": ErrorOut, "description": "hiapi rejected the task; the video is `failed`."},
    },
)
async def create_video(
    body: VideoCreate,
    ctx: ContextDep,
    session: SessionDep,
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
    async with session.begin():
        video, created = await lifecycle.create_video(
            session,
            params=params,
            idempotency_key=idempotency_key,
            now=ctx.clock(),
            submit_hold=ctx.lease,
        )
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


@router.get("", response_model=VideoPage, summary="List videos, newest first")
async def list_videos(
    ctx: ContextDep,
    session: SessionDep,
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
            session, status=status_, limit=limit, cursor=cursor
        )
    except repository.BadCursor as exc:
        raise AppError(str(exc), code="bad_cursor", status_code=422) from None
    return VideoPage(items=[to_out(ctx, v) for v in rows], next_cursor=next_cursor)


async def _video_or_404(session: SessionDep, video_id: uuid.UUID) -> Video:
    video = await lifecycle.get(session, video_id)
    if video is None:
        raise NotFound(f"no video with id {video_id}")
    return video


@router.get("/{video_id}", response_model=VideoOut, responses=ERRORS, summary="Read one video")
async def read_video(video_id: uuid.UUID, ctx: ContextDep, session: SessionDep) -> VideoOut:
    return to_out(ctx, await _video_or_404(session, video_id))


@router.get(
    "/{video_id}/content",
    response_class=FileResponse,
    summary="Stream the stored MP4",
    description="Serves `video/mp4` with HTTP Range support, so a `<video>` tag can seek.",
    responses={
        200: {"content": {"video/mp4": {}}},
        206: {"description": "Partial content for a Range request."},
        404: ERRORS[404],
        409: {"model": ErrorOut, "description": "The video is not ready yet."},
    },
)
async def video_content(video_id: uuid.UUID, ctx: ContextDep, session: SessionDep) -> FileResponse:
    video = await _video_or_404(session, video_id)
    if video.status != Status.ready or video.storage_key is None:
        raise Conflict(
            f"video {video_id} is {video.status}; content is available once it is ready",
            code="not_ready",
        )
    path = ctx.storage.path(video.storage_key)
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
