"""The simulator's clips are like hiapi's: size, aspect ratio and duration; and broken on demand.

Every clip here is made by a simulator on a real port (the ``sim`` fixture, or a
``videorelay simulator`` process) and downloaded over HTTP; PyAV probes it. Images come from
a real server on 127.0.0.1 that counts its requests, so a test also sees whether the
simulator fetched anything. Expected sizes are written out, not computed with the
simulator's own formula.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import httpx
import pytest
from fastapi import FastAPI, Response
from PIL import Image

from app import cli
from app.hiapi.schemas import MODEL
from app.simulator import render
from app.simulator.config import BROKEN_CLIPS, BrokenClip
from tests.conftest import ChildServer, RunningServer, Sim, child_env, free_socket, videorelay
from tests.test_startup import assert_one_line_refusal, clean_env, run_cli

AUTH = {"Authorization": "Bearer sk-clips"}
FPS = 8  # hiapi's clips have their own rate; the simulator's is 8 frames a second
SHAPES = {"landscape": (1600, 900), "portrait": (600, 900), "square": (500, 500)}


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Images:
    """A real HTTP server of PNGs of any size (``/1600x900.png``) that counts its requests."""

    url: str = ""
    requests: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        api = FastAPI()

        @api.get("/{width}x{height}.png")
        async def image(width: int, height: int) -> Response:
            self.requests.append(f"{width}x{height}")
            buffer = io.BytesIO()
            Image.linear_gradient("L").resize((width, height)).save(buffer, "PNG")
            return Response(buffer.getvalue(), media_type="image/png")

        @api.get("/turned.jpg")
        async def turned() -> Response:
            """A JPEG stored 900x600 whose EXIF orientation (6: turn 90 degrees) makes it
            600x900 on screen, as phone photos are."""
            self.requests.append("turned")
            exif = Image.Exif()
            exif[0x0112] = 6
            buffer = io.BytesIO()
            Image.linear_gradient("L").resize((900, 600)).save(buffer, "JPEG", exif=exif)
            return Response(buffer.getvalue(), media_type="image/jpeg")

        return api

    def of(self, shape: str) -> str:
        width, height = SHAPES[shape]
        return f"{self.url}/{width}x{height}.png"


@pytest.fixture
async def images() -> AsyncIterator[Images]:
    server_images = Images()
    server = RunningServer(server_images.app(), free_socket())
    await server.start()
    server_images.url = server.url
    yield server_images
    await server.stop()


@dataclass(frozen=True)
class Probe:
    width: int
    height: int
    duration: float  # seconds, the container's
    frames: int


def probe(clip: bytes) -> Probe:
    """What PyAV reads in ``clip``: size, container duration, and every frame decoded."""
    with av.open(io.BytesIO(clip), mode="r") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert container.duration is not None
        return Probe(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            duration=container.duration / 1_000_000,
            frames=frames,
        )


def decodes(clip: bytes) -> tuple[int, Exception | None]:
    """How many frames decode before the end or an error, and the error."""
    count = 0
    try:
        with av.open(io.BytesIO(clip), mode="r") as container:
            for _ in container.decode(video=0):
                count += 1
    except av.error.FFmpegError as exc:
        return count, exc
    return count, None


def boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """Top-level MP4 boxes as ``(type, offset, declared size)``."""
    found = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, offset + 8)
        assert size >= 8, (kind, size)
        found.append((kind, offset, size))
        offset += size
    return found


async def make_clip(
    base_url: str,
    *,
    image_url: str = "https://example.invalid/still.jpg",
    resolution: str = "720p",
    duration: int = 3,
) -> bytes:
    """Create a task on the simulator at ``base_url``, wait for it, download its clip."""
    body = {
        "model": MODEL,
        "input": {"image_urls": [image_url], "resolution": resolution, "duration": duration},
    }
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30) as client:
        created = await client.post("/v1/tasks", json=body)
        assert created.status_code == 200, created.text
        task_id = created.json()["data"]["taskId"]
        deadline = time.monotonic() + 60
        while (task := (await client.get(f"/v1/tasks/{task_id}")).json()["data"])[
            "status"
        ] == "handling":
            assert time.monotonic() < deadline, f"task {task_id} still handling"
            await asyncio.sleep(0.02)
        assert task["status"] == "success", task
        download = await client.get(task["output"][0]["url"])
    assert download.status_code == 200
    clip: bytes = download.content
    assert clip[4:8] == b"ftyp"  # every clip, broken or not, passes a first-box check
    return clip


# -- size, aspect ratio and duration -------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "resolution", "scale", "duration", "size"),
    [
        ("landscape", "720p", 0.2, 3, (256, 144)),
        ("landscape", "1080p", 0.2, 5, (384, 216)),
        ("portrait", "720p", 0.2, 4, (96, 144)),
        ("portrait", "1080p", 0.2, 15, (144, 216)),
        ("square", "720p", 0.2, 3, (144, 144)),
        ("square", "1080p", 0.2, 7, (216, 216)),
        ("landscape", "720p", 0.1, 3, (128, 72)),
        ("portrait", "1080p", 0.1, 3, (72, 108)),
        ("landscape", "720p", 1.0, 5, (1280, 720)),
        ("portrait", "1080p", 1.0, 3, (720, 1080)),
    ],
)
async def test_clip_has_the_resolutions_height_the_images_shape_and_the_duration(
    sim: Sim,
    images: Images,
    shape: str,
    resolution: str,
    scale: float,
    duration: int,
    size: tuple[int, int],
) -> None:
    sim.set(fetch_images=True, allow_http_image_urls=True, render_scale=scale)
    clip = await make_clip(
        sim.url, image_url=images.of(shape), resolution=resolution, duration=duration
    )
    got = probe(clip)
    assert (got.width, got.height) == size
    assert got.frames == duration * FPS
    assert abs(got.duration - duration) <= 1 / FPS, got
    assert images.requests == [f"{SHAPES[shape][0]}x{SHAPES[shape][1]}"]


async def test_clip_follows_the_image_as_shown_not_as_stored(sim: Sim, images: Images) -> None:
    sim.set(fetch_images=True, allow_http_image_urls=True)
    got = probe(await make_clip(sim.url, image_url=f"{images.url}/turned.jpg"))
    assert (got.width, got.height) == (96, 144)


async def test_no_fetch_means_no_request_and_a_16_9_pattern(sim: Sim, images: Images) -> None:
    """With ``fetch_images`` off (the tests' and the standalone simulator's default) the image's
    host is never contacted and the clip shows the generated 16:9 pattern; turned on, the same
    URL is fetched and the clip takes the image's shape."""
    sim.set(allow_http_image_urls=True)
    assert sim.config.fetch_images is False
    unfetched = probe(await make_clip(sim.url, image_url=images.of("portrait")))
    assert images.requests == []
    sim.set(fetch_images=True)
    fetched = probe(await make_clip(sim.url, image_url=images.of("portrait")))
    missing = probe(await make_clip(sim.url, image_url=f"{images.url}/not-an-image"))
    assert (unfetched.width, unfetched.height) == (256, 144)
    assert (fetched.width, fetched.height) == (96, 144)
    assert (missing.width, missing.height) == (256, 144)  # could not be fetched: the pattern
    assert len(images.requests) == 1  # the 404 route is not counted


