"""Every state change of a video, in one place.

The submit endpoint, the webhook, the reconciler and the downloader all call these functions.
Each change is one conditional SQL statement whose result says who won: the caller that gets
a row back acts (sends the task, starts the download); the others do nothing. This is what
makes duplicate callbacks, concurrent replicas and restarts safe without in-memory locks.
The operator's actions (``videorelay admin``) live in ``app/admin.py``, the notify_url outbox
in ``app/outbox.py``, the spend quota in ``app/spend.py``, reads in ``app/repository.py``.

State machine::

    queued ──create ok──▶ processing ──task success──▶ downloading ──stored──▶ ready
      │  ╲                    │                          │
      │   ╲──task success (callback before taskId stored)─┘
      ├──create rejected──▶ failed ◀──task fail──────────┤◀── expired / bad file
      └──create 5xx/timeout: stays queued, due_at = next try
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    Integer,
    String,
    Table,
    Text,
    Uuid,
    and_,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import UTCDateTime, claim_due_rows, dialect_insert
from app.hiapi.schemas import Task, TaskStatus
from app.models import Status, Via, Video
from app.outbox import queue_notification
from app.spend import refund_spend

__all__ = [
    "ApplyOutcome",
    "Created",
    "NewVideo",
    "TaskReport",
    "apply_reports",
    "apply_task",
    "claim_download",
    "claim_due",
    "create_video",
    "fail_download",
    "fail_processing",
    "mark_ready",
    "record_poll_pending",
    "record_submit_rejected",
    "record_submit_retry",
    "record_submit_success",
    "release_download",
    "renew_lease",
]

_WAITING_FOR_TASK = (Status.queued, Status.processing)


@dataclass(frozen=True, slots=True)
class NewVideo:
    image_url: str
    prompt: str | None
    resolution: str
    duration: int
    image_id: uuid.UUID | None = None
    notify_url: str | None = None


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


async def create_video(
    session: AsyncSession,
    *,
    params: NewVideo,
    owner: str = "",
    idempotency_key: str | None,
    now: datetime,
    submit_hold: timedelta,
) -> tuple[Video, Created]:
    """Insert a queued video; with an idempotency key, return the earlier video instead.

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
        "owner": owner,
        "idempotency_key": idempotency_key,
        "due_at": now + submit_hold,
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
        return Video(**values), Created.created
    # One atomic statement closes the race of two identical requests arriving together:
    # exactly one insert wins; the other reads the winner's row.
    stmt = (
        dialect_insert(session)(Video)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["owner", "idempotency_key"])
        .returning(Video.id)
    )
    inserted = (await session.execute(stmt)).scalar_one_or_none()
    existing = (
        await session.execute(
            select(Video).where(Video.owner == owner, Video.idempotency_key == idempotency_key)
        )
    ).scalar_one()
    if inserted is not None:
        return existing, Created.created
    same = (
        existing.image_url,
        existing.prompt,
        existing.resolution,
        existing.duration,
        existing.notify_url,
    ) == (params.image_url, params.prompt, params.resolution, params.duration, params.notify_url)
    return existing, (Created.replayed if same else Created.conflict)


async def _update_returning(session: AsyncSession, where: Any, **values: Any) -> Video | None:
    stmt = update(Video).where(where).values(**values).returning(Video)
    result = await session.execute(stmt, execution_options={"synchronize_session": False})
    return result.scalar_one_or_none()


async def _finish(session: AsyncSession, where: Any, now: datetime, **values: Any) -> Video | None:
    """A transition into ``ready`` or ``failed``, with its notify_url delivery queued."""
    video = await _update_returning(session, where, **values)
    if video is not None and video.notify_url:
        await queue_notification(
            session, video_id=video.id, url=video.notify_url, status=video.status, now=now
        )
    return video


# --- submit -----------------------------------------------------------------------------


def _submittable(video_id: uuid.UUID) -> Any:
    return and_(Video.id == video_id, Video.status == Status.queued, Video.task_id.is_(None))


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
    return None if row is None else Video(**row._mapping)


