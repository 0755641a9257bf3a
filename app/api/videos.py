"""``/v1/videos``: submit, read back, list, and stream the stored clip and its poster."""

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

from app import lifecycle, repository
from app.api.deps import (
    ApiKeysDep,
    CallerDep,
    ClockDep,
    DeleterDep,
    EventStreamsDep,
    SecretDep,
    SessionDep,
    SessionmakerDep,
    SettingsDep,
    StopDep,
    StorageDep,
    SubmissionDep,
    VideoUrlsDep,
)
from app.api.responses import ClipResponse, EventStreamResponse, rate_limit_headers
from app.auth import Caller
from app.errors import AppError, Conflict, NotFound, UpstreamRejected
from app.limits import require_scope
from app.models import TERMINAL, Notification, Status, Video
from app.schemas import (
    FIELD_RULE,
    METADATA_VALUE_MAX,
    DeletedOut,
    ErrorOut,
    VideoCreate,
    VideoOut,
    VideoPage,
    metadata_key_problem,
)
from app.signing import VideoUrls
from app.spend import tightest
from app.storage import Storage
from app.submission import Invalid, OverLimit, Quota

__all__ = ["router", "to_out"]

router = APIRouter(prefix="/v1/videos", tags=["videos"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorOut,
        "description": (
            "No `Authorization: Bearer <API key>`, or an unknown key (`unauthorized`); only "
            "when the service has API keys configured. A client token that has expired "
            "(`token_expired`) or does not verify (`invalid_token`)."
        ),
    },
    403: {
        "model": ErrorOut,
        "description": "A client token without the scope this needs (`insufficient_scope`).",
    },
    404: {
        "model": ErrorOut,
        "description": "No such video (or it belongs to another key, or it was deleted).",
    },
}
SIGNED_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {
        "model": ErrorOut,
        "description": (
            "A client token without `videos:read` (`insufficient_scope`), or a signed URL "
            "(`exp` and `sig`, no `Authorization` header) that was altered (`bad_signature`) "
            "or is past its `exp` (`url_expired`: GET the video again for a fresh one)."
        ),
    },
}


RATE_LIMIT_DOCS: dict[str, Any] = {
    "RateLimit-Limit": {
        "description": "Video-seconds of the limit (only when a limit applies).",
        "schema": {"type": "integer"},
    },
    "RateLimit-Remaining": {
        "description": "Video-seconds left of it.",
        "schema": {"type": "integer"},
    },
    "RateLimit-Reset": {
        "description": "Seconds until it resets (a token's cap: until the token expires).",
        "schema": {"type": "integer"},
    },
}


def _presigned_redirect(what: str) -> dict[str, Any]:
    """The ``307`` of a stored file read from S3, as OpenAPI describes it."""
    return {
        "description": f"S3 storage: the {what} is at the presigned URL in `Location`.",
        "headers": {
            "Location": {
                "description": "Presigned GET URL, valid for `S3_PRESIGN_SECONDS`.",
                "schema": {"type": "string", "format": "uri"},
            }
        },
    }


