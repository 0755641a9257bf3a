"""Clips on a local (or mounted) filesystem: partial files, then an atomic rename.

A clip is first written to ``<root>/.partial/<video_id>.<owner>.part``; only a complete,
checked, fsynced file is renamed to its final key, so a reader never sees half a clip and a
crash leaves at most a partial file that the next attempt removes.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["LocalStorage"]


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.partial_dir = self.root / ".partial"

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
        removed = 0
        for leftover in self.partial_dir.glob(f"{video_id}.*.part"):
            if leftover != keep:
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

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
