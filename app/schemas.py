"""The REST API's request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.hiapi.schemas import DURATION_MAX, DURATION_MIN, image_url_errors
from app.models import Notification, Video

__all__ = [
    "FIELD_HINTS",
    "ErrorOut",
    "ImageOut",
    "NotifyOut",
    "VideoCreate",
    "VideoError",
    "VideoOut",
    "VideoPage",
]

# How to fix each submit field, used in 422 messages.
FIELD_HINTS = {
    "image_url": "must be one https URL string, for example https://example.com/still.jpg",
    "prompt": "must be a string of at most 5000 characters, or left out",
    "image_id": "must be the id of an image uploaded with POST /v1/images",
    "notify_url": "must be an https URL of at most 2048 characters, or left out",
    "resolution": "must be one of '720p', '1080p' (default '1080p')",
    "duration": f"must be a whole number of seconds from {DURATION_MIN} to {DURATION_MAX}",
}


class VideoCreate(BaseModel):
    """What a frontend sends. The rules are hiapi's, so nothing hiapi would refuse is sent."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image_url": "https://example.com/still.jpg",
                    "prompt": "the cat slowly turns its head toward the camera and blinks",
                    "resolution": "1080p",
                    "duration": 5,
                }
            ]
        },
    )

    image_url: str | None = Field(
        default=None,
        max_length=2048,
        description="One https URL of the still image hiapi will fetch. Give this or `image_id`.",
    )
    image_id: uuid.UUID | None = Field(
        default=None, description="An image uploaded with `POST /v1/images`, instead of a URL."
    )
    prompt: str | None = Field(
        default=None, max_length=5000, description="Optional motion description."
    )
    resolution: Literal["720p", "1080p"] = Field(default="1080p")
    duration: Annotated[int, Field(strict=True, ge=DURATION_MIN, le=DURATION_MAX)] = Field(
        default=5, description=f"Clip length in whole seconds, {DURATION_MIN} to {DURATION_MAX}."
    )

    notify_url: str | None = Field(
        default=None,
        max_length=2048,
        description="https URL that receives the video JSON (signed, Standard Webhooks) once "
        "it is `ready` or `failed`. Needs NOTIFY_SECRET on the server.",
    )

    @field_validator("image_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and image_url_errors(value, field="image_url"):
            raise ValueError("must be an https URL (for example https://example.com/still.jpg)")
        return value


class VideoError(BaseModel):
    code: str
    message: str


class NotifyOut(BaseModel):
    """Delivery state of the ``notify_url`` push, once the video has ended."""

    url: str
    status: Literal["waiting", "pending", "delivered", "failed"] = Field(
        description="`waiting` until the video ends; then `pending` (retrying), "
        "`delivered` or `failed` (gave up after NOTIFY_MAX_ATTEMPTS)."
    )
    attempts: int
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None


class VideoOut(BaseModel):
    id: uuid.UUID
    status: Literal["queued", "processing", "downloading", "ready", "failed"]
    image_url: str
    image_id: uuid.UUID | None = Field(description="The uploaded image used, if any.")
    prompt: str | None
    resolution: str
    duration: int
    task_id: str | None
    error: VideoError | None
    size_bytes: int | None
    sha256: str | None
    content_url: str | None = Field(description="Where the stored MP4 is served once ready.")
    notify: NotifyOut | None = Field(description="Push to `notify_url`, if one was given.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(
        cls, video: Video, *, public_base: str, notification: Notification | None = None
    ) -> VideoOut:
        error = (
            VideoError(code=video.error_code, message=video.error_message or "")
            if video.error_code
            else None
        )
        notify = None
        if video.notify_url:
            notify = NotifyOut(
                url=video.notify_url,
                status=notification.status if notification else "waiting",
                attempts=notification.attempts if notification else 0,
                last_attempt_at=notification.last_attempt_at if notification else None,
                last_status_code=notification.last_status_code if notification else None,
                last_error=notification.last_error if notification else None,
            )
        ready = video.status == "ready"
        return cls(
            id=video.id,
            status=video.status,
            image_url=video.image_url,
            image_id=video.image_id,
            prompt=video.prompt,
            resolution=video.resolution,
            duration=video.duration,
            task_id=video.task_id,
            error=error,
            size_bytes=video.size_bytes,
            sha256=video.sha256,
            content_url=f"{public_base}/v1/videos/{video.id}/content" if ready else None,
            notify=notify,
            created_at=video.created_at,
            updated_at=video.updated_at,
        )


class ImageOut(BaseModel):
    id: uuid.UUID = Field(description="Pass as `image_id` to `POST /v1/videos`.")
    url: str = Field(description="Public, unguessable URL hiapi fetches the image from.")
    content_type: Literal["image/jpeg", "image/png", "image/webp"]
    width: int
    height: int
    size_bytes: int
    sha256: str
    created_at: datetime


class VideoPage(BaseModel):
    items: list[VideoOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail
