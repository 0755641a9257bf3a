"""Every state change of a video, in one place.

The submit endpoint, the webhook, the reconciler and the downloader all call these functions.
Each change is one conditional SQL statement whose result says who won: the caller that gets
a row back acts (sends the task, starts the download); the others do nothing. This is what
makes duplicate callbacks, concurrent replicas and restarts safe without in-memory locks.

State machine::

    queued ──create ok──▶ processing ──task success──▶ downloading ──stored──▶ ready
      │  ╲                    │                          │
      │   ╲──task success (callback before task_id stored)─┘
      ├──create rejected──▶ failed ◀──task fail──────────┤◀── expired / bad file
      └──create 5xx/timeout: stays queued, due_at = next try

    any of them ──DELETE, or VIDEO_RETENTION_SECONDS for ready/failed──▶ deleted (final)

A deleted video is a tombstone: every other transition is guarded by a status it no longer
has, so a late callback, poll, submit result or download finds it and changes nothing. While
its ``storage_key`` or ``poster_key`` is set, files may remain to be removed (``app.deletion``
removes them, and the reconciler retries at ``due_at`` if that failed).

A one-off change is an ORM ``UPDATE ... RETURNING``. The statements of the submit path and of
a task's result run on every request and callback, so they are built once: Core statements,
and for a task's result a ``db.BulkStatement`` that takes one report or a whole batch of the
webhook's group commit, so the rule "this task belongs to this video" is written once
(``_BELONGS``). The module is longer than the others on purpose: it holds every transition
beside its guard, so one file answers "who may change this row, and when". What is not a
transition lives elsewhere: the operator's actions (``videorelay admin``) in ``app/admin.py``,
the notify_url outbox in ``app/outbox.py``, the spend quota in ``app/spend.py``, reads in
``app/repository.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import String, Table, Text, Uuid, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeEngine

from app.db import BulkStatement, UTCDateTime, claim_due_rows, dialect_insert, lock_first
from app.hiapi.schemas import Task, TaskStatus
from app.models import Status, Via, Video
from app.outbox import drop_pending, queue_notification
from app.spend import refund_spend

if TYPE_CHECKING:
    from app.media import ClipFacts

__all__ = [
    "FIRST_SUBMIT",
    "ApplyOutcome",
    "Created",
    "Deletion",
    "NewVideo",
    "TaskReport",
    "apply_reports",
    "apply_task",
    "claim_download",
    "claim_due",
    "claim_removals",
    "create_video",
    "delete_expired",
    "delete_video",
    "fail_download",
    "fail_processing",
    "files_removed",
    "files_to_remove",
    "mark_ready",
    "record_poll_pending",
    "record_submit_rejected",
    "record_submit_retry",
    "record_submit_success",
    "release_download",
    "renew_lease",
]


@dataclass(frozen=True, slots=True)
class NewVideo:
    image_url: str
    prompt: str | None
    resolution: str
    duration: int
    image_id: uuid.UUID | None = None
    notify_url: str | None = None
    metadata: dict[str, str] | None = None  # the caller's own pairs; never sent to hiapi


class Created(StrEnum):
    created = "created"
    replayed = "replayed"  # same Idempotency-Key, same parameters: the earlier video
    conflict = "conflict"  # same Idempotency-Key, different parameters: nothing created


class ApplyOutcome(StrEnum):
    download_claimed = "download_claimed"  # this caller owns the download lease: start it
    download_queued = "download_queued"  # succeeded; no slot was free: any replica claims it
    failed = "failed"  # the task failed upstream; the video is now failed
    adopted = "adopted"  # a handling task was recorded for a video that had no task id yet
    pending = "pending"  # the task is still running; nothing changed
    duplicate = "duplicate"  # already applied (or video already terminal): nothing to do
    stale_task = "stale_task"  # another task of this video, no longer the one that counts
    foreign_task = "foreign_task"  # the task id belongs to another video: rejected
    unknown_video = "unknown_video"  # no such video: rejected


@dataclass(frozen=True, slots=True)
class TaskReport:
    """What hiapi said about a task of a video, and who takes the download if it finished."""

    video_id: uuid.UUID
    task: Task
    via: Via
    owner: str | None  # None: no download slot is free here; a success is queued, not claimed


# The lease of a new video's first submit attempt, which the request that created it makes:
# until ``due_at`` passes, a create call may be in flight for it (``delete_video``).
FIRST_SUBMIT = "first-submit"


# --- statements built once ---------------------------------------------------------------

_videos = cast(Table, Video.__table__)
_p_video = bindparam("p_video", type_=Uuid())
_p_task = bindparam("p_task", type_=String())
_p_now = bindparam("p_now", type_=UTCDateTime())


def _no_task_yet(video_id: Any) -> Any:
    """Queued and without a task id: the create's outcome and an early callback race for it."""
    return and_(
        _videos.c.id == video_id,
        _videos.c.status == Status.queued.value,
        _videos.c.task_id.is_(None),
    )


