"""The download benchmark's subject in a process of its own (``-m tools.bench.download_child``).

It opens the given (already migrated) SQLite database, creates one video and moves it to
``downloading`` through ``app.lifecycle`` exactly as a success callback would, then runs
``Downloader.run`` on it: streaming, sha256, the MP4 check, fsync and rename, ``mark_ready``.
The HTTP client comes from ``app.context.download_session`` and the limits from the
settings, as in the service.
It writes wall time, CPU time, peak RSS (``VmHWM``) and the time spent in ``storage.commit``
(fsync and rename) as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from app import lifecycle, repository
from app.config import Settings
from app.context import download_session
from app.db import create_engine, create_sessionmaker, utc_now
from app.hiapi.schemas import Task, TaskOutput, TaskStatus
from app.jobs.downloader import Downloader, DownloadSettings
from app.jobs.hosts import HostAllowlist
from app.models import Status, Via
from app.storage import LocalStorage

__all__ = ["main"]


class _TimedStorage(LocalStorage):
    """``LocalStorage`` that also adds up the time its blocking ``commit`` takes."""

    commit_seconds = 0.0

    def commit(self, partial: Path, key: str) -> Path:
        started = time.perf_counter()
        try:
            return super().commit(partial, key)
        finally:
            self.commit_seconds += time.perf_counter() - started


def _status_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process image, from ``/proc/self/status``.

    ``getrusage``'s ``ru_maxrss`` is not used: on Linux it starts at the RSS of the parent
    that forked this process, which would count the bench's own memory.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(
        _env_file=None,
        DATABASE_URL=args.database_url,
        STORAGE_DIR=Path(args.storage),
        DOWNLOAD_ALLOWED_HOSTS=args.allow,
        MAX_VIDEO_BYTES=args.max_bytes,
        HIAPI_KEY=SecretStr("sk-bench-0123456789"),
        WEBHOOK_SECRET=SecretStr("bench-webhook-secret-0123456789abcdef"),
    )
    engine = create_engine(settings.DATABASE_URL)
    sm = create_sessionmaker(engine)
    allowlist = HostAllowlist.parse(settings.DOWNLOAD_ALLOWED_HOSTS)
    http = download_session(allowlist, concurrency=settings.DOWNLOAD_CONCURRENCY)
    lease = timedelta(seconds=settings.DOWNLOAD_LEASE_SECONDS)
    storage = _TimedStorage(settings.STORAGE_DIR)
    await asyncio.to_thread(storage.ensure_dirs)
    downloader = Downloader(
        sessionmaker=sm,
        http=http,
        storage=storage,
        allowlist=allowlist,
        settings=DownloadSettings(
            max_bytes=settings.MAX_VIDEO_BYTES,
            lease=lease,
            retry_base=settings.RETRY_BASE_SECONDS,
            retry_max=settings.RETRY_MAX_SECONDS,
        ),
        stop=asyncio.Event(),
        clock=utc_now,
    )
    try:
        now = utc_now()
        task_id = f"bench-{uuid.uuid4().hex}"
        async with sm() as session, session.begin():
            video, _ = await lifecycle.create_video(
                session,
                params=lifecycle.NewVideo("https://example.com/still.jpg", None, "1080p", 5),
                idempotency_key=None,
                now=now,
                submit_hold=timedelta(seconds=120),
            )
            await lifecycle.record_submit_success(
                session, video_id=video.id, task_id=task_id, now=now, poll_after=timedelta(hours=1)
            )
        owner = uuid.uuid4().hex
        task = Task(
            task_id=task_id,
            status=TaskStatus.success,
            output=[TaskOutput(url=args.url, expires_at=int(time.time()) + 3600)],
        )
        async with sm() as session, session.begin():
            outcome = await lifecycle.apply_task(
                session,
                video_id=video.id,
                task=task,
                via=Via.callback,
                owner=owner,
                now=utc_now(),
                lease=lease,
            )
        if outcome != lifecycle.ApplyOutcome.download_claimed:
            raise RuntimeError(f"the setup callback was not applied: {outcome}")

        rss_before = _status_kib("VmRSS")
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await downloader.run(video.id, owner)
        wall = time.perf_counter() - started
        usage1 = resource.getrusage(resource.RUSAGE_SELF)

        async with sm() as session:
            stored = await repository.get(session, video.id)
        assert stored is not None
        return {
            "wall_s": wall,
            "cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
            "peak_rss_kib": _status_kib("VmHWM"),
            "rss_before_kib": rss_before,
            "commit_s": storage.commit_seconds,
            "status": stored.status,
            "size_bytes": stored.size_bytes,
            "sha256": stored.sha256,
            "error": stored.error_message,
            "ready": stored.status == Status.ready,
        }
    finally:
        await http.close()
        await engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.download_child")
    parser.add_argument("--url", required=True)
    parser.add_argument("--allow", required=True, help="DOWNLOAD_ALLOWED_HOSTS")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvicorn[standard] ships uvloop
        runner = asyncio.Runner()
    with runner:
        result = runner.run(_run(args))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