def to_out(urls: VideoUrls, video: Video, notification: Notification | None = None) -> VideoOut:
    return VideoOut.of(video, urls=urls, notification=notification)


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
        "\n\nWhen a video-seconds limit applies (see `GET /v1/usage`), the `202` and the "
        "`429` carry `RateLimit-Limit`, `RateLimit-Remaining` (after this video, on a `202`) "
        "and `RateLimit-Reset` (seconds until the next midnight UTC; for a client token's "
        "`max_video_seconds`, until the token expires) of the limit with the fewest seconds "
        "left, or on a `429` of the limit that refused it."
    ),
    responses={
        202: {"headers": RATE_LIMIT_DOCS},
        200: {
            "model": VideoOut,
            "description": "Replay of an earlier request with the same Idempotency-Key.",
        },
        401: ERRORS[401],
        403: ERRORS[403],
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
            "description": (
                "Daily video-seconds limit of this key (`daily_limit_exceeded`) or of this "
                "end user (`subject_daily_limit_exceeded`) reached, see `resets_at`; or the "
                "client token's `max_video_seconds` (`token_limit_exceeded`)."
            ),
            "headers": RATE_LIMIT_DOCS,
        },
        502: {"model": ErrorOut, "description": "hiapi rejected the task; the video is `failed`."},
    },
)
async def create_video(
    body: VideoCreate,
    urls: VideoUrlsDep,
    submission: SubmissionDep,
    session: SessionDep,
    caller: CallerDep,
    clock: ClockDep,
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
    require_scope(caller, "videos:create")
    try:
        result = await submission.submit(
            session, body, caller=caller, idempotency_key=idempotency_key
        )
    except Invalid as exc:
        raise RequestValidationError(
            [{"type": FIELD_RULE, "loc": ("body", exc.field), "msg": exc.message}]
        ) from None
    except OverLimit as exc:
        raise _over_limit(exc) from None
    if result.created == lifecycle.Created.conflict:
        raise Conflict(
            "Idempotency-Key was already used with different parameters; use a new key "
            "for a new video",
            code="idempotency_conflict",
            extra={"video": to_out(urls, result.video)},
        )
    if result.created == lifecycle.Created.replayed:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
        return to_out(urls, result.video)
    if result.rejected is not None:
        raise UpstreamRejected(
            f"hiapi rejected the task ({result.rejected.status_code} {result.rejected.code}): "
            f"{result.rejected.message}",
            extra={"video": to_out(urls, result.video)},
        )
    response.headers.update(rate_limit_headers(tightest(result.quotas), clock()))
    return to_out(urls, result.video)


@router.get(
    "",
    response_model=VideoPage,
    summary="List videos, newest first",
    description=(
        "Only the calling key's videos. Keyset pagination: pass `next_cursor` back.\n\n"
        "`metadata.<key>=<value>` (for example `?metadata.order_id=A-1042`) keeps the videos "
        "whose `metadata` has that key with exactly that value. One such parameter per "
        "request; it combines with `status`, `subject` and `cursor`."
    ),
    responses={
        401: ERRORS[401],
        403: ERRORS[403],
        422: {
            "model": ErrorOut,
            "description": (
                "Bad parameter: `error.field` names it. A `metadata.<key>` filter with a key "
                "that is not 1 to 40 characters of `[A-Za-z0-9_.-]`, a value over 500 "
                "characters, more than one such filter, or `metadata` without a key."
            ),
        },
    },
)
async def list_videos(
    request: Request,
    urls: VideoUrlsDep,
    secret: SecretDep,
    session: SessionDep,
    caller: CallerDep,
    status_: Annotated[
        Status | None,
        Query(alias="status", description="Only videos in this status."),
    ] = None,
    subject: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=128,
            description=(
                "Only the videos of this end user (the `subject` of the client tokens that "
                "created them). A client token only ever lists its own subject's."
            ),
        ),
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
    require_scope(caller, "videos:read")
    if status_ == Status.deleted:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "status"),
                    "msg": "deleted videos are not listed; use queued, processing, "
                    "downloading, ready or failed",
                    "type": "value_error",
                }
            ]
        )
    pair = _metadata_filter(request)
    try:
        rows, next_cursor = await repository.list_videos(
            session,
            caller=caller,
            subject=subject,
            status=status_,
            limit=limit,
            cursor=cursor,
            secret=secret,
            metadata=pair,
        )
    except repository.BadCursor as exc:  # same 422 shape as any bad query parameter
        raise RequestValidationError(
            [{"loc": ("query", "cursor"), "msg": str(exc), "type": "value_error"}]
        ) from None
    notes = await repository.notifications_for(session, [v.id for v in rows if v.notify_url])
    return VideoPage(
        items=[to_out(urls, v, notes.get(v.id)) for v in rows], next_cursor=next_cursor
    )