_INSERT_VIDEO = insert(_videos)
# The submit path's second write: the task id hiapi returned, if no callback adopted one.
_RECORD_TASK = (
    update(_videos)
    .where(_no_task_yet(_p_video))
    .values(
        status=Status.processing.value,
        task_id=_p_task,
        submitted_at=_p_now,
        due_at=bindparam("p_due", type_=UTCDateTime()),
        lease_owner=None,
        submit_attempts=_videos.c.submit_attempts + 1,
        last_error=None,
        updated_at=_p_now,
    )
    .returning(*_videos.c)
)
_ADOPT = (
    update(_videos)
    .where(_no_task_yet(_p_video))
    .values(status=Status.processing.value, task_id=_p_task, submitted_at=_p_now, updated_at=_p_now)
    .returning(_videos.c.id)
)
_TASK_OF_VIDEO = select(_videos.c.task_id).where(_videos.c.id == _p_video)
_TASKS_OF_VIDEOS = select(_videos.c.id, _videos.c.task_id).where(
    _videos.c.id.in_(bindparam("p_videos", expanding=True))
)
_VIDEO_OF_TASK = select(_videos.c.id).where(_videos.c.task_id == _p_task)

# A task's result, over rows ``b`` (one report, or a batch). ``v.status IN`` lists literal
# values: an expanding IN would be rendered again on every call.
_WAITING = "v.status IN ({})".format(
    ", ".join(f"'{s}'" for s in (Status.queued, Status.processing))
)
# The task belongs to the video: the video waits for a task's result, and the task is the one
# it runs, or it has none recorded yet (a callback that overtook the create's response is
# adopted, not lost). The first report moves the row on; every later copy (a duplicate
# callback, a concurrent replica, a late poll) matches no row.
_BELONGS = f"v.id = b.video AND {_WAITING} AND (v.task_id IS NULL OR v.task_id = b.task)"
# Or the video runs (or failed on) another task, and this one is no other video's: a finished
# clip of an earlier task of this video (its create was ambiguous, so we never stored its id)
# arrives on the video's own signed URL. Kept rather than lose a paid clip.
_REPLACEABLE = f"""v.id = b.video AND v.task_id IS NOT NULL AND v.task_id != b.task
    AND ({_WAITING} OR (v.status = '{Status.failed}' AND v.task_finished_at IS NOT NULL
        AND v.output_url IS NULL))
    AND NOT EXISTS (SELECT 1 FROM videos AS other WHERE other.task_id = b.task)"""
_TASK_DONE = """task_id = b.task, completed_via = :via, task_finished_at = :now,
    submitted_at = COALESCE(v.submitted_at, :now), updated_at = :now"""
# Unqualified: SQLite's RETURNING names only the updated table's columns (``b`` has none of these).
_RETURNING = "RETURNING id, status, notify_url"
_RESULT: dict[str, TypeEngine[Any]] = {"id": Uuid(), "status": String(), "notify_url": Text()}

