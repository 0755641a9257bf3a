"""Tracks the downloads running in this process so shutdown can stop them cleanly."""

from __future__ import annotations

import asyncio
import logging
import uuid

from app.jobs.downloader import Downloader

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)


class JobRunner:
    """Starts downloads as tasks, at most ``concurrency`` at a time.

    A download waiting for a slot keeps its lease only until the lease runs out; if another
    replica takes it meanwhile, ``Downloader.run`` sees the lost lease and does nothing.
    """

    def __init__(self, downloader: Downloader, *, stop: asyncio.Event, concurrency: int) -> None:
        self._downloader = downloader
        self._stop = stop
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def free_slots(self) -> int:
        """Downloads this process could start right now (running and waiting ones count)."""
        return max(0, self._concurrency - len(self._tasks))

    @property
    def active(self) -> int:
        return len(self._tasks)

    def start_download(self, video_id: uuid.UUID, owner: str) -> None:
        if self._stop.is_set():
            return  # the lease expires and another replica (or this one, restarted) resumes
        task = asyncio.create_task(self._guarded(video_id, owner), name=f"download-{video_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start_download_later(self, video_id: uuid.UUID, owner: str) -> None:
        """For ``BackgroundTasks``: an async callable runs on the event loop, not a thread."""
        self.start_download(video_id, owner)

    async def _guarded(self, video_id: uuid.UUID, owner: str) -> None:
        async with self._slots:
            if self._stop.is_set():
                return
            await self._downloader.run(video_id, owner)

    async def shutdown(self, grace: float) -> None:
        """Ask downloads to stop (they release their leases), then wait ``grace`` seconds."""
        self._stop.set()
        if not self._tasks:
            return
        done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("shutdown.downloads_cancelled count=%d", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
