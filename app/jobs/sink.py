"""The hashing and writing half of a download: chunks go to worker threads, in order.

The downloader reads the response and hands it to a ``Sink`` in chunks of
``downloader.WRITE_CHUNK``; the sink hashes each chunk and writes it to the storage backend's
``ClipWriter`` while the next one is read, so a slow disk or upload never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Awaitable, Callable

from app.storage import ClipWriter
from app.threads import run_bulk

__all__ = ["PIPELINE_DEPTH", "Sink"]

# Chunks being hashed and written while the next one is read.
PIPELINE_DEPTH = 3


class Sink:
    """Hashes and stores chunks in worker threads, in order, while the caller reads on.

    Two chains of steps, one hashing and one writing: each step waits for the one before it
    in its chain, so bytes are hashed and written in the order they came, and hashing one
    chunk overlaps writing another. At most ``PIPELINE_DEPTH`` chunks are in flight, which
    bounds memory at about (``PIPELINE_DEPTH`` + 1) × ``WRITE_CHUNK``. A failed step fails
    every step after it in its chain, and ``put``/``finish`` raise its error.
    """

    def __init__(self, writer: ClipWriter, hasher: hashlib._Hash) -> None:
        self._writer = writer
        self._hasher = hasher
        self._steps: collections.deque[tuple[asyncio.Task[None], asyncio.Task[None]]] = (
            collections.deque()
        )

    async def put(self, data: bytes) -> None:
        if len(self._steps) >= PIPELINE_DEPTH:
            await self._settle_oldest()
        last_hash, last_write = self._steps[-1] if self._steps else (None, None)
        hashing = asyncio.create_task(
            _after(last_hash, lambda: run_bulk(self._hasher.update, data))
        )
        writing = asyncio.create_task(_after(last_write, lambda: self._writer.write(data)))
        self._steps.append((hashing, writing))

    async def finish(self) -> None:
        while self._steps:
            await self._settle_oldest()

    async def cancel(self) -> None:
        """Stop every step still in flight and wait until they have stopped."""
        steps = [task for pair in self._steps for task in pair]
        self._steps.clear()
        for task in steps:
            task.cancel()
        await asyncio.gather(*steps, return_exceptions=True)

    async def _settle_oldest(self) -> None:
        hashing, writing = self._steps[0]
        await hashing
        await writing
        self._steps.popleft()


async def _after(previous: asyncio.Task[None] | None, step: Callable[[], Awaitable[None]]) -> None:
    if previous is not None:
        await previous
    await step()
