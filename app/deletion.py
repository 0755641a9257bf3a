"""Deleting videos: the ``deleted`` transition, then the files.

``DELETE /v1/videos/{id}`` and the reconciler's ``VIDEO_RETENTION_SECONDS`` sweep both come
here. A deletion is first a state change (``lifecycle.delete_video`` or
``lifecycle.delete_expired``, a conditional UPDATE that wins or loses against every other
transition, also across replicas); only after it commits are the clip and poster removed from
storage (local or S3). If that fails (the store is down), the video is deleted all the same:
its tombstone keeps the keys, and the reconciler removes them at its next ticks
(``remove_pending``) until it succeeds. Once removed, the keys are cleared.

A download in flight when its video is deleted loses its lease at the next renewal and aborts
its writer; one that had already committed its file removes it itself when ``mark_ready``
fails (``app.jobs.downloader``). What an earlier, crashed attempt left half-written (a partial
file, an unfinished multipart upload) is removed here too, with ``discard_leftovers``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lifecycle
from app.logging import bind
from app.metrics import METRICS
from app.models import Video
from app.storage import Storage, StorageError

__all__ = ["Deleter"]

log = logging.getLogger(__name__)

# A removal that failed (or whose process died) is tried again by the reconciler after this.
REMOVAL_RETRY = timedelta(seconds=60)
# Nobody else's attempt owns a partial file of a deleted video: ``discard_leftovers`` keeps
# only the files of this owner, which names no attempt.
_NO_ATTEMPT = "deleted"


class Deleter:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        storage: Storage,
        clock: Callable[[], datetime],
        retry_after: timedelta = REMOVAL_RETRY,
    ) -> None:
        self._sm = sessionmaker
        self._storage = storage
        self._clock = clock
        self._retry_after = retry_after

    async def delete(self, video_id: uuid.UUID) -> lifecycle.Deletion | None:
        """Delete one video (``DELETE /v1/videos/{id}``); None if it is gone already."""
        now = self._clock()
        async with self._sm() as session, session.begin():
            deletion = await lifecycle.delete_video(
                session,
                video_id=video_id,
                storage_key=self._storage.key_for(video_id),
                now=now,
                retry_at=now + self._retry_after,
            )
        if deletion is None:
            return None
        METRICS.deleted.labels("api").inc()
        with bind(video_id=video_id):
            log.info("video.deleted reason=api refunded=%s", deletion.refunded)
            await self._remove(deletion.video, leftovers=True)
        return deletion

    async def expire(self, *, retention: timedelta, limit: int) -> int:
        """Delete up to ``limit`` ready or failed videos created more than ``retention`` ago,
        and remove their files; how many were deleted."""
        now = self._clock()
        async with self._sm() as session, session.begin():
            videos = await lifecycle.delete_expired(
                session,
                created_before=now - retention,
                now=now,
                retry_at=now + self._retry_after,
                limit=limit,
            )
        for video in videos:
            METRICS.deleted.labels("retention").inc()
            with bind(video_id=video.id):
                log.info("video.deleted reason=retention")
                # Ready or failed: no download of it is in flight, no attempt left anything.
                await self._remove(video, leftovers=False)
        return len(videos)

    async def remove_pending(self, *, limit: int) -> int:
        """Remove the files of up to ``limit`` tombstones whose removal failed before; how
        many were removed now."""
        async with self._sm() as session, session.begin():
            videos = await lifecycle.claim_removals(
                session,
                now=self._clock(),
                hold=self._retry_after,
                owner=uuid.uuid4().hex,
                limit=limit,
            )
        removed = 0
        for video in videos:
            with bind(video_id=video.id):
                removed += await self._remove(video, leftovers=True)
        return removed

    async def _remove(self, video: Video, *, leftovers: bool) -> bool:
        """Remove the tombstone's files, then clear its keys. False (and the keys kept, for
        the reconciler's retry) if the store failed."""
        try:
            for key in (video.storage_key, video.poster_key):
                if key is not None:
                    await self._storage.delete(key)
            if leftovers:
                await self._storage.discard_leftovers(video.id, _NO_ATTEMPT)
        except (StorageError, OSError) as exc:
            log.warning("video.files_kept error=%s (the reconciler retries)", exc)
            METRICS.deleted_files_kept.inc()
            return False
        async with self._sm() as session, session.begin():
            await lifecycle.files_removed(session, video_id=video.id)
        return True
