"""Issue 14, section 1: every clip is opened with PyAV before it is stored.

A playable clip becomes ``ready`` with its facts (size, length, codec, frame rate), its
``warnings``, and a poster JPEG served at ``/v1/videos/{id}/poster.jpg``; a clip with its
``moov`` at the end is stored remuxed to fast-start. A broken one (no ``moov``, a cut
``mdat``, no video stream) fails ``bad_mp4`` and leaves nothing in storage. Through real HTTP:
the simulator, or a real file server on 127.0.0.1 serving the files of ``tests.clips``; local
storage and S3 (moto), SQLite and Postgres. The simulator's ``broken_clip`` knob covers the
same kinds of broken file through the simulator itself.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from PIL import Image

from tests import clips
from tests.conftest import RunningServer, Service, ServiceFactory, Sim, free_socket
from tests.test_flow import callback_path
from tests.test_storage_s3 import (  # noqa: F401  (fixtures)
    Bucket,
    aws_env,
    bucket,
    moto_endpoint,
    s3_settings,
)

# The S3 tests share the moto server of tests/test_storage_s3.py's group.
pytestmark = pytest.mark.xdist_group("storage_s3")

FAR = 4102444800  # 2100-01-01: an expireAt that does not matter
API_KEY = "clip-facts-key-0123456789"

BROKEN: dict[str, Callable[[], bytes]] = {
    "no_moov": clips.no_moov,
    "truncated_mdat": clips.truncated_mdat,
    "audio_only": clips.audio_only,
}


class ClipOrigin:
    """The clip host: a real HTTP server on 127.0.0.1 serving ``files`` by name."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        app = FastAPI()

        @app.get("/{name}.mp4")
        async def clip(name: str) -> Response:
            if name not in self.files:
                return Response(status_code=404)
            return Response(self.files[name], media_type="video/mp4")

        self.server = RunningServer(app, free_socket())

    def url(self, name: str) -> str:
        return f"{self.server.url}/{name}.mp4"


@pytest.fixture
async def origin() -> AsyncIterator[ClipOrigin]:
    origin = ClipOrigin()
    await origin.server.start()
    yield origin
    await origin.server.stop()


async def start(services: ServiceFactory, sim: Sim, origin: ClipOrigin, **settings: Any) -> Service:
    sim.set(callback_drop_rate=1.0)  # the test delivers the callback itself
    return await services.start(DOWNLOAD_ALLOWED_HOSTS=f"{sim.url},{origin.server.url}", **settings)


async def deliver(service: Service, origin: ClipOrigin, name: str, **body: Any) -> dict[str, Any]:
    """Submit a video, then hiapi's success callback with ``origin``'s ``name`` as output."""
    video = await service.submit(**body)
    task = {
        "taskId": video["task_id"],
        "status": "success",
        "output": [{"type": "video", "url": origin.url(name), "expireAt": FAR}],
    }
    ack = await service.client.post(callback_path(video["id"]), json=task)
    assert ack.status_code == 200, ack.text
    return video


def stored_files(service: Service) -> list[str]:
    """Everything under the storage directory, partial files included."""
    root = Path(service.settings.STORAGE_DIR)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def top_level(data: bytes) -> list[bytes]:
    return [kind for kind, _, _ in clips.boxes(data)]


def assert_jpeg_of(data: bytes, size: tuple[int, int]) -> None:
    assert data[:3] == b"\xff\xd8\xff", data[:16]
    assert len(data) <= 200 * 1024
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.size == size
        image.load()  # the whole image decodes


FACTS = ("width", "height", "duration_seconds", "codec", "fps", "warnings", "faststart_remuxed")


