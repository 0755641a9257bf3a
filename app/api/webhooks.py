"""``POST /webhooks/hiapi/{video_id}/{token}``: hiapi's callback.

It answers within one short SQL transaction: no network or file I/O. The URL's token proves
the caller got it from us; the body is handed to ``app.intake``, where the reconciler's polls
go too: the conditional update of the state machine makes duplicate or concurrent copies
harmless, and a won download starts as its own task beside the response (or waits in the
table when no download slot is free here).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app import lifecycle
from app.context import context_of
from app.errors import AppError
from app.hiapi.schemas import parse_task_payload
from app.logging import bind
from app.metrics import METRICS
from app.models import Via
from app.schemas import ErrorOut
from app.security import token_matches

__all__ = ["PATH", "hiapi_callback", "router"]

log = logging.getLogger(__name__)
router = APIRouter(tags=["webhooks"])

MAX_CALLBACK_BYTES = 256 * 1024
PATH = "/webhooks/hiapi/{video_id}/{token}"


class CallbackAck(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"outcome": "download_claimed"}]})

    outcome: str = Field(
        description="download_claimed (this replica downloads it), download_queued (no "
        "download slot free here: the first replica with one does), failed, adopted, pending, "
        "duplicate or stale_task."
    )


_NO_CHANGE = {
    lifecycle.ApplyOutcome.duplicate,
    lifecycle.ApplyOutcome.pending,
    lifecycle.ApplyOutcome.stale_task,
}
_ACKS = {
    outcome: json.dumps({"outcome": outcome.value}).encode() for outcome in lifecycle.ApplyOutcome
}


async def _read_capped(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_CALLBACK_BYTES:
        raise AppError("callback body too large", code="too_large", status_code=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_CALLBACK_BYTES:
            raise AppError("callback body too large", code="too_large", status_code=413)
    return bytes(body)


@router.post(
    PATH,
    response_model=CallbackAck,
    summary="hiapi task callback",
    description=(
        "hiapi POSTs the finished task here (bare, or wrapped as `{code, data}`). The URL is "
        "per video and signed; a wrong token gets 404. Duplicates are acknowledged and ignored. "
        "A success whose output URL cannot be fetched (unreadable, not http(s), credentials in "
        "it, or a host not on `DOWNLOAD_ALLOWED_HOSTS`) is acknowledged and ends the video "
        "`failed` with `bad_output_url` or `host_not_allowed` (outcome `failed`)."
    ),
    # The path parameters are read from the request, not declared in the signature; they are
    # documented here instead.
    openapi_extra={
        "parameters": [
            {
                "name": "video_id",
                "in": "path",
                "required": True,
                "description": "The video's id, as in the callback URL videorelay gave hiapi.",
                "schema": {"type": "string", "title": "Video Id"},
            },
            {
                "name": "token",
                "in": "path",
                "required": True,
                "description": "The URL's signature (HMAC of the video id); never logged.",
                "schema": {"type": "string", "title": "Token"},
            },
        ]
    },
    responses={
        400: {"model": ErrorOut, "description": "Not JSON, or not a task object."},
        404: {"model": ErrorOut, "description": "Unknown video or wrong token."},
        409: {"model": ErrorOut, "description": "The task belongs to a different video."},
        413: {"model": ErrorOut, "description": "Body larger than 256 KiB."},
        503: {"model": ErrorOut, "description": "Database unavailable; hiapi should retry."},
    },
)
async def hiapi_callback(request: Request) -> Response:
    # The hot path. ``app.main`` serves it through a plain Starlette route, so there are no
    # parameters or dependencies to solve and no response model to validate; the decorator
    # above only documents it. The ack is written directly (its schema is ``CallbackAck``).
    ctx = context_of(request.app)
    video_id: str = request.path_params["video_id"]
    token: str = request.path_params["token"]
    try:
        vid = uuid.UUID(video_id)
    except ValueError:
        METRICS.callbacks.labels("bad_token").inc()
        raise HTTPException(404, "not found") from None
    if not token_matches(ctx.secret, vid, token):
        log.warning("webhook.bad_token", extra={"video_id": vid})
        METRICS.callbacks.labels("bad_token").inc()
        raise HTTPException(404, "not found")
    raw = await _read_capped(request)
    try:
        payload: Any = json.loads(raw)
        task = parse_task_payload(payload)
    except (ValueError, RecursionError) as exc:
        METRICS.callbacks.labels("bad_body").inc()
        raise AppError(
            f"callback body is not a hiapi task: {exc}", code="bad_callback", status_code=400
        ) from None

    with bind(video_id=vid, task_id=task.task_id):
        # Written together with the callbacks arriving alongside; answered after the commit.
        outcome = await ctx.intake.accept(vid, task, via=Via.callback)
        if outcome == lifecycle.ApplyOutcome.unknown_video:
            raise HTTPException(404, "not found")
        if outcome == lifecycle.ApplyOutcome.foreign_task:
            log.warning("webhook.foreign_task")
            METRICS.callbacks.labels("foreign_task").inc()
            raise AppError(
                "this task does not belong to this video", code="foreign_task", status_code=409
            )
        METRICS.callbacks.labels(outcome.value).inc()
        if outcome in _NO_CHANGE:
            log.debug("webhook.%s status=%s", outcome.value, task.status.value)
        else:
            log.info("webhook.%s status=%s", outcome.value, task.status.value)
    return Response(_ACKS[outcome], media_type="application/json")
