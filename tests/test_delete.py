"""DELETE /v1/videos/{id} through real HTTP on SQLite and Postgres: the tombstone, the files
gone from local disk and S3, who may delete, and deleting a video in each state."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app import lifecycle, spend
from app.metrics import METRICS
from app.models import Notification, Status, Video
from tests.conftest import Service, ServiceFactory, Sim
from tests.test_client_tokens import ALICE, BOB, KEYS, SECRET, Clock, auth, mint
from tests.test_flow import callback_path, db_video, stored_path, until
from tests.test_storage_s3 import (  # noqa: F401  (fixtures)
    Bucket,
    aws_env,
    bucket,
    moto_endpoint,
    s3_settings,
)


def deleted_count(reason: str) -> float:
    value: float = METRICS.deleted.labels(reason)._value.get()
    return value


async def finished_task(service: Service, sim: Sim, **body: Any) -> tuple[dict[str, Any], Any]:
    """A processing video whose task hiapi finished, its callback held back: the test
    delivers it. Returns the video and the task as hiapi reports it."""
    sim.set(callback_drop_rate=1.0)
    video = await service.submit(**body)
    assert video["status"] == "processing"
    done = await sim.client.post(f"/_sim/tasks/{video['task_id']}/complete")
    return video, done.json()["data"]


async def assert_gone(service: Service, video_id: str, headers: dict[str, str] | None = None):
    """What a client sees of a deleted video: 404 at every URL, and not in the list."""
    for path in ("", "/content", "/events"):
        response = await service.client.get(f"/v1/videos/{video_id}{path}", headers=headers)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    listed = await service.client.get("/v1/videos", headers=headers)
    assert video_id not in [v["id"] for v in listed.json()["items"]]
    again = await service.client.delete(f"/v1/videos/{video_id}", headers=headers)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


async def no_files(service: Service, video_id: str) -> bool:
    storage = service.ctx.storage
    partials = list(storage.partial_dir.glob(f"{video_id}.*"))
    return not stored_path(service, video_id).exists() and not partials


class TestDeleteReady:
    async def test_the_clip_goes_and_a_tombstone_stays(self, service: Service, sim: Sim):
        video = await service.submit(prompt="ann's birthday", metadata={"user": "ann@example.com"})
        await service.wait_for(video["id"], "ready")
        path = stored_path(service, video["id"])
        assert path.is_file()
        keep = await service.submit()  # another video, untouched
        await service.wait_for(keep["id"], "ready")
        before = deleted_count("api")

        response = await service.client.delete(f"/v1/videos/{video['id']}")
        assert response.status_code == 204 and response.content == b""
        assert not path.exists()
        await assert_gone(service, video["id"])

        row = await db_video(service, video["id"])
        assert row.status == Status.deleted and row.deleted_at is not None
        assert row.storage_key is None and row.poster_key is None and row.output_url is None
        # Nothing the caller wrote stays on the tombstone (a deletion request must be met).
        assert (row.prompt, row.meta, row.notify_url, row.image_url) == (None, None, None, "")
        assert deleted_count("api") - before == 1
        # The other video and its clip are still there.
        assert (await service.get(keep["id"]))["status"] == "ready"
        assert stored_path(service, keep["id"]).is_file()
        listed = await service.client.get("/v1/videos")
        assert [v["id"] for v in listed.json()["items"]] == [keep["id"]]
        metrics = (await service.client.get("/metrics")).text
        assert 'videorelay_videos_deleted_total{reason="api"}' in metrics
        assert 'videorelay_videos{status="deleted"} 1.0' in metrics

    async def test_a_late_callback_finds_the_tombstone_and_does_nothing(
        self, service: Service, sim: Sim
    ):
        video = await service.submit()
        await service.wait_for(video["id"], "ready")
        task = (
            await sim.client.get(
                f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
            )
        ).json()["data"]
        assert (await service.client.delete(f"/v1/videos/{video['id']}")).status_code == 204
        files = (await sim.stats())["file_requests"]

        late = await service.client.post(callback_path(video["id"]), json=task)
        assert late.status_code == 200
        await service.ctx.reconciler.tick()
        row = await db_video(service, video["id"])
        assert row.status == Status.deleted and row.output_url is None
        assert (await sim.stats())["file_requests"] == files
        assert await no_files(service, video["id"])

    async def test_status_deleted_is_not_a_list_filter(self, service: Service):
        response = await service.client.get("/v1/videos", params={"status": "deleted"})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["field"] == "status" and "not listed" in error["message"]

    async def test_pending_notify_deliveries_are_dropped(self, services: ServiceFactory, sim: Sim):
        # The notifier never gets to send (its receiver is a closed port, retried later).
        service = await services.start(
            NOTIFY_SECRET="whsec_" + "A" * 32, NOTIFY_ALLOW_LOCAL=True, NOTIFY_MAX_ATTEMPTS=50
        )
        video = await service.submit(notify_url="http://127.0.0.1:9/hook")
        await service.wait_for(video["id"], "ready")
        assert (await service.client.delete(f"/v1/videos/{video['id']}")).status_code == 204
        async with service.ctx.sessionmaker() as session:
            notes = (
                (
                    await session.execute(
                        select(Notification).where(Notification.video_id == uuid.UUID(video["id"]))
                    )
                )
                .scalars()
                .all()
            )
        assert [(n.status, n.last_error) for n in notes] == [("failed", "video deleted")]


class TestWhoMayDelete:
    async def test_keys_subjects_and_scopes(self, services: ServiceFactory, sim: Sim):
        service = await services.start(API_KEYS=KEYS, CLIENT_TOKEN_SECRET=SECRET, clock=Clock())
        user1 = await mint(service, subject="user-1")
        user2 = await mint(service, subject="user-2")
        reader = await mint(service, subject="user-1", scopes=["videos:read"])
        made = await service.client.post(
            "/v1/videos",
            json={"image_url": "https://example.invalid/a.jpg", "duration": 3},
            headers=auth(user1),
        )
        assert made.status_code == 202, made.text
        video_id = made.json()["id"]
        await until(
            lambda: _status_is(service, video_id, "ready"), "the video is ready", timeout=20
        )
        url = f"/v1/videos/{video_id}"

        # Another key and another end user see no such video; a read-only token may not delete.
        for bearer, code in ((BOB, 404), (user2, 404), (reader, 403)):
            refused = await service.client.delete(url, headers=auth(bearer))
            assert refused.status_code == code, refused.text
        assert refused.json()["error"]["code"] == "insufficient_scope"
        assert "videos:create" in refused.json()["error"]["message"]
        # A signed content URL grants reading, never deleting.
        content_url = (await service.client.get(url, headers=auth(ALICE))).json()["content_url"]
        signed = await service.client.delete(url + "?" + httpx.URL(content_url).query.decode())
        assert signed.status_code == 401
        assert (await db_video(service, video_id)).status == Status.ready
        assert stored_path(service, video_id).is_file()

        # The end user who made it may; then it is gone for its key too.
        assert (await service.client.delete(url, headers=auth(user1))).status_code == 204
        await assert_gone(service, video_id, headers=auth(ALICE))


async def _status_is(service: Service, video_id: str, status: str) -> bool:
    return (await db_video(service, video_id)).status == status


class TestDeleteBeforeReady:
    async def test_queued_gets_no_task_and_its_seconds_back(
        self, services: ServiceFactory, sim: Sim
    ):
        service = await services.start(DAILY_VIDEO_SECONDS_LIMIT=100)
        sim.set(error_5xx_rate=1.0)  # hiapi is down: the video stays queued
        video = await service.submit(duration=7)
        assert video["status"] == "queued"
        day = (await db_video(service, video["id"])).created_at.date()
        async with service.ctx.sessionmaker() as session:
            assert await spend.spent(session, owner="", day=day) == 7

        assert (await service.client.delete(f"/v1/videos/{video['id']}")).status_code == 204
        async with service.ctx.sessionmaker() as session:
            assert await spend.spent(session, owner="", day=day) == 0
        await assert_gone(service, video["id"])

        # hiapi comes back; the reconciler's next ticks never send the deleted video.
        sim.set(error_5xx_rate=0.0)
        async with service.ctx.sessionmaker() as session, session.begin():
            await session.execute(
                update(Video)
                .where(Video.id == uuid.UUID(video["id"]))
                .values(due_at=service.ctx.clock())
            )
        creates = (await sim.stats())["create_requests"]
        for _ in range(3):
            await service.ctx.reconciler.tick()
        assert (await sim.stats())["create_requests"] == creates
        assert (await sim.stats())["tasks_created"] == 0

    async def test_queued_while_its_first_create_is_in_flight_is_not_refunded(
        self, services: ServiceFactory, sim: Sim
    ):
        # The create call hangs (a timeout): the video is queued with a create in flight,
        # which may yet make a task hiapi bills. Deleting it then refunds nothing.
        service = await services.start(DAILY_VIDEO_SECONDS_LIMIT=100, HIAPI_TIMEOUT_SECONDS=30)
        sim.set(create_timeout_rate=1.0, timeout_delay_seconds=2.0, callback_drop_rate=1.0)
        posting = asyncio.create_task(
            service.client.post(
                "/v1/videos", json={"image_url": "https://example.invalid/a.jpg", "duration": 5}
            )
        )
        await until(lambda: _one_video(service), "the video is stored")
        video_id = str(await _only_video_id(service))
        assert (await db_video(service, video_id)).status == Status.queued

        assert (await service.client.delete(f"/v1/videos/{video_id}")).status_code == 204
        created = await posting  # the create answers after all: the task exists upstream
        assert created.status_code == 202
        assert created.json()["status"] == "deleted"
        row = await db_video(service, video_id)
        assert row.status == Status.deleted and row.task_id is None
        async with service.ctx.sessionmaker() as session:
            assert await spend.spent(session, owner="", day=row.created_at.date()) == 5

    async def test_processing_is_never_downloaded(self, service: Service, sim: Sim):
        video, task = await finished_task(service, sim)
        assert (await service.client.delete(f"/v1/videos/{video['id']}")).status_code == 204
        files = (await sim.stats())["file_requests"]
        # The task's result arrives after the deletion, by callback and by a poll.
        late = await service.client.post(callback_path(video["id"]), json=task)
        assert late.status_code == 200
        async with service.ctx.sessionmaker() as session, session.begin():
            await session.execute(
                update(Video)
                .where(Video.id == uuid.UUID(video["id"]))
                .values(due_at=service.ctx.clock())
            )
        await service.ctx.reconciler.tick()
        assert (await sim.stats())["file_requests"] == files
        row = await db_video(service, video["id"])
        assert row.status == Status.deleted and row.output_url is None
        assert await no_files(service, video["id"])
        await assert_gone(service, video["id"])

    async def test_a_download_in_flight_stops_and_leaves_no_file(
        self, services: ServiceFactory, sim: Sim
    ):
        # A 4 MB clip at 1 MB/s; the lease is renewed every 0.5 s.
        service = await services.start(DOWNLOAD_LEASE_SECONDS=1.5)
        sim.set(pad_bytes=4 * 1024 * 1024, download_bytes_per_second=1024 * 1024)
        video, task = await finished_task(service, sim)
        assert (await service.client.post(callback_path(video["id"]), json=task)).status_code == 200
        partials = service.ctx.storage.partial_dir
        await until(
            lambda: _has_partial(partials, video["id"]), "the download has started", timeout=10
        )
        stopped = METRICS.downloads.labels("stopped")._value.get()

        assert (await service.client.delete(f"/v1/videos/{video['id']}")).status_code == 204
        await until(lambda: _idle(service), "the download has stopped", timeout=10)
        assert METRICS.downloads.labels("stopped")._value.get() - stopped == 1
        assert await no_files(service, video["id"])
        assert (await db_video(service, video["id"])).status == Status.deleted
        await assert_gone(service, video["id"])


async def _one_video(service: Service) -> bool:
    return await _only_video_id(service) is not None


async def _only_video_id(service: Service) -> uuid.UUID | None:
    async with service.ctx.sessionmaker() as session:
        return (await session.execute(select(Video.id))).scalar_one_or_none()


async def _has_partial(partials: Any, video_id: str) -> bool:
    return any(partials.glob(f"{video_id}.*.part"))


async def _idle(service: Service) -> bool:
    return service.ctx.runner.active == 0


class TestS3:
    async def test_the_object_is_removed_from_the_bucket(
        self,
        services: ServiceFactory,
        sim: Sim,
        bucket: Bucket,  # noqa: F811
    ):
        service = await services.start(**s3_settings(bucket))
        video = await service.submit()
        keep = await service.submit()
        await service.wait_for(video["id"], "ready")
        await service.wait_for(keep["id"], "ready")
        assert len(await bucket.keys()) == 4  # two clips, each with its poster

        assert (await service.client.delete(f"/v1/videos/{video['id']}")).status_code == 204
        assert await bucket.keys() == _with_poster(bucket.object_name(keep["id"]))
        assert await bucket.uploads() == []
        await assert_gone(service, video["id"])

    async def test_store_down_deletes_the_video_and_the_reconciler_removes_the_object(
        self,
        services: ServiceFactory,
        sim: Sim,
        bucket: Bucket,  # noqa: F811
    ):
        clock = Clock()
        healthy = await services.start(**s3_settings(bucket), clock=clock)
        video = await healthy.submit()
        await healthy.wait_for(video["id"], "ready")
        name = bucket.object_name(video["id"])
        # A second replica whose S3 endpoint is down (nothing listens there).
        down = await services.start(**s3_settings(bucket, endpoint="http://127.0.0.1:9"))
        kept = METRICS.deleted_files_kept._value.get()

        assert (await down.client.delete(f"/v1/videos/{video['id']}")).status_code == 204
        assert METRICS.deleted_files_kept._value.get() - kept == 1
        await assert_gone(healthy, video["id"])
        row = await db_video(healthy, video["id"])
        assert row.status == Status.deleted and row.storage_key is not None
        # Still there: the store could not be reached.
        assert await bucket.keys() == _with_poster(name)

        # The healthy replica's reconciler retries once the retry time has come.
        await healthy.ctx.reconciler.tick()
        assert await bucket.keys() == _with_poster(name)  # not yet due
        clock.offset = timedelta(seconds=120)
        await until(lambda: _keys_cleared(healthy, video["id"]), "the reconciler's removal")
        assert await bucket.keys() == []
        assert (await db_video(healthy, video["id"])).status == Status.deleted


def _with_poster(name: str) -> list[str]:
    """A clip's object name and its poster's, as the bucket lists them."""
    return sorted([name, name.removesuffix(".mp4") + ".jpg"])


async def _keys_cleared(service: Service, video_id: str) -> bool:
    return (await db_video(service, video_id)).storage_key is None


RACE_ROUNDS = 20
# How long the DELETE is released after the callback, round by round: from together to after
# the callback's download has begun, so both orders and the overlaps in between occur.
RACE_OFFSETS = (0.0, 0.0, 0.005, 0.01, 0.02, 0.04, 0.08)


class TestRaceWithACallback:
    async def test_delete_and_callback_at_once_on_two_replicas(
        self, services: ServiceFactory, sim: Sim, record_property: Any
    ):
        """The callback of a finished task reaches one replica while DELETE reaches another,
        released together, ``RACE_ROUNDS`` times. Whichever wins, the video ends deleted with
        no file and no partial file, and no download is left running."""
        webhook = await services.start()
        api = await services.start()
        sim.set(pad_bytes=256 * 1024)  # a download takes a moment, so some overlap a delete
        outcomes: dict[str, int] = {"downloaded_first": 0, "never_downloaded": 0}
        for round_ in range(RACE_ROUNDS):
            video, task = await finished_task(api, sim)
            files = (await sim.stats())["file_requests"]
            start = asyncio.Event()
            offset = RACE_OFFSETS[round_ % len(RACE_OFFSETS)]
            racing = asyncio.gather(
                _when(start, webhook.client.post(callback_path(video["id"]), json=task)),
                _when(start, api.client.delete(f"/v1/videos/{video['id']}"), offset),
            )
            await asyncio.sleep(0)  # both wait on the event
            start.set()
            called, deleted = await racing
            assert called.status_code == 200 and deleted.status_code == 204
            await until(lambda: _all_idle(webhook, api), "no download left running")

            row = await db_video(api, video["id"])
            assert row.status == Status.deleted and row.output_url is None
            assert await no_files(api, video["id"]), "a file survived the deletion"
            assert row.storage_key is None  # removed, nothing left for the reconciler
            fetched = (await sim.stats())["file_requests"] - files
            outcomes["downloaded_first" if fetched else "never_downloaded"] += 1
            await assert_gone(api, video["id"])
        record_property("race_outcomes", outcomes)


async def _when(
    start: asyncio.Event, request: Awaitable[httpx.Response], offset: float = 0.0
) -> httpx.Response:
    await start.wait()
    if offset:
        await asyncio.sleep(offset)  # staggers the two requests; waits for nothing
    return await request


async def _all_idle(*replicas: Service) -> bool:
    return all(replica.ctx.runner.active == 0 for replica in replicas)


class TestDeletedBetweenCommitAndReady:
    @pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
    async def test_the_download_removes_the_file_it_just_committed(
        self, service: Service, sim: Sim
    ):
        """The narrowest window: the clip is committed to storage, and the video is deleted
        before ``mark_ready`` runs. A row lock (Postgres) holds ``mark_ready`` in that window
        while another replica's deletion is written; the download then finds the row deleted
        and removes its file itself."""
        # A 3 MB clip at 2 MB/s, written 1 MB at a time.
        sim.set(pad_bytes=3 * 1024 * 1024, download_bytes_per_second=2 * 1024 * 1024)
        video, task = await finished_task(service, sim)
        video_id = uuid.UUID(video["id"])
        removed = METRICS.downloads.labels("deleted")._value.get()
        response = await service.client.post(callback_path(video["id"]), json=task)
        assert response.status_code == 200
        # Its first bytes are written (its lease confirmed): lock the row from now on.
        partials = service.ctx.storage.partial_dir
        await until(lambda: _has_partial(partials, video["id"]), "the download has started")
        async with service.ctx.sessionmaker() as session, session.begin():
            locked = await session.execute(
                select(Video.status).where(Video.id == video_id).with_for_update()
            )
            assert locked.scalar_one() == Status.downloading
            await until(lambda: _stored(service, video["id"]), "the clip is committed")
            deletion = await lifecycle.delete_video(
                session,
                video_id=video_id,
                storage_key=service.ctx.storage.key_for(video_id),
                now=service.ctx.clock(),
                retry_at=service.ctx.clock() + timedelta(hours=1),  # no reconciler help
            )
            assert deletion is not None and not deletion.refunded
        await until(lambda: _all_idle(service), "the download has ended")
        assert METRICS.downloads.labels("deleted")._value.get() - removed == 1
        assert await no_files(service, video["id"])
        assert (await db_video(service, video["id"])).status == Status.deleted


async def _stored(service: Service, video_id: str) -> bool:
    return stored_path(service, video_id).exists()


class TestRetention:
    async def test_old_ready_and_failed_videos_go_in_bounded_batches(
        self, services: ServiceFactory, sim: Sim
    ):
        clock = Clock()
        # The background tick runs once at start, then the test ticks by hand.
        service = await services.start(
            clock=clock,
            VIDEO_RETENTION_SECONDS=3600,
            RECONCILE_BATCH_SIZE=1,
            RECONCILE_INTERVAL_SECONDS=3600,
        )
        ready = [await service.submit() for _ in range(2)]
        for video in ready:
            await service.wait_for(video["id"], "ready")
        sim.set(fail_rate=1.0)
        failed = await service.submit()
        await service.wait_for(failed["id"], "failed")
        sim.set(fail_rate=0.0, latency_seconds=3600)
        running = await service.submit()  # stays processing: never deleted by retention
        before = deleted_count("retention")

        assert (await service.ctx.reconciler.tick()).videos_expired == 0  # none old enough
        clock.offset = timedelta(hours=2)
        fresh = await service.submit()  # created after the others' retention ran out
        expired = [(await service.ctx.reconciler.tick()).videos_expired for _ in range(4)]
        assert expired == [1, 1, 1, 0]  # RECONCILE_BATCH_SIZE per tick, then nothing left

        assert deleted_count("retention") - before == 3
        for video in [*ready, failed]:
            await assert_gone(service, video["id"])
            assert await no_files(service, video["id"])
            row = await db_video(service, video["id"])
            assert row.status == Status.deleted and row.storage_key is None
        assert (await service.get(running["id"]))["status"] == "processing"
        assert (await service.get(fresh["id"]))["status"] == "processing"