_FAIL = BulkStatement(
    f"""UPDATE videos AS v SET status = '{Status.failed}', error_code = b.code,
        error_message = b.message, lease_owner = NULL, {_TASK_DONE}
        FROM {{rows}} WHERE {_BELONGS} {_RETURNING}""",
    alias="b",
    columns={"video": Uuid(), "task": Text(), "code": Text(), "message": Text()},
    binds={"via": String(), "now": UTCDateTime()},
    returns=_RESULT,
)


def _claim(guard: str, *, clear_error: bool = False) -> BulkStatement:
    """Take the output (and, with an owner, the download lease) of videos matching ``guard``."""
    return BulkStatement(
        f"""UPDATE videos AS v SET status = '{Status.downloading}', output_url = b.url,
            {"error_code = NULL, error_message = NULL," if clear_error else ""}
            output_expires_at = b.expires, lease_owner = b.owner,
            due_at = CASE WHEN b.owner IS NULL THEN :now ELSE :due END,
            download_attempts = CASE WHEN b.owner IS NULL THEN 0 ELSE 1 END, {_TASK_DONE}
            FROM {{rows}} WHERE {guard} {_RETURNING}""",
        alias="b",
        columns={
            "video": Uuid(),
            "task": Text(),
            "url": Text(),
            "expires": UTCDateTime(),
            "owner": Text(),
        },
        binds={"via": String(), "now": UTCDateTime(), "due": UTCDateTime()},
        returns=_RESULT,
    )


_CLAIM = _claim(_BELONGS)
_RESCUE = _claim(_REPLACEABLE, clear_error=True)


# --- create and submit -------------------------------------------------------------------


def _detached(columns: Mapping[Any, Any]) -> Video:
    """A ``Video`` from a row's columns (the ``metadata`` column is the ``meta`` attribute)."""
    values = {k: v for k, v in columns.items() if k != "metadata"}
    return Video(**values, meta=columns.get("metadata"))


async def create_video(
    session: AsyncSession,
    *,
    params: NewVideo,
    owner: str = "",
    subject: str = "",
    token_id: str | None = None,
    idempotency_key: str | None,
    now: datetime,
    submit_hold: timedelta,
) -> tuple[Video, Created]:
    """Insert a queued video; with an idempotency key, return the earlier video instead.

    The key is looked up within ``(owner, subject)`` only: one end user of an API key never
    sees another's video through a replay or a conflict.

    ``due_at`` is pushed ``submit_hold`` into the future so the reconciler leaves the first
    submit attempt to the request that created the row.
    """
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "status": Status.queued.value,
        "image_url": params.image_url,
        "prompt": params.prompt,
        "resolution": params.resolution,
        "duration": params.duration,
        "image_id": params.image_id,
        "notify_url": params.notify_url,
        "metadata": params.metadata,
        "owner": owner,
        "subject": subject,
        "token_id": token_id,
        "idempotency_key": idempotency_key,
        "due_at": now + submit_hold,
        "lease_owner": FIRST_SUBMIT,
        "created_at": now,
        "updated_at": now,
        "submit_attempts": 0,
        "ambiguous_submits": 0,
        "poll_attempts": 0,
        "download_attempts": 0,
    }
    if idempotency_key is None:
        # A Core INSERT of a prepared statement; the caller gets a detached copy of the row.
        await session.execute(_INSERT_VIDEO, values)
        return _detached(values), Created.created
    # One atomic statement closes the race of two identical requests arriving together:
    # exactly one insert wins; the other reads the winner's row.
    stmt = (
        dialect_insert(session)(Video)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["owner", "subject", "idempotency_key"])
        .returning(Video.id)
    )
    inserted = (await session.execute(stmt)).scalar_one_or_none()
    existing = (
        await session.execute(
            select(Video).where(
                Video.owner == owner,
                Video.subject == subject,
                Video.idempotency_key == idempotency_key,
            )
        )
    ).scalar_one()
    if inserted is not None:
        return existing, Created.created
    # Every parameter counts, metadata too (as notify_url, which hiapi never sees either).
    same = (
        existing.image_url,
        existing.prompt,
        existing.resolution,
        existing.duration,
        existing.notify_url,
        existing.meta or None,
    ) == (
        params.image_url,
        params.prompt,
        params.resolution,
        params.duration,
        params.notify_url,
        params.metadata or None,
    )
    return existing, (Created.replayed if same else Created.conflict)


