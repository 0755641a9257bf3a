"""The REST API's request and response bodies."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Annotated, Literal, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.hiapi.schemas import DURATION_MAX, DURATION_MIN, image_url_errors, json_type
from app.jobs.hosts import canonical_host
from app.models import Notification, Status, Video
from app.net import is_ip_literal, is_public_address
from app.signing import VideoUrls

__all__ = [
    "FIELD_HINTS",
    "FIELD_RULE",
    "DeletedOut",
    "METADATA_MAX_BYTES",
    "METADATA_MAX_KEYS",
    "METADATA_VALUE_MAX",
    "ErrorOut",
    "QuotaOut",
    "UsageOut",
    "ImageOut",
    "NotifyOut",
    "VideoCreate",
    "VideoError",
    "VideoOut",
    "VideoPage",
    "field_rule",
    "metadata_key_problem",
    "metadata_problem",
    "notify_url_form_problem",
    "notify_url_problem",
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

# ``metadata``: the caller's own key/value pairs, stored and echoed, never sent to hiapi.
METADATA_MAX_KEYS = 16
METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,40}")
METADATA_VALUE_MAX = 500
# The size of the whole object is the UTF-8 length of its compact JSON encoding
# (``json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)``), escapes included.
METADATA_MAX_BYTES = 8 * 1024
METADATA_EXAMPLE: dict[str, JsonValue] = {"order_id": "A-1042", "user.plan": "pro"}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def metadata_key_problem(key: str) -> str | None:
    """Why ``key`` can't be a metadata key, or None."""
    if METADATA_KEY.fullmatch(key) is None:
        return f"key {_shown(key)} must be 1 to 40 characters of A-Z, a-z, 0-9, '_', '.' and '-'"
    return None


def metadata_problem(metadata: object) -> tuple[str, str] | None:
    """``(field, message)`` of the first rule ``metadata`` breaks, or None."""
    if not isinstance(metadata, dict):
        return "metadata", (
            f"must be an object of string keys to string values, for example "
            f"{json.dumps(METADATA_EXAMPLE)} (got {json_type(metadata)})"
        )
    if len(metadata) > METADATA_MAX_KEYS:
        return "metadata", f"at most {METADATA_MAX_KEYS} keys (got {len(metadata)})"
    for key, value in metadata.items():
        problem = metadata_key_problem(key)
        if problem is not None:
            return "metadata", problem
        if not isinstance(value, str):
            return f"metadata.{key}", (
                f"must be a string of at most {METADATA_VALUE_MAX} characters "
                f"(got {json_type(value)})"
            )
        if len(value) > METADATA_VALUE_MAX:
            return f"metadata.{key}", (
                f"must be a string of at most {METADATA_VALUE_MAX} characters (got {len(value)})"
            )
    size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
    if size > METADATA_MAX_BYTES:
        return "metadata", (
            f"at most {METADATA_MAX_BYTES} bytes in all, counted as compact JSON in UTF-8 "
            f"(got {size})"
        )
    return None


# The error type of a rule that spans fields or needs more than the field's type: its message
# is shown as written, and ``ctx["field"]`` names the field to blame (``app.errors``).
FIELD_RULE = "field_rule"


