"""A task's life after creation: wait out the latency, render, turn terminal, call back.

``run_task`` is the background job spawned for every created task. Rendering (the image fetch,
when the config allows it, plus ``render_mp4`` in a worker thread) starts right away and
overlaps the configured latency, so a task finishes after ``max(latency, render time)``.
``POST /_sim/tasks/{id}/complete`` cuts the wait short through ``SimTask.finish_now``.
"""

from __future__ import annotations

import asyncio
import contextlib

from app.hiapi.schemas import TaskStatus
from app.simulator.config import SimulatorConfig
from app.simulator.delivery import deliver_callbacks, fetch_image
from app.simulator.render import render_mp4
from app.simulator.state import SimTask, SimulatorState

__all__ = ["FAIL_ERROR", "RENDER_ERROR", "run_task"]

FAIL_ERROR = {
    "code": "generation_failed",
    "message": "the model could not generate a video for this input",
}
RENDER_ERROR = {"code": "generation_failed", "message": "rendering the video failed"}


async def run_task(state: SimulatorState, task: SimTask) -> None:
    """Drive ``task`` to a terminal status, then deliver its callback."""
    clip_job = None if task.fate.fail else asyncio.ensure_future(_produce_clip(state, task))
    try:
        await _wait_latency(task, state.config.latency_seconds)
        if _outcome(task) is TaskStatus.success:
            clip_job = clip_job or asyncio.ensure_future(_produce_clip(state, task))
            await _succeed(state, task, clip_job)
        else:
            _fail(task, FAIL_ERROR)
    finally:
        if clip_job is not None and not clip_job.done():
            clip_job.cancel()
        task.finished.set()
    await deliver_callbacks(state, task)


def _outcome(task: SimTask) -> TaskStatus:
    if task.forced_outcome is not None:
        return task.forced_outcome
    return TaskStatus.fail if task.fate.fail else TaskStatus.success


async def _wait_latency(task: SimTask, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task.finish_now.wait(), timeout=seconds)


async def _produce_clip(state: SimulatorState, task: SimTask) -> bytes:
    image = None
    if _fetches(state.config, task.image_url):
        image = await fetch_image(state.http_client(), task.image_url)
    return await asyncio.to_thread(
        render_mp4,
        image,
        resolution=task.resolution,
        duration=task.duration,
        scale=state.config.render_scale,
        broken=task.fate.broken_clip,
    )


def _fetches(config: SimulatorConfig, url: str) -> bool:
    """Remote images only when asked; the service's own uploads whenever a prefix is set."""
    prefix = config.local_image_prefix
    return config.fetch_images or (prefix is not None and url.startswith(prefix))


async def _succeed(state: SimulatorState, task: SimTask, clip_job: asyncio.Future[bytes]) -> None:
    try:
        clip = await clip_job
    except Exception:  # a broken render is reported the way hiapi reports a failed task
        _fail(task, RENDER_ERROR)
        return
    url, expire_at = state.add_file(clip)
    task.output = [{"type": "video", "url": url, "expireAt": expire_at}]
    task.status = TaskStatus.success


def _fail(task: SimTask, error: dict[str, str]) -> None:
    task.error = dict(error)
    task.status = TaskStatus.fail
