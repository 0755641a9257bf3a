"""``videorelay admin``: what an operator runs against the database when something is stuck.

The commands only change rows; the running service's reconciler then does the work at its
next tick, on whichever replica claims it. Their two transitions (``admin_retry``,
``admin_repoll``) live here, beside the command, rather than in ``lifecycle``: only an operator
takes them, and they only make a video due now for the reconciler's usual transitions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from app import repository
from app.config import Settings
from app.db import create_engine, create_sessionmaker, utc_now
from app.models import Status, Video

__all__ = ["AdminError", "add_parser", "admin_repoll", "admin_retry", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser("admin", help="operator actions: list stuck videos, retry, repoll")
    actions = admin.add_subparsers(dest="action", required=True)
    stuck = actions.add_parser("stuck", help="videos not finished and unchanged for a while")
    stuck.add_argument("--older-than", type=float, default=900, metavar="SECONDS")
    retry = actions.add_parser("retry", help="resubmit / resume / re-run a failed download")
    retry.add_argument("video_id", type=uuid.UUID)
    repoll = actions.add_parser("repoll", help="poll hiapi for a processing video now")
    repoll.add_argument("video_id", type=uuid.UUID)


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    engine = create_engine(settings.DATABASE_URL, timeout=settings.DATABASE_TIMEOUT_SECONDS)
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            now = utc_now()
            if args.action == "stuck":
                rows = await repository.stuck(
                    session, now=now, older_than=timedelta(seconds=args.older_than)
                )
                for video in rows:
                    print(
                        json.dumps(
                            {
                                "id": str(video.id),
                                "status": video.status,
                                "task_id": video.task_id,
                                "updated_at": video.updated_at.isoformat(),
                                "due_at": video.due_at.isoformat(),
                                "attempts": {
                                    "submit": video.submit_attempts,
                                    "poll": video.poll_attempts,
                                    "download": video.download_attempts,
                                },
                                "last_error": video.last_error,
                            }
                        )
                    )
                print(f"{len(rows)} stuck video(s)")
                return 0
            action = admin_retry if args.action == "retry" else admin_repoll
            try:
                video = await action(session, video_id=args.video_id, now=now)
            except AdminError as exc:
                print(f"videorelay admin {args.action}: {exc}")
                return 1
            print(f"{video.id}: {video.status}, due now; the reconciler acts at its next tick")
            return 0
    finally:
        await engine.dispose()


class AdminError(Exception):
    """The action does not apply to the video in its current state."""


async def admin_retry(session: AsyncSession, *, video_id: uuid.UUID, now: datetime) -> Video:
    """Make the reconciler act on a video at its next tick: resubmit a queued one, resume a
    download, or re-run a failed download whose output URL has not expired yet."""
    video = await repository.get(session, video_id)
    if video is None:
        raise AdminError(f"no video {video_id}")
    if video.status == Status.failed and video.output_url:
        if video.output_expires_at is not None and video.output_expires_at <= now:
            raise AdminError("the output URL has expired; the clip can no longer be fetched")
        values: dict[str, Any] = {
            "status": Status.downloading,
            "error_code": None,
            "error_message": None,
        }
    elif video.status in (Status.queued, Status.downloading):
        values = {}
    else:
        raise AdminError(
            f"video is {video.status}; retry applies to queued and downloading videos and to "
            "failed downloads (use repoll for processing videos)"
        )
    updated = await _make_due(session, video_id, video.status, now, **values)
    if updated is None:
        raise AdminError("the video changed meanwhile; look again")
    return updated


async def admin_repoll(session: AsyncSession, *, video_id: uuid.UUID, now: datetime) -> Video:
    """Poll hiapi for a processing video at the next tick instead of waiting."""
    updated = await _make_due(session, video_id, Status.processing, now)
    if updated is None:
        video = await repository.get(session, video_id)
        state = video.status if video else "missing"
        raise AdminError(f"video is {state}; repoll applies to processing videos only")
    return updated


async def _make_due(
    session: AsyncSession, video_id: uuid.UUID, was: str, now: datetime, **values: Any
) -> Video | None:
    """Due now and unowned, if the video's status is still ``was``."""
    stmt = (
        update(Video)
        .where(Video.id == video_id, Video.status == was)
        .values(due_at=now, lease_owner=None, updated_at=now, **values)
        .returning(Video)
    )
    result = await session.execute(stmt, execution_options={"synchronize_session": False})
    return result.scalar_one_or_none()