async def _update_returning(session: AsyncSession, where: Any, **values: Any) -> Video | None:
    stmt = update(Video).where(where).values(**values).returning(Video)
    # populate_existing: a Video this session loaded before is refreshed with the row as
    # updated, not handed back with its old attributes (a ready video read as "downloading").
    options = {"synchronize_session": False, "populate_existing": True}
    result = await session.execute(stmt, execution_options=options)
    return result.scalar_one_or_none()


async def _finish(session: AsyncSession, where: Any, now: datetime, **values: Any) -> Video | None:
    """A transition into ``ready`` or ``failed``, with its notify_url delivery queued."""
    video = await _update_returning(session, where, **values)
    if video is not None and video.notify_url:
        await queue_notification(
            session, video_id=video.id, url=video.notify_url, status=video.status, now=now
        )
    return video


async def _refund(session: AsyncSession, video: Video) -> None:
    """Give a video's seconds back to every quota it was charged to: hiapi never billed it."""
    await refund_spend(
        session,
        owner=video.owner,
        day=video.created_at.date(),
        seconds=video.duration,
        subject=video.subject,
        token_id=video.token_id,
    )


async def record_submit_success(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    task_id: str,
    now: datetime,
    poll_after: timedelta,
) -> Video | None:
    """hiapi created ``task_id``. If a callback already adopted it, this changes nothing."""
    row = (
        await session.execute(
            _RECORD_TASK,
            {"p_video": video_id, "p_task": task_id, "p_now": now, "p_due": now + poll_after},
        )
    ).first()
    return None if row is None else _detached(row._mapping)


async def record_submit_rejected(
    session: AsyncSession, *, video_id: uuid.UUID, code: str, message: str, now: datetime
) -> Video | None:
    """hiapi refused the task (400/401): final, never retried; its seconds are refunded."""
    failed = await _finish(
        session,
        _no_task_yet(video_id),
        now,
        status=Status.failed,
        error_code=code,
        error_message=message,
        submit_attempts=Video.submit_attempts + 1,
        lease_owner=None,
        updated_at=now,
    )
    if failed is not None:
        await _refund(session, failed)
    return failed


async def record_submit_retry(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    error: str,
    ambiguous: bool,
    retry_at: datetime,
    now: datetime,
) -> Video | None:
    """The create call failed transiently: stay queued and try again at ``retry_at``.

    After an ambiguous failure (timeout), the task may exist upstream; the caller picks a
    ``retry_at`` late enough for that task's callback to arrive and be adopted first.
    """
    queued = await _update_returning(
        session,
        _no_task_yet(video_id),
        due_at=retry_at,
        lease_owner=None,
        submit_attempts=Video.submit_attempts + 1,
        ambiguous_submits=Video.ambiguous_submits + (1 if ambiguous else 0),
        last_error=error,
        updated_at=now,
    )
    if queued is None and ambiguous:
        # A callback adopted the task meanwhile; still count the ambiguity for operators.
        await session.execute(
            update(Video)
            .where(Video.id == video_id)
            .values(ambiguous_submits=Video.ambiguous_submits + 1)
        )
    return queued


# --- the task's result (webhook and reconciler alike) ------------------------------------


async def apply_task(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    task: Task,
    via: Via,
    owner: str | None,
    now: datetime,
    lease: timedelta,
) -> ApplyOutcome:
    """Apply what hiapi says about a task to the video it belongs to: ``apply_reports`` with
    one report."""
    report = TaskReport(video_id, task, via, owner)
    (outcome,) = await apply_reports(session, [report], now=now, lease=lease)
    return outcome