def _metadata_filter(request: Request) -> tuple[str, str] | None:
    """The ``metadata.<key>=<value>`` filter of a list request, or None; 422 if malformed."""
    given = [
        (name, value)
        for name, value in request.query_params.multi_items()
        if name == "metadata" or name.startswith("metadata.")
    ]
    if not given:
        return None
    name, value = given[0]
    field, problem = "metadata", None
    if len(given) > 1:
        names = ", ".join(_shown_name(n) for n, _ in given)
        problem = f"only one metadata.<key>=<value> filter is supported per request (got {names})"
    elif name == "metadata":
        problem = (
            "filter on one key as metadata.<key>=<value>, for example metadata.order_id=A-1042"
        )
    else:
        key = name.removeprefix("metadata.")
        problem = metadata_key_problem(key)
        if problem is None and len(value) > METADATA_VALUE_MAX:
            field = name
            problem = f"must be at most {METADATA_VALUE_MAX} characters (got {len(value)})"
        if problem is None:
            return key, value
    raise RequestValidationError([{"loc": ("query", field), "msg": problem, "type": "value_error"}])


def _shown_name(name: str) -> str:
    return name if len(name) <= 60 else name[:57] + "..."


def _over_limit(refused: OverLimit) -> AppError:
    now = refused.now
    if refused.quota == Quota.token:
        # A token's cap is over its whole life: nothing resets it; a new token has its own.
        return AppError(
            f"this client token's limit is reached: {refused.used} of {refused.limit} "
            f"video-seconds used (max_video_seconds), this video needs {refused.asked}; "
            "ask your backend for a new token",
            code="token_limit_exceeded",
            status_code=429,
            headers=rate_limit_headers(refused.use, now),
        )
    resets = datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)
    per_subject = refused.quota == Quota.subject
    what = (
        "this end user's daily limit (DAILY_VIDEO_SECONDS_PER_SUBJECT)"
        if per_subject
        else "daily limit"
    )
    return AppError(
        f"{what} reached: {refused.used} of {refused.limit} video-seconds used today, this "
        f"video needs {refused.asked}; the limit resets at "
        f"{resets.isoformat().replace('+00:00', 'Z')}",
        code="subject_daily_limit_exceeded" if per_subject else "daily_limit_exceeded",
        status_code=429,
        extra={"resets_at": resets},
        headers={
            "Retry-After": str(max(1, int((resets - now).total_seconds()))),
            **rate_limit_headers(refused.use, now),
        },
    )


async def _video_or_404(
    session: SessionDep, video_id: uuid.UUID, caller: Caller, *, scope: str = "videos:read"
) -> Video:
    """The video if ``caller`` may see it; a deleted video is a 404 like one never made."""
    require_scope(caller, scope)
    video = await repository.get(session, video_id)
    if (
        video is None
        or video.status == Status.deleted
        or not caller.may_read(video.owner, video.id, video.subject)
    ):
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
    video_id: uuid.UUID, urls: VideoUrlsDep, session: SessionDep, caller: CallerDep
) -> VideoOut:
    video = await _video_or_404(session, video_id, caller)
    note = await repository.latest_notification(session, video.id) if video.notify_url else None
    return to_out(urls, video, note)


