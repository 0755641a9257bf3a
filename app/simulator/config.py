"""The simulator's knobs: one mutable, validated settings object shared by every request.

``SimulatorConfig`` owns the behaviour switches (latency, failure and fault-injection rates,
broken clips, render size, callback shape, file-serving limits). Handlers read it on every
request, so a change made through ``PATCH /_sim/config`` or by assigning an attribute takes
effect immediately.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BROKEN_CLIPS", "BrokenClip", "CallbackEnvelope", "SimulatorConfig"]

ENV_PREFIX = "HIAPI_SIM_"

CallbackEnvelope = Literal["bare", "wrapped", "random"]
BrokenClip = Literal["truncated", "no_moov", "moov_at_end", "wrong_duration", "no_video_stream"]
BROKEN_CLIPS: tuple[BrokenClip, ...] = get_args(BrokenClip)


class SimulatorConfig(BaseModel):
    """Behaviour of the fake hiapi. Rates are probabilities in ``[0, 1]`` rolled per event."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    api_key: str | None = None
    """Required bearer token; ``None`` accepts any token starting with ``sk-``."""
    public_base_url: str = Field(default="http://127.0.0.1:9100", min_length=1)
    """Base of output file URLs, including any mount prefix (``.../simulator``)."""
    latency_seconds: float = Field(default=1.0, ge=0)
    """Render time before a task becomes terminal."""
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of tasks that end with ``status: fail`` and a ``generation_failed`` error."""
    error_5xx_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of create and poll requests answered 503 (a failed create makes no task)."""
    create_timeout_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of creates whose task is made but whose answer waits ``timeout_delay_seconds``."""
    timeout_delay_seconds: float = Field(default=30.0, ge=0)
    callback_drop_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of tasks whose callback is never sent."""
    duplicate_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of tasks whose callback is delivered 2 or 3 times concurrently."""
    url_ttl_seconds: float = Field(default=3600.0, ge=0)
    """Lifetime of an output URL; ``expireAt`` is ``now + ttl`` and the file 404s after it."""
    fetch_images: bool = False
    """Download the input image (5 s, 20 MB cap); otherwise render a generated frame, so the
    simulator sends no request to the hosts named in image URLs (``--fetch-images``)."""
    local_image_prefix: str | None = None
    """Image URLs starting with this are downloaded even with ``fetch_images`` off: ``serve
    --simulate`` sets its own origin, so images uploaded to it are used (no outside host)."""
    # Real hiapi takes https image URLs only. `serve --simulate` turns this on so images
    # uploaded to a local, plain-http videorelay can be used.
    allow_http_image_urls: bool = False
    render_scale: float = Field(default=1.0, gt=0, le=1)
    """Clip size as a share of hiapi's: 1 renders 720p clips 720 px high and 1080p clips 1080
    px high (width from the image's aspect ratio); 0.1 renders them 72 and 108 px high."""
    broken_clip: BrokenClip | None = None
    """Every task created while this is set succeeds with this kind of broken clip (see
    ``app.simulator.broken``); tasks created before keep theirs. ``None``: valid clips."""
    pad_bytes: int = Field(default=0, ge=0)
    """Append an MP4 ``free`` box of this many bytes (at least 8) to every served file."""
    download_bytes_per_second: float | None = Field(default=None, gt=0)
    """Throttle for file downloads; ``None`` serves as fast as possible."""
    callback_envelope: CallbackEnvelope = "random"
    """``bare`` task object, ``wrapped`` as ``{"code":200,"data":...}``, or ``random`` per send."""
    callback_retries: int = Field(default=3, ge=0)
    """Extra attempts after a non-2xx answer or connection error (backoff 0.5 s, 1 s, 2 s)."""
    seed: int | None = None
    """Seed for the simulator's ``random.Random``; ``None`` is unseeded."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimulatorConfig:
        """Defaults overridden by ``HIAPI_SIM_<KNOB>`` variables (``none`` or empty is None)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = None if raw.strip().lower() in ("", "none", "null") else raw
        return cls.model_validate(values)

    def merged(self, changes: dict[str, Any]) -> SimulatorConfig:
        """Return a validated copy with ``changes`` applied (raises ``ValidationError``)."""
        return SimulatorConfig.model_validate({**self.model_dump(), **changes})

    def update_from(self, other: SimulatorConfig) -> None:
        """Copy every field of ``other`` onto this object, in place."""
        for name in type(self).model_fields:
            value = getattr(other, name)
            if getattr(self, name) != value:
                setattr(self, name, value)