async def apply_reports(
    session: AsyncSession, reports: list[TaskReport], *, now: datetime, lease: timedelta
) -> list[ApplyOutcome]:
    """Apply what hiapi says about tasks to the videos they belong to, in one transaction
    (the webhook's group commit), and say what became of each report.

    A report changes a video only if its task belongs to the video (``_BELONGS``), so it is
    idempotent. A success's winner also takes the download lease, so exactly one download
    starts; with ``owner=None`` (no download slot free) the row is left unowned and due at
    once, for whichever process has a slot first.

    A burst is a handful of statements, not one per report: the finished tasks (failed;
    succeeded with an output) are one ``UPDATE ... FROM`` per kind over all the batch's rows.
    Everything else (handling, a second report of a video in the batch, another task's
    report) is applied one by one afterwards, in the batch's order.
    """
    plans = [_plan(report) for report in reports]
    outcomes: list[ApplyOutcome | None] = [None] * len(reports)
    groups: dict[tuple[BulkStatement, Via], list[tuple[int, list[Any]]]] = {}
    seen: set[uuid.UUID] = set()
    later: list[int] = []
    for i, (report, plan) in enumerate(zip(reports, plans, strict=True)):
        if plan is None or report.video_id in seen:
            later.append(i)
            continue
        seen.add(report.video_id)
        groups.setdefault((plan[0], report.via), []).append((i, plan[1]))
    missed: list[int] = []
    for stmt in (_FAIL, _CLAIM):
        for via in Via:  # one statement per kind and ``via`` (a webhook batch has one ``via``)
            group = groups.get((stmt, via))
            if not group:
                continue
            rows = [row for _, row in group]
            won = await _write(session, stmt, rows, via=via, now=now, lease=lease)
            for i, _ in group:
                if reports[i].video_id in won:
                    outcomes[i] = _won(stmt, reports[i])
                else:
                    missed.append(i)
    # Reports that changed nothing are mostly duplicates: one SELECT tells.
    if missed:
        ids = [reports[i].video_id for i in missed]
        current = dict((await session.execute(_TASKS_OF_VIDEOS, {"p_videos": ids})).all())
        for i in missed:
            report = reports[i]
            if report.video_id not in current:
                outcomes[i] = ApplyOutcome.unknown_video
            elif current[report.video_id] in (None, report.task.task_id):
                outcomes[i] = ApplyOutcome.duplicate
            else:
                later.append(i)  # another task's report: stale, foreign, or a clip to rescue
    for i in sorted(later):
        outcomes[i] = await _apply_alone(session, reports[i], plans[i], now=now, lease=lease)
    return cast(list[ApplyOutcome], outcomes)


_Plan = tuple[BulkStatement, list[Any]] | None


def _plan(report: TaskReport) -> _Plan:
    """The statement that applies a finished task, with the report's row for it; None while
    the task is running."""
    task = report.task
    if task.status == TaskStatus.handling:
        return None
    if task.status == TaskStatus.success and task.output:
        out = task.output[0]
        expires = datetime.fromtimestamp(out.expires_at, UTC) if out.expires_at else None
        return _CLAIM, [report.video_id, task.task_id, out.url, expires, report.owner]
    if task.status == TaskStatus.success:
        code, message = "no_output", "hiapi reported success without an output URL"
    elif task.error is not None:
        code, message = task.error.code, task.error.message
    else:
        code, message = "unknown", "hiapi reported the task as failed"
    return _FAIL, [report.video_id, task.task_id, code, message]