class TestLocalStorage:
    async def test_simulator_clip_is_ready_with_its_facts_and_a_poster(
        self, service: Service, sim: Sim
    ):
        sim.set(render_scale=1.0)  # hiapi's own size: 720 px high
        video = await service.submit(duration=3, resolution="720p")
        for field in (*FACTS, "poster_url"):
            assert video[field] is None, (field, video)  # nothing known before it is stored
        early = await service.client.get(f"/v1/videos/{video['id']}/poster.jpg")
        assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready"

        done = await service.wait_for(video["id"], "ready")
        stored = (await service.client.get(f"/v1/videos/{video['id']}/content")).content
        assert (done["size_bytes"], done["sha256"]) == (
            len(stored),
            hashlib.sha256(stored).hexdigest(),
        )
        assert done["codec"] == "h264"
        assert done["duration_seconds"] == pytest.approx(3.0, abs=0.01)
        assert done["fps"] == pytest.approx(8.0)
        assert done["width"] > 0 and done["height"] > 0
        assert done["faststart_remuxed"] is False  # the simulator renders fast-start clips
        assert done["height"] == 720 and done["width"] > 0
        assert done["warnings"] == []  # what was asked: 720 px high, 3 s

        assert done["poster_url"] == (
            f"{service.settings.public_base}/v1/videos/{video['id']}/poster.jpg"
        )
        poster = await service.client.get(done["poster_url"])
        assert poster.status_code == 200, poster.text
        assert poster.headers["content-type"] == "image/jpeg"
        assert_jpeg_of(poster.content, (done["width"], done["height"]))
        head = await service.client.head(done["poster_url"])
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(poster.content))
        # Stored beside the clip.
        key = f"{video['id'][:2]}/{video['id']}"
        assert stored_files(service) == [f"{key}.jpg", f"{key}.mp4"]

        # The list shows the same facts.
        page = (await service.client.get("/v1/videos")).json()["items"]
        assert {k: page[0][k] for k in FACTS} == {k: done[k] for k in FACTS}

    @pytest.mark.parametrize("kind", sorted(BROKEN))
    async def test_broken_clip_fails_bad_mp4_and_nothing_is_stored(
        self, services: ServiceFactory, sim: Sim, origin: ClipOrigin, kind: str
    ):
        origin.files[kind] = BROKEN[kind]()
        service = await start(services, sim, origin)
        video = await deliver(service, origin, kind)
        done = await service.wait_for(video["id"], "failed", "ready")
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "bad_mp4"
        assert "not a playable MP4" in done["error"]["message"]
        for field in (*FACTS, "poster_url", "content_url", "sha256"):
            assert done[field] is None, (field, done)
        assert stored_files(service) == []  # no clip, no poster, no partial file
        poster = await service.client.get(f"/v1/videos/{video['id']}/poster.jpg")
        assert poster.status_code == 409

    async def test_moov_at_the_end_is_stored_fast_start_with_its_own_hash(
        self, services: ServiceFactory, sim: Sim, origin: ClipOrigin
    ):
        original = clips.moov_at_end()
        assert top_level(original).index(b"moov") > top_level(original).index(b"mdat")
        origin.files["late"] = original
        service = await start(services, sim, origin)
        video = await deliver(service, origin, "late", duration=3)
        done = await service.wait_for(video["id"], "ready", "failed")
        assert done["status"] == "ready", done["error"]
        assert done["faststart_remuxed"] is True
        stored = (await service.client.get(f"/v1/videos/{video['id']}/content")).content
        kinds = top_level(stored)
        assert kinds.index(b"moov") < kinds.index(b"mdat")
        assert stored != original
        assert done["size_bytes"] == len(stored)
        assert done["sha256"] == hashlib.sha256(stored).hexdigest()
        # Remuxed, not re-encoded: the same frames, the same facts.
        assert (done["width"], done["height"], done["duration_seconds"]) == (256, 144, 3.0)
        assert done["warnings"] == ["resolution_mismatch"]  # 720p asked, 144 rows came

    async def test_fast_start_clip_is_stored_as_sent(
        self, services: ServiceFactory, sim: Sim, origin: ClipOrigin
    ):
        original = clips.good_mp4()
        origin.files["good"] = original
        service = await start(services, sim, origin)
        video = await deliver(service, origin, "good", duration=3, resolution="1080p")
        done = await service.wait_for(video["id"], "ready", "failed")
        assert done["status"] == "ready", done["error"]
        assert done["faststart_remuxed"] is False
        assert done["sha256"] == hashlib.sha256(original).hexdigest()
        assert done["warnings"] == ["resolution_mismatch"]

    async def test_clip_of_the_wrong_length_is_ready_with_a_duration_warning(
        self, services: ServiceFactory, sim: Sim, origin: ClipOrigin
    ):
        origin.files["short"] = clips.render(1280, 720, seconds=3.0)
        service = await start(services, sim, origin)
        wrong = await deliver(service, origin, "short", duration=5, resolution="720p")
        right = await deliver(service, origin, "short", duration=3, resolution="720p")
        wrong_done = await service.wait_for(wrong["id"], "ready", "failed")
        right_done = await service.wait_for(right["id"], "ready", "failed")
        assert wrong_done["warnings"] == ["duration_mismatch"]
        assert right_done["warnings"] == []  # 1280x720, 3 s: what was asked
        assert (right_done["width"], right_done["height"]) == (1280, 720)
        poster = await service.client.get(right_done["poster_url"])
        assert_jpeg_of(poster.content, (1280, 720))

    async def test_a_frame_too_busy_for_200_kb_still_gets_a_poster_that_fits(
        self, services: ServiceFactory, sim: Sim, origin: ClipOrigin
    ):
        origin.files["noise"] = clips.noise()
        service = await start(services, sim, origin)
        video = await deliver(service, origin, "noise", duration=3, resolution="1080p")
        done = await service.wait_for(video["id"], "ready", "failed")
        assert done["status"] == "ready", done["error"]  # a poster never fails a clip
        assert (done["width"], done["height"]) == (1920, 1080)
        poster = (await service.client.get(done["poster_url"])).content
        assert len(poster) <= 200 * 1024
        with Image.open(io.BytesIO(poster)) as image:
            # Scaled down, as the last resort, keeping the aspect ratio.
            assert image.format == "JPEG" and image.size[0] < 1920
            assert image.size[0] * 1080 == image.size[1] * 1920


