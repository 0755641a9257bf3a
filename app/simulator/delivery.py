"""Outbound HTTP made by the simulator: fetching input images and delivering callbacks.

Callbacks behave like hiapi's: the task object is POSTed (bare or wrapped) to
``callback.url``; a non-2xx answer or a connection error is retried with a short backoff;
duplicate deliveries are sent concurrently. All randomness comes from ``SimulatorState.roll``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from app.simulator.state import SimTask, SimulatorState

__all__ = ["BACKOFF_SECONDS", "MAX_IMAGE_BYTES", "deliver_callbacks", "envelope", "fetch_image"]

MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE_TIMEOUT_SECONDS = 5.0
BACKOFF_SECONDS = (0.5, 1.0, 2.0)
"""Wait before retry 1, 2, 3; later retries reuse the last value."""


async def fetch_image(http: httpx.AsyncClient, url: str) -> bytes | None:
    """Download ``url`` (5 s overall, 20 MB cap); ``None`` on any failure."""
    try:
        async with asyncio.timeout(IMAGE_TIMEOUT_SECONDS):
            return await _read_capped(http, url)
    except (httpx.HTTPError, httpx.InvalidURL, TimeoutError, ValueError):
        return None


async def _read_capped(http: httpx.AsyncClient, url: str) -> bytes | None:
    async with http.stream("GET", url, follow_redirects=True) as response:
        if response.status_code != 200:
            return None
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
            return None
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body.extend(chunk)
            if len(body) > MAX_IMAGE_BYTES:
                return None
        return bytes(body)


def envelope(state: SimulatorState, task: dict[str, Any]) -> dict[str, Any]:
    """The callback body for ``task`` under the configured envelope."""
    shape = state.config.callback_envelope
    if shape == "random":
        shape = state.rng.choice(("bare", "wrapped"))
    if shape == "wrapped":
        return {"code": 200, "data": task, "message": "success"}
    return task


async def deliver_callbacks(state: SimulatorState, task: SimTask) -> None:
    """Send ``task``'s final callback, honouring drop and duplicate fates."""
    if task.callback_url is None:
        return
    if task.fate.drop_callback:
        state.stats.callbacks_dropped += 1
        return
    wire = task.to_wire()
    bodies = [envelope(state, wire) for _ in range(task.fate.callback_copies)]
    sent = await asyncio.gather(*(_send_with_retries(state, task.callback_url, b) for b in bodies))
    acked = [at for at in sent if at is not None]
    task.callback_delivered = bool(acked)
    task.callback_delivered_at = min(acked) if acked else None


async def _send_with_retries(state: SimulatorState, url: str, body: dict[str, Any]) -> float | None:
    """When an attempt was answered 2xx (unix time); ``None`` when every retry failed."""
    attempts = 1 + state.config.callback_retries
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS)) - 1])
        if await _send_once(state, url, body):
            state.stats.callbacks_delivered += 1
            return time.time()
    return None


async def _send_once(state: SimulatorState, url: str, body: dict[str, Any]) -> bool:
    """POST one callback; True on a 2xx answer."""
    state.stats.callbacks_sent += 1
    try:
        response = await state.http_client().post(url, json=body)
    except (httpx.HTTPError, httpx.InvalidURL):
        state.stats.callback_failures += 1
        return False
    if 200 <= response.status_code < 300:
        return True
    state.stats.callback_failures += 1
    return False