async def _write(
    session: AsyncSession,
    stmt: BulkStatement,
    rows: list[list[Any]],
    *,
    via: Via,
    now: datetime,
    lease: timedelta,
) -> set[uuid.UUID]:
    """Run ``stmt`` over ``rows``; the videos it moved on. A video that failed gets its
    notify_url delivery queued in the same transaction."""
    params: dict[str, Any] = {"via": via.value, "now": now}
    if stmt is not _FAIL:
        params["due"] = now + lease
    result = await session.execute(*stmt.for_rows(session.get_bind().dialect, rows, **params))
    won = {row.id: row for row in result}
    for video_id, *_ in rows:
        row = won.get(video_id)
        if row is not None and row.status == Status.failed and row.notify_url:
            await queue_notification(
                session, video_id=row.id, url=row.notify_url, status=row.status, now=now
            )
    return set(won)


def _won(stmt: BulkStatement, report: TaskReport) -> ApplyOutcome:
    if stmt is _FAIL:
        return ApplyOutcome.failed
    if report.owner is None:
        return ApplyOutcome.download_queued
    return ApplyOutcome.download_claimed


async def _apply_alone(
    session: AsyncSession,
    report: TaskReport,
    plan: _Plan,
    *,
    now: datetime,
    lease: timedelta,
) -> ApplyOutcome:
    """One report on its own, after the batch's bulk statements."""
    params = {"p_video": report.video_id, "p_task": report.task.task_id, "p_now": now}
    if plan is None:  # still running: record the task if the video has none yet
        if (await session.execute(_ADOPT, params)).first() is not None:
            return ApplyOutcome.adopted
        return await _explain_noop(session, params, ApplyOutcome.pending)
    stmt, row = plan
    # A clip of an earlier task of this video: keep it rather than lose a paid clip, unless
    # the video already has one on the way.
    for attempt in (stmt, _RESCUE) if stmt is _CLAIM else (stmt,):
        if await _write(session, attempt, [row], via=report.via, now=now, lease=lease):
            return _won(stmt, report)
    return await _explain_noop(session, params, ApplyOutcome.duplicate)


async def _explain_noop(
    session: AsyncSession, params: dict[str, Any], default: ApplyOutcome
) -> ApplyOutcome:
    found = (await session.execute(_TASK_OF_VIDEO, params)).first()
    if found is None:
        return ApplyOutcome.unknown_video
    if found.task_id is not None and found.task_id != params["p_task"]:
        owner = (await session.execute(_VIDEO_OF_TASK, params)).scalar_one_or_none()
        if owner is not None and owner != params["p_video"]:
            return ApplyOutcome.foreign_task
        return ApplyOutcome.stale_task
    return default


async def fail_processing(
    session: AsyncSession, *, video_id: uuid.UUID, code: str, message: str, now: datetime
) -> Video | None:
    """End a video whose task hiapi no longer knows, or that ran far too long."""
    return await _finish(
        session,
        and_(Video.id == video_id, Video.status == Status.processing),
        now,
        status=Status.failed,
        error_code=code,
        error_message=message,
        lease_owner=None,
        updated_at=now,
    )


async def record_poll_pending(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    next_poll_at: datetime,
    error: str | None,
    now: datetime,
) -> None:
    """A poll found the task still running (or could not reach hiapi): poll again later."""
    await session.execute(
        update(Video)
        .where(Video.id == video_id, Video.status == Status.processing)
        .values(
            due_at=next_poll_at,
            lease_owner=None,
            poll_attempts=Video.poll_attempts + 1,
            last_error=error,
            updated_at=now,
        )
    )


# --- claims (reconciler) -----------------------------------------------------------------


async def claim_due(
    session: AsyncSession,
    *,
    status: Status,
    now: datetime,
    hold: timedelta,
    owner: str,
    limit: int,
) -> list[Video]:
    """Take up to ``limit`` videos of ``status`` whose ``due_at`` has passed."""
    values: dict[str, Any] = {"updated_at": now}
    if status == Status.downloading:
        values["download_attempts"] = Video.download_attempts + 1
    return await claim_due_rows(
        session, Video, status=status, now=now, hold=hold, owner=owner, limit=limit, **values
    )


