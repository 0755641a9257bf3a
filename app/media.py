"""What a downloaded clip is: checked with PyAV before it is stored, its facts, its poster.

``inspect_clip`` opens a complete local file (the downloader's spool, before it is committed)
and either returns its ``ClipFacts`` or raises ``BadClip``:

- The top-level boxes are walked first (headers only, by seeking): a box that runs past the
  end of the file is a truncated download (usually the ``mdat``), and a file with no ``moov``
  box cannot be played at all. Both fail before any decoding.
- PyAV then opens the file; it must have a video stream. Every packet of that stream is
  demuxed (reading the file to the end); fewer packets than the ``moov`` index promises is a
  truncated file. The first keyframe and the last one are decoded: a clip whose frames do not
  decode is no clip.
- While demuxing, frames are decoded from the start up to about ``POSTER_SECONDS``; that frame
  (or the last one, for a shorter clip) becomes the poster, a JPEG at the clip's size of at
  most ``POSTER_MAX_BYTES`` (the quality steps down until it fits; a frame of near noise that
  does not fit even then is scaled down rather than failing the clip).
- ``moov_at_end`` says whether the index comes after the media (``moov`` after ``mdat``), so a
  browser would need the whole file before it could start playing; ``remux_faststart`` then
  rewrites it with the index first (``movflags=faststart``), copying the packets as they are.
  ``prepare_clip`` does both, and hashes the remuxed file, whose bytes are the ones stored.

Everything here is blocking and CPU-bound, and parts of it (Pillow's JPEG encoder, PyAV's frame
conversion) hold the GIL for tens of milliseconds: the downloader runs it in a worker process
(``app.threads.run_isolated``), never on the event loop or in its threads. Decoding uses one
thread per clip, so the pool's size (one process per core) bounds the cores checks take.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.error
from PIL import Image

__all__ = [
    "DURATION_TOLERANCE_SECONDS",
    "EXPECTED_HEIGHTS",
    "POSTER_MAX_BYTES",
    "POSTER_SECONDS",
    "BadClip",
    "ClipFacts",
    "PreparedClip",
    "inspect_clip",
    "prepare_clip",
    "remux_faststart",
    "warnings_for",
]

POSTER_SECONDS = 0.5
POSTER_MAX_BYTES = 200 * 1024
_POSTER_QUALITIES = (85, 70, 50, 30, 15)
DURATION_TOLERANCE_SECONDS = 0.5
EXPECTED_HEIGHTS = {"720p": 720, "1080p": 1080}

_HEADER = struct.Struct(">I4s")


class BadClip(Exception):
    """The file is not a playable MP4 video; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class ClipFacts:
    width: int
    height: int
    duration_seconds: float
    codec: str
    fps: float | None
    moov_at_end: bool
    poster: bytes = field(repr=False)


def warnings_for(facts: ClipFacts, *, duration: int, resolution: str) -> list[str]:
    """What is off about a playable clip, compared with what was asked for (not fatal)."""
    found = []
    if abs(facts.duration_seconds - duration) > DURATION_TOLERANCE_SECONDS:
        found.append("duration_mismatch")
    expected = EXPECTED_HEIGHTS.get(resolution)
    if expected is not None and facts.height != expected:
        found.append("resolution_mismatch")
    return found


def _boxes(path: Path) -> Iterator[tuple[bytes, int, int]]:
    """``(type, offset, size)`` of each top-level box; ``BadClip`` if one runs past the end."""
    end = os.path.getsize(path)
    with path.open("rb") as fh:
        offset = 0
        while offset < end:
            fh.seek(offset)
            head = fh.read(16)
            if len(head) < 8:
                raise BadClip(f"the file ends inside a box header at byte {offset}")
            size, kind = _HEADER.unpack_from(head)
            if size == 1:
                if len(head) < 16:
                    raise BadClip(f"the file ends inside a box header at byte {offset}")
                (size,) = struct.unpack_from(">Q", head, 8)
            elif size == 0:  # the last box, up to the end of the file
                size = end - offset
            if size < 8:
                raise BadClip(f"box {kind!r} at byte {offset} has an impossible size {size}")
            if offset + size > end:
                name = kind.decode("latin-1")
                raise BadClip(
                    f"the file is truncated: its {name!r} box needs {size} bytes from byte "
                    f"{offset} but the file has {end} bytes"
                )
            yield kind, offset, size
            offset += size


def inspect_clip(path: Path) -> ClipFacts:
    """Check ``path`` is a playable MP4 video and return its facts and poster. Blocking."""
    kinds = [(kind, offset) for kind, offset, _ in _boxes(path)]
    moov = next((offset for kind, offset in kinds if kind == b"moov"), None)
    mdat = next((offset for kind, offset in kinds if kind == b"mdat"), None)
    if moov is None:
        raise BadClip("the file has no 'moov' box (the index a player needs to read it)")
    if mdat is None:
        raise BadClip("the file has no 'mdat' box (no media data)")
    try:
        with av.open(str(path), "r") as container:
            return _decode(container, moov_at_end=moov > mdat)
    except av.error.FFmpegError as exc:
        raise BadClip(f"the file cannot be read as a video: {exc}") from None


