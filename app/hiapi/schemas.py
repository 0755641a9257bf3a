"""hiapi's wire shapes and input rules for ``happyhorse-1.1/image-to-video``.

The rules live here once, in hiapi's own words, so that videorelay's API rejects exactly what
hiapi would reject (before anything is sent or billed) and the simulator answers with the exact
bodies hiapi sends.

This is the boundary for hiapi's field names: ``taskId`` and ``expireAt`` on the wire are
``task_id`` and ``expires_at`` on the models, and nowhere else in videorelay. ``Task.wire()``
writes a task back in hiapi's words (for the bench and tests that play hiapi's part).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "DURATION_MAX",
    "DURATION_MIN",
    "MODEL",
    "RESOLUTIONS",
    "Task",
    "TaskError",
    "TaskOutput",
    "TaskStatus",
    "input_errors",
    "json_type",
    "parse_task_payload",
    "task_object",
]

MODEL = "happyhorse-1.1/image-to-video"
RESOLUTIONS = ("720p", "1080p")
DURATION_MIN = 3
DURATION_MAX = 15
INPUT_FIELDS = ("image_urls", "prompt", "resolution", "duration")
ROOT_FIELDS = ("model", "input", "callback")
CALLBACK_WHEN = ("final",)


class TaskStatus(StrEnum):
    handling = "handling"
    success = "success"
    fail = "fail"


class TaskOutput(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: str = "video"
    url: str
    expires_at: int | None = Field(default=None, alias="expireAt")

    @field_validator("expires_at", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """Unix seconds; a value in milliseconds is scaled, one out of range is dropped."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None if value is None else value
        if value >= 10**14:
            return None  # not even milliseconds (and an int this big overflows a float)
        if value > 10**11:
            value = value / 1000
        return int(value) if 0 < value < 10**11 else None


class TaskError(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str = "unknown"
    message: str = ""


class Task(BaseModel):
    """The task object hiapi returns from ``GET /v1/tasks/{taskId}`` and POSTs to callbacks."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    task_id: str = Field(min_length=1, max_length=200, alias="taskId")
    status: TaskStatus
    model: str | None = None
    output: list[TaskOutput] = Field(default_factory=list)
    error: TaskError | None = None

    def wire(self) -> dict[str, Any]:
        """The task as hiapi writes it (``taskId``, ``expireAt``), ready for ``json.dumps``."""
        return self.model_dump(mode="json", by_alias=True)


def task_object(payload: Any) -> Mapping[str, Any] | None:
    """The task object of a body, bare or wrapped as ``{"code", "data"}``; None if not an object."""
    if isinstance(payload, Mapping) and "data" in payload and "taskId" not in payload:
        payload = payload["data"]
    return payload if isinstance(payload, Mapping) else None


def parse_task_payload(payload: Any) -> Task:
    """Accept a task bare or wrapped as ``{"code", "data"}``; raise ``ValueError`` otherwise."""
    payload = task_object(payload)
    if payload is None:
        raise ValueError("expected a JSON object with taskId and status")
    try:
        return Task.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ValueError(f"{where}: {first['msg']}") from None


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def input_errors(body: Any, *, allow_http_images: bool = False) -> list[str]:
    """Check a create-task body the way hiapi does; return hiapi's messages (empty if valid).

    Messages use hiapi's format: ``invalid input: <field>: <reason>``. ``allow_http_images``
    exists for the local simulator only (uploads served by a dev server over plain http).
    """
    problems: list[str] = []
    if not isinstance(body, Mapping):
        return [f"invalid input: expected object, but got {json_type(body)}"]
    extra = [k for k in body if k not in ROOT_FIELDS]
    if extra:
        problems.append(f"additional properties {', '.join(repr(k) for k in extra)} not allowed")
    if body.get("model") != MODEL:
        if "model" not in body:
            problems.append('model: missing required field "model"')
        else:
            problems.append(f"model: value must be {MODEL!r}")
    problems.extend(_callback_errors(body.get("callback")))
    inp = body.get("input")
    if inp is None:
        problems.append('input: missing required field "input"')
    elif not isinstance(inp, Mapping):
        problems.append(f"input: expected object, but got {json_type(inp)}")
    else:
        problems.extend(_input_object_errors(inp, allow_http_images=allow_http_images))
    return [f"invalid input: {p}" for p in problems]


def _callback_errors(callback: Any) -> list[str]:
    if callback is None:
        return []
    if not isinstance(callback, Mapping):
        return [f"callback: expected object, but got {json_type(callback)}"]
    problems: list[str] = []
    url = callback.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        problems.append("callback.url: must be an http(s) URL")
    if callback.get("when", "final") not in CALLBACK_WHEN:
        problems.append("callback.when: value must be one of 'final'")
    return problems


def _input_object_errors(inp: Mapping[str, Any], *, allow_http_images: bool) -> list[str]:
    problems: list[str] = []
    extra = [k for k in inp if k not in INPUT_FIELDS]
    if extra:
        problems.append(f"additional properties {', '.join(repr(k) for k in extra)} not allowed")

    urls = inp.get("image_urls")
    if "image_urls" not in inp:
        problems.append('image_urls: missing required field "image_urls"')
    elif not isinstance(urls, list):
        problems.append(f"image_urls: expected array, but got {json_type(urls)}")
    elif len(urls) < 1:
        problems.append(f"image_urls: minItems: got {len(urls)}, want 1")
    elif len(urls) > 1:
        problems.append(f"image_urls: maxItems: got {len(urls)}, want 1")
    else:
        url = urls[0]
        if allow_http_images and isinstance(url, str) and url.startswith("http://"):
            url = "https://" + url.removeprefix("http://")
        problems.extend(image_url_errors(url, field="image_urls/0"))

    if "prompt" in inp and not isinstance(inp["prompt"], str):
        problems.append(f"prompt: expected string, but got {json_type(inp['prompt'])}")

    if "resolution" in inp and inp["resolution"] not in RESOLUTIONS:
        allowed = ", ".join(repr(r) for r in RESOLUTIONS)
        problems.append(f"resolution: value must be one of {allowed}")

    if "duration" in inp:
        problems.extend(duration_errors(inp["duration"]))
    return problems


def image_url_errors(url: Any, *, field: str) -> list[str]:
    """hiapi takes one HTTPS URL with a host."""
    if not isinstance(url, str):
        return [f"{field}: expected string, but got {json_type(url)}"]
    if not url.startswith("https://") or len(url) <= len("https://") or " " in url:
        return [f"{field}: value must be an https URL"]
    return []


def duration_errors(value: Any) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int):
        return [f"duration: expected integer, but got {json_type(value)}"]
    if value < DURATION_MIN:
        return [f"duration: minimum: got {value}, want {DURATION_MIN}"]
    if value > DURATION_MAX:
        return [f"duration: maximum: got {value}, want {DURATION_MAX}"]
    return []