@router.delete(
    "/{video_id}",
    operation_id="deleteVideo",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a video and its clip",
    description=(
        "Removes the stored clip and poster (local disk or S3) and answers `204` with no "
        "body. The video then answers `404` at every URL (`GET`, `content`, `events`; a "
        "second `DELETE` too) and is no longer listed. The server keeps a "
        "tombstone (`status: deleted`, `deleted_at`) so that a late hiapi callback or poll "
        "finds it and does nothing.\n\n"
        "Any status may be deleted. A `queued` video for which no task was sent to hiapi yet "
        "never gets one, and its seconds go back to the daily quotas. A video whose task was "
        "created (`processing`, `downloading`) is downloaded no further, and a download in "
        "flight stops and leaves no file; but hiapi's task can't be cancelled upstream, so "
        "it is still billed, and its seconds are not given back. An open event stream of "
        "the video ends with a `deleted` event. No `notify_url` delivery is made for a "
        "deletion, and deliveries not yet made are dropped.\n\n"
        "Needs the same access as reading the video, and, for a client token, the "
        "`videos:create` scope (who may spend on videos may delete them)."
    ),
    responses={401: ERRORS[401], 403: ERRORS[403], 404: ERRORS[404]},
)
async def delete_video(
    video_id: uuid.UUID, deleter: DeleterDep, session: SessionDep, caller: CallerDep
) -> Response:
    await _video_or_404(session, video_id, caller, scope="videos:create")
    await session.close()  # the deletion runs in a transaction of its own
    if await deleter.delete(video_id) is None:  # another request deleted it meanwhile
        raise NotFound(f"no video with id {video_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{video_id}/content",
    operation_id="getVideoContent",
    response_class=FileResponse,
    summary="Stream the stored MP4",
    description=(
        "Serves `video/mp4` with HTTP Range support, so a `<video>` tag can seek.\n\n"
        "With API keys on, the video's `content_url` is this URL signed (`?exp=...&sig=...`): "
        "it needs no `Authorization` header and reads this one video until `exp`.\n\n"
        "When clips are stored in S3 (`STORAGE_URL=s3://...`), this answers `307` with a "
        "`Location` of a short-lived presigned URL (`S3_PRESIGN_SECONDS`) on the bucket, "
        "which serves the same bytes with Range support. Browsers and HTTP clients follow it; "
        "they drop the `Authorization` header on the way, as the bucket wants. Request this "
        "URL again for a fresh link rather than keeping the presigned one.\n\n"
        "With `CONTENT_ACCEL_REDIRECT` set (clips on local disk, behind the nginx of "
        "`deploy/nginx.conf`), this checks the caller and hands the file to nginx with "
        "`X-Accel-Redirect`; nginx serves it, with Range support.\n\n"
        "A malformed `Range` is a `400 bad_range`; one that starts beyond the end of the clip "
        "is a `416 range_not_satisfiable` with `Content-Range: bytes */<size>`. Both, like "
        "every error, in the JSON error shape.\n\n"
        "`HEAD` (same URL, same credentials or signature) answers exactly as `GET` would, "
        "without the body: `200`/`206` with `Content-Length`, `Accept-Ranges: bytes`, "
        "`ETag` and `Last-Modified`, the `307` with S3 storage, or the same error status."
    ),
    responses={
        200: {"content": {"video/mp4": {}}},
        206: {"description": "Partial content for a Range request."},
        307: _presigned_redirect("clip"),
        400: {"model": ErrorOut, "description": "Malformed `Range` header (`bad_range`)."},
        401: ERRORS[401],
        **SIGNED_ERRORS,
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
@router.head("/{video_id}/content", include_in_schema=False)
async def video_content(
    video_id: uuid.UUID,
    storage: StorageDep,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
) -> Response:
    video = await _video_or_404(session, video_id, caller)
    if video.status != Status.ready or video.storage_key is None:
        raise Conflict(
            f"video {video_id} is {video.status}; content is available once it is ready",
            code="not_ready",
        )
    return await _stored_file(
        storage,
        video.storage_key,
        media_type="video/mp4",
        filename=f"{video_id}.mp4",
        accel=settings.CONTENT_ACCEL_REDIRECT,
    )


async def _stored_file(
    storage: Storage, key: str, *, media_type: str, filename: str, accel: str | None
) -> Response:
    """A stored object: a ``307`` to a presigned URL (S3), handed to nginx (``accel``, the
    ``CONTENT_ACCEL_REDIRECT`` location), or the file itself with Range."""
    presigned = await storage.presigned_url(key)
    if presigned is not None:
        # The link expires: no cache may keep the redirect longer than the link lives.
        return RedirectResponse(
            presigned,
            status_code=status.HTTP_307_TEMPORARY_REDIRECT,
            headers={"Cache-Control": "no-store"},
        )
    path = await asyncio.to_thread(storage.local_path, key)
    if path is None or not await asyncio.to_thread(path.is_file):
        raise AppError(
            f"the stored file {filename} is missing from storage",
            code="content_missing",
            status_code=500,
        )
    if accel is not None:
        # nginx serves the file from its internal location (Range, sendfile); no body here.
        return Response(
            headers={
                "X-Accel-Redirect": accel + key,
                "Content-Type": media_type,
                "Content-Disposition": f'inline; filename="{filename}"',
            }
        )
    return ClipResponse(
        path, media_type=media_type, filename=filename, content_disposition_type="inline"
    )


@router.get(
    "/{video_id}/poster.jpg",
    operation_id="getVideoPoster",
    response_class=FileResponse,
    summary="The clip's poster frame (JPEG)",
    description=(
        "One `image/jpeg` frame of the stored clip, from about 0.5 s into it (or its first "
        "frame), at the clip's size and at most 200 KB: for `<video poster>` or `<img>`. "
        "Made when the clip is stored, so it exists once the video is `ready`.\n\n"
        "Read like `/content`: the same credentials, and with API keys on the video's "
        "`poster_url` is this URL signed (`?exp=...&sig=...`), needing no `Authorization` "
        "header. With S3 storage it answers `307` to a short-lived presigned URL on the "
        "bucket; with `CONTENT_ACCEL_REDIRECT` it hands the file to nginx, as `/content` does. "
        "`HEAD` answers as `GET` would, without the body."
    ),
    responses={
        200: {"content": {"image/jpeg": {}}},
        307: _presigned_redirect("poster"),
        401: ERRORS[401],
        **SIGNED_ERRORS,
        404: {
            "model": ErrorOut,
            "description": (
                "No such video (`not_found`), or a video stored before posters were made "
                "(`no_poster`)."
            ),
        },
        409: {"model": ErrorOut, "description": "The video is not ready yet (`not_ready`)."},
    },
)
@router.head("/{video_id}/poster.jpg", include_in_schema=False)
async def video_poster(
    video_id: uuid.UUID,
    storage: StorageDep,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
) -> Response:
    video = await _video_or_404(session, video_id, caller)
    if video.status != Status.ready:
        raise Conflict(
            f"video {video_id} is {video.status}; its poster is available once it is ready",
            code="not_ready",
        )
    if video.poster_key is None:
        raise NotFound(
            f"video {video_id} has no poster: it was stored before posters were made",
            code="no_poster",
        )
    return await _stored_file(
        storage,
        video.poster_key,
        media_type="image/jpeg",
        filename=f"{video_id}.jpg",
        accel=settings.CONTENT_ACCEL_REDIRECT,
    )


EVENT_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATUS_ORDER: dict[str, int] = {
    Status.queued: 1,
    Status.processing: 2,
    Status.downloading: 3,
    Status.ready: 4,
    Status.failed: 4,
    Status.deleted: 5,
}


@router.get(
    "/{video_id}/events",
    operation_id="streamVideoEvents",
    response_class=StreamingResponse,
    summary="Live status as Server-Sent Events",
    description=(
        "A `text/event-stream` of the video's status changes. Each event has `id` "
        "(`<n>-<status>`), `event` (`status` while running, then `ready` or `failed`) and "
        "`data` (the video JSON, with fresh signed URLs when API keys are on). If the video "
        "is deleted meanwhile, a last `deleted` event (`data`: `id`, `status`, `deleted_at`) "
        "ends the stream. With API keys "
        "on, the video's `events_url` is this URL signed (`?exp=...&sig=...`), for "
        "`new EventSource(events_url)` with no `Authorization` header. The stream ends "
        "after the final event, or after "
        "`EVENTS_MAX_STREAM_SECONDS` (reconnect then). A comment line is sent every "
        "`EVENTS_HEARTBEAT_SECONDS` (15 s) as a heartbeat. Reconnect with `Last-Event-ID` "
        "to get only what changed since. Events come from the database, so any replica can "
        "serve them. Each API key may hold "
        "`EVENTS_MAX_STREAMS` open streams per server process; one more is a `429`.\n\n"
        "`HEAD` (same URL, same credentials or signature) checks the stream is there "
        "without opening it: `200` with `Content-Type: text/event-stream` and no body, or "
        "the error status `GET` would answer. It holds no stream slot, so it is never a "
        "`429`. (`EventSource` itself always uses `GET`.)"
    ),
    responses={
        200: {"content": {"text/event-stream": {}}},
        401: ERRORS[401],
        **SIGNED_ERRORS,
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
    settings: SettingsDep,
    urls: VideoUrlsDep,
    sessionmaker: SessionmakerDep,
    stop: StopDep,
    streams: EventStreamsDep,
    api_keys: ApiKeysDep,
    session: SessionDep,
    caller: CallerDep,
    request: Request,
    last_event_id: Annotated[str | None, Header(description="Resume after this event.")] = None,
) -> StreamingResponse:
    video = await _video_or_404(session, video_id, caller)
    owner, subject = video.owner, video.subject
    await session.close()  # the stream opens short sessions of its own

    async def stream() -> AsyncGenerator[str, None]:
        last = last_event_id
        loop = asyncio.get_running_loop()
        next_heartbeat = loop.time() + settings.EVENTS_HEARTBEAT_SECONDS
        end = loop.time() + settings.EVENTS_MAX_STREAM_SECONDS
        yield "retry: 2000\n\n"
        while not stop.is_set() and not await request.is_disconnected():
            if loop.time() >= end:
                yield ": stream lifetime reached; reconnect with Last-Event-ID\n\n"
                return
            async with sessionmaker() as events_session:
                video = await repository.get(events_session, video_id)
                if video is None:
                    return
                if video.status == Status.deleted:
                    # Nothing of the video is shown any more: only that it is gone.
                    gone = DeletedOut(id=video.id, deleted_at=video.deleted_at or video.updated_at)
                    event_id = f"{STATUS_ORDER[Status.deleted]}-{Status.deleted}"
                    yield f"id: {event_id}\nevent: deleted\ndata: {gone.model_dump_json()}\n\n"
                    return
                note = (
                    await repository.latest_notification(events_session, video_id)
                    if video.notify_url
                    else None
                )
            event_id = f"{STATUS_ORDER[video.status]}-{video.status}"
            final = video.status in TERMINAL
            if event_id != last:
                kind = video.status if final else "status"
                data = to_out(urls, video, note).model_dump_json()
                yield f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n"
                last = event_id
            if final:
                return
            if loop.time() >= next_heartbeat:
                yield ": heartbeat\n\n"
                next_heartbeat = loop.time() + settings.EVENTS_HEARTBEAT_SECONDS
            with contextlib.suppress(TimeoutError):
                wait = min(settings.EVENTS_POLL_SECONDS, max(0.0, end - loop.time()))
                await asyncio.wait_for(stop.wait(), wait)

    # On an open API every caller is the same owner (""): count streams per client address
    # instead, so that anonymous viewers do not share one process-wide allowance. A signed
    # URL's streams count against the key that owns the video, and the streams of a client
    # token's end user's video against that end user's own allowance (a key's name holds no
    # white space).
    client = request.client.host if request.client else ""
    if api_keys.open and caller.subject is None:
        slot = f"client:{client}"
    else:
        slot = f"{owner} {subject}" if subject else owner
    return EventStreamResponse(
        stream(),
        slots=streams,
        caller=slot,
        limit=settings.EVENTS_MAX_STREAMS,
        headers=EVENT_STREAM_HEADERS,
    )


@router.head("/{video_id}/events", include_in_schema=False)
async def video_events_head(
    video_id: uuid.UUID, session: SessionDep, caller: CallerDep
) -> Response:
    """What ``GET`` would answer, without opening the stream: link checkers, monitors and
    proxies probe with ``HEAD``, and ``405`` would tell them the URL is broken."""
    await _video_or_404(session, video_id, caller)
    response = Response(media_type="text/event-stream", headers=EVENT_STREAM_HEADERS)
    del response.headers["content-length"]  # GET streams with no length; "0" would be untrue
    return response
