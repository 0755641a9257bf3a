"""Real MP4 files for tests, good and broken, made with PyAV (small: they render in ms).

The service now opens every downloaded clip with PyAV before it stores it, so a test origin
must serve a real clip; these are the ones to serve. Each is built once per process.
"""

from __future__ import annotations

import functools
import os
import struct
import tempfile
from collections.abc import Iterator

import av
from PIL import Image

__all__ = [
    "audio_only",
    "noise",
    "padded",
    "boxes",
    "good_mp4",
    "moov_at_end",
    "no_moov",
    "render",
    "truncated_mdat",
]


def boxes(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """``(type, offset, size)`` of the top-level boxes of ``data`` (32-bit sizes only)."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        yield kind, offset, size
        offset += size or len(data) - offset


def render(
    width: int = 256,
    height: int = 144,
    *,
    seconds: float = 3.0,
    fps: int = 8,
    faststart: bool = True,
    gop: int | None = None,
) -> bytes:
    """An H.264 clip of a moving gradient; ``faststart=False`` leaves the ``moov`` at the end."""
    return _render(width, height, seconds, fps, faststart, gop)


@functools.lru_cache(maxsize=16)
def _render(
    width: int, height: int, seconds: float, fps: int, faststart: bool, gop: int | None
) -> bytes:
    base = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    options = {"movflags": "+faststart"} if faststart else {}
    with tempfile.TemporaryDirectory(prefix="clips-") as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, mode="w", format="mp4", options=options) as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "ultrafast", "threads": "1"}
            if gop is not None:
                stream.options = {**stream.options, "g": str(gop)}
            for index in range(round(seconds * fps)):
                shifted = base.rotate(index * 7)
                frame = av.VideoFrame.from_image(shifted)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        with open(path, "rb") as clip:
            return clip.read()


@functools.lru_cache(maxsize=1)
def noise() -> bytes:
    """A 3 s, 1 fps, 1920x1080 clip of pure noise: no JPEG of a frame fits in 200 KB."""
    with tempfile.TemporaryDirectory(prefix="clips-") as tmp:
        path = os.path.join(tmp, "noise.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=1)
            stream.width, stream.height = 1920, 1080
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "ultrafast", "crf": "25", "threads": "1"}
            picture = Image.effect_noise((1920, 1080), 128).convert("RGB")
            for _ in range(3):
                out.mux(stream.encode(av.VideoFrame.from_image(picture)))
            out.mux(stream.encode(None))
        with open(path, "rb") as clip:
            return clip.read()


def good_mp4() -> bytes:
    """A playable 3 s clip, 256x144, ``moov`` first."""
    return render()


def padded(size: int) -> bytes:
    """``good_mp4`` followed by a ``free`` box: a playable clip of exactly ``size`` bytes."""
    clip = good_mp4()
    pad = size - len(clip)
    if pad < 8:
        raise ValueError(f"a padded clip is at least {len(clip) + 8} bytes")
    return clip + struct.pack(">I4s", pad, b"free") + bytes(pad - 8)


def moov_at_end() -> bytes:
    """A playable 3 s clip whose ``moov`` comes after its ``mdat`` (not fast-start)."""
    return render(faststart=False)


def no_moov() -> bytes:
    """``ftyp`` and ``mdat`` but no ``moov``: what a download cut before the index looks like."""
    data = moov_at_end()
    moov = next(offset for kind, offset, _ in boxes(data) if kind == b"moov")
    return data[:moov]


def truncated_mdat() -> bytes:
    """A fast-start clip cut in the middle of its ``mdat``."""
    data = good_mp4()
    _, offset, size = next(box for box in boxes(data) if box[0] == b"mdat")
    return data[: offset + size // 2]


@functools.lru_cache(maxsize=1)
def audio_only() -> bytes:
    """A real MP4 with one AAC audio stream and no video stream."""
    with tempfile.TemporaryDirectory(prefix="clips-") as tmp:
        path = os.path.join(tmp, "audio.mp4")
        with av.open(path, mode="w", format="mp4") as out:
            stream = out.add_stream("aac", rate=8000)
            stream.layout = "mono"
            samples = 1024
            for index in range(8):
                frame = av.AudioFrame(format="fltp", layout="mono", samples=samples)
                frame.planes[0].update(bytes(4 * samples))
                frame.sample_rate = 8000
                frame.pts = index * samples
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        with open(path, "rb") as clip:
            return clip.read()
