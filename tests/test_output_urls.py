"""hiapi's output URL is checked once, when the task is applied, and a bad one ends the video
at once; nothing in the downloader can wedge a video (issue 10, section 2).

Real simulator, real origin server on 127.0.0.1, real webhook POSTs, on SQLite and Postgres.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import select, update

from app.hiapi.schemas import Task, TaskStatus, parse_task_payload
from app.jobs.hosts import HostAllowlist, Refused, canonical_host
from app.logging import configure_logging
from app.models import Video
from app.outputs import OutputCheck
from app.security import webhook_token
from tests import clips
from tests.conftest import WEBHOOK_SECRET, RunningServer, Service, ServiceFactory, Sim, free_socket

MP4 = clips.good_mp4()  # a real clip: every download is opened with PyAV
FAR_FUTURE = 99_999_999_999  # 5138-11-16: under the schema's 10**11 cap, so it gets through


class Origin:
    """A file server on 127.0.0.1 that counts the requests it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        app = FastAPI()

        @app.middleware("http")
        async def count(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            self.requests.append(request.url.path)
            return await call_next(request)

        @app.get("/clip.mp4")
        async def clip() -> Response:
            return Response(MP4, media_type="video/mp4")

        @app.get("/missing.mp4")
        async def missing() -> Response:
            return Response(b"gone", status_code=404)

        @app.get("/to-octal.mp4")
        async def to_octal() -> Response:
            # httpx cannot even parse this Location.
            return Response(status_code=302, headers={"Location": self.url(octal=True)})

        @app.get("/to-hex.mp4")
        async def to_hex() -> Response:
            location = f"http://0x7f.1:{self.server.port}/clip.mp4"
            return Response(status_code=302, headers={"Location": location})

        self.server = RunningServer(app, free_socket())

    def url(self, path: str = "/clip.mp4", *, octal: bool = False) -> str:
        host = "0177.0.0.1" if octal else "127.0.0.1"
        return f"http://{host}:{self.server.port}{path}"


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    origin = Origin()
    await origin.server.start()
    yield origin
    await origin.server.stop()


async def post_task(
    service: Service, video: dict[str, Any], url: str, expire_at: Any = 4102444800
) -> dict[str, Any]:
    token = webhook_token(WEBHOOK_SECRET.encode(), uuid.UUID(video["id"]))
    task = {
        "taskId": video["task_id"],
        "status": "success",
        "output": [{"type": "video", "url": url, "expireAt": expire_at}],
    }
    ack = await service.client.post(f"/webhooks/hiapi/{video['id']}/{token}", json=task)
    assert ack.status_code == 200, ack.text
    body: dict[str, Any] = ack.json()
    return body


async def db_video(service: Service, video_id: str) -> Video:
    async with service.ctx.sessionmaker() as session:
        return (
            await session.execute(select(Video).where(Video.id == uuid.UUID(video_id)))
        ).scalar_one()


async def assert_failed_untouched(service: Service, video_id: str, code: str, what: str) -> None:
    """Failed with ``code`` at once: no download was claimed, no lease is held."""
    video = await service.get(video_id)
    assert video["status"] == "failed", (what, video)
    assert video["error"]["code"] == code, (what, video["error"])
    assert "output URL refused" in video["error"]["message"], (what, video["error"])
    row = await db_video(service, video_id)
    assert row.lease_owner is None and row.download_attempts == 0, what
    assert row.output_url is None, what


# --- units: one spelling per host --------------------------------------------------------


class TestCanonicalHosts:
    @pytest.mark.parametrize(
        ("host", "canonical"),
        [
            ("TEMP.HiApi.AI", "temp.hiapi.ai"),
            ("temp.hiapi.ai.", "temp.hiapi.ai"),
            ("xn--bcher-kva.hiapi.ai", "xn--bcher-kva.hiapi.ai"),
            ("127.0.0.1.", "127.0.0.1"),
            ("0:0:0:0:0:0:0:1", "::1"),
        ],
    )
    def test_one_spelling(self, host: str, canonical: str):
        assert canonical_host(host) == canonical

    @pytest.mark.parametrize(
        "host", ["0x7f.1", "2130706433", "127.1", "0x7f000001", "127.0.0.01", "1.2.3.4.5"]
    )
    def test_other_ipv4_spellings_are_refused_not_guessed(self, host: str):
        with pytest.raises(ValueError, match="IPv4 address"):
            canonical_host(host)

    @pytest.mark.parametrize(
        "url",
        [
            "http://0177.0.0.1:9100/x.mp4",
            "http://0x7f.1:9100/x.mp4",
            "http://2130706433:9100/x.mp4",
            "http://127.1:9100/x.mp4",
            "http://127.0.0.1:9100/a\tb.mp4",
            "http://127.0.0.1:9100/x.mp4\r\nX: 1",
            "http://127.0.0.1:99999/x.mp4",
            "http://[fe80::1%25eth0]:9100/x.mp4",
            "https://a..hiapi.ai/x.mp4",
            "https://a%41.hiapi.ai/x.mp4",
            "https://temp.hiapi.ai/" + "x" * 9000,
        ],
    )
    def test_unreadable_urls_are_bad_output_url(self, url: str):
        allow = HostAllowlist.parse("*.hiapi.ai, http://127.0.0.1:9100")
        with pytest.raises(Refused) as refused:
            allow.check(url)
        assert refused.value.code == "bad_output_url"

    def test_entries_are_read_in_the_same_spelling(self):
        allow = HostAllowlist.parse("*.HIAPI.AI., HTTP://LocalHost.:9100, [0::1]")
        url, rule = allow.check("https://Temp.HIAPI.ai./a%2Fb.mp4?X-Sig=a%2B")
        assert str(url) == "https://temp.hiapi.ai/a%2Fb.mp4?X-Sig=a%2B"  # escapes kept
        assert not rule.explicit
        assert str(allow.check("http://LOCALHOST.:9100/x.mp4")[0]) == "http://localhost:9100/x.mp4"
        assert allow.check("https://[::1]/x.mp4")[1].explicit

    def test_an_unreadable_entry_is_a_config_error(self):
        for spec in ("http://0x7f.1:9100", "temp.hiapi.ai:8443", "*.hiapi.ai/path"):
            with pytest.raises(ValueError, match="DOWNLOAD_ALLOWED_HOSTS"):
                HostAllowlist.parse(spec)


class TestVet:
    CHECK = OutputCheck(HostAllowlist.parse("*.hiapi.ai"), max_retry=timedelta(hours=1))
    NOW = datetime(2030, 1, 1, tzinfo=UTC)

    def task(self, url: str, expire_at: Any) -> Task:
        out = {"url": url, "expireAt": expire_at}
        return parse_task_payload({"taskId": "tk-1", "status": "success", "output": [out]})

    def test_a_refused_url_becomes_a_failed_task(self):
        vetted = self.CHECK.vet(self.task("ftp://temp.hiapi.ai/x.mp4", None), now=self.NOW)
        assert vetted.status == TaskStatus.fail and not vetted.output
        assert vetted.error is not None and vetted.error.code == "bad_output_url"

    @pytest.mark.parametrize(
        ("expire_at", "expected"),
        [
            (FAR_FUTURE, NOW + timedelta(hours=1)),
            (None, NOW + timedelta(hours=1)),
            (10**400, NOW + timedelta(hours=1)),  # used to overflow a float: a 500
            (int((NOW + timedelta(minutes=5)).timestamp()), NOW + timedelta(minutes=5)),
        ],
    )
    def test_expire_at_is_bounded(self, expire_at: Any, expected: datetime):
        vetted = self.CHECK.vet(self.task("https://TEMP.hiapi.ai./x.mp4", expire_at), now=self.NOW)
        assert vetted.output[0].url == "https://temp.hiapi.ai/x.mp4"
        assert vetted.output[0].expires_at == int(expected.timestamp())


# --- the webhook path ----------------------------------------------------------------------


class TestWebhook:
    async def test_each_hostile_output_url_fails_the_video_at_once(
        self, services: ServiceFactory, sim: Sim, origin: Origin
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(DOWNLOAD_ALLOWED_HOSTS=origin.url(""))
        port = origin.server.port
        cases = [
            (origin.url(octal=True), "bad_output_url"),  # httpx.URL raises
            (f"http://0x7f.1:{port}/clip.mp4", "bad_output_url"),
            (f"http://2130706433:{port}/clip.mp4", "bad_output_url"),
            (f"http://127.1:{port}/clip.mp4", "bad_output_url"),
            (origin.url("/a\tb.mp4"), "bad_output_url"),
            (origin.url("/clip.mp4\r\nX-Injected: 1"), "bad_output_url"),
            (f"ftp://127.0.0.1:{port}/clip.mp4", "bad_output_url"),
            (f"http://user:pw@127.0.0.1:{port}/clip.mp4", "bad_output_url"),
            ("/clip.mp4", "bad_output_url"),
            ("http://127.0.0.1:99999/clip.mp4", "bad_output_url"),
            ("https://files.example.invalid/clip.mp4", "host_not_allowed"),
        ]
        for url, code in cases:
            video = await service.submit()
            ack = await post_task(service, video, url)
            assert ack == {"outcome": "failed"}, (url, ack)
            await assert_failed_untouched(service, video["id"], code, url)
            # A duplicate of the same report changes nothing.
            assert (await post_task(service, video, url)) == {"outcome": "duplicate"}
        assert origin.requests == []
        assert service.ctx.runner.free_slots == service.settings.DOWNLOAD_CONCURRENCY

    async def test_trailing_dot_and_upper_case_spellings_are_admitted_and_download(
        self, services: ServiceFactory, sim: Sim, origin: Origin
    ):
        sim.set(callback_drop_rate=1.0)
        port = origin.server.port
        service = await services.start(
            DOWNLOAD_ALLOWED_HOSTS=f"http://127.0.0.1:{port},http://localhost:{port}"
        )
        for url, stored in [
            (f"http://127.0.0.1.:{port}/clip.mp4", f"http://127.0.0.1:{port}/clip.mp4"),
            (f"http://LocalHost.:{port}/clip.mp4", f"http://localhost:{port}/clip.mp4"),
        ]:
            video = await service.submit()
            assert (await post_task(service, video, url))["outcome"] == "download_claimed"
            done = await service.wait_for(video["id"], "ready", "failed", timeout=5)
            assert done["status"] == "ready", (url, done)
            assert done["size_bytes"] == len(MP4)
            assert (await db_video(service, video["id"])).output_url == stored

    async def test_an_expire_at_too_big_for_a_float_is_acknowledged(
        self, services: ServiceFactory, sim: Sim, origin: Origin
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(DOWNLOAD_ALLOWED_HOSTS=origin.url(""))
        video = await service.submit()
        assert (await post_task(service, video, origin.url(), expire_at=10**400))[
            "outcome"
        ] == "download_claimed"
        await service.wait_for(video["id"], "ready", timeout=5)


# --- the reconciler's poll path ------------------------------------------------------------


class TestPoll:
    async def test_each_hostile_output_url_found_by_polling_fails_the_video(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(RECONCILE_AFTER_SECONDS=0.2)
        port = sim.server.port
        cases = [
            (f"http://0177.0.0.1:{port}", "bad_output_url"),
            (f"http://127.0.0.1:{port}/a\tb", "bad_output_url"),
            (f"ftp://127.0.0.1:{port}", "bad_output_url"),
            (f"http://user:pw@127.0.0.1:{port}", "bad_output_url"),
            ("https://files.example.invalid", "host_not_allowed"),
        ]
        before = (await sim.stats())["file_requests"]
        for base, code in cases:
            sim.set(public_base_url=base)  # the base of the output URLs hiapi reports
            video = await service.submit()
            await service.wait_for(video["id"], "failed", "ready", "downloading", timeout=5)
            await assert_failed_untouched(service, video["id"], code, base)
            assert (await db_video(service, video["id"])).completed_via == "poll"
        assert (await sim.stats())["file_requests"] == before
        assert service.ctx.runner.free_slots == service.settings.DOWNLOAD_CONCURRENCY


# --- bounded retries -----------------------------------------------------------------------


class TestRetryBound:
    async def test_a_404_with_expire_at_in_5138_ends_expired_after_max_retry(
        self, services: ServiceFactory, sim: Sim, origin: Origin
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(
            DOWNLOAD_ALLOWED_HOSTS=origin.url(""), DOWNLOAD_MAX_RETRY_SECONDS=1.5
        )
        video = await service.submit()
        await post_task(service, video, origin.url("/missing.mp4"), expire_at=FAR_FUTURE)
        # Not 5138: the stored expiry below is the bound (the deadline only bounds a hang).
        done = await service.wait_for(video["id"], "failed", timeout=30)
        assert done["error"]["code"] == "expired"
        row = await db_video(service, video["id"])
        assert row.lease_owner is None and row.download_attempts >= 2
        assert "404" in (row.last_error or ""), row.last_error
        assert row.output_expires_at is not None and row.task_finished_at is not None
        assert row.output_expires_at <= row.task_finished_at + timedelta(seconds=1.5)

    async def test_a_row_stored_before_the_clamp_gets_the_same_bound(
        self, services: ServiceFactory, sim: Sim, origin: Origin
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(
            DOWNLOAD_ALLOWED_HOSTS=origin.url(""), DOWNLOAD_MAX_RETRY_SECONDS=1.5
        )
        video = await service.submit()
        await post_task(service, video, origin.url("/missing.mp4"))
        # As an older version stored it: hiapi's far-future expireAt, unclamped.
        async with service.ctx.sessionmaker() as session, session.begin():
            await session.execute(
                update(Video)
                .where(Video.id == uuid.UUID(video["id"]))
                .values(output_expires_at=datetime(5138, 11, 16, tzinfo=UTC))
            )
        done = await service.wait_for(video["id"], "failed", timeout=8)
        assert done["error"]["code"] == "expired"


# --- no exception wedges a download --------------------------------------------------------


class TestCrashes:
    async def test_an_unexpected_storage_error_is_recorded_and_retried_on_the_reconcilers_path(
        self, services: ServiceFactory, sim: Sim, capsys: pytest.CaptureFixture[str]
    ):
        # The callback is queued by a replica that never downloads; a worker's reconciler
        # claims it. The key's folder is a symlink out of STORAGE_DIR, so committing the clip
        # raises ValueError ("escapes the storage root"): no network or OS error.
        front = await services.start(DOWNLOAD_CONCURRENCY=0, RECONCILE_INTERVAL_SECONDS=3600)
        video = await front.submit()
        await front.wait_for(video["id"], "downloading")
        storage = front.ctx.storage
        folder = storage.path(storage.key_for(uuid.UUID(video["id"]))).parent
        outside = services.storage.parent / "outside"
        outside.mkdir()
        folder.symlink_to(outside, target_is_directory=True)

        root = logging.getLogger()
        saved = list(root.handlers), root.level
        try:
            configure_logging("INFO", "json")
            worker = await services.start(RETRY_BASE_SECONDS=0.1, RETRY_MAX_SECONDS=0.2)
            deadline = asyncio.get_running_loop().time() + 30
            while (row := await db_video(worker, video["id"])).download_attempts < 3:
                assert asyncio.get_running_loop().time() < deadline, row.download_attempts
                await asyncio.sleep(0.05)
        finally:
            for handler in list(root.handlers):
                if getattr(handler, "_videorelay", False):
                    root.removeHandler(handler)
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
        # Retried (each attempt gave the lease back), the error recorded, nothing stored.
        assert row.status == "downloading", row.status
        assert row.download_attempts >= 3, row.download_attempts
        assert "ValueError" in (row.last_error or ""), row.last_error
        assert not list(outside.iterdir())
        lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
        crashes = [x for x in lines if x["message"].startswith("download.crashed")]
        assert crashes, "no download.crashed line"
        assert all(x.get("video_id") == video["id"] for x in crashes), crashes[0]
        assert all(x.get("task_id") == video["task_id"] for x in crashes), crashes[0]
        # Mended: the next retry stores the clip.
        folder.unlink()
        done = await worker.wait_for(video["id"], "ready", timeout=10)
        assert done["size_bytes"] > 0
        assert (await db_video(worker, video["id"])).lease_owner is None

    async def test_an_unreadable_redirect_location_is_bad_redirect(
        self, services: ServiceFactory, sim: Sim, origin: Origin
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(DOWNLOAD_ALLOWED_HOSTS=origin.url(""))
        for path in ("/to-octal.mp4", "/to-hex.mp4"):
            video = await service.submit()
            await post_task(service, video, origin.url(path))
            done = await service.wait_for(video["id"], "failed", timeout=5)
            assert done["error"]["code"] == "bad_redirect", (path, done["error"])
            row = await db_video(service, video["id"])
            assert row.lease_owner is None and row.download_attempts == 1
        assert "/clip.mp4" not in origin.requests
