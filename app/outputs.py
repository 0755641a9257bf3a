"""What hiapi's output must be before we try to fetch it.

A finished task's output URL is checked once, when the report is applied (``app.intake`` calls
``OutputCheck.vet`` for the webhook and the reconciler's poll alike, before building the
``lifecycle.TaskReport``).
A URL we cannot read, that is not http(s), carries a user name or password, or whose host is
not on ``DOWNLOAD_ALLOWED_HOSTS`` turns the report into a failed task (``bad_output_url`` or
``host_not_allowed``), so the one state-machine path ends the video at once: no download slot
is taken, no lease is held, ``notify_url`` hears ``video.failed``.

An admitted URL is stored in its canonical spelling (``HostAllowlist.check``: lower-case host,
no trailing dot, IDNA), which is what the downloader fetches. Its ``expires_at`` is clamped to
the task's end plus ``DOWNLOAD_MAX_RETRY_SECONDS``: an absurd value (the year 5138) or none at
all cannot keep a clip retrying; the downloader applies the same bound to rows stored before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from app.hiapi.schemas import Task, TaskError, TaskStatus
from app.jobs.hosts import HostAllowlist, Refused

__all__ = ["OutputCheck"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutputCheck:
    allowlist: HostAllowlist
    max_retry: timedelta  # DOWNLOAD_MAX_RETRY_SECONDS

    def vet(self, task: Task, *, now: datetime) -> Task:
        """``task`` as it may be applied: a success whose output URL we will not fetch becomes
        a failed task saying why; an admitted one carries the canonical URL and a bounded
        ``expires_at``. Anything but a success with an output is returned as it is."""
        if task.status != TaskStatus.success or not task.output:
            return task
        out = task.output[0]
        try:
            url, _ = self.allowlist.check(out.url)
        except Refused as exc:
            log.warning("output.refused code=%s message=%s", exc.code, exc.message)
            return task.model_copy(
                update={
                    "status": TaskStatus.fail,
                    "output": [],
                    "error": TaskError(code=exc.code, message=f"output URL refused: {exc}"),
                }
            )
        bound = int((now + self.max_retry).timestamp())
        expires_at = bound if out.expires_at is None else min(out.expires_at, bound)
        checked = out.model_copy(update={"url": str(url), "expires_at": expires_at})
        return task.model_copy(update={"output": [checked, *task.output[1:]]})