# --- download ----------------------------------------------------------------------------


async def claim_download(
    session: AsyncSession, *, video_id: uuid.UUID, owner: str, now: datetime, lease: timedelta
) -> Video | None:
    """Take the download lease of one video if it is free (never taken, or expired)."""
    return await _update_returning(
        session,
        and_(Video.id == video_id, Video.status == Status.downloading, Video.due_at <= now),
        due_at=now + lease,
        lease_owner=owner,
        download_attempts=Video.download_attempts + 1,
        updated_at=now,
    )


def _holds_lease(video_id: uuid.UUID, owner: str) -> Any:
    return and_(
        Video.id == video_id, Video.status == Status.downloading, Video.lease_owner == owner
    )


async def renew_lease(
    session: AsyncSession, *, video_id: uuid.UUID, owner: str, now: datetime, lease: timedelta
) -> bool:
    row = await _update_returning(
        session, _holds_lease(video_id, owner), due_at=now + lease, updated_at=now
    )
    return row is not None


async def mark_ready(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    owner: str,
    size_bytes: int,
    sha256: str,
    storage_key: str,
    now: datetime,
    facts: ClipFacts | None = None,
    warnings: list[str] | None = None,
    faststart_remuxed: bool | None = None,
    poster_key: str | None = None,
) -> Video | None:
    """The clip is stored (and its poster, at ``poster_key``): record it with its facts."""
    return await _finish(
        session,
        _holds_lease(video_id, owner),
        now,
        status=Status.ready,
        size_bytes=size_bytes,
        sha256=sha256,
        storage_key=storage_key,
        width=facts.width if facts else None,
        height=facts.height if facts else None,
        duration_seconds=facts.duration_seconds if facts else None,
        codec=facts.codec if facts else None,
        fps=facts.fps if facts else None,
        warnings=warnings,
        faststart_remuxed=faststart_remuxed,
        poster_key=poster_key,
        ready_at=now,
        lease_owner=None,
        last_error=None,
        updated_at=now,
    )


async def release_download(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    owner: str,
    retry_at: datetime,
    error: str | None,
    now: datetime,
) -> bool:
    """Give the lease back: a transient failure, or a shutdown. Anyone may retry at ``retry_at``."""
    row = await _update_returning(
        session,
        _holds_lease(video_id, owner),
        due_at=retry_at,
        lease_owner=None,
        last_error=error,
        updated_at=now,
    )
    return row is not None


async def fail_download(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    owner: str | None,
    code: str,
    message: str,
    now: datetime,
) -> Video | None:
    where = (
        _holds_lease(video_id, owner)
        if owner is not None
        else and_(Video.id == video_id, Video.status == Status.downloading)
    )
    return await _finish(
        session,
        where,
        now,
        status=Status.failed,
        error_code=code,
        error_message=message,
        lease_owner=None,
        updated_at=now,
    )


# --- deletion ----------------------------------------------------------------------------

# The ``due_at`` of a tombstone with no files left: nobody is ever due to act on it, so the
# removal sweep's index range (status 'deleted', due_at <= now) holds only pending removals.
NEVER = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Deletion:
    video: Video  # the tombstone
    refunded: bool  # it was queued and no create call can have reached hiapi: seconds given back


def _tombstone(now: datetime, retry_at: datetime) -> dict[str, Any]:
    """What every deletion writes. ``retry_at``: when the reconciler removes the files if the
    deleter's own removal right after the commit did not."""
    return {
        "status": Status.deleted,
        "deleted_at": now,
        # Nothing the caller wrote stays: a user's deletion request is met by the tombstone too.
        "prompt": None,
        "meta": None,
        "notify_url": None,
        "image_url": "",
        "output_url": None,
        "output_expires_at": None,
        "lease_owner": None,
        "due_at": retry_at,
        "updated_at": now,
    }


