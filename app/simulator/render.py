"""Rendering of the simulator's output clips: small, real H.264 MP4s made from a still image.

This module owns everything that knows the MP4 format: ``render_mp4`` (PyAV + libx264,
``yuv420p``, ``+faststart``), the LRU cache that makes repeated renders free, and the ``free``
box used to pad a clip to a requested size. It is synchronous and CPU-bound; call it from a
worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import av
from PIL import Image, ImageDraw, ImageOps

__all__ = [
    "FPS",
    "WIDTHS",
    "free_box_header",
    "output_size",
    "padding_chunks",
    "padding_length",
    "render_mp4",
]

FPS = 8
WIDTHS = {"720p": 256, "1080p": 320}
"""Output width per resolution flag; the height follows the input image's aspect ratio."""
ZOOM = 0.12
"""How far the last frame is zoomed in relative to the first."""
MIN_SIDE = 16
MAX_ASPECT = 4.0
CACHE_SIZE = 32
_FREE = b"free"
_U32_MAX = 0xFFFFFFFF

_cache: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
_cache_lock = threading.Lock()


def render_mp4(image: bytes | None, *, resolution: str, duration: int) -> bytes:
    """Return an MP4 of ``duration`` seconds at ``FPS`` showing a slow zoom into ``image``.

    ``image`` may be any format Pillow decodes; ``None`` or undecodable bytes give a generated
    pattern instead. Results are cached by (image hash, resolution, duration).
    """
    if resolution not in WIDTHS:
        raise ValueError(f"unknown resolution {resolution!r}")
    if duration < 1:
        raise ValueError("duration must be at least 1 second")
    key = (_digest(image), resolution, duration)
    cached = _cache_get(key)
    if cached is not None:
        return cached
    source = _decode(image)
    size = output_size(source.size, resolution=resolution)
    clip = _encode(source.resize(size, Image.Resampling.BILINEAR), frames=FPS * duration)
    _cache_put(key, clip)
    return clip


def output_size(source: tuple[int, int], *, resolution: str) -> tuple[int, int]:
    """Even ``(width, height)``: the resolution's width, the source's aspect ratio (clamped)."""
    width = WIDTHS[resolution]
    src_w, src_h = source
    aspect = min(max(src_h / max(src_w, 1), 1 / MAX_ASPECT), MAX_ASPECT)
    height = max(MIN_SIDE, round(width * aspect / 2) * 2)
    return width, height


def padding_length(pad_bytes: int) -> int:
    """Bytes actually appended for a ``pad_bytes`` request: 0, or a box of at least 8 bytes."""
    if pad_bytes <= 0:
        return 0
    return max(pad_bytes, 8)


def free_box_header(total_size: int) -> bytes:
    """Header of a top-level ``free`` box whose size, header included, is ``total_size``."""
    if total_size < 8:
        raise ValueError("a free box is at least 8 bytes")
    if total_size <= _U32_MAX:
        return struct.pack(">I4s", total_size, _FREE)
    return struct.pack(">I4sQ", 1, _FREE, total_size)


def padding_chunks(total_size: int, chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """Yield a ``free`` box of ``total_size`` bytes in chunks, never holding it all in memory."""
    if total_size <= 0:
        return
    header = free_box_header(total_size)
    zeros = bytes(chunk_size)
    yield header
    remaining = total_size - len(header)
    while remaining > 0:
        step = min(remaining, chunk_size)
        yield zeros if step == chunk_size else zeros[:step]
        remaining -= step


def clear_cache() -> None:
    """Forget every cached render (for tests)."""
    with _cache_lock:
        _cache.clear()


def _digest(image: bytes | None) -> str:
    return "generated" if image is None else hashlib.sha256(image).hexdigest()


def _cache_get(key: tuple[str, str, int]) -> bytes | None:
    with _cache_lock:
        clip = _cache.get(key)
        if clip is not None:
            _cache.move_to_end(key)
        return clip


def _cache_put(key: tuple[str, str, int], clip: bytes) -> None:
    with _cache_lock:
        _cache[key] = clip
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)


def _decode(image: bytes | None) -> Image.Image:
    """Decode ``image`` to RGB, or fall back to a generated pattern."""
    if image is None:
        return _pattern()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image)) as opened:
                opened.draft("RGB", (WIDTHS["1080p"] * 2, WIDTHS["1080p"] * 2))
                return ImageOps.exif_transpose(opened).convert("RGB")
    except Exception:  # Pillow raises many types for bad input; any of them means "undecodable"
        return _pattern()


def _pattern() -> Image.Image:
    """A 16:9 colour gradient with a few shapes, so the zoom is visible."""
    ramp = Image.linear_gradient("L")
    base = Image.merge("RGB", (ramp, ramp.rotate(90), Image.radial_gradient("L")))
    frame = base.resize((320, 180), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(frame)
    draw.ellipse((130, 60, 190, 120), outline=(255, 255, 255), width=4)
    draw.rectangle((20, 20, 60, 60), fill=(240, 200, 40))
    draw.line((0, 179, 319, 0), fill=(20, 20, 20), width=3)
    return frame


def _zoomed(base: Image.Image, progress: float) -> Image.Image:
    """``base`` zoomed towards its centre by ``progress`` (0..1) of ``ZOOM``."""
    width, height = base.size
    scale = 1 + ZOOM * progress
    crop_w, crop_h = width / scale, height / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    return base.resize(base.size, Image.Resampling.BILINEAR, box=box)


def _encode(base: Image.Image, *, frames: int) -> bytes:
    """Encode ``frames`` zoom steps of ``base`` to MP4 bytes (moov first)."""
    # ffmpeg's faststart pass re-opens the output by name, so it needs a real file.
    with tempfile.TemporaryDirectory(prefix="hiapi-sim-") as tmp:
        path = os.path.join(tmp, "clip.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height = base.size
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "ultrafast", "crf": "30", "threads": "1"}
            last = max(frames - 1, 1)
            for index in range(frames):
                # PyAV's stubs leave from_image unannotated.
                frame = av.VideoFrame.from_image(_zoomed(base, index / last))  # type: ignore[no-untyped-call]
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        with open(path, "rb") as clip:
            return clip.read()