async def record_submit_rejected(
    session: AsyncSession, *, video_id: uuid.UUID, code: str, message: str, now: datetime
) -> Video | None:
    """hiapi refused the task (400/401): final, never retried; its seconds are refunded."""
    failed = await _finish(
        session,
        _submittable(video_id),
        now,
        status=Status.failed,
        error_code=code,
        error_message=message,
        submit_attempts=Video.submit_attempts + 1,
        lease_owner=None,
        updated_at=now,
    )
    if failed is not None:
        await refund_spend(
            session, owner=failed.owner, day=failed.created_at.date(), seconds=failed.duration
        )
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
        _submittable(video_id),
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
#
# This is the webhook's hot path, so its statements are built once, as Core statements with
# bound parameters: SQLAlchemy then reuses the compiled SQL (and asyncpg its prepared
# statement) instead of rebuilding an ORM expression for every callback. Each returns only
# what the caller needs.

_videos = cast(Table, Video.__table__)
_p_video = bindparam("p_video", type_=Uuid())
_p_task = bindparam("p_task", type_=String())
_p_now = bindparam("p_now", type_=UTCDateTime())
# Literal values, not an expanding IN: its parameters would be re-rendered on every call.
_waiting = _videos.c.status.in_([literal_column(f"'{s.value}'") for s in _WAITING_FOR_TASK])
_belongs = and_(
    _videos.c.id == _p_video,
    _waiting,
    or_(_videos.c.task_id.is_(None), _videos.c.task_id == _p_task),
)
_task_done: dict[str, Any] = {
    "task_id": _p_task,
    "completed_via": bindparam("p_via", type_=String()),
    "task_finished_at": _p_now,
    "submitted_at": func.coalesce(_videos.c.submitted_at, _p_now),
    "updated_at": _p_now,
}
_claimed: dict[str, Any] = {
    "status": Status.downloading.value,
    "output_url": bindparam("p_url", type_=Text()),
    "output_expires_at": bindparam("p_expires", type_=UTCDateTime()),
    "due_at": bindparam("p_due", type_=UTCDateTime()),
    "lease_owner": bindparam("p_owner", type_=String()),
    "download_attempts": bindparam("p_attempts", type_=Integer()),
    **_task_done,
}
# Queued and without a task id: the create response and an early callback race for it.
_NO_TASK_YET = and_(
    _videos.c.id == _p_video,
    _videos.c.status == Status.queued.value,
    _videos.c.task_id.is_(None),
)
_ADOPT = (
    update(_videos)
    .where(_NO_TASK_YET)
    .values(status=Status.processing.value, task_id=_p_task, submitted_at=_p_now, updated_at=_p_now)
    .returning(_videos.c.id)
)
_CLAIM_OUTPUT = update(_videos).where(_belongs).values(**_claimed).returning(_videos.c.id)


def _replaceable() -> Any:
    """The video runs (or failed on) a different task, and ``p_task`` is no other video's:
    a finished clip of an earlier task of this video (its create was ambiguous, so we never
    stored its id) arrives on the video's own signed URL."""
    failed_by_task = and_(
        _videos.c.status == Status.failed.value,
        _videos.c.task_finished_at.is_not(None),
        _videos.c.output_url.is_(None),
    )
    other = _videos.alias("other")  # not correlated with the row being updated
    taken = select(other.c.id).where(other.c.task_id == _p_task).exists()
    return and_(
        _videos.c.id == _p_video,
        _videos.c.task_id.is_not(None),
        _videos.c.task_id != _p_task,
        or_(_waiting, failed_by_task),
        ~taken,
    )