async def delete_video(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    storage_key: str,
    now: datetime,
    retry_at: datetime,
) -> Deletion | None:
    """Delete a video in any state but ``deleted``; None if there is no such video or it is
    already deleted (this call lost the race to another deletion).

    ``storage_key`` is where the video's clip is (or would be) stored: it is kept on the
    tombstone even when no clip was stored yet, so a download in flight that commits its file
    before it notices finds the key listed for removal.

    A queued video no create call can be in flight for (never claimed, or its claim's hold ran
    out, and no earlier attempt ended ambiguously) gets its seconds back on every quota: the
    submit claims (``claim_due``, the first attempt's ``FIRST_SUBMIT`` lease) only take queued
    rows, so once this commits no task is ever created for it. Any other deletion may leave a
    task that hiapi bills (a create in flight, or a task already running: it can't be
    cancelled upstream), and refunds nothing.
    """
    values = {
        **_tombstone(now, retry_at),
        "storage_key": func.coalesce(Video.storage_key, storage_key),
    }
    never_sent = and_(
        _no_task_yet(video_id),
        Video.ambiguous_submits == 0,
        or_(Video.lease_owner.is_(None), Video.due_at <= now),
    )
    video = await _update_returning(session, never_sent, **values)
    refunded = video is not None
    if video is not None:
        await _refund(session, video)
    else:
        video = await _update_returning(
            session, and_(Video.id == video_id, Video.status != Status.deleted), **values
        )
    if video is None:
        return None
    await drop_pending(session, [video.id], now=now)
    return Deletion(video, refunded)


async def delete_expired(
    session: AsyncSession,
    *,
    created_before: datetime,
    now: datetime,
    retry_at: datetime,
    limit: int,
) -> list[Video]:
    """Delete up to ``limit`` ready or failed videos created before ``created_before``
    (``VIDEO_RETENTION_SECONDS``), oldest first; the tombstones. Replicas running this at once
    skip each other's rows (Postgres) or run one after the other (SQLite)."""
    ended = and_(
        Video.status.in_((Status.ready.value, Status.failed.value)),
        Video.created_at < created_before,
    )
    ids = await lock_first(session, Video, ended, order_by=Video.created_at, limit=limit)
    if not ids:
        return []
    stmt = (
        update(Video)
        .where(Video.id.in_(ids), ended)
        .values(**_tombstone(now, retry_at))
        .returning(Video)
    )
    result = await session.execute(stmt, execution_options={"synchronize_session": False})
    videos = list(result.scalars().all())
    if videos:
        await drop_pending(session, [video.id for video in videos], now=now)
    return videos


async def claim_removals(
    session: AsyncSession, *, now: datetime, hold: timedelta, owner: str, limit: int
) -> list[Video]:
    """Take up to ``limit`` tombstones whose files are still listed and whose removal is due
    (the deleter's own attempt failed, or its process died before it)."""
    return await claim_due_rows(
        session,
        Video,
        status=Status.deleted,
        now=now,
        hold=hold,
        owner=owner,
        limit=limit,
        where=or_(Video.storage_key.is_not(None), Video.poster_key.is_not(None)),
    )


async def files_removed(session: AsyncSession, *, video_id: uuid.UUID) -> None:
    """The tombstone's files are gone from storage: nothing is left to do for it."""
    await session.execute(
        update(Video)
        .where(Video.id == video_id, Video.status == Status.deleted)
        .values(storage_key=None, poster_key=None, lease_owner=None, due_at=NEVER)
    )


async def files_to_remove(
    session: AsyncSession,
    *,
    video_id: uuid.UUID,
    storage_key: str,
    now: datetime,
    poster_key: str | None = None,
) -> bool:
    """List ``storage_key`` (and ``poster_key``) for removal on a deleted video's tombstone (a
    download committed its clip after the deletion and could not remove it itself); False if
    not deleted."""
    row = await _update_returning(
        session,
        and_(Video.id == video_id, Video.status == Status.deleted),
        storage_key=storage_key,
        poster_key=poster_key,
        due_at=now,
    )
    return row is not None
