"""The fake hiapi's HTTP surface: task endpoints, file downloads and test controls.

``create_simulator_app`` builds a standalone FastAPI app whose lifespan owns the outbound
``httpx.AsyncClient`` and cancels background jobs on shutdown. Routes:

* ``POST /v1/tasks`` and ``GET /v1/tasks/{taskId}``: hiapi's task API, exact bodies included;
* ``GET /files/{token}.mp4``: the rendered clips behind ``output[].url``;
* ``/_sim/...`` (no auth): stats, per-task details (``/_sim/tasks``, used by
  ``videorelay chaos``), runtime config changes, and forcing a task to finish.

Handlers read the per-app ``SimulatorState`` from ``request.app.state.simulator``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, cast

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from app.hiapi.schemas import TaskStatus, input_errors
from app.simulator.config import SimulatorConfig
from app.simulator.files import stream_file
from app.simulator.jobs import run_task
from app.simulator.render import padding_length
from app.simulator.state import SimulatorState

__all__ = ["create_simulator_app"]

FORCE_COMPLETE_TIMEOUT_SECONDS = 30.0

router = APIRouter()


def create_simulator_app(config: SimulatorConfig | None = None) -> FastAPI:
    """A fresh simulator with its own state; ``config`` is used (and mutated) in place.

    When mounted inside another app, enter ``sim.router.lifespan_context(sim)`` from the host's
    lifespan so background jobs are cancelled on shutdown (Starlette does not run the lifespans
    of mounted apps).
    """
    state = SimulatorState(config=config if config is not None else SimulatorConfig.from_env())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.http_client()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(title="hiapi simulator", version="1", lifespan=lifespan)
    app.state.simulator = state
    app.include_router(router)
    return app


def _state(request: Request) -> SimulatorState:
    return cast(SimulatorState, request.app.state.simulator)


# -- hiapi's answers -----------------------------------------------------------------------


def _denied() -> JSONResponse:
    error = {
        "code": "permission_denied",
        "message": "This API key cannot use the selected model...",
        "type": "hiapi_error",
    }
    return JSONResponse({"error": error}, status_code=401)


def _invalid(message: str) -> JSONResponse:
    body = {"code": 400, "error_code": "INVALID_REQUEST", "message": message}
    return JSONResponse(body, status_code=400)


def _unavailable() -> JSONResponse:
    body = {
        "code": 503,
        "error_code": "SERVICE_UNAVAILABLE",
        "message": "service temporarily unavailable",
    }
    return JSONResponse(body, status_code=503)


def _not_found() -> JSONResponse:
    body = {"code": 404, "error_code": "NOT_FOUND", "message": "task not found"}
    return JSONResponse(body, status_code=404)


def _authorized(config: SimulatorConfig, header: str | None) -> bool:
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    if config.api_key is None:
        return token.startswith("sk-")
    return hmac.compare_digest(token.encode(), config.api_key.encode())


async def _read_json(request: Request) -> tuple[bool, Any]:
    """``(True, value)`` for a JSON body, ``(False, None)`` when it does not parse."""
    try:
        return True, json.loads(await request.body())
    except (ValueError, RecursionError):
        return False, None


async def _create_problem(request: Request) -> tuple[Response | None, Any]:
    """Auth and input checks of a create; returns ``(rejection, body)``."""
    if not _authorized(_state(request).config, request.headers.get("authorization")):
        return _denied(), None
    parsed, body = await _read_json(request)
    if not parsed:
        return _invalid("invalid input: request body is not valid JSON"), None
    config = _state(request).config
    errors = input_errors(body, allow_http_images=config.allow_http_image_urls)
    return (_invalid(errors[0]) if errors else None), body


# -- task API ------------------------------------------------------------------------------


@router.post("/v1/tasks")
async def create_task(request: Request) -> Response:
    state = _state(request)
    state.stats.create_requests += 1
    rejection, body = await _create_problem(request)
    if rejection is not None:
        state.stats.create_rejected += 1
        return rejection
    if state.roll(state.config.error_5xx_rate):
        state.stats.create_5xx += 1
        return _unavailable()
    task = state.new_task(body)
    state.spawn(run_task(state, task))
    if state.roll(state.config.create_timeout_rate):
        state.stats.create_timeouts += 1
        state.timed_out_creates.add(task.task_id)
        await asyncio.sleep(state.config.timeout_delay_seconds)
    return JSONResponse({"code": 200, "data": {"taskId": task.task_id}, "message": "success"})


@router.get("/v1/tasks/{task_id}")
async def get_task(task_id: str, request: Request) -> Response:
    state = _state(request)
    state.stats.polls += 1
    if not _authorized(state.config, request.headers.get("authorization")):
        return _denied()
    if state.roll(state.config.error_5xx_rate):
        state.stats.poll_5xx += 1
        return _unavailable()
    task = state.tasks.get(task_id)
    if task is None:
        return _not_found()
    return JSONResponse({"code": 200, "data": task.to_wire()})


# -- files ---------------------------------------------------------------------------------


@router.api_route("/files/{token}.mp4", methods=["GET", "HEAD"])
async def get_file(token: str, request: Request) -> Response:
    state = _state(request)
    state.stats.file_requests += 1
    item = state.files.get(token)
    if item is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    if item.expires_at <= time.time() or not item.clip:
        return JSONResponse({"error": "expired"}, status_code=404)
    padding = padding_length(state.config.pad_bytes)
    headers = {"Content-Length": str(len(item.clip) + padding), "Cache-Control": "no-store"}
    if request.method == "HEAD":
        return Response(headers=headers, media_type="video/mp4")
    rate = state.config.download_bytes_per_second
    body = state.track_serve(token, stream_file(item.clip, padding=padding, bytes_per_second=rate))
    return StreamingResponse(body, media_type="video/mp4", headers=headers)


# -- test controls -------------------------------------------------------------------------


@router.get("/_sim/stats")
async def get_stats(request: Request) -> dict[str, int]:
    return asdict(_state(request).stats)


@router.get("/_sim/tasks")
async def get_tasks(request: Request) -> dict[str, Any]:
    """Every task: fate, callback URL, whether its create timed out, and each file download."""
    return {"tasks": _state(request).task_details()}


@router.get("/_sim/config")
async def get_config(request: Request) -> dict[str, Any]:
    return _state(request).config.model_dump()


@router.patch("/_sim/config")
async def patch_config(request: Request) -> Response:
    state = _state(request)
    parsed, changes = await _read_json(request)
    if not parsed or not isinstance(changes, dict):
        return JSONResponse({"detail": "expected a JSON object of knobs"}, status_code=422)
    try:
        updated = state.config.merged(changes)
    except ValidationError as exc:
        detail = exc.errors(include_url=False, include_context=False, include_input=False)
        return JSONResponse({"detail": detail}, status_code=422)
    state.config.update_from(updated)
    if "seed" in changes:
        state.reseed()
    return JSONResponse(state.config.model_dump())


@router.post("/_sim/tasks/{task_id}/complete")
async def complete_task(task_id: str, request: Request, outcome: str | None = None) -> Response:
    """Finish a task now (``?outcome=success|fail`` overrides its fate); returns the task."""
    state = _state(request)
    task = state.tasks.get(task_id)
    if task is None:
        return _not_found()
    if outcome is not None:
        if outcome not in (TaskStatus.success, TaskStatus.fail):
            return JSONResponse({"detail": "outcome must be success or fail"}, status_code=422)
        if task.status is TaskStatus.handling:
            task.forced_outcome = TaskStatus(outcome)
    task.finish_now.set()
    try:
        await asyncio.wait_for(task.finished.wait(), timeout=FORCE_COMPLETE_TIMEOUT_SECONDS)
    except TimeoutError:
        return _unavailable()
    return JSONResponse({"code": 200, "data": task.to_wire(), "message": "success"})
