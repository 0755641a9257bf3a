"""The simulator's in-memory world: tasks, rendered files, counters and the random source.

``SimulatorState`` is created once per app and lives on ``app.state.simulator``. It owns no
I/O: the HTTP handlers and the background jobs read and change it. Every random decision
goes through ``state.roll`` so a ``seed`` makes a run reproducible.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.hiapi.schemas import MODEL, TaskStatus
from app.simulator.config import BrokenClip, SimulatorConfig

__all__ = [
    "FileRecord",
    "FileServe",
    "SimFile",
    "SimStats",
    "SimTask",
    "SimulatorState",
    "TaskFate",
]

SWEEP_THRESHOLD = 256
"""Expired clips are only swept once this many files have been published."""


@dataclass
class SimStats:
    """Counters exposed by ``GET /_sim/stats``."""

    create_requests: int = 0
    tasks_created: int = 0
    create_rejected: int = 0
    create_5xx: int = 0
    create_timeouts: int = 0
    polls: int = 0
    poll_5xx: int = 0
    callbacks_sent: int = 0
    callback_failures: int = 0
    callbacks_delivered: int = 0
    callbacks_dropped: int = 0
    file_requests: int = 0


@dataclass(frozen=True)
class TaskFate:
    """What will happen to a task, rolled once when it is created."""

    fail: bool = False
    drop_callback: bool = False
    callback_copies: int = 1
    broken_clip: BrokenClip | None = None
    """The kind of broken clip the task succeeds with (``config.broken_clip`` at creation)."""


@dataclass
class SimTask:
    """One task as hiapi tracks it, plus what the simulator needs to finish it."""

    task_id: str
    image_url: str
    resolution: str
    duration: int
    callback_url: str | None
    fate: TaskFate
    status: TaskStatus = TaskStatus.handling
    output: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    created_at: float = field(default_factory=time.time)
    finish_now: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    forced_outcome: TaskStatus | None = None
    callback_delivered: bool = False  # some copy of the final callback was answered 2xx
    callback_delivered_at: float | None = None  # when the first copy was answered 2xx

    def to_wire(self) -> dict[str, Any]:
        """The task object returned by ``GET /v1/tasks/{id}`` and POSTed to callbacks."""
        return {
            "taskId": self.task_id,
            "status": self.status.value,
            "model": MODEL,
            "output": [dict(item) for item in self.output],
            "error": None if self.error is None else dict(self.error),
        }


@dataclass(frozen=True)
class SimFile:
    """A rendered clip served under ``/files/{token}.mp4`` until ``expires_at`` (unix time)."""

    clip: bytes
    expires_at: float


@dataclass
class FileServe:
    """One ``GET`` of an output file: when it started, how far it got, whether it finished."""

    started_at: float
    last_chunk_at: float
    bytes_sent: int = 0
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "last_chunk_at": self.last_chunk_at,
            "bytes_sent": self.bytes_sent,
            "complete": self.complete,
        }


@dataclass
class FileRecord:
    """Bookkeeping of one published output file, kept after its bytes expire (for chaos runs)."""

    published_at: float
    """When the clip was published, i.e. when its task succeeded (unix time)."""
    serves: list[FileServe] = field(default_factory=list)
    sha256: str | None = None
    """sha256 of the last body that was served completely."""


@dataclass
class SimulatorState:
    """Everything the simulator remembers; one instance per app."""

    config: SimulatorConfig
    stats: SimStats = field(default_factory=SimStats)
    tasks: dict[str, SimTask] = field(default_factory=dict)
    files: dict[str, SimFile] = field(default_factory=dict)
    jobs: set[asyncio.Task[None]] = field(default_factory=set)
    http: httpx.AsyncClient | None = None
    file_records: dict[str, FileRecord] = field(default_factory=dict)
    """Per output-file token: publish time and every download of it (see ``task_details``)."""
    timed_out_creates: set[str] = field(default_factory=set)
    """Tasks whose create answer was held back past the caller's timeout (ambiguous creates)."""
    _rng: random.Random = field(init=False, repr=False)
    _rng_seed: int | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        """Restart the random sequence from ``config.seed``."""
        self._rng_seed = self.config.seed
        self._rng = random.Random(self._rng_seed)

    @property
    def rng(self) -> random.Random:
        """The random source; reseeded automatically when ``config.seed`` is changed."""
        if self.config.seed != self._rng_seed:
            self.reseed()
        return self._rng

    def roll(self, rate: float) -> bool:
        """True with probability ``rate`` (never draws for 0 or 1, to keep seeds stable)."""
        if rate <= 0:
            return False
        if rate >= 1:
            return True
        return self.rng.random() < rate

    def roll_fate(self) -> TaskFate:
        cfg = self.config
        fail = self.roll(cfg.fail_rate)
        drop = self.roll(cfg.callback_drop_rate)
        copies = self.rng.choice((2, 3)) if self.roll(cfg.duplicate_rate) else 1
        return TaskFate(
            fail=fail, drop_callback=drop, callback_copies=copies, broken_clip=cfg.broken_clip
        )

    def new_task(self, body: dict[str, Any]) -> SimTask:
        """Record a task for a validated create body."""
        inp = body["input"]
        callback = body.get("callback")
        task = SimTask(
            task_id=f"tk-sim-{uuid.uuid4().hex}",
            image_url=inp["image_urls"][0],
            resolution=inp.get("resolution", "1080p"),
            duration=inp.get("duration", 5),
            callback_url=callback["url"] if callback else None,
            fate=self.roll_fate(),
        )
        self.tasks[task.task_id] = task
        self.stats.tasks_created += 1
        return task

    def add_file(self, clip: bytes) -> tuple[str, int]:
        """Publish ``clip``; return its URL and integer ``expireAt``."""
        token = uuid.uuid4().hex
        now = time.time()
        self._forget_expired_clips(now)
        expires_at = now + self.config.url_ttl_seconds
        self.files[token] = SimFile(clip=clip, expires_at=expires_at)
        self.file_records[token] = FileRecord(published_at=now)
        base = self.config.public_base_url.rstrip("/")
        return f"{base}/files/{token}.mp4", int(expires_at)

    async def track_serve(self, token: str, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass ``body`` through, recording in ``file_records`` how much of it was sent."""
        record = self.file_records.get(token)
        if record is None:
            async for chunk in body:
                yield chunk
            return
        now = time.time()
        serve = FileServe(started_at=now, last_chunk_at=now)
        record.serves.append(serve)
        hasher = hashlib.sha256()
        async for chunk in body:
            hasher.update(chunk)
            yield chunk
            serve.bytes_sent += len(chunk)
            serve.last_chunk_at = time.time()
        serve.complete = True
        record.sha256 = hasher.hexdigest()

    def task_details(self) -> list[dict[str, Any]]:
        """Every task with its fate, callback URL, create timeout and output-file downloads."""
        details = []
        for task in self.tasks.values():
            token = _file_token(task.output[0].get("url")) if task.output else None
            record = self.file_records.get(token) if token is not None else None
            details.append(
                {
                    "task_id": task.task_id,
                    "status": task.status.value,
                    "created_at": task.created_at,
                    "callback_url": task.callback_url,
                    "create_timed_out": task.task_id in self.timed_out_creates,
                    "callback_delivered": task.callback_delivered,
                    "callback_delivered_at": task.callback_delivered_at,
                    "fate": {
                        "fail": task.fate.fail,
                        "drop_callback": task.fate.drop_callback,
                        "callback_copies": task.fate.callback_copies,
                        "broken_clip": task.fate.broken_clip,
                    },
                    "file": None
                    if record is None
                    else {
                        "token": token,
                        "published_at": record.published_at,
                        "sha256": record.sha256,
                        "serves": [serve.to_dict() for serve in record.serves],
                    },
                }
            )
        return details

    def _forget_expired_clips(self, now: float) -> None:
        """Drop the bytes of expired files but keep their tokens, so they still 404 as expired."""
        if len(self.files) < SWEEP_THRESHOLD:
            return
        for token, item in self.files.items():
            if item.clip and item.expires_at <= now:
                self.files[token] = SimFile(clip=b"", expires_at=item.expires_at)

    def http_client(self) -> httpx.AsyncClient:
        """The outbound client; created lazily if the lifespan did not run (mounted app)."""
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        return self.http

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background, tracked so shutdown can cancel it."""
        job: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)
        return job

    async def shutdown(self) -> None:
        """Cancel background jobs and close the outbound client."""
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
            self.http = None


def _file_token(url: Any) -> str | None:
    """The ``{token}`` of an output URL ``.../files/{token}.mp4``."""
    if not isinstance(url, str) or not url.endswith(".mp4") or "/files/" not in url:
        return None
    return url.rsplit("/files/", 1)[1][: -len(".mp4")]
