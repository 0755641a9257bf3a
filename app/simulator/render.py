"""Rendering of the simulator's output clips: real H.264 MP4s made from a still image.

This module owns everything that knows the MP4 format: ``render_mp4`` (PyAV + libx264,
``yuv420p``, ``+faststart``), the LRU cache that makes repeated renders free, and the ``free``
box used to pad a clip to a requested size. Broken clips (``broken=...``) are made from a
valid render by ``app.simulator.broken``. It is synchronous and CPU-bound; call it from a
worker thread (``asyncio.to_thread``).

Like hiapi, a clip is as high as its resolution flag says (720 or 1080 px, times ``scale``),
as wide as the image's aspect ratio makes it, and ``duration`` seconds long (``FPS`` frames
per second). Without an image it shows a generated 16:9 pattern.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import av
from av.container import OutputContainer
from PIL import Image, ImageDraw, ImageOps

from app.simulator import broken as broken_clips
from app.simulator.config import BrokenClip
from app.simulator.mp4 import write_mp4

__all__ = [
    "FPS",
    "HEIGHTS",
    "free_box_header",
    "output_size",
    "padding_chunks",
    "padding_length",
    "render_mp4",
]

FPS = 8
HEIGHTS = {"720p": 720, "1080p": 1080}
"""Output height per resolution flag (at scale 1); the width follows the image's aspect ratio."""
ZOOM = 0.12
"""How far the last frame is zoomed in relative to the first."""
MIN_SIDE = 16
MAX_ASPECT = 4.0
CACHE_SIZE = 32
_FREE = b"free"
_U32_MAX = 0xFFFFFFFF

_CacheKey = tuple[str, str, int, float, str | None]
_cache: OrderedDict[_CacheKey, bytes] = OrderedDict()
_cache_lock = threading.Lock()


def render_mp4(
    image: bytes | None,
    *,
    resolution: str,
    duration: int,
    scale: float = 1.0,
    broken: BrokenClip | None = None,
) -> bytes:
    """Return an MP4 of ``duration`` seconds at ``FPS`` showing a slow zoom into ``image``.

    ``image`` may be any format Pillow decodes; ``None`` or undecodable bytes give a generated
    pattern instead. ``scale`` (0 to 1) shrinks the clip; ``broken`` makes a broken clip of
    that kind instead (see ``app.simulator.broken``). Results are cached by all of these.
    """
    if resolution not in HEIGHTS:
        raise ValueError(f"unknown resolution {resolution!r}")
    if duration < 1:
        raise ValueError("duration must be at least 1 second")
    if not 0 < scale <= 1:
        raise ValueError("scale must be in (0, 1]")
    key = (_digest(image), resolution, duration, scale, broken)
    cached = _cache_get(key)
    if cached is not None:
        return cached
    if broken is None:
        source = _decode(image, resolution=resolution, scale=scale)
        size = output_size(source.size, resolution=resolution, scale=scale)
        clip = _encode(source.resize(size, Image.Resampling.BILINEAR), frames=FPS * duration)
    elif broken == "wrong_duration":
        clip = render_mp4(image, resolution=resolution, duration=duration + 1, scale=scale)
    else:
        valid = render_mp4(image, resolution=resolution, duration=duration, scale=scale)
        clip = broken_clips.make(broken, valid, duration=duration)
    _cache_put(key, clip)
    return clip


def output_size(source: tuple[int, int], *, resolution: str, scale: float = 1.0) -> tuple[int, int]:
    """Even ``(width, height)``: the resolution's height times ``scale``, the source's aspect
    ratio (clamped to 1:4 .. 4:1); no side under ``MIN_SIDE``."""
    src_w, src_h = source
    aspect = min(max(src_w / max(src_h, 1), 1 / MAX_ASPECT), MAX_ASPECT)
    height = max(MIN_SIDE, _even(HEIGHTS[resolution] * scale))
    width = max(MIN_SIDE, _even(height * aspect))
    return width, height


def _even(value: float) -> int:
    return round(value / 2) * 2


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


def _cache_get(key: _CacheKey) -> bytes | None:
    with _cache_lock:
        clip = _cache.get(key)
        if clip is not None:
            _cache.move_to_end(key)
        return clip


def _cache_put(key: _CacheKey, clip: bytes) -> None:
    with _cache_lock:
        _cache[key] = clip
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)


def _decode(image: bytes | None, *, resolution: str, scale: float) -> Image.Image:
    """Decode ``image`` to RGB, or fall back to a generated pattern."""
    if image is None:
        return _pattern()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image)) as opened:
                # JPEGs decode at a reduced size when that still covers the output, whichever
                # way the EXIF orientation turns the image.
                side = max(
                    *output_size(opened.size, resolution=resolution, scale=scale),
                    *output_size(opened.size[::-1], resolution=resolution, scale=scale),
                )
                opened.draft("RGB", (side, side))
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


def _zoom_box(size: tuple[int, int], progress: float) -> tuple[int, int, int, int]:
    """The centred crop of an image of ``size`` zoomed in by ``progress`` (0..1) of ``ZOOM``."""
    width, height = size
    scale = 1 + ZOOM * progress
    crop_w, crop_h = max(2, round(width / scale)), max(2, round(height / scale))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def _encode(base: Image.Image, *, frames: int) -> bytes:
    """Encode ``frames`` zoom steps of ``base`` to MP4 bytes (moov first)."""
    width, height = base.size

    def fill(out: OutputContainer) -> None:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30", "threads": "1"}
        last = max(frames - 1, 1)
        for index in range(frames):
            crop = base.crop(_zoom_box(base.size, index / last))
            # Scaling back up and converting to yuv420p in one swscale pass is what keeps a
            # full-size (1920x1080) render fast. PyAV's stubs leave from_image unannotated.
            frame = av.VideoFrame.from_image(crop).reformat(  # type: ignore[no-untyped-call]
                width=width, height=height, format="yuv420p", interpolation="BILINEAR"
            )
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))

    return write_mp4(fill)
