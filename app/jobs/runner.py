"""Tracks the downloads running in this process so shutdown can stop them cleanly.

The database is the download queue: a success that finds no free slot here is recorded as
``downloading`` with no lease owner and due at once, and whichever process has a slot free
first claims it (``refill``, run each time a download here ends, and on every reconciler tick).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lifecycle
from app.jobs.downloader import Downloader
from app.models import Status

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)


class JobRunner:
    """Starts downloads as tasks, at most ``concurrency`` at a time.

    A download waiting for a slot keeps its lease only until the lease runs out; if another
    replica takes it meanwhile, ``Downloader.run`` sees the lost lease and does nothing.
    """

    def __init__(
        self,
        downloader: Downloader,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        clock: Callable[[], datetime],
        lease: timedelta,
        batch_size: int,
        stop: asyncio.Event,
        concurrency: int,
    ) -> None:
        self._downloader = downloader
        self._sm = sessionmaker
        self._clock = clock
        self._lease = lease
        self._batch = batch_size
        self._stop = stop
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._concurrency = concurrency
        self._tasks: set[asyncio.Task[None]] = set()
        self._reserved = 0
        self._refilling: asyncio.Task[None] | None = None
        self._refill_again = False

    @property
    def free_slots(self) -> int:
        """Downloads this process could start right now (running, waiting and reserved ones
        count)."""
        if self._stop.is_set():
            return 0
        return max(0, self._concurrency - len(self._tasks) - self._reserved)

    def try_reserve(self) -> bool:
        """Hold a slot for a download about to be claimed (``app.intake``): True if one was
        free. Pass ``reserved=True`` to ``start_download``, or call ``release``."""
        if self.free_slots <= 0:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """Give back a reserved slot that was not used."""
        self._reserved = max(0, self._reserved - 1)

    @property
    def active(self) -> int:
        return len(self._tasks)

    def start_download(self, video_id: uuid.UUID, owner: str, *, reserved: bool = False) -> None:
        if reserved:
            self.release()
        if self._stop.is_set():
            return  # the lease expires and another replica (or this one, restarted) resumes
        task = asyncio.create_task(self._guarded(video_id, owner), name=f"download-{video_id}")
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    async def refill(self) -> int:
        """Claim due downloads (queued by a report with no free slot, released, or with an
        expired lease) up to the free slots here, and start them. Claiming no more than this
        process can start now keeps a claimed download from outliving its lease while it
        waits for a slot."""
        limit = min(self.free_slots, self._batch)
        if limit == 0:
            return 0
        owner = uuid.uuid4().hex
        async with self._sm() as session, session.begin():
            videos = await lifecycle.claim_due(
                session,
                status=Status.downloading,
                now=self._clock(),
                hold=self._lease,
                owner=owner,
                limit=limit,
            )
        for video in videos:
            self.start_download(video.id, owner)
        return len(videos)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._stop.is_set():
            return
        if self._refilling is not None and not self._refilling.done():
            self._refill_again = True  # one more pass when the running one ends
            return
        self._refilling = asyncio.create_task(self._refill_loop(), name="download-refill")

    async def _refill_loop(self) -> None:
        while True:
            self._refill_again = False
            try:
                await self.refill()
            except Exception:  # the next tick or the next ended download tries again
                log.exception("download.refill_failed")
                return
            if not self._refill_again or self._stop.is_set():
                return

    async def _guarded(self, video_id: uuid.UUID, owner: str) -> None:
        async with self._slots:
            if self._stop.is_set():
                return
            await self._downloader.run(video_id, owner)

    async def shutdown(self, grace: float) -> None:
        """Ask downloads to stop (they release their leases), then wait ``grace`` seconds."""
        self._stop.set()
        if self._refilling is not None:
            await asyncio.gather(self._refilling, return_exceptions=True)
        if not self._tasks:
            return
        done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("shutdown.downloads_cancelled count=%d", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
