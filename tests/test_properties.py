"""Property tests: any interleaving of callbacks, polls, submit outcomes and download steps
keeps the state machine's promises: at most one download is ever claimed and at most one
completes; ``ready`` is final; ``failed`` is final except that the success of another task of
the same video (an earlier, ambiguous create) may still rescue it into ``downloading``.

Callbacks go through ``apply_reports`` (the webhook's batched path), each with a duplicate
copy in the same batch; polls go through ``apply_task``.

Each example drives one fresh video through the real ``lifecycle`` functions on a real
database (SQLite and Postgres), sometimes firing several events at once on separate sessions.
Then the service's own recovery runs to the end (the create goes out, the reconciler polls the
stored task, an expired download lease is taken over and the copy completes): every video ends
in exactly one terminal state, and no later copy of a callback or poll moves it.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import lifecycle, repository
from app.db import create_engine, create_sessionmaker, utc_now
from app.hiapi.schemas import Task
from app.models import Status, Via

LEASE = timedelta(seconds=30)
PARAMS = lifecycle.NewVideo(
    image_url="https://example.invalid/a.jpg", prompt=None, resolution="720p", duration=3
)
TERMINAL = {Status.ready.value, Status.failed.value}

task_status = st.sampled_from(["success", "fail", "handling"])
task_name = st.sampled_from(["A", "A", "A", "B"])  # mostly the stored task, sometimes another
event = st.one_of(
    st.tuples(st.just("callback"), task_status, task_name),
    st.tuples(st.just("poll"), task_status, task_name),
    st.tuples(st.just("submit_ok"), st.just(""), task_name),
    st.tuples(st.just("submit_retry"), st.sampled_from(["ambiguous", "plain"]), st.just("")),
    st.tuples(st.just("submit_rejected"), st.just(""), st.just("")),
    st.tuples(st.just("download_done"), st.just(""), st.just("")),
    st.tuples(st.just("download_retry"), st.just(""), st.just("")),
    st.tuples(st.just("lease_expires"), st.just(""), st.just("")),
)
# A step is one event, or several fired concurrently on separate sessions.
step = st.lists(event, min_size=1, max_size=4)


def make_task(status: str, name: str, run: str) -> Task:
    body: dict[str, Any] = {"taskId": f"tk-{run}-{name}", "status": status}
    if status == "success":
        body["output"] = [
            {"type": "video", "url": "https://temp.hiapi.ai/x.mp4", "expireAt": 4102444800}
        ]
    if status == "fail":
        body["error"] = {"code": "boom", "message": "upstream failure"}
    return Task.model_validate(body)


@dataclass
class Run:
    sm: Any
    video_id: uuid.UUID
    run: str
    clock_offset: timedelta = timedelta(0)
    downloads_started: int = 0
    downloads_completed: int = 0
    owners: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    seen_success: bool = False

    def now(self):
        return utc_now() + self.clock_offset

    async def fire(self, kind: str, arg: str, name: str) -> None:
        async with self.sm() as session, session.begin():
            if kind == "callback":
                # The webhook's group commit: here hiapi's copy of the callback lands in the
                # same batch, so at most one of the two may claim.
                task = make_task(arg, name, self.run)
                reports = [
                    lifecycle.TaskReport(self.video_id, task, Via.callback, uuid.uuid4().hex)
                    for _ in range(2)
                ]
                outcomes = await lifecycle.apply_reports(
                    session, reports, now=self.now(), lease=LEASE
                )
                for report, outcome in zip(reports, outcomes, strict=True):
                    if outcome == lifecycle.ApplyOutcome.download_claimed:
                        assert report.owner is not None
                        self.downloads_started += 1
                        self.owners.append(report.owner)
                        self.seen_success = True
            elif kind == "poll":
                task = make_task(arg, name, self.run)
                owner = uuid.uuid4().hex
                outcome = await lifecycle.apply_task(
                    session,
                    video_id=self.video_id,
                    task=task,
                    via=Via.poll,
                    owner=owner,
                    now=self.now(),
                    lease=LEASE,
                )
                if outcome == lifecycle.ApplyOutcome.download_claimed:
                    self.downloads_started += 1
                    self.owners.append(owner)
                    self.seen_success = True
            elif kind == "submit_ok":
                await lifecycle.record_submit_success(
                    session,
                    video_id=self.video_id,
                    task_id=f"tk-{self.run}-{name}",
                    now=self.now(),
                    poll_after=timedelta(0),
                )
            elif kind == "submit_retry":
                await lifecycle.record_submit_retry(
                    session,
                    video_id=self.video_id,
                    error="x",
                    ambiguous=arg == "ambiguous",
                    retry_at=self.now(),
                    now=self.now(),
                )
            elif kind == "submit_rejected":
                await lifecycle.record_submit_rejected(
                    session,
                    video_id=self.video_id,
                    code="INVALID_REQUEST",
                    message="no",
                    now=self.now(),
                )
            elif kind == "download_done" and self.owners:
                ready = await lifecycle.mark_ready(
                    session,
                    video_id=self.video_id,
                    owner=self.owners[-1],
                    size_bytes=10,
                    sha256="0" * 64,
                    storage_key="k",
                    now=self.now(),
                )
                if ready is not None:
                    self.downloads_completed += 1
            elif kind == "download_retry" and self.owners:
                await lifecycle.release_download(
                    session,
                    video_id=self.video_id,
                    owner=self.owners[-1],
                    retry_at=self.now(),
                    error="x",
                    now=self.now(),
                )
            elif kind == "lease_expires":
                self.clock_offset += LEASE * 2
                owner = uuid.uuid4().hex
                claimed = await lifecycle.claim_download(
                    session, video_id=self.video_id, owner=owner, now=self.now(), lease=LEASE
                )
                if claimed is not None:
                    self.owners.append(owner)  # a resumed download replaces the stale one

    async def status(self) -> tuple[str, str | None]:
        async with self.sm() as session:
            video = await repository.get(session, self.video_id)
        assert video is not None
        return video.status, video.task_id

    async def settle(self) -> str:
        """Drive the video the way the running service would once events stop: the create
        is sent (task A), the reconciler polls the stored task (which has finished), an
        expired download lease is taken over and that copy completes. Returns the final
        status; fails if the video is still not terminal after each step had its chance."""
        for _ in range(4):
            status, task_id = await self.status()
            if status in TERMINAL:
                return status
            if status == Status.queued:
                await self.fire("submit_ok", "", "A")
            elif status == Status.processing:
                assert task_id is not None, "processing without a task id"
                await self.fire("poll", "success", task_id.rsplit("-", 1)[1])
            elif status == Status.downloading:
                # Whoever held the lease is gone; a replica takes it over once it expires and
                # completes the copy. (The old holder never finishes here.)
                holders = len(self.owners)
                await self.fire("lease_expires", "", "")
                if len(self.owners) > holders:
                    await self.fire("download_done", "", "")
        status, task_id = await self.status()
        assert status in TERMINAL, f"stuck in {status} (task {task_id}) after recovery"
        return status


async def check_interleaving(url: str, steps: list[list[tuple[str, str, str]]]) -> None:
    engine = create_engine(url)
    try:
        sm = create_sessionmaker(engine)
        async with sm() as session, session.begin():
            video, _ = await lifecycle.create_video(
                session,
                params=PARAMS,
                idempotency_key=None,
                now=utc_now(),
                submit_hold=timedelta(0),
            )
        run = Run(sm=sm, video_id=video.id, run=uuid.uuid4().hex[:8])
        previous: str | None = None
        previous_task: str | None = None
        for group in steps:
            started_before = run.downloads_started
            await asyncio.gather(*(run.fire(*e) for e in group))
            status, task_id = await run.status()
            if previous == Status.ready:
                assert status == Status.ready, f"ready changed to {status}"
            if previous == Status.failed and status != Status.failed:
                # Only a rescue leaves `failed`: the success of *another* task of the video
                # (an earlier, ambiguous create) claimed a download in this very group, into
                # `downloading`, and on to `ready` if that download also finished in it.
                assert status in (Status.downloading, Status.ready), f"failed -> {status}"
                assert run.downloads_started > started_before, f"failed -> {status}, no claim"
                assert previous_task is not None, "a video hiapi never took was rescued"
                assert task_id != previous_task, f"failed -> {status} by its own task {task_id}"
            previous, previous_task = status, task_id
        assert run.downloads_started <= 1, "two downloads claimed by task results"
        assert run.downloads_completed <= 1, "marked ready twice"

        # Whatever happened, the video ends in one terminal state and stays there.
        final = await run.settle()
        assert run.downloads_started <= 1, "two downloads claimed by task results"
        assert run.downloads_completed <= 1, "marked ready twice"
        if final == Status.ready:
            assert run.seen_success
            assert run.downloads_completed == 1, "ready without a completed download"
        _, task_id = await run.status()
        if task_id is not None:  # late copies of the video's own task's results change nothing
            name = task_id.rsplit("-", 1)[1]
            for late in (("callback", "success", name), ("poll", "fail", name)):
                await run.fire(*late)
        await run.fire("lease_expires", "", "")
        await run.fire("download_done", "", "")
        assert (await run.status())[0] == final, f"{final} changed after it was final"
        assert run.downloads_completed <= 1, "marked ready twice"
    finally:
        await engine.dispose()


def run_sync(url: str, steps: list[list[tuple[str, str, str]]]) -> None:
    with ThreadPoolExecutor(1) as pool:  # a loop of its own, away from pytest-asyncio's
        pool.submit(asyncio.run, check_interleaving(url, steps)).result()


def test_any_interleaving_ends_in_one_terminal_state_with_at_most_one_download(
    database_url: str,
) -> None:
    budget = 60 if database_url.startswith("sqlite") else 30

    @settings(max_examples=budget, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(step, min_size=1, max_size=12))
    def prop(steps: list[list[tuple[str, str, str]]]) -> None:
        run_sync(database_url, steps)

    prop()
