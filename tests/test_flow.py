"""End to end: videorelay and the simulator over real HTTP, on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from sqlalchemy import select

from app.metrics import METRICS
from app.models import Video
from app.security import webhook_token
from tests.conftest import HIAPI_KEY, WEBHOOK_SECRET, Service, ServiceFactory, Sim


def stored_path(service: Service, video_id: str):
    return service.ctx.storage.path(service.ctx.storage.key_for(uuid.UUID(video_id)))


async def db_video(service: Service, video_id: str) -> Video:
    async with service.ctx.sessionmaker() as session:
        return (
            await session.execute(select(Video).where(Video.id == uuid.UUID(video_id)))
        ).scalar_one()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        await asyncio.sleep(0.02)


def callback_path(video_id: str) -> str:
    token = webhook_token(WEBHOOK_SECRET.encode(), uuid.UUID(video_id))
    return f"/webhooks/hiapi/{video_id}/{token}"


class TestHappyPath:
    async def test_submit_to_stored_mp4_with_matching_sha256_and_range(
        self, service: Service, sim: Sim
    ):
        video = await service.submit(prompt="slow zoom", resolution="720p", duration=4)
        assert video["status"] in ("processing", "downloading", "ready")
        assert video["task_id"].startswith("tk-sim-")
        assert video["resolution"] == "720p" and video["duration"] == 4

        done = await service.wait_for(video["id"], "ready")
        assert (
            done["content_url"] == f"{service.settings.public_base}/v1/videos/{video['id']}/content"
        )
        assert done["error"] is None

        # The stored file is byte-for-byte the clip hiapi served.
        task = (
            await sim.client.get(
                f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
            )
        ).json()["data"]
        original = (await sim.client.get(task["output"][0]["url"])).content
        assert hashlib.sha256(original).hexdigest() == done["sha256"]
        assert len(original) == done["size_bytes"]

        content = await service.client.get(f"/v1/videos/{video['id']}/content")
        assert content.status_code == 200
        assert content.headers["content-type"] == "video/mp4"
        assert hashlib.sha256(content.content).hexdigest() == done["sha256"]
        assert content.headers.get("accept-ranges") == "bytes"

        part = await service.client.get(
            f"/v1/videos/{video['id']}/content", headers={"Range": "bytes=100-199"}
        )
        assert part.status_code == 206
        assert part.content == original[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(original)}"

        beyond = await service.client.get(
            f"/v1/videos/{video['id']}/content", headers={"Range": f"bytes={len(original) + 10}-"}
        )
        assert beyond.status_code == 416

        row = await db_video(service, video["id"])
        assert row.completed_via == "callback"
        assert (await sim.stats())["tasks_created"] == 1

    async def test_content_of_unfinished_video_is_409(self, service: Service, sim: Sim):
        sim.set(latency_seconds=5)
        video = await service.submit()
        response = await service.client.get(f"/v1/videos/{video['id']}/content")
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "not_ready"

    async def test_unknown_video_is_404_with_json(self, service: Service):
        response = await service.client.get(f"/v1/videos/{uuid.uuid4()}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        bad = await service.client.get("/v1/videos/not-a-uuid")
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "video_id"


class TestIdempotency:
    async def test_same_key_returns_same_video_and_creates_one_task(
        self, service: Service, sim: Sim
    ):
        body = {"image_url": "https://example.invalid/a.jpg", "duration": 3}
        headers = {"Idempotency-Key": "order-42"}
        first = await service.client.post("/v1/videos", json=body, headers=headers)
        second = await service.client.post("/v1/videos", json=body, headers=headers)
        assert first.status_code == 202
        assert second.status_code == 200
        assert second.headers["idempotent-replayed"] == "true"
        assert first.json()["id"] == second.json()["id"]
        assert (await sim.stats())["tasks_created"] == 1

    async def test_concurrent_same_key_creates_one_video(self, service: Service, sim: Sim):
        body = {"image_url": "https://example.invalid/a.jpg", "duration": 3}
        responses = await asyncio.gather(
            *(
                service.client.post("/v1/videos", json=body, headers={"Idempotency-Key": "k-1"})
                for _ in range(8)
            )
        )
        assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
        assert len({r.json()["id"] for r in responses}) == 1
        assert (await sim.stats())["tasks_created"] == 1

    async def test_same_key_different_body_is_409_and_changes_nothing(
        self, service: Service, sim: Sim
    ):
        headers = {"Idempotency-Key": "k-2"}
        await service.client.post(
            "/v1/videos", json={"image_url": "https://example.invalid/a.jpg"}, headers=headers
        )
        other = await service.client.post(
            "/v1/videos", json={"image_url": "https://example.invalid/b.jpg"}, headers=headers
        )
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_conflict"
        listing = (await service.client.get("/v1/videos")).json()
        assert len(listing["items"]) == 1
        assert (await sim.stats())["tasks_created"] == 1


class TestUpstreamErrors:
    async def test_rejected_key_fails_video_with_hiapi_code_and_502(
        self, services: ServiceFactory, sim: Sim
    ):
        sim.set(api_key="sk-the-right-key")
        service = await services.start()
        response = await service.client.post(
            "/v1/videos", json={"image_url": "https://example.invalid/a.jpg"}
        )
        assert response.status_code == 502
        body = response.json()
        assert body["error"]["code"] == "upstream_rejected"
        assert "permission_denied" in body["error"]["message"]
        assert body["video"]["status"] == "failed"
        assert body["video"]["error"]["code"] == "permission_denied"
        assert "cannot use the selected model" in body["video"]["error"]["message"]
        # Never retried: reconciler ticks (run here, so they surely ran) leave it alone.
        for _ in range(3):
            await service.ctx.reconciler.tick()
        assert (await sim.stats())["create_requests"] == 1
        assert "sk-test-key" not in response.text

    async def test_5xx_on_create_stays_queued_then_goes_out_once(self, service: Service, sim: Sim):
        sim.set(error_5xx_rate=1.0)
        video = await service.submit()
        assert video["status"] == "queued"
        assert video["task_id"] is None

        async def retried() -> bool:
            return (await sim.stats())["create_5xx"] >= 2  # retried with backoff

        await until(retried, "a second create answered 503")
        assert (await service.get(video["id"]))["status"] == "queued"
        sim.set(error_5xx_rate=0.0)
        done = await service.wait_for(video["id"], "ready")
        assert done["task_id"] is not None
        assert (await sim.stats())["tasks_created"] == 1

    async def test_unreachable_hiapi_stays_queued(self, services: ServiceFactory, sim: Sim):
        service = await services.start(HIAPI_BASE_URL="http://127.0.0.1:9")  # nothing listens
        video = await service.submit()
        assert video["status"] == "queued"
        row = await db_video(service, video["id"])
        assert row.submit_attempts >= 1 and "unreachable" in (row.last_error or "")

    async def test_ambiguous_timeout_adopts_the_late_callback_without_a_second_task(
        self, services: ServiceFactory, sim: Sim
    ):
        # The task is created but its create response comes too late: the callback arrives
        # before videorelay knows the taskId, and must be adopted, not lost or paid twice.
        sim.set(create_timeout_rate=1.0, timeout_delay_seconds=3.0, latency_seconds=0.2)
        service = await services.start(HIAPI_TIMEOUT_SECONDS=1.0, RECONCILE_AFTER_SECONDS=30)
        video = await service.submit()
        # The callback came while the create call was still waiting: already adopted.
        assert video["task_id"] is not None
        done = await service.wait_for(video["id"], "ready", timeout=15)
        assert done["task_id"].startswith("tk-sim-")
        assert (await sim.stats())["tasks_created"] == 1
        row = await db_video(service, video["id"])
        assert row.ambiguous_submits == 1

    async def test_failed_task_callback_marks_failed_with_hiapi_error(
        self, service: Service, sim: Sim
    ):
        sim.set(fail_rate=1.0)
        video = await service.submit()
        done = await service.wait_for(video["id"], "failed")
        assert done["error"]["code"] == "generation_failed"
        assert done["error"]["message"]
        assert done["content_url"] is None


class TestWebhook:
    async def test_bad_token_is_404_and_changes_nothing(self, service: Service, sim: Sim):
        sim.set(callback_drop_rate=1.0)
        video = await service.submit()
        before = await service.get(video["id"])
        task = {
            "taskId": video["task_id"],
            "status": "fail",
            "error": {"code": "x", "message": "y"},
        }
        for path in (
            f"/webhooks/hiapi/{video['id']}/{'0' * 40}",
            f"/webhooks/hiapi/{uuid.uuid4()}/{'0' * 40}",
            "/webhooks/hiapi/not-a-uuid/abc",
        ):
            response = await service.client.post(path, json=task)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
        assert await service.get(video["id"]) == before

    @pytest.mark.parametrize(
        "body", [b"not json", b"[]", b'{"taskId": "x"}', b'{"code": 200, "data": 5}']
    )
    async def test_malformed_callback_is_400_and_changes_nothing(
        self, service: Service, sim: Sim, body: bytes
    ):
        sim.set(callback_drop_rate=1.0)
        video = await service.submit()
        response = await service.client.post(
            callback_path(video["id"]), content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "bad_callback"
        assert (await service.get(video["id"]))["status"] == "processing"

    async def test_callback_with_another_videos_task_is_409(self, service: Service, sim: Sim):
        sim.set(callback_drop_rate=1.0)
        mine, other = await service.submit(), await service.submit()
        task = {
            "taskId": other["task_id"],
            "status": "fail",
            "error": {"code": "x", "message": "y"},
        }
        response = await service.client.post(callback_path(mine["id"]), json=task)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "foreign_task"
        assert (await service.get(mine["id"]))["status"] == "processing"
        assert (await service.get(other["id"]))["status"] == "processing"

    async def test_failure_of_a_stale_task_of_this_video_changes_nothing(
        self, service: Service, sim: Sim
    ):
        sim.set(callback_drop_rate=1.0)
        video = await service.submit()
        task = {"taskId": "tk-earlier", "status": "fail", "error": {"code": "x", "message": "y"}}
        response = await service.client.post(callback_path(video["id"]), json=task)
        assert response.status_code == 200
        assert response.json()["outcome"] == "stale_task"
        assert (await service.get(video["id"]))["status"] == "processing"

    async def test_success_of_an_earlier_task_rescues_a_failed_video(
        self, service: Service, sim: Sim
    ):
        # An ambiguous first create made task A, whose id we never stored; task B (the
        # retry) failed. A's success callback still arrives on the video's signed URL:
        # the paid clip is kept instead of lost.
        sim.set(callback_drop_rate=1.0, latency_seconds=30)
        video = await service.submit()
        earlier = (await service.submit())["task_id"]  # any real task with a real output
        await sim.client.post(f"/_sim/tasks/{video['task_id']}/complete?outcome=fail")
        failed_task = (
            await sim.client.get(
                f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
            )
        ).json()
        await service.client.post(callback_path(video["id"]), json=failed_task)
        assert (await service.get(video["id"]))["status"] == "failed"
        # Forge "task A": a finished task whose id no video has stored.
        done = (await sim.client.post(f"/_sim/tasks/{earlier}/complete?outcome=success")).json()
        data = done.get("data", done)
        rescue = {**data, "taskId": "tk-ambiguous-first-create"}
        response = await service.client.post(callback_path(video["id"]), json=rescue)
        assert response.json()["outcome"] == "download_claimed"
        ready = await service.wait_for(video["id"], "ready")
        assert ready["task_id"] == "tk-ambiguous-first-create"
        assert ready["error"] is None

    async def test_oversized_callback_is_413(self, service: Service, sim: Sim):
        sim.set(callback_drop_rate=1.0)
        video = await service.submit()
        response = await service.client.post(callback_path(video["id"]), content=b"x" * 300_000)
        assert response.status_code == 413

    async def test_duplicate_callbacks_from_hiapi_give_one_download(
        self, service: Service, sim: Sim
    ):
        sim.set(duplicate_rate=1.0)
        videos = [await service.submit() for _ in range(3)]
        for video in videos:
            await service.wait_for(video["id"], "ready")

        async def every_copy_answered() -> bool:
            tasks = (await sim.client.get("/_sim/tasks")).json()["tasks"]
            copies = sum(t["fate"]["callback_copies"] for t in tasks)
            return (await sim.stats())["callbacks_delivered"] == copies

        await until(every_copy_answered, "every callback copy answered 2xx")
        stats = await sim.stats()
        assert stats["callbacks_delivered"] >= 6
        assert stats["file_requests"] == 3

    async def test_concurrent_identical_callbacks_start_exactly_one_download(
        self, service: Service, sim: Sim
    ):
        sim.set(callback_drop_rate=1.0)
        video = await service.submit()
        await sim.client.post(f"/_sim/tasks/{video['task_id']}/complete")
        task = (
            await sim.client.get(
                f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
            )
        ).json()
        bodies = [task, task["data"]] * 6  # wrapped and bare copies
        responses = await asyncio.gather(
            *(service.client.post(callback_path(video["id"]), json=b) for b in bodies)
        )
        assert all(r.status_code == 200 for r in responses)
        outcomes = [r.json()["outcome"] for r in responses]
        assert outcomes.count("download_claimed") == 1
        assert outcomes.count("duplicate") == len(bodies) - 1
        await service.wait_for(video["id"], "ready")
        assert (await sim.stats())["file_requests"] == 1


class TestReconciler:
    async def test_lost_callback_is_recovered_by_polling(self, services: ServiceFactory, sim: Sim):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(RECONCILE_AFTER_SECONDS=1.5)
        video = await service.submit()
        row = await db_video(service, video["id"])
        assert row.submitted_at is not None
        assert (row.due_at - row.submitted_at).total_seconds() >= 1.5  # first poll's time
        for _ in range(2):  # ticks run here and now, well before that time: no poll yet
            await service.ctx.reconciler.tick()
        assert (await service.get(video["id"]))["status"] == "processing"
        assert (await sim.stats())["polls"] == 0
        done = await service.wait_for(video["id"], "ready")
        row = await db_video(service, video["id"])
        assert row.completed_via == "poll"
        totals = service.ctx.reconciler.totals

        async def counted() -> bool:  # a tick adds to its totals when it ends, maybe after this
            return totals.recovered >= 1

        await until(counted, "the tick that polled counted the recovery")
        assert totals.recovered == 1
        assert done["sha256"]

    async def test_poll_errors_back_off_then_recover(self, services: ServiceFactory, sim: Sim):
        sim.set(callback_drop_rate=1.0)
        service = await services.start(RECONCILE_AFTER_SECONDS=0.2)
        video = await service.submit()
        sim.set(error_5xx_rate=1.0)

        async def poll_failed() -> bool:
            return service.ctx.reconciler.totals.poll_errors >= 1

        await until(poll_failed, "a poll answered 503")
        assert (await service.get(video["id"]))["status"] == "processing"
        sim.set(error_5xx_rate=0.0)
        await service.wait_for(video["id"], "ready")

    async def test_two_replicas_recover_each_video_once(self, services: ServiceFactory, sim: Sim):
        sim.set(callback_drop_rate=1.0)
        a = await services.start(RECONCILE_AFTER_SECONDS=0.3)
        b = await services.start(RECONCILE_AFTER_SECONDS=0.3)
        videos = [await (a if i % 2 else b).submit() for i in range(10)]
        for video in videos:
            await a.wait_for(video["id"], "ready")

        async def recovered() -> int:
            return a.ctx.reconciler.totals.recovered + b.ctx.reconciler.totals.recovered

        async def all_counted() -> bool:  # each tick adds to its totals when it ends
            return await recovered() >= 10

        await until(all_counted, "the ticks that polled counted every recovery")
        assert await recovered() == 10
        assert (await sim.stats())["file_requests"] == 10


class TestDownloadQueue:
    """A success that finds no free download slot is queued in the database (``downloading``,
    no lease owner, due at once) and taken by the first process with a free slot."""

    async def test_a_webhook_only_replica_queues_and_a_worker_downloads_each_once(
        self, services: ServiceFactory, sim: Sim
    ):
        # The replica that takes the callbacks never downloads, and its reconciler sleeps.
        front = await services.start(DOWNLOAD_CONCURRENCY=0, RECONCILE_INTERVAL_SECONDS=3600)
        videos = [await front.submit() for _ in range(3)]
        for video in videos:
            await front.wait_for(video["id"], "downloading")
        await front.ctx.reconciler.tick()  # a tick of its own claims nothing either
        for video in videos:
            row = await db_video(front, video["id"])
            assert row.status == "downloading" and row.lease_owner is None
            assert row.download_attempts == 0
        assert (await sim.stats())["file_requests"] == 0
        # One slot, one tick at start-up and none after: the worker claims one video at its
        # tick, then the next each time a download ends, without waiting for another tick.
        worker = await services.start(DOWNLOAD_CONCURRENCY=1, RECONCILE_INTERVAL_SECONDS=3600)
        for video in videos:
            await worker.wait_for(video["id"], "ready")
            row = await db_video(worker, video["id"])
            assert row.download_attempts == 1  # claimed once: no lease ran out while waiting
        assert (await sim.stats())["file_requests"] == 3
        assert worker.ctx.runner.free_slots == 1

    async def test_a_full_replica_queues_the_rest_and_catches_up_without_a_tick(
        self, services: ServiceFactory, sim: Sim
    ):
        # Four tasks finish together; each download takes a while.
        sim.set(latency_seconds=0.3, download_bytes_per_second=200_000)
        queued = METRICS.callbacks.labels("download_queued")._value.get()
        service = await services.start(DOWNLOAD_CONCURRENCY=1, RECONCILE_INTERVAL_SECONDS=3600)
        videos = await asyncio.gather(*(service.submit() for _ in range(4)))
        for video in videos:
            await service.wait_for(video["id"], "ready")
        assert METRICS.callbacks.labels("download_queued")._value.get() - queued >= 2
        rows = [await db_video(service, video["id"]) for video in videos]
        assert all(row.download_attempts == 1 for row in rows)
        assert (await sim.stats())["file_requests"] == 4
        assert service.ctx.runner.free_slots == 1

    async def test_a_caller_that_hangs_up_before_the_ack_still_gets_its_download(
        self, services: ServiceFactory, sim: Sim
    ):
        """A callback whose sender disconnects before the answer is still stored and
        downloaded, and its download slot is given back."""
        sim.set(callback_drop_rate=1.0)
        service = await services.start(DOWNLOAD_CONCURRENCY=1, RECONCILE_INTERVAL_SECONDS=3600)
        video = await service.submit()
        async with httpx.AsyncClient(base_url=sim.url) as hiapi:
            for _ in range(100):
                task = (
                    await hiapi.get(
                        f"/v1/tasks/{video['task_id']}",
                        headers={"Authorization": f"Bearer {HIAPI_KEY}"},
                    )
                ).json()["data"]
                if task["status"] == "success":
                    break
                await asyncio.sleep(0.05)
        body = json.dumps(task).encode()
        port = int(service.server.url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST {callback_path(video['id'])} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()  # gone before the answer
        # Well within the 10 s lease: nobody else would have taken it over by then.
        await service.wait_for(video["id"], "ready", timeout=5)
        for _ in range(50):
            if service.ctx.runner.free_slots == 1:
                break
            await asyncio.sleep(0.05)
        assert service.ctx.runner.free_slots == 1


class TestDownloadFailures:
    async def test_expired_url_fails_with_expired(self, service: Service, sim: Sim):
        sim.set(url_ttl_seconds=0.0)
        video = await service.submit()
        done = await service.wait_for(video["id"], "failed")
        assert done["error"]["code"] == "expired"

    async def test_disallowed_host_is_never_downloaded(self, services: ServiceFactory, sim: Sim):
        service = await services.start(DOWNLOAD_ALLOWED_HOSTS="*.hiapi.ai")
        video = await service.submit()
        done = await service.wait_for(video["id"], "failed")
        assert done["error"]["code"] == "host_not_allowed"
        assert (await sim.stats())["file_requests"] == 0

    async def test_too_large_clip_is_refused(self, services: ServiceFactory, sim: Sim):
        sim.set(pad_bytes=2_000_000)
        service = await services.start(MAX_VIDEO_BYTES=1_000_000)
        video = await service.submit()
        done = await service.wait_for(video["id"], "failed")
        assert done["error"]["code"] == "too_large"
        assert not list(service.ctx.storage.partial_dir.iterdir())

    async def test_transient_download_errors_are_retried(self, service: Service, sim: Sim):
        # The first download attempt races a file that isn't served: a 404 before expireAt
        # is retried with backoff until it succeeds.
        sim.set(callback_drop_rate=1.0)
        video = await service.submit()
        await sim.client.post(f"/_sim/tasks/{video['task_id']}/complete")
        task = (
            await sim.client.get(
                f"/v1/tasks/{video['task_id']}", headers={"Authorization": "Bearer sk-x"}
            )
        ).json()["data"]
        good_url = task["output"][0]["url"]
        task["output"][0]["url"] = good_url.replace(".mp4", "missing.mp4")
        await service.client.post(callback_path(video["id"]), json=task)

        async def retried() -> bool:
            return (await db_video(service, video["id"])).download_attempts >= 2

        await until(retried, "a second download attempt")
        row = await db_video(service, video["id"])
        assert row.status == "downloading"
        assert "404" in (row.last_error or "")


class TestLongAndLostTasks:
    async def test_a_download_slower_than_the_lease_is_not_taken_over(
        self, services: ServiceFactory, sim: Sim
    ):
        # 3 MB at 1 MB/s against a 1 s lease: only the heartbeat keeps the lease alive.
        sim.set(pad_bytes=3_000_000, download_bytes_per_second=1_000_000)
        service = await services.start(DOWNLOAD_LEASE_SECONDS=1.0)
        video = await service.submit()
        await service.wait_for(video["id"], "ready", timeout=30)
        row = await db_video(service, video["id"])
        assert row.download_attempts == 1
        assert (await sim.stats())["file_requests"] == 1

    async def test_poll_of_a_task_hiapi_does_not_know_fails_the_video(
        self, services: ServiceFactory, sim: Sim
    ):
        from datetime import timedelta

        from app import lifecycle
        from app.db import utc_now

        service = await services.start(RECONCILE_AFTER_SECONDS=0.2)
        async with service.ctx.sessionmaker() as session, session.begin():
            video, _ = await lifecycle.create_video(
                session,
                params=lifecycle.NewVideo("https://example.invalid/a.jpg", None, "720p", 3),
                idempotency_key=None,
                now=utc_now(),
                submit_hold=timedelta(seconds=60),
            )
            await lifecycle.record_submit_success(
                session,
                video_id=video.id,
                task_id="tk-gone",
                now=utc_now(),
                poll_after=timedelta(0),
            )
        done = await service.wait_for(str(video.id), "failed")
        assert done["error"]["code"] == "task_not_found"

    async def test_a_task_running_too_long_is_given_up(self, services: ServiceFactory, sim: Sim):
        sim.set(latency_seconds=60, callback_drop_rate=1.0)
        service = await services.start(RECONCILE_AFTER_SECONDS=0.2, TASK_TIMEOUT_SECONDS=1.0)
        video = await service.submit()
        done = await service.wait_for(video["id"], "failed", timeout=15)
        assert done["error"]["code"] == "task_timeout"