_RESCUE_OUTPUT = (
    update(_videos)
    .where(_replaceable())
    .values(error_code=None, error_message=None, **_claimed)
    .returning(_videos.c.id)
)
_FAIL_TASK = (
    update(_videos)
    .where(_belongs)
    .values(
        status=Status.failed.value,
        error_code=bindparam("p_code", type_=String()),
        error_message=bindparam("p_message", type_=Text()),
        lease_owner=None,
        **_task_done,
    )
    .returning(_videos.c.id, _videos.c.status, _videos.c.notify_url)
)
_TASK_OF_VIDEO = select(_videos.c.task_id).where(_videos.c.id == _p_video)
_TASKS_OF_VIDEOS = select(_videos.c.id, _videos.c.task_id).where(
    _videos.c.id.in_(bindparam("p_videos", expanding=True))
)
_VIDEO_OF_TASK = select(_videos.c.id).where(_videos.c.task_id == _p_task)
_INSERT_VIDEO = insert(_videos)
# The submit path's second write: the task id hiapi returned, if no callback adopted one.
_RECORD_TASK = (
    update(_videos)
    .where(_NO_TASK_YET)
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
    """Apply what hiapi says about a task to the video it belongs to.

    The guard ``status IN (queued, processing) AND (task_id IS NULL OR task_id = :task)``
    makes this idempotent: the first caller moves the row on, every later copy (duplicate
    callback, concurrent replica, late poll) matches no row. ``task_id IS NULL`` admits a
    callback that overtook the create response, so it is adopted rather than lost.
    On success the winner also takes the download lease, so exactly one download starts;
    with ``owner=None`` (no download slot free) the row is left unowned and due at once, for
    whichever process has a slot first.
    """
    params: dict[str, Any] = {"p_video": video_id, "p_task": task.taskId, "p_now": now}
    if task.status == TaskStatus.handling:
        if (await session.execute(_ADOPT, params)).first() is not None:
            return ApplyOutcome.adopted
        return await _explain_noop(session, params, ApplyOutcome.pending)

    params["p_via"] = via.value
    if task.status == TaskStatus.success and task.output:
        out = task.output[0]
        params.update(
            p_url=out.url,
            p_expires=datetime.fromtimestamp(out.expireAt, UTC) if out.expireAt else None,
            p_due=now + lease if owner else now,
            p_owner=owner,
            p_attempts=1 if owner else 0,
        )
        won = (await session.execute(_CLAIM_OUTPUT, params)).first() is not None
        # A clip of an earlier task of this video: keep it rather than lose a paid clip,
        # unless the video already has one on the way.
        won = won or (await session.execute(_RESCUE_OUTPUT, params)).first() is not None
        if won:
            return ApplyOutcome.download_claimed if owner else ApplyOutcome.download_queued
    else:
        if task.status == TaskStatus.success:
            code, message = "no_output", "hiapi reported success without an output URL"
        else:
            err = task.error
            code = err.code if err else "unknown"
            message = err.message if err else "hiapi reported the task as failed"
        params.update(p_code=code, p_message=message)
        row = (await session.execute(_FAIL_TASK, params)).first()
        if row is not None:
            if row.notify_url:
                await queue_notification(
                    session, video_id=video_id, url=row.notify_url, status=row.status, now=now
                )
            return ApplyOutcome.failed
    return await _explain_noop(session, params, ApplyOutcome.duplicate)


@dataclass(frozen=True, slots=True)
class TaskReport:
    """What hiapi said about a task of a video, and who takes the download if it finished."""

    video_id: uuid.UUID
    task: Task
    via: Via
    owner: str | None  # None: no download slot is free here; a success is queued, not claimed


# --- many reports at once (the webhook's group commit) -----------------------------------
#
# A burst of callbacks is written as a handful of statements, not one per callback: the
# common cases (a task failed; a task succeeded with an output) are each one ``UPDATE ...
# FROM`` over all the batch's rows, with the same guard as ``apply_task``. Postgres gets the
# rows as arrays (``unnest``), SQLite as one JSON document (``json_each``); either way the SQL
# text is constant, so it is prepared once. Everything else (handling, a second report of a
# video in the same batch, a report the bulk statement did not match) goes through
# ``apply_task`` or the same explanation of a no-op, one by one, after the bulk statements.

_SET_TASK_DONE = """
    task_id = b.task, completed_via = :via, task_finished_at = :now,
    submitted_at = COALESCE(v.submitted_at, :now), updated_at = :now"""
_GUARD = """
    v.id = b.id AND v.status IN ('queued', 'processing')
    AND (v.task_id IS NULL OR v.task_id = b.task)"""


def _json_rows(*names: str) -> str:
    fields = ", ".join(f"json_extract(value, '$[{i}]') AS {name}" for i, name in enumerate(names))
    return f"(SELECT {fields} FROM json_each(:rows)) AS b"


_BULK_ROWS = {
    "postgresql": {
        "fail": "unnest(CAST(:ids AS UUID[]), CAST(:tasks AS TEXT[]), CAST(:codes AS TEXT[]), "
        "CAST(:messages AS TEXT[])) AS b(id, task, code, message)",
        "claim": "unnest(CAST(:ids AS UUID[]), CAST(:tasks AS TEXT[]), CAST(:urls AS TEXT[]), "
        "CAST(:expires AS TIMESTAMP[]), CAST(:owners AS TEXT[])) AS b(id, task, url, expires, "
        "owner)",
    },
    "sqlite": {
        "fail": _json_rows("id", "task", "code", "message"),
        "claim": _json_rows("id", "task", "url", "expires", "owner"),
    },
}


def _bulk_statement(dialect: str, kind: str) -> Any:
    rows = _BULK_ROWS[dialect][kind]
    # SQLite's RETURNING names only the updated table's columns, and unqualified.
    returning = (
        "v.id, v.status, v.notify_url" if dialect == "postgresql" else "id, status, notify_url"
    )
    if kind == "fail":
        sql = f"""UPDATE videos AS v SET status = 'failed', error_code = b.code,
            error_message = b.message, lease_owner = NULL, {_SET_TASK_DONE}
            FROM {rows} WHERE {_GUARD} RETURNING {returning}"""
    else:
        sql = f"""UPDATE videos AS v SET status = 'downloading', output_url = b.url,
            output_expires_at = b.expires, lease_owner = b.owner,
            due_at = CASE WHEN b.owner IS NULL THEN :now ELSE :due END,
            download_attempts = CASE WHEN b.owner IS NULL THEN 0 ELSE 1 END, {_SET_TASK_DONE}
            FROM {rows} WHERE {_GUARD} RETURNING {returning}"""
    times = [bindparam("now", type_=UTCDateTime())]
    if kind == "claim":
        times.append(bindparam("due", type_=UTCDateTime()))
    return (
        text(sql)
        .bindparams(bindparam("via", type_=String()), *times)
        .columns(id=Uuid(), status=String(), notify_url=Text())
    )


_BULK = {(d, k): _bulk_statement(d, k) for d in ("postgresql", "sqlite") for k in ("fail", "claim")}


def _failure_of(task: Task) -> tuple[str, str]:
    if task.status == TaskStatus.success:
        return "no_output", "hiapi reported success without an output URL"
    err = task.error
    return (err.code, err.message) if err else ("unknown", "hiapi reported the task as failed")


def _expiry(task: Task) -> datetime | None:
    expire_at = task.output[0].expireAt
    return datetime.fromtimestamp(expire_at, UTC) if expire_at else None


async def apply_reports(
    session: AsyncSession, reports: list[TaskReport], *, now: datetime, lease: timedelta
) -> list[ApplyOutcome]:
    """``apply_task`` for many reports in one transaction, with the same outcomes."""
    outcomes: list[ApplyOutcome | None] = [None] * len(reports)
    seen: set[uuid.UUID] = set()
    fails: list[int] = []
    claims: list[int] = []
    later: list[int] = []
    for i, report in enumerate(reports):
        if report.video_id in seen or report.task.status == TaskStatus.handling:
            later.append(i)
            continue
        seen.add(report.video_id)
        is_claim = report.task.status == TaskStatus.success and report.task.output
        (claims if is_claim else fails).append(i)

    dialect = session.get_bind().dialect
    via = {reports[i].via.value for i in fails + claims}
    unmatched: list[int] = []
    for kind, chosen, outcome in (
        ("fail", fails, ApplyOutcome.failed),
        ("claim", claims, ApplyOutcome.download_claimed),
    ):
        # One statement per kind and ``via`` (a batch from the webhook has a single one).
        for one_via in sorted(via):
            group = [i for i in chosen if reports[i].via.value == one_via]
            if not group:
                continue
            params = _bulk_params(dialect, kind, [reports[i] for i in group], now, lease)
            result = await session.execute(_BULK[(_dialect_key(dialect.name), kind)], params)
            won = {row.id: row for row in result}
            for i in group:
                row = won.get(reports[i].video_id)
                if row is None:
                    unmatched.append(i)
                    continue
                outcomes[i] = (
                    ApplyOutcome.download_queued
                    if kind == "claim" and reports[i].owner is None
                    else outcome
                )
                if kind == "fail" and row.notify_url:  # the video ended: tell its notify_url
                    await queue_notification(
                        session,
                        video_id=row.id,
                        url=row.notify_url,
                        status=row.status,
                        now=now,
                    )
    # Reports the bulk statements did not match are mostly duplicates: one SELECT tells.
    if unmatched:
        ids = [reports[i].video_id for i in unmatched]
        current = dict((await session.execute(_TASKS_OF_VIDEOS, {"p_videos": ids})).all())
        for i in unmatched:
            report = reports[i]
            if report.video_id not in current:
                outcomes[i] = ApplyOutcome.unknown_video
            elif current[report.video_id] in (None, report.task.taskId):
                outcomes[i] = ApplyOutcome.duplicate
            else:
                later.append(i)  # another task's report: stale, foreign, or a clip to rescue
    for i in sorted(later):
        report = reports[i]
        outcomes[i] = await apply_task(
            session,
            video_id=report.video_id,
            task=report.task,
            via=report.via,
            owner=report.owner,
            now=now,
            lease=lease,
        )
    return [outcome for outcome in outcomes if outcome is not None]


def _dialect_key(name: str) -> str:
    return "postgresql" if name == "postgresql" else "sqlite"


def _bulk_params(
    dialect: Any, kind: str, reports: list[TaskReport], now: datetime, lease: timedelta
) -> dict[str, Any]:
    params: dict[str, Any] = {"via": reports[0].via.value, "now": now}
    if kind == "fail":
        columns: list[list[Any]] = [
            [r.video_id for r in reports],
            [r.task.taskId for r in reports],
            *map(list, zip(*(_failure_of(r.task) for r in reports), strict=True)),
        ]
        names = ["ids", "tasks", "codes", "messages"]
    else:
        params["due"] = now + lease
        columns = [
            [r.video_id for r in reports],
            [r.task.taskId for r in reports],
            [r.task.output[0].url for r in reports],
            [_expiry(r.task) for r in reports],
            [r.owner for r in reports],
        ]
        names = ["ids", "tasks", "urls", "expires", "owners"]
    if dialect.name == "postgresql":
        # asyncpg takes the arrays as lists; timestamps are stored naive UTC.
        if kind == "claim":
            columns[3] = [_naive_utc(t) for t in columns[3]]
        params.update(zip(names, columns, strict=True))
        return params
    # SQLite: one JSON document; ids and timestamps in the exact text SQLAlchemy stores.
    uuid_text = Uuid().dialect_impl(dialect).bind_processor(dialect)
    time_text = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert uuid_text is not None
    assert time_text is not None
    columns[0] = [uuid_text(v) for v in columns[0]]
    if kind == "claim":
        columns[3] = [time_text(t) for t in columns[3]]
    params["rows"] = json.dumps(list(zip(*columns, strict=True)))
    return params


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


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
) -> Video | None:
    return await _finish(
        session,
        _holds_lease(video_id, owner),
        now,
        status=Status.ready,
        size_bytes=size_bytes,
        sha256=sha256,
        storage_key=storage_key,
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