# -- broken clips --------------------------------------------------------------------------


async def broken(sim: Sim, kind: BrokenClip, duration: int = 3) -> bytes:
    """A clip made while ``broken_clip`` is ``kind``, set through ``PATCH /_sim/config``."""
    changed = await sim.client.patch("/_sim/config", json={"broken_clip": kind})
    assert changed.status_code == 200, changed.text
    return await make_clip(sim.url, duration=duration)


async def test_truncated_clip_opens_but_stops_decoding_early(sim: Sim) -> None:
    valid = await make_clip(sim.url)
    clip = await broken(sim, "truncated")
    *_, (kind, offset, size) = boxes(valid)
    assert kind == b"mdat"
    assert offset < len(clip) < offset + size  # the file ends inside mdat
    assert clip == valid[: len(clip)]
    frames, error = decodes(clip)
    assert frames < 3 * FPS, (frames, error)


async def test_no_moov_clip_cannot_be_opened(sim: Sim) -> None:
    clip = await broken(sim, "no_moov")
    kinds = [kind for kind, _, _ in boxes(clip)]
    assert kinds[0] == b"ftyp" and b"mdat" in kinds and b"moov" not in kinds
    with pytest.raises(av.error.InvalidDataError):
        av.open(io.BytesIO(clip), mode="r")


async def test_moov_at_end_clip_is_valid_but_not_fast_start(sim: Sim) -> None:
    valid = await make_clip(sim.url)
    clip = await broken(sim, "moov_at_end")
    order = [kind for kind, _, _ in boxes(clip) if kind in (b"moov", b"mdat")]
    assert order == [b"mdat", b"moov"]
    assert [kind for kind, _, _ in boxes(valid) if kind in (b"moov", b"mdat")] == [
        b"moov",
        b"mdat",
    ]
    assert probe(clip) == probe(valid) == Probe(width=256, height=144, duration=3.0, frames=24)


async def test_wrong_duration_clip_is_a_second_longer(sim: Sim) -> None:
    got = probe(await broken(sim, "wrong_duration", duration=5))
    assert (got.width, got.height, got.frames) == (256, 144, 6 * FPS)
    assert abs(got.duration - 5) > 0.5


