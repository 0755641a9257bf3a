"""Clips on a local (or mounted) filesystem: partial files, then an atomic rename.

A clip is first written to ``<root>/.partial/<video_id>.<owner>.part``; only a complete,
checked, fsynced file is renamed to its final key, so a reader never sees half a clip and a
crash leaves at most a partial file that the next attempt removes. The partial file is also
what ``LocalWriter.spool`` hands the downloader to verify (and maybe remux) before the rename:
no extra copy. A poster is written the same way (a partial file, fsync, rename) just before
its clip is renamed into place.

The blocking methods (``discard_partials``, ``commit``, ``path``) are the primitives; the async
ones implement ``app.storage.Storage`` on top of them, each in a worker thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from app.storage.base import poster_key
from app.threads import run_bulk

__all__ = ["LocalStorage", "LocalWriter", "PartialFile", "SpooledWriter", "discard_partials_in"]


def discard_partials_in(directory: Path, video_id: uuid.UUID, *, keep: Path) -> int:
    """Remove ``directory``'s partial files of ``video_id`` but ``keep``; how many. Blocking."""
    removed = 0
    for leftover in directory.glob(f"{video_id}.*.part"):
        if leftover != keep:
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.partial_dir = self.root / ".partial"

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def ensure_dirs(self) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key_for(video_id: uuid.UUID) -> str:
        return f"{video_id.hex[:2]}/{video_id}.mp4"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError("storage key escapes the storage root")
        return path

    def partial_path(self, video_id: uuid.UUID, owner: str) -> Path:
        return self.partial_dir / f"{video_id}.{owner}.part"

    def discard_partials(self, video_id: uuid.UUID, *, keep: Path) -> int:
        """Remove other attempts' leftovers of this video. Blocking.

        The caller holds the lease, so every other partial file belongs to an attempt that
        lost it: a crashed process, or a stalled one whose heartbeat will notice and stop.
        """
        return discard_partials_in(self.partial_dir, video_id, keep=keep)

    def poster_partial(self, video_id: uuid.UUID, owner: str) -> Path:
        return self.partial_dir / f"{video_id}.{owner}.jpg.part"

    def commit(self, partial: Path, key: str) -> Path:
        """fsync the partial file, rename it into place, fsync the directory. Blocking."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    # -- app.storage.Storage ----------------------------------------------------------------

    async def open_writer(self, video_id: uuid.UUID, owner: str) -> LocalWriter:
        return LocalWriter(
            self,
            self.key_for(video_id),
            self.partial_path(video_id, owner),
            self.poster_partial(video_id, owner),
        )

    async def discard_leftovers(self, video_id: uuid.UUID, owner: str) -> int:
        """Other attempts' partial files, and a poster a dead attempt published before its
        clip (the video is not ready, so no poster of it is in use)."""
        keep = self.partial_path(video_id, owner)
        poster = self.path(poster_key(self.key_for(video_id)))

        def discard() -> int:
            poster.unlink(missing_ok=True)
            return self.discard_partials(video_id, keep=keep)

        return await asyncio.to_thread(discard)

    def write_small(self, partial: Path, key: str, data: bytes) -> None:
        """Write ``data`` to ``partial``, then ``commit`` it under ``key``. Blocking."""
        with partial.open("wb") as fh:
            fh.write(data)
        try:
            self.commit(partial, key)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    async def put_small(self, key: str, data: bytes, content_type: str) -> None:
        partial = self.partial_dir / f"{uuid.uuid4()}.small.part"
        await asyncio.to_thread(self.write_small, partial, key, data)

    async def presigned_url(self, key: str) -> str | None:
        return None  # served by the API itself, with Range

    def local_path(self, key: str) -> Path:
        return self.path(key)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(lambda: self.path(key).unlink(missing_ok=True))

    async def aclose(self) -> None:
        return None


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` from the C library, which
    Python's ``os`` does not expose; a no-op where it does not exist."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, count: None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int

    def start(fd: int, offset: int, count: int) -> None:
        call(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # a failure only means: no head start

    return start


_SYNC_FILE_RANGE_WRITE = 2
_start_writeback = _load_sync_file_range() if sys.platform == "linux" else lambda *_: None


class PartialFile:
    """One attempt's bytes in a local file (opened on the first write), until they are kept
    (``close``) or thrown away (``discard``).

    Each step runs in a worker thread under one lock, so a ``discard`` that follows a
    cancelled ``write`` waits for that write's thread to finish before it closes and removes
    the file: no file handle or partial file outlives the attempt.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] | None = None
        self._written = 0
        self._finished = False
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._finished:
                raise OSError(f"{self.path.name} was already committed or aborted")
            if self._fh is None:
                self._fh = self.path.open("wb", buffering=0)
            start = self._written
            self._fh.write(data)
            self._written += len(data)
            # Start writing these bytes back to disk now, without waiting, so the fsync at
            # commit has little left to do (Linux; elsewhere the fsync does all of it).
            _start_writeback(self._fh.fileno(), start, len(data))

    def close(self) -> Path:
        """No more writes: the file is complete (created empty if nothing was written)."""
        with self._lock:
            self._finished = True
            fh, self._fh = self._fh, None
            if fh is not None:
                fh.close()
            elif not self.path.exists():
                self.path.touch()
            return self.path

    def discard(self) -> None:
        with self._lock:
            self._finished = True
            fh, self._fh = self._fh, None
            try:
                if fh is not None:
                    fh.close()
            except OSError:
                pass  # a failed flush of bytes we are throwing away
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # e.g. the directory itself is gone; the next attempt cleans up


class SpooledWriter:
    """What both backends' writers share: the clip's keys, and its bytes in a local
    ``PartialFile`` (written in the bulk threads) until ``commit``."""

    def __init__(self, key: str, spool: Path) -> None:
        self._key = key
        self._poster_key = poster_key(key)
        self._file = PartialFile(spool)
        self._poster_stored = False

    @property
    def key(self) -> str:
        return self._key

    @property
    def poster_key(self) -> str:
        return self._poster_key

    async def write(self, data: bytes) -> None:
        await run_bulk(self._file.write, data)

    async def spool(self) -> Path:
        return await asyncio.to_thread(self._file.close)


class LocalWriter(SpooledWriter):
    """Writes the partial file; ``commit`` is ``LocalStorage.commit`` (after the poster's)."""

    def __init__(
        self, storage: LocalStorage, key: str, partial: Path, poster_partial: Path
    ) -> None:
        super().__init__(key, partial)
        self._storage = storage
        self._poster_partial = poster_partial

    @property
    def partial(self) -> Path:
        return self._file.path

    def _commit(self, poster: bytes | None) -> None:
        self._file.close()
        if poster is not None:
            self._storage.write_small(self._poster_partial, self._poster_key, poster)
            self._poster_stored = True
        self._storage.commit(self._file.path, self._key)

    async def commit(self, poster: bytes | None = None) -> None:
        await asyncio.to_thread(self._commit, poster)

    def _discard(self) -> None:
        self._file.discard()
        if self._poster_stored:
            self._poster_stored = False
            try:
                self._storage.path(self._poster_key).unlink(missing_ok=True)
            except OSError:
                pass  # the next attempt's discard_leftovers removes it

    async def abort(self) -> None:
        await asyncio.to_thread(self._discard)
