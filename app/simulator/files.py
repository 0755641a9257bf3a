"""Serving rendered clips: ``GET /files/{token}.mp4`` bodies, padding and download throttling.

The clip itself stays in memory (it is small); the optional ``free``-box padding is generated
while streaming, so padded files of any size cost no memory. Bodies are sent in 64 KiB chunks,
smaller when a throttle is set so the rate stays smooth.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from itertools import chain

from app.simulator.render import padding_chunks

__all__ = ["CHUNK_SIZE", "chunk_size_for", "stream_file"]

CHUNK_SIZE = 64 * 1024
MIN_THROTTLED_CHUNK = 1024
THROTTLE_TICKS_PER_SECOND = 10


def chunk_size_for(bytes_per_second: float | None) -> int:
    """64 KiB, or about a tenth of a second's worth of bytes when throttled."""
    if bytes_per_second is None:
        return CHUNK_SIZE
    per_tick = int(bytes_per_second / THROTTLE_TICKS_PER_SECOND)
    return max(MIN_THROTTLED_CHUNK, min(CHUNK_SIZE, per_tick))


def _clip_chunks(clip: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(clip)
    for start in range(0, len(clip), size):
        yield bytes(view[start : start + size])


async def stream_file(
    clip: bytes, *, padding: int, bytes_per_second: float | None
) -> AsyncIterator[bytes]:
    """Yield ``clip`` then ``padding`` bytes of ``free`` box, at most ``bytes_per_second``."""
    size = chunk_size_for(bytes_per_second)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    for chunk in chain(_clip_chunks(clip, size), padding_chunks(padding, size)):
        yield chunk
        sent += len(chunk)
        ahead = 0.0
        if bytes_per_second is not None:
            ahead = sent / bytes_per_second - (loop.time() - started)
        await asyncio.sleep(max(ahead, 0.0))  # also lets other requests run between chunks