async def test_no_video_stream_clip_holds_only_audio(sim: Sim) -> None:
    clip = await broken(sim, "no_video_stream", duration=4)
    with av.open(io.BytesIO(clip), mode="r") as container:
        assert len(container.streams.video) == 0
        assert [stream.type for stream in container.streams] == ["audio"]
        assert container.duration is not None
        assert abs(container.duration / 1_000_000 - 4) < 0.1


async def test_broken_clip_is_fixed_when_the_task_is_created(sim: Sim) -> None:
    """Only tasks created while the knob is set get a broken clip; ``null`` turns it off; an
    unknown kind is refused with 422 and changes nothing."""
    body = {
        "model": MODEL,
        "input": {"image_urls": ["https://example.invalid/a.jpg"], "duration": 3},
    }
    sim.set(latency_seconds=30)  # tasks wait until completed by hand
    before = (await sim.client.post("/v1/tasks", json=body, headers=AUTH)).json()["data"]
    await sim.client.patch("/_sim/config", json={"broken_clip": "no_moov"})
    during = (await sim.client.post("/v1/tasks", json=body, headers=AUTH)).json()["data"]
    refused = await sim.client.patch("/_sim/config", json={"broken_clip": "scrambled"})
    assert refused.status_code == 422
    assert (await sim.client.get("/_sim/config")).json()["broken_clip"] == "no_moov"
    await sim.client.patch("/_sim/config", json={"broken_clip": None})
    sim.set(latency_seconds=0.05)
    after = await make_clip(sim.url)

    async def finish(task_id: str) -> bytes:
        done = await sim.client.post(f"/_sim/tasks/{task_id}/complete")
        url = done.json()["data"]["output"][0]["url"]
        return (await sim.client.get(url)).content

    tasks = {t["task_id"]: t for t in (await sim.client.get("/_sim/tasks")).json()["tasks"]}
    assert tasks[during["taskId"]]["fate"]["broken_clip"] == "no_moov"
    assert tasks[before["taskId"]]["fate"]["broken_clip"] is None
    assert probe(await finish(before["taskId"])).frames == 3 * FPS
    assert b"moov" not in [kind for kind, _, _ in boxes(await finish(during["taskId"]))]
    assert probe(after).frames == 3 * FPS


@pytest.mark.parametrize("kind", BROKEN_CLIPS)
def test_broken_clips_are_deterministic(kind: BrokenClip) -> None:
    """The same request gives the same bytes, rendered afresh (cache emptied in between)."""
    made = []
    for _ in range(2):
        render.clear_cache()
        made.append(render.render_mp4(None, resolution="720p", duration=3, scale=0.1, broken=kind))
    assert made[0] == made[1]
    assert made[0] != render.render_mp4(None, resolution="720p", duration=3, scale=0.1)


# -- the commands --------------------------------------------------------------------------


async def test_standalone_simulator_takes_render_scale_and_broken_clip(tmp_path: Path) -> None:
    child = ChildServer(
        videorelay(
            "simulator",
            "--port",
            "{port}",
            "--latency",
            "0",
            "--render-scale",
            "0.1",
            "--broken-clip",
            "moov_at_end",
        ),
        lambda port: child_env(tmp_path),
        cwd=tmp_path,
        log=tmp_path / "simulator.log",
        up_path="/_sim/stats",
    )
    await asyncio.to_thread(child.start)
    try:
        clip = await make_clip(child.url, resolution="1080p", duration=4)
    finally:
        await asyncio.to_thread(child.terminate)
    assert probe(clip) == Probe(width=192, height=108, duration=4.0, frames=4 * FPS)
    assert [kind for kind, _, _ in boxes(clip) if kind in (b"moov", b"mdat")] == [
        b"mdat",
        b"moov",
    ]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["simulator", "--broken-clip", "scrambled"], ["broken_clip", "no_moov"]),
        (["serve", "--render-scale", "0.5"], ["--render-scale goes with --simulate"]),
        (["serve", "--fetch-images"], ["--fetch-images goes with --simulate"]),
    ],
    ids=["unknown-broken-kind", "render-scale-without-simulate", "fetch-without-simulate"],
)
def test_simulator_options_are_refused_clearly(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    assert_one_line_refusal(run_cli(*args, cwd=tmp_path, env=clean_env(tmp_path)), *needles)


@pytest.mark.parametrize("command", ["simulator", "serve"])
@pytest.mark.parametrize("value", ["0", "1.5", "half"])
def test_render_scale_out_of_range_is_a_usage_error(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by the argument parser, before anything starts (so in this process)."""
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--render-scale", value])
    assert exited.value.code == 2
    assert "--render-scale: must be a number above 0 and at most 1" in capsys.readouterr().err
