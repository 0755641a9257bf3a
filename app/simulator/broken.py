"""Broken clips on demand, to test what a service does with an MP4 that can't be played.

Set the ``broken_clip`` knob (``PATCH /_sim/config {"broken_clip": "no_moov"}``, the
``HIAPI_SIM_BROKEN_CLIP`` variable or ``videorelay simulator --broken-clip``) and every task
created from then on succeeds, like a hiapi task would, with that kind of clip; set it back to
``null`` for valid clips again. Each kind is made from the task's valid render, deterministically
(the same request gives the same bytes), and every one starts with an ``ftyp`` box:

* ``truncated``: the file ends halfway through ``mdat`` (the ``moov`` indexes frames that are
  not there), so it opens but does not decode to the end;
* ``no_moov``: ``ftyp`` and ``mdat`` only, so no player (and no PyAV) can open it;
* ``moov_at_end``: a valid clip, remuxed without fast-start (``moov`` after ``mdat``);
* ``wrong_duration``: a valid clip one second longer than the requested ``duration``;
* ``no_video_stream``: a valid fast-start MP4 of ``duration`` seconds of silent AAC audio,
  with no video track.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
from av.container import OutputContainer

from app.simulator.config import BrokenClip
from app.simulator.mp4 import Box, top_level_boxes, write_mp4

__all__ = ["AUDIO_RATE", "make"]

AUDIO_RATE = 16_000
AUDIO_FRAME_SAMPLES = 1024


def make(kind: BrokenClip, valid: bytes, *, duration: int) -> bytes:
    """The ``kind`` of broken clip made from ``valid``, a fast-start render of ``duration``
    seconds (``wrong_duration`` is a render of its own: see ``render_mp4``)."""
    if kind == "truncated":
        return truncated(valid)
    if kind == "no_moov":
        return without_moov(valid)
    if kind == "moov_at_end":
        return moov_at_end(valid)
    if kind == "no_video_stream":
        return silent_audio(duration)
    raise ValueError(f"{kind!r} is not made from a valid clip")


def truncated(clip: bytes) -> bytes:
    """``clip`` cut halfway through its ``mdat`` payload."""
    mdat = _box(clip, b"mdat")
    header = 16 if clip[mdat.offset : mdat.offset + 4] == b"\x00\x00\x00\x01" else 8
    payload = mdat.size - header
    return clip[: mdat.offset + header + payload // 2]


def without_moov(clip: bytes) -> bytes:
    """``clip`` with its ``moov`` box cut out."""
    moov = _box(clip, b"moov")
    return clip[: moov.offset] + clip[moov.end :]


def moov_at_end(clip: bytes) -> bytes:
    """``clip``'s packets remuxed (not re-encoded) into an MP4 with ``moov`` after ``mdat``."""
    with av.open(io.BytesIO(clip), mode="r") as source:
        video = source.streams.video[0]

        def fill(out: OutputContainer) -> None:
            stream = out.add_stream_from_template(video)
            for packet in source.demux(video):
                if packet.dts is None:  # the flush packet at the end of the demux
                    continue
                packet.stream = stream
                out.mux(packet)

        return write_mp4(fill, faststart=False)


def silent_audio(duration: int) -> bytes:
    """A fast-start MP4 holding only ``duration`` seconds of silent mono AAC."""

    def fill(out: OutputContainer) -> None:
        stream = out.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        total = duration * AUDIO_RATE
        for start in range(0, total, AUDIO_FRAME_SAMPLES):
            samples = min(AUDIO_FRAME_SAMPLES, total - start)
            frame = av.AudioFrame(format="fltp", layout="mono", samples=samples)
            frame.planes[0].update(bytes(samples * 4))  # fltp: 4 bytes a sample, one plane
            frame.sample_rate = AUDIO_RATE
            frame.pts = start
            frame.time_base = Fraction(1, AUDIO_RATE)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))

    return write_mp4(fill)


def _box(clip: bytes, kind: bytes) -> Box:
    for box in top_level_boxes(clip):
        if box.type == kind:
            return box
    raise ValueError(f"the clip has no {kind.decode()} box")
