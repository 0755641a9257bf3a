"""The REST API's request and response bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.hiapi.schemas import DURATION_MAX, DURATION_MIN, image_url_errors

__all__ = ["FIELD_HINTS", "ErrorOut", "VideoCreate", "VideoError", "VideoOut", "VideoPage"]

# How to fix each submit field, used in 422 messages.
FIELD_HINTS = {
    "image_url": "must be one https URL string, for example https://example.com/still.jpg",
    "prompt": "must be a string of at most 5000 characters, or left out",
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

    image_url: str = Field(
        max_length=2048, description="One https URL of the still image hiapi will fetch."
    )
    prompt: str | None = Field(
        default=None, max_length=5000, description="Optional motion description."
    )
    resolution: Literal["720p", "1080p"] = Field(default="1080p")
    duration: Annotated[int, Field(strict=True, ge=DURATION_MIN, le=DURATION_MAX)] = Field(
        default=5, description=f"Clip length in whole seconds, {DURATION_MIN} to {DURATION_MAX}."
    )

    @field_validator("image_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if image_url_errors(value, field="image_url"):
            raise ValueError("must be an https URL (for example https://example.com/still.jpg)")
        return value


class VideoError(BaseModel):
    code: str
    message: str


class VideoOut(BaseModel):
    id: uuid.UUID
    status: Literal["queued", "processing", "downloading", "ready", "failed"]
    image_url: str
    prompt: str | None
    resolution: str
    duration: int
    task_id: str | None
    error: VideoError | None
    size_bytes: int | None
    sha256: str | None
    content_url: str | None = Field(description="Where the stored MP4 is served once ready.")
    created_at: datetime
    updated_at: datetime


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