class TestSimulatorBrokenClips:
    """The simulator's ``broken_clip`` knob: hiapi's success with a broken file, through the
    same HTTP as every clip."""

    @pytest.mark.parametrize("kind", ["truncated", "no_moov", "no_video_stream"])
    async def test_unplayable_clip_fails_bad_mp4_and_nothing_is_stored(
        self, service: Service, sim: Sim, kind: str
    ):
        sim.set(broken_clip=kind)
        video = await service.submit(duration=3)
        done = await service.wait_for(video["id"], "failed", "ready")
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "bad_mp4", done["error"]
        assert done["poster_url"] is None and done["width"] is None
        assert stored_files(service) == []

    async def test_moov_at_the_end_is_remuxed_and_the_wrong_length_is_flagged(
        self, service: Service, sim: Sim
    ):
        sim.set(broken_clip="moov_at_end")
        late = await service.submit(duration=3)
        late_done = await service.wait_for(late["id"], "ready", "failed")
        sim.set(broken_clip="wrong_duration")
        long = await service.submit(duration=3)
        long_done = await service.wait_for(long["id"], "ready", "failed")
        assert late_done["status"] == "ready", late_done["error"]
        assert late_done["faststart_remuxed"] is True
        stored = (await service.client.get(f"/v1/videos/{late['id']}/content")).content
        assert top_level(stored).index(b"moov") < top_level(stored).index(b"mdat")
        assert late_done["sha256"] == hashlib.sha256(stored).hexdigest()
        assert "duration_mismatch" not in late_done["warnings"]
        assert long_done["status"] == "ready", long_done["error"]
        assert "duration_mismatch" in long_done["warnings"]
        assert abs(long_done["duration_seconds"] - 3) > 0.5


