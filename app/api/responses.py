"""Responses with a duty beyond their body: a clip whose Range errors speak JSON, and an event
stream that holds one of its caller's stream slots for exactly as long as it is sent."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from app.errors import error_body
from app.spend import QuotaUse
from app.streams import StreamSlots

__all__ = ["ClipResponse", "EventStreamResponse", "rate_limit_headers"]


def rate_limit_headers(quota: QuotaUse | None, now: datetime) -> dict[str, str]:
    """``RateLimit-Limit``, ``-Remaining`` and ``-Reset`` (seconds) of ``quota``; none when
    no quota applies. A token's cap never resets: its ``Reset`` is when the token expires."""
    if quota is None:
        return {}
    ends = quota.resets_at or quota.expires_at
    headers = {"RateLimit-Limit": str(quota.limit), "RateLimit-Remaining": str(quota.remaining)}
    if ends is not None:
        headers["RateLimit-Reset"] = str(max(0, math.ceil((ends - now).total_seconds())))
    return headers


RANGE_FORMS = "use bytes=START-END, bytes=START- or bytes=-LENGTH (in bytes, counted from 0)"


class ClipResponse(FileResponse):
    """A FileResponse (streaming, Range, 206) whose Range errors use the JSON error shape.

    Starlette answers a malformed Range ``400`` and an unsatisfiable one ``416`` in plain
    text; this catches those two answers on their way out and sends the same status (and
    ``Content-Range: bytes */size`` on 416) with ``{"error": {...}}`` instead.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held: Message | None = None
        text = bytearray()

        async def send_json_errors(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in (400, 416):
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            text.extend(message.get("body", b""))
            if not message.get("more_body", False):
                await _send_range_error(held, text.decode("utf-8", "replace"), scope, send)

        await super().__call__(scope, receive, send_json_errors)


async def _send_range_error(start: Message, reason: str, scope: Scope, send: Send) -> None:
    status = int(start["status"])
    headers = Headers(raw=start.get("headers", []))
    asked = Headers(scope=scope).get("range", "")
    shown = repr(asked) if len(asked) <= 80 else repr(asked[:77]) + "..."
    if status == 416:
        size = headers.get("content-range", "").rpartition("/")[2]
        body = error_body(
            "range_not_satisfiable",
            f"Range {shown} starts at or beyond the end of the clip ({size} bytes); "
            f"ask for bytes below {size}, or leave Range out for the whole clip",
        )
    else:
        why = reason.strip().removeprefix("Range header: ").rstrip(".") or "malformed"
        body = error_body("bad_range", f"Range {shown} is not valid ({why}); {RANGE_FORMS}")
    data = json.dumps(body).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
    ]
    if "content-range" in headers:
        raw.append((b"content-range", headers["content-range"].encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class EventStreamResponse(StreamingResponse):
    """Server-Sent Events that hold one of ``caller``'s slots while they are sent.

    The slot is taken when the response starts and given back however it ends: the stream's
    last event, its lifetime, the client going away, or an error. With no slot free, the
    answer is ``429 too_many_streams`` and the stream never starts.
    """

    def __init__(
        self,
        content: AsyncGenerator[str, None],
        *,
        slots: StreamSlots,
        caller: str,
        limit: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._content = content
        self._slots = slots
        self._caller = caller
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        release = self._slots.acquire(self._caller, self._limit)
        if release is None:
            await self._content.aclose()
            await _too_many_streams(self._limit)(scope, receive, send)
            return
        try:
            await super().__call__(scope, receive, send)
        finally:
            release()
            await self._content.aclose()


def _too_many_streams(limit: int) -> JSONResponse:
    body: dict[str, Any] = error_body(
        "too_many_streams",
        f"this API key already has {limit} open event streams on this server "
        "(EVENTS_MAX_STREAMS); close one, or read GET /v1/videos/{id} instead",
        limit=limit,
    )
    return JSONResponse(body, status_code=429, headers={"Retry-After": "5"})