def field_rule(field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(FIELD_RULE, "{message}", {"field": field, "message": message})


def _notify_host(url: str) -> tuple[httpx.URL, str]:
    parsed = httpx.URL(url)
    return parsed, canonical_host(parsed.raw_host.decode("ascii")) if parsed.raw_host else ""


def notify_url_form_problem(url: str) -> str | None:
    """Why ``url`` is not an absolute http(s) URL without credentials, or None: the part of the
    notify_url rule that holds whatever the server's settings."""
    try:
        parsed, host = _notify_host(url)
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        return f"must be an absolute https URL ({exc})"
    if parsed.scheme not in ("https", "http") or not host or parsed.userinfo:
        return "must be an absolute https URL without credentials"
    return None


def notify_url_problem(url: str, *, allow_local: bool) -> str | None:
    """Why ``url`` can't be a notify_url on a server with ``NOTIFY_ALLOW_LOCAL=allow_local``,
    or None. An IP literal is checked here; a name's addresses are checked on every delivery
    (``app.jobs.notifier``), before connecting."""
    problem = notify_url_form_problem(url)
    if problem is not None or allow_local:
        return problem
    parsed, host = _notify_host(url)
    if parsed.scheme == "http":
        return "must use https"
    if is_ip_literal(host) and not is_public_address(host):
        return (
            f"{parsed.host} is a private or local address, which notifications are never sent to; "
            "give a public https URL (NOTIFY_ALLOW_LOCAL=true allows it, for development only)"
        )
    return None


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
        "it is `ready` or `failed`. Needs NOTIFY_SECRET on the server. A host that is a "
        "private or local IP address is refused (`422`); a name is resolved on each delivery "
        "and sent to only if every address it resolves to is public.",
    )

    metadata: dict[str, str] | None = Field(
        default=None,
        description=(
            f"Your own key/value pairs, stored with the video and echoed in its JSON, events "
            f"and `notify_url` pushes; never sent to hiapi. Up to {METADATA_MAX_KEYS} keys of 1 "
            f"to 40 characters `[A-Za-z0-9_.-]`, string values of at most "
            f"{METADATA_VALUE_MAX} characters, and at most {METADATA_MAX_BYTES} bytes in all "
            "(the UTF-8 length of the object's compact JSON encoding). Filter the list with "
            "`GET /v1/videos?metadata.<key>=<value>`."
        ),
        json_schema_extra={
            "maxProperties": METADATA_MAX_KEYS,
            "propertyNames": {"pattern": METADATA_KEY.pattern, "maxLength": 40},
            "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_MAX},
            "examples": [METADATA_EXAMPLE],
        },
    )

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata_rules(cls, value: object) -> object:
        if value is not None:
            problem = metadata_problem(value)
            if problem is not None:
                raise field_rule(*problem)
        return value

    @field_validator("image_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and image_url_errors(value, field="image_url"):
            raise ValueError("must be an https URL (for example https://example.com/still.jpg)")
        return value

    @model_validator(mode="after")
    def _one_image_and_a_well_formed_notify_url(self) -> Self:
        # Runs once every field is valid, so a request with a bad field is blamed on that
        # field alone. Whether notify_url may be http or a private address depends on the
        # server's settings: ``app.submission`` checks that part.
        if self.image_url is None and self.image_id is None:
            raise field_rule(
                "image_url",
                "field required: give image_url (an https URL) or image_id (from POST /v1/images)",
            )
        if self.image_url is not None and self.image_id is not None:
            raise field_rule("image_url", "give image_url or image_id, not both")
        if self.notify_url is not None:
            problem = notify_url_form_problem(self.notify_url)
            if problem is not None:
                raise field_rule("notify_url", problem)
        return self


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


VIDEO_EXAMPLE: dict[str, JsonValue] = {
    "id": "5f0c7d7e-8c1b-4f0e-9a55-1d2b3c4d5e6f",
    "status": "ready",
    "image_url": "https://example.com/still.jpg",
    "image_id": None,
    "prompt": "slow zoom out",
    "resolution": "1080p",
    "duration": 5,
    "subject": None,
    "task_id": "tk-hiapi-01KW3D",
    "error": None,
    "size_bytes": 367150,
    "sha256": "8aa7a38801b8f2a8a58d9624b5bbdea44739413b76a505ebccd71672068a153a",
    "width": 1920,
    "height": 1080,
    "duration_seconds": 5.0,
    "codec": "h264",
    "fps": 24.0,
    "warnings": [],
    "faststart_remuxed": False,
    "content_url": "https://relay.example.com/v1/videos/5f0c7d7e-8c1b-4f0e-9a55-1d2b3c4d5e6f"
    "/content?exp=1795887911&sig=q9c1uY0Vh8m2b5JmQk3m4l0bXQ3u8b7yq6QmC0d3N2s",
    "poster_url": "https://relay.example.com/v1/videos/5f0c7d7e-8c1b-4f0e-9a55-1d2b3c4d5e6f"
    "/poster.jpg?exp=1795887911&sig=Vb3kR0s9cE1mT7yQ2wL5nA8dX4hG6jU0pZ3fK9iO1eM",
    "events_url": "https://relay.example.com/v1/videos/5f0c7d7e-8c1b-4f0e-9a55-1d2b3c4d5e6f"
    "/events?exp=1795887911&sig=Jm3v8d0Xo2sH5q1cYb7kN9rT4wE6uA0zL8pG2fV5iQk",
    "notify": None,
    "metadata": {"order_id": "A-1042"},
    "created_at": "2026-11-28T16:45:09.379107Z",
    "updated_at": "2026-11-28T16:45:11.451912Z",
}


class VideoOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [VIDEO_EXAMPLE]})
    id: uuid.UUID
    status: Status
    image_url: str
    image_id: uuid.UUID | None = Field(description="The uploaded image used, if any.")
    prompt: str | None
    resolution: str
    duration: int
    subject: str | None = Field(
        description="The end user whose client token created it; null when the key did."
    )
    task_id: str | None
    error: VideoError | None
    size_bytes: int | None
    sha256: str | None = Field(description="sha256 of the stored clip (hex); null until ready.")
    width: int | None = Field(description="Frame width of the stored clip; null until ready.")
    height: int | None = Field(description="Frame height of the stored clip; null until ready.")
    duration_seconds: float | None = Field(
        description="Length of the stored clip's video stream, in seconds; null until ready."
    )
    codec: str | None = Field(description="Video codec (`h264`, ...); null until ready.")
    fps: float | None = Field(description="Average frame rate; null until ready (or unknown).")
    warnings: list[str] | None = Field(
        description=(
            "What is off about a playable clip, for operators to take up with hiapi (the "
            "video is ready all the same): `duration_mismatch` (more than 0.5 s from the "
            "requested `duration`), `resolution_mismatch` (height not 720 or 1080 as "
            "`resolution` asked). Empty when nothing is; null until ready."
        )
    )
    faststart_remuxed: bool | None = Field(
        description=(
            "Whether hiapi's file had its index (`moov`) at the end and was rewritten with it "
            "first (no re-encoding), so a `<video>` can start before it has the whole file; "
            "`size_bytes` and `sha256` are then the rewritten file's. Null until ready."
        )
    )
    content_url: str | None = Field(
        description=(
            "Where the stored MP4 is served once ready (absolute; null until then). With API "
            "keys on it is a signed URL valid `SIGNED_URL_TTL_SECONDS` that needs no "
            "`Authorization` header, for `<video src>`; GET the video again for a fresh one."
        )
    )
    poster_url: str | None = Field(
        description=(
            "A JPEG frame of the clip (from about 0.5 s, at the clip's size, at most 200 KB) "
            "for `<video poster>` (absolute; null until ready). Signed like `content_url` "
            "when API keys are on."
        )
    )
    events_url: str = Field(
        description=(
            "This video's Server-Sent Events stream (absolute). With API keys on it is a "
            "signed URL valid `SIGNED_URL_TTL_SECONDS` that needs no `Authorization` header, "
            "for `new EventSource(events_url)`; GET the video again for a fresh one."
        )
    )
    notify: NotifyOut | None = Field(description="Push to `notify_url`, if one was given.")
    metadata: dict[str, str] = Field(
        description="The `metadata` given at submit, keys in sorted order; `{}` when none."
    )
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(
        cls, video: Video, *, urls: VideoUrls, notification: Notification | None = None
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
        ready = video.status == Status.ready
        return cls(
            id=video.id,
            status=video.status,
            image_url=video.image_url,
            image_id=video.image_id,
            prompt=video.prompt,
            resolution=video.resolution,
            duration=video.duration,
            subject=video.subject or None,
            task_id=video.task_id,
            error=error,
            size_bytes=video.size_bytes,
            sha256=video.sha256,
            width=video.width if ready else None,
            height=video.height if ready else None,
            duration_seconds=video.duration_seconds if ready else None,
            codec=video.codec if ready else None,
            fps=video.fps if ready else None,
            warnings=video.warnings if ready else None,
            faststart_remuxed=video.faststart_remuxed if ready else None,
            content_url=urls.content(video.id) if ready else None,
            poster_url=urls.poster(video.id) if ready and video.poster_key else None,
            events_url=urls.events(video.id),
            notify=notify,
            metadata=dict(sorted((video.meta or {}).items())),
            created_at=video.created_at,
            updated_at=video.updated_at,
        )


class DeletedOut(BaseModel):
    """The last event of a deleted video's event stream: that it is gone, and when."""

    id: uuid.UUID
    status: Literal["deleted"] = "deleted"
    deleted_at: datetime


Scope = Literal["videos:create", "videos:read", "images:create"]
ALL_SCOPES: tuple[Scope, ...] = ("videos:create", "videos:read", "images:create")


class ClientTokenCreate(BaseModel):
    """A client token for one end user, minted by the customer's backend with its API key."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"subject": "user-42", "ttl_seconds": 900, "max_video_seconds": 30}]
        },
    )
    subject: str = Field(
        min_length=1, max_length=128, description="The end user's id in your system."
    )
    ttl_seconds: int = Field(default=900, ge=60, le=86400, description="Lifetime of the token.")
    scopes: list[Scope] = Field(
        default_factory=lambda: list(ALL_SCOPES),
        min_length=1,
        description="What the token may do (default: all three).",
    )
    max_video_seconds: int | None = Field(
        default=None, ge=1, description="Video-seconds this token may submit in all."
    )


class ClientTokenOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJ2aWRlb3JlbGF5Ii…",
                    "expires_at": "2026-11-28T17:00:00Z",
                    "subject": "user-42",
                    "scopes": ["videos:create", "videos:read", "images:create"],
                }
            ]
        }
    )
    token: str = Field(description="Send as `Authorization: Bearer <token>`.")
    expires_at: datetime
    subject: str
    scopes: list[Scope]


class ImageOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0b7c1f1e-2d3a-4b5c-8d9e-0f1a2b3c4d5e",
                    "url": "https://relay.example.com/i/4Jq9cX2bXbP1w0xk3m7T1qg5mZkq8Y1a.png",
                    "content_type": "image/png",
                    "width": 1280,
                    "height": 720,
                    "size_bytes": 183422,
                    "sha256": "f475006c3c22aa1e5d2c9a9f4c6d1a0b8e2f3c4d5e6f708192a3b4c5d6e7f809",
                    "created_at": "2026-11-28T16:44:02.102Z",
                }
            ]
        }
    )
    id: uuid.UUID = Field(description="Pass as `image_id` to `POST /v1/videos`.")
    url: str = Field(description="Public, unguessable URL hiapi fetches the image from.")
    content_type: Literal["image/jpeg", "image/png", "image/webp"]
    width: int
    height: int
    size_bytes: int
    sha256: str
    created_at: datetime


class VideoPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [VIDEO_EXAMPLE], "next_cursor": None}]}
    )
    items: list[VideoOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class QuotaOut(BaseModel):
    scope: Literal["key", "subject", "token"] = Field(
        description=(
            "`key`: the API key's `DAILY_VIDEO_SECONDS_LIMIT` (shared by all its end users); "
            "`subject`: this end user's `DAILY_VIDEO_SECONDS_PER_SUBJECT`; `token`: this "
            "client token's `max_video_seconds`, over its life."
        )
    )
    used_video_seconds: int
    limit_video_seconds: int
    remaining_video_seconds: int
    resets_at: datetime | None = Field(
        description="Next midnight UTC for a day's quota; null for a token's cap (never resets)."
    )
    expires_at: datetime | None = Field(
        description="For a token's cap, when the token expires (a new token has its own cap)."
    )


class UsageOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "day": "2026-12-07",
                    "scope": "subject",
                    "used_video_seconds": 25,
                    "limit_video_seconds": 30,
                    "remaining_video_seconds": 5,
                    "resets_at": "2026-12-08T00:00:00Z",
                    "limits": [
                        {
                            "scope": "key",
                            "used_video_seconds": 840,
                            "limit_video_seconds": 3600,
                            "remaining_video_seconds": 2760,
                            "resets_at": "2026-12-08T00:00:00Z",
                            "expires_at": None,
                        },
                        {
                            "scope": "subject",
                            "used_video_seconds": 25,
                            "limit_video_seconds": 30,
                            "remaining_video_seconds": 5,
                            "resets_at": "2026-12-08T00:00:00Z",
                            "expires_at": None,
                        },
                    ],
                }
            ]
        }
    )
    day: str = Field(description="Today, UTC (`YYYY-MM-DD`): the day the daily quotas count.")
    scope: Literal["key", "subject", "token"] | None = Field(
        description="Which of `limits` the top-level figures are: the one with the fewest "
        "seconds left. Null when no limit applies."
    )
    used_video_seconds: int | None
    limit_video_seconds: int | None = Field(description="Null when no limit applies.")
    remaining_video_seconds: int | None
    resets_at: datetime | None
    limits: list[QuotaOut] = Field(
        description="Every limit that applies to the caller (key, subject, token order). A "
        "limit that is not configured is left out: nothing is counted against it."
    )


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "validation_error",
                        "message": "duration: must be a whole number of seconds from 3 to 15 "
                        "(got 30)",
                        "field": "duration",
                    }
                }
            ]
        }
    )
    error: ErrorDetail