class TestSignedPoster:
    async def test_signed_poster_url_works_without_a_key_and_not_when_altered(
        self, services: ServiceFactory, sim: Sim
    ):
        service = await services.start(API_KEYS=f"app:{API_KEY}")
        service.client.headers["Authorization"] = f"Bearer {API_KEY}"
        video = await service.submit()
        done = await service.wait_for(video["id"], "ready")
        base = service.settings.public_base
        signed = done["poster_url"].removeprefix(base)
        assert signed.startswith(f"/v1/videos/{video['id']}/poster.jpg?exp=")
        assert "&sig=" in signed
        async with httpx.AsyncClient(base_url=service.server.url) as browser:  # no key
            got = await browser.get(signed)
            assert got.status_code == 200, got.text
            assert_jpeg_of(got.content, (done["width"], done["height"]))
            bare = await browser.get(signed.partition("?")[0])
            assert bare.status_code == 401
            tampered = await browser.get(signed[:-2] + ("AA" if signed[-2:] != "AA" else "BB"))
            assert tampered.status_code == 403
            assert tampered.json()["error"]["code"] == "bad_signature"
            # A signature is for one path: the clip's does not open the poster.
            content_query = done["content_url"].partition("?")[2]
            swapped = await browser.get(f"/v1/videos/{video['id']}/poster.jpg?{content_query}")
            assert swapped.status_code == 403
            # Nor another video's poster.
            other = await browser.get(signed.replace(video["id"], str(uuid.uuid4())))
            assert other.status_code == 403


class TestS3:
    async def test_poster_beside_the_clip_and_a_redirect_like_content(
        self,
        services: ServiceFactory,
        sim: Sim,
        origin: ClipOrigin,
        bucket: Bucket,  # noqa: F811
    ):
        origin.files["late"] = clips.moov_at_end()
        service = await start(services, sim, origin, **s3_settings(bucket))
        video = await deliver(service, origin, "late", duration=3)
        done = await service.wait_for(video["id"], "ready", "failed")
        assert done["status"] == "ready", done["error"]
        name = bucket.object_name(video["id"])
        poster_name = name.removesuffix(".mp4") + ".jpg"
        assert sorted(await bucket.keys()) == sorted([name, poster_name])
        assert await bucket.uploads() == []
        # The remuxed file is what went to the bucket, and what the video says.
        assert done["faststart_remuxed"] is True
        assert await bucket.sha256(name) == (done["sha256"], done["size_bytes"])
        assert not list(Path(service.settings.STORAGE_DIR).rglob("*.part"))  # spool removed

        redirect = await service.client.get(done["poster_url"])
        assert redirect.status_code == 307
        assert redirect.headers["cache-control"] == "no-store"
        location = redirect.headers["location"]
        assert location.startswith(f"{bucket.endpoint}/{bucket.name}/{poster_name}?")
        async with httpx.AsyncClient() as anyone:
            fetched = await anyone.get(location)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/jpeg"
        assert_jpeg_of(fetched.content, (done["width"], done["height"]))

    @pytest.mark.parametrize("kind", ["no_moov", "truncated_mdat"])
    async def test_broken_clip_fails_bad_mp4_and_the_bucket_stays_empty(
        self,
        services: ServiceFactory,
        sim: Sim,
        origin: ClipOrigin,
        bucket: Bucket,  # noqa: F811
        kind: str,
    ):
        origin.files[kind] = BROKEN[kind]()
        service = await start(services, sim, origin, **s3_settings(bucket))
        video = await deliver(service, origin, kind)
        done = await service.wait_for(video["id"], "failed", "ready")
        assert done["status"] == "failed" and done["error"]["code"] == "bad_mp4", done
        assert await bucket.keys() == []
        assert await bucket.uploads() == []
        assert stored_files(service) == []  # the local spool is gone too
