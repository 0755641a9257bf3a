"""The one place a task report is accepted, whether hiapi called back or the reconciler polled.

``Intake.accept`` takes what hiapi says about a video's task and:

1. vets the output URL (``app.outputs``): one we will not fetch turns the report into a failure;
2. reserves a download slot of this process, if the task succeeded and one is free;
3. writes the report through the group commit (``lifecycle.apply_reports``), so copies arriving
   together share a transaction and the state machine's guard decides who won;
4. starts the download if this report won it with the reserved slot; a success that found no
   free slot is left queued in the database for the first process with one
   (``JobRunner.refill``);
5. gives the slot back on every other path, an exception included.

It answers only once the report is committed, so an acknowledgement means "durably recorded".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from app.group_commit import GroupCommit
from app.hiapi.schemas import Task, TaskStatus
from app.jobs.runner import JobRunner
from app.lifecycle import ApplyOutcome, TaskReport
from app.models import Via
from app.outputs import OutputCheck

__all__ = ["Intake"]


class Intake:
    def __init__(
        self,
        *,
        outputs: OutputCheck,
        runner: JobRunner,
        writes: GroupCommit[TaskReport, ApplyOutcome],
        clock: Callable[[], datetime],
    ) -> None:
        self._outputs = outputs
        self._runner = runner
        self._writes = writes
        self._clock = clock

    async def accept(self, video_id: uuid.UUID, task: Task, *, via: Via) -> ApplyOutcome:
        """Apply ``task`` to the video and start its download if this report won it."""
        task = self._outputs.vet(task, now=self._clock())
        # A success takes a download slot of this process if one is free; otherwise it is
        # queued in the database for whichever replica frees a slot first.
        reserved = (
            task.status == TaskStatus.success and bool(task.output) and self._runner.try_reserve()
        )
        owner = uuid.uuid4().hex if reserved else None
        started = False
        try:
            outcome = await self._writes.submit(TaskReport(video_id, task, via, owner))
            if outcome == ApplyOutcome.download_claimed and owner is not None:
                # A task of its own (not a response background task, which Starlette skips
                # when the client has gone), so the reserved slot is always used or freed.
                self._runner.start_download(video_id, owner, reserved=True)
                started = True
        finally:
            if reserved and not started:
                self._runner.release()
        return outcome

    async def drain(self) -> None:
        """Wait until every report accepted so far is written (at shutdown)."""
        await self._writes.drain()
