"""MP4 containers as files and boxes: writing one with PyAV, listing its top-level boxes.

``write_mp4`` gives the bytes of a container whose streams a callback fills, with ``moov``
before ``mdat`` (fast-start) or, like a plain ffmpeg mux, after it. ``top_level_boxes`` reads
the box layout (``ftyp``, ``moov``, ``mdat``, ...) that ``app.simulator.broken`` cuts into.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import av
from av.container import OutputContainer

__all__ = ["Box", "top_level_boxes", "write_mp4"]


@dataclass(frozen=True)
class Box:
    """One top-level box: its four-letter type, where it starts and its size (header included)."""

    type: bytes
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def write_mp4(fill: Callable[[OutputContainer], None], *, faststart: bool = True) -> bytes:
    """The bytes of an MP4 whose streams ``fill`` adds and muxes; ``moov`` before ``mdat``
    unless ``faststart`` is false (then ffmpeg writes it at the end)."""
    # ffmpeg's faststart pass re-opens the output by name, so it needs a real file.
    options = {"movflags": "+faststart"} if faststart else {}
    with tempfile.TemporaryDirectory(prefix="hiapi-sim-") as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, mode="w", format="mp4", options=options) as out:
            fill(out)
        with open(path, "rb") as clip:
            return clip.read()


def top_level_boxes(data: bytes) -> list[Box]:
    """The top-level boxes of ``data``, in order, with their declared sizes (the last one may
    end past the end of ``data`` when the file is truncated)."""
    boxes = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        if size == 1 and offset + 16 <= len(data):
            (size,) = struct.unpack_from(">Q", data, offset + 8)
        elif size == 0:  # "to the end of the file"
            size = len(data) - offset
        if size < 8:
            raise ValueError(f"box {kind!r} at {offset} has an impossible size {size}")
        boxes.append(Box(type=kind, offset=offset, size=size))
        offset += size
    return boxes
