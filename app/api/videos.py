"""``/v1/videos``: submit, read back, list, and stream the stored clip."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from app import images, lifecycle, repository
from app.api.deps import CallerDep, ContextDep, SessionDep
from app.api.responses import ClipResponse, EventStreamResponse
from app.context import AppContext
from app.errors import AppError, Conflict, NotFound, UpstreamRejected
from app.jobs.notifier import notify_url_problem
from app.jobs.submitter import submit_video
from app.metrics import METRICS
from app.models import TERMINAL, Notification, Status, Video
from app.schemas import ErrorOut, VideoCreate, VideoOut, VideoPage

__all__ = ["router", "to_out"]

router = APIRouter(prefix="/v1/videos", tags=["videos"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorOut,
        "description": (
            "No `Authorization: Bearer <API key>`, or an unknown key (`unauthorized`); only "
            "when the service has API keys configured."
        ),
    },
    404: {"model": ErrorOut, "description": "No such video (or it belongs to another key)."},
}


def to_out(ctx: AppContext, video: Video, notification: Notification | None = None) -> VideoOut:
    return VideoOut.of(video, public_base=ctx.settings.public_base, notification=notification)


def _field_error(field: str, message: str, kind: str = "missing_one_of") -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", field), "msg": message}])


async def _resolve_params(
    ctx: AppContext, session: AsyncSession, body: VideoCreate, caller: str
) -> lifecycle.NewVideo:
    """Turn the body into what is stored: an uploaded image becomes its public URL."""
    if body.image_url is None and body.image_id is None:
        raise _field_error(
            "image_url",
            "field required: give image_url (an https URL) or image_id (from POST /v1/images)",
        )
    if body.image_url is not None and body.image_id is not None:
        raise _field_error("image_url", "give image_url or image_id, not both")
    image_url = body.image_url
    if body.image_id is not None:
        image = await images.get_owned(session, body.image_id, owner=caller)
        if image is None:
            raise _field_error("image_id", f"no uploaded image with id {body.image_id}")
        image_url = images.public_url(ctx.settings.public_base, image)
    if body.notify_url is not None:
        problem = notify_url_problem(body.notify_url, allow_local=ctx.settings.NOTIFY_ALLOW_LOCAL)
        if problem:
            raise _field_error("notify_url", problem)
        if ctx.settings.NOTIFY_SECRET is None:
            raise _field_error(
                "notify_url",
                "this server has no NOTIFY_SECRET, so it cannot sign notifications; "
                "leave notify_url out or ask the operator to set NOTIFY_SECRET",
            )
    assert image_url is not None
    return lifecycle.NewVideo(
        image_url=image_url,
        prompt=body.prompt,
        resolution=body.resolution,
        duration=body.duration,
        image_id=body.image_id,
        notify_url=body.notify_url,
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
        413: {
            "model": ErrorOut,
            "description": "Body larger than MAX_JSON_BODY_BYTES (counted while it streams).",
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
    now = ctx.clock()
    limit = ctx.settings.DAILY_VIDEO_SECONDS_LIMIT
    async with session.begin():
        params = await _resolve_params(ctx, session, body, caller)
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
                METRICS.submits.labels("over_limit").inc()
                # Raising rolls the transaction back: the video row goes too, nothing is sent.
                raise _over_limit(now, used=used, limit=limit, asked=body.duration)
    if created != lifecycle.Created.created:
        METRICS.submits.labels(created.value).inc()
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
        Status | None,
        Query(alias="status", description="Only videos in this status."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None,
        Query(
            max_length=200,
            description=(
                "`next_cursor` of the previous page, passed back unchanged: it is opaque and "
                "signed for the calling key, and an altered or foreign one is a 422."
            ),
        ),
    ] = None,
) -> VideoPage:
    try:
        rows, next_cursor = await repository.list_videos(
            session,
            owner=caller,
            status=status_,
            limit=limit,
            cursor=cursor,
            secret=ctx.webhook_secret,
        )
    except repository.BadCursor as exc:  # same 422 shape as any bad query parameter
        raise RequestValidationError(
            [{"loc": ("query", "cursor"), "msg": str(exc), "type": "value_error"}]
        ) from None
    notes = await repository.notifications_for(session, [v.id for v in rows if v.notify_url])
    return VideoPage(items=[to_out(ctx, v, notes.get(v.id)) for v in rows], next_cursor=next_cursor)


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


@router.get(
    "/{video_id}",
    operation_id="getVideo",
    response_model=VideoOut,
    responses=ERRORS,
    summary="Read one video",
)
async def read_video(
    video_id: uuid.UUID, ctx: ContextDep, session: SessionDep, caller: CallerDep
) -> VideoOut:
    video = await _video_or_404(session, video_id, caller)
    note = await lifecycle.latest_notification(session, video.id) if video.notify_url else None
    return to_out(ctx, video, note)


@router.get(
    "/{video_id}/content",
    operation_id="getVideoContent",
    response_class=FileResponse,
    summary="Stream the stored MP4",
    description=(
        "Serves `video/mp4` with HTTP Range support, so a `<video>` tag can seek.\n\n"
        "When clips are stored in S3 (`STORAGE_URL=s3://...`), this answers `307` with a "
        "`Location` of a short-lived presigned URL (`S3_PRESIGN_SECONDS`) on the bucket, "
        "which serves the same bytes with Range support. Browsers and HTTP clients follow it; "
        "they drop the `Authorization` header on the way, as the bucket wants. Request this "
        "URL again for a fresh link rather than keeping the presigned one.\n\n"
        "A malformed `Range` is a `400 bad_range`; one that starts beyond the end of the clip "
        "is a `416 range_not_satisfiable` with `Content-Range: bytes */<size>`. Both, like "
        "every error, in the JSON error shape."
    ),
    responses={
        200: {"content": {"video/mp4": {}}},
        206: {"description": "Partial content for a Range request."},
        307: {
            "description": "S3 storage: the clip is at the presigned URL in `Location`.",
            "headers": {
                "Location": {
                    "description": "Presigned GET URL, valid for `S3_PRESIGN_SECONDS`.",
                    "schema": {"type": "string", "format": "uri"},
                }
            },
        },
        400: {"model": ErrorOut, "description": "Malformed `Range` header (`bad_range`)."},
        401: ERRORS[401],
        404: ERRORS[404],
        409: {"model": ErrorOut, "description": "The video is not ready yet."},
        416: {
            "model": ErrorOut,
            "description": "`Range` starts beyond the end (`range_not_satisfiable`).",
            "headers": {
                "Content-Range": {
                    "description": "`bytes */<size of the clip>`",
                    "schema": {"type": "string"},
                }
            },
        },
    },
)
async def video_content(
    video_id: uuid.UUID, ctx: ContextDep, session: SessionDep, caller: CallerDep
) -> Response:
    video = await _video_or_404(session, video_id, caller)
    if video.status != Status.ready or video.storage_key is None:
        raise Conflict(
            f"video {video_id} is {video.status}; content is available once it is ready",
            code="not_ready",
        )
    presigned = await ctx.storage.presigned_url(video.storage_key)
    if presigned is not None:
        # The link expires: no cache may keep the redirect longer than the link lives.
        return RedirectResponse(
            presigned,
            status_code=status.HTTP_307_TEMPORARY_REDIRECT,
            headers={"Cache-Control": "no-store"},
        )
    path = await asyncio.to_thread(ctx.storage.local_path, video.storage_key)
    if path is None or not await asyncio.to_thread(path.is_file):
        raise AppError(
            f"the stored file of video {video_id} is missing from storage",
            code="content_missing",
            status_code=500,
        )
    return ClipResponse(
        path,
        media_type="video/mp4",
        filename=f"{video_id}.mp4",
        content_disposition_type="inline",
    )


STATUS_ORDER: dict[str, int] = {
    Status.queued: 1,
    Status.processing: 2,
    Status.downloading: 3,
    Status.ready: 4,
    Status.failed: 4,
}


@router.get(
    "/{video_id}/events",
    operation_id="streamVideoEvents",
    response_class=StreamingResponse,
    summary="Live status as Server-Sent Events",
    description=(
        "A `text/event-stream` of the video's status changes. Each event has `id` "
        "(`<n>-<status>`), `event` (`status` while running, then `ready` or `failed`) and "
        "`data` (the video JSON). The stream ends after the final event, or after "
        "`EVENTS_MAX_STREAM_SECONDS` (reconnect then). A comment line is sent every "
        "`EVENTS_HEARTBEAT_SECONDS` (15 s) as a heartbeat. Reconnect with `Last-Event-ID` "
        "to get only what changed since. Events come from the database, so any replica can "
        "serve them. Each API key may hold "
        "`EVENTS_MAX_STREAMS` open streams per server process; one more is a `429`."
    ),
    responses={
        200: {"content": {"text/event-stream": {}}},
        401: ERRORS[401],
        404: ERRORS[404],
        429: {
            "model": ErrorOut,
            "description": "This key has `EVENTS_MAX_STREAMS` streams open (`too_many_streams`); "
            "see `Retry-After`.",
        },
    },
)
async def video_events(
    video_id: uuid.UUID,
    ctx: ContextDep,
    session: SessionDep,
    caller: CallerDep,
    request: Request,
    last_event_id: Annotated[str | None, Header(description="Resume after this event.")] = None,
) -> StreamingResponse:
    await _video_or_404(session, video_id, caller)
    await session.close()  # the stream opens short sessions of its own
    settings = ctx.settings

    async def stream() -> AsyncGenerator[str, None]:
        last = last_event_id
        loop = asyncio.get_running_loop()
        next_heartbeat = loop.time() + settings.EVENTS_HEARTBEAT_SECONDS
        end = loop.time() + settings.EVENTS_MAX_STREAM_SECONDS
        yield "retry: 2000\n\n"
        while not ctx.stop.is_set() and not await request.is_disconnected():
            if loop.time() >= end:
                yield ": stream lifetime reached; reconnect with Last-Event-ID\n\n"
                return
            async with ctx.sessionmaker() as events_session:
                video = await lifecycle.get(events_session, video_id)
                if video is None:
                    return
                note = (
                    await lifecycle.latest_notification(events_session, video_id)
                    if video.notify_url
                    else None
                )
            event_id = f"{STATUS_ORDER[video.status]}-{video.status}"
            final = video.status in TERMINAL
            if event_id != last:
                kind = video.status if final else "status"
                data = to_out(ctx, video, note).model_dump_json()
                yield f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n"
                last = event_id
            if final:
                return
            if loop.time() >= next_heartbeat:
                yield ": heartbeat\n\n"
                next_heartbeat = loop.time() + settings.EVENTS_HEARTBEAT_SECONDS
            with contextlib.suppress(TimeoutError):
                wait = min(settings.EVENTS_POLL_SECONDS, max(0.0, end - loop.time()))
                await asyncio.wait_for(ctx.stop.wait(), wait)

    # On an open API every caller is the same owner (""): count streams per client address
    # instead, so that anonymous viewers do not share one process-wide allowance.
    client = request.client.host if request.client else ""
    return EventStreamResponse(
        stream(),
        slots=ctx.event_streams,
        caller=caller if not ctx.api_keys.open else f"client:{client}",
        limit=settings.EVENTS_MAX_STREAMS,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