def _decode(container: av.container.InputContainer, *, moov_at_end: bool) -> ClipFacts:
    if not container.streams.video:
        raise BadClip("the file has no video stream")
    stream = container.streams.video[0]
    decoder = stream.codec_context
    decoder.thread_count = 1
    width, height = decoder.width, decoder.height
    if width <= 0 or height <= 0:
        raise BadClip("the video stream has no frame size")
    time_base = stream.time_base or Fraction(1, 1)
    packets = 0
    first_key: av.Packet[av.VideoStream] | None = None
    last_key: av.Packet[av.VideoStream] | None = None
    poster: av.VideoFrame | None = None
    decoding = True  # frames from the start until the poster's
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the demuxer's end-of-stream marker
        packets += 1
        if packet.is_keyframe:
            if first_key is None:
                first_key = packet
            last_key = packet
        if decoding:
            for frame in decoder.decode(packet):
                poster = frame
                if frame.time is not None and frame.time >= POSTER_SECONDS:
                    decoding = False
                    break
    if first_key is None or last_key is None:
        raise BadClip("the video stream has no keyframe")
    if stream.frames and packets < stream.frames:
        raise BadClip(
            f"the file is truncated: its index lists {stream.frames} frames, "
            f"{packets} are in the file"
        )
    if decoding:
        for frame in decoder.decode(None):
            if poster is None or (poster.time or 0.0) < POSTER_SECONDS:
                poster = frame
    decoder.flush_buffers()
    if poster is None:
        raise BadClip("the first keyframe does not decode")
    if last_key is not first_key:
        _decode_alone(decoder, last_key)
    duration = _duration(container, stream.duration, time_base)
    rate = stream.average_rate or stream.guessed_rate
    return ClipFacts(
        width=width,
        height=height,
        duration_seconds=round(duration, 3),
        codec=decoder.name,
        fps=round(float(rate), 3) if rate else None,
        moov_at_end=moov_at_end,
        poster=_jpeg(poster),
    )


def _decode_alone(decoder: av.VideoCodecContext, packet: av.Packet[av.VideoStream]) -> None:
    try:
        frames = [*decoder.decode(packet), *decoder.decode(None)]
    finally:
        decoder.flush_buffers()
    if not frames:
        raise BadClip("the last keyframe does not decode")


def _duration(
    container: av.container.InputContainer, ticks: int | None, time_base: Fraction
) -> float:
    if ticks:
        return float(ticks * time_base)
    if container.duration:
        return container.duration / av.time_base
    raise BadClip("the video stream has no duration")


def _jpeg(frame: av.VideoFrame) -> bytes:
    """The frame as a JPEG at its own size, in at most ``POSTER_MAX_BYTES``.

    The quality steps down until it fits. A frame that does not fit even at the lowest
    (noise, in practice) is halved in size until it does: a poster never fails a clip.
    """
    image: Image.Image = frame.to_image()  # type: ignore[no-untyped-call]
    while True:
        for quality in _POSTER_QUALITIES:
            out = io.BytesIO()
            image.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= POSTER_MAX_BYTES:
                return out.getvalue()
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)))


def remux_faststart(source: Path, target: Path) -> None:
    """Copy ``source``'s packets to ``target`` with the ``moov`` box first. Blocking.

    No re-encoding: every audio and video packet is copied as it is; only the boxes move.
    """
    with (
        av.open(str(source), "r") as inp,
        av.open(str(target), "w", format="mp4", options={"movflags": "+faststart"}) as out,
    ):
        streams = [s for s in inp.streams if s.type in ("video", "audio")]
        mapping = {s.index: out.add_stream_from_template(s) for s in streams}
        for packet in inp.demux(streams):
            if packet.dts is None:
                continue
            packet.stream = mapping[packet.stream.index]
            out.mux(packet)


@dataclass(frozen=True, slots=True)
class PreparedClip:
    """A checked clip, ready to be committed. After a fast-start remux, ``size_bytes`` and
    ``sha256`` are the remuxed file's (None: the file is as it was downloaded)."""

    facts: ClipFacts
    faststart_remuxed: bool
    size_bytes: int | None = None
    sha256: str | None = None


def prepare_clip(path: Path) -> PreparedClip:
    """``inspect_clip``, then, if its ``moov`` is at the end, remux ``path`` to fast-start in
    place (through a sibling file and ``os.replace``). Blocking; ``BadClip`` if it is no clip."""
    facts = inspect_clip(path)
    if not facts.moov_at_end:
        return PreparedClip(facts, faststart_remuxed=False)
    remuxed = path.with_name(path.name.removesuffix(".part") + ".faststart.part")
    try:
        try:
            remux_faststart(path, remuxed)
        except av.error.FFmpegError as exc:
            raise BadClip(f"the clip cannot be remuxed to fast-start: {exc}") from None
        size, digest = _sha256(remuxed)
        os.replace(remuxed, path)
    finally:
        remuxed.unlink(missing_ok=True)
    return PreparedClip(facts, faststart_remuxed=True, size_bytes=size, sha256=digest)


def _sha256(path: Path) -> tuple[int, str]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()
