"""``videorelay admin``: what an operator runs against the database when something is stuck.

The commands only change rows (through ``lifecycle``); the running service's reconciler then
does the work at its next tick, on whichever replica claims it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import timedelta

from app import lifecycle
from app.config import Settings
from app.db import create_engine, create_sessionmaker, utc_now

__all__ = ["add_parser", "run"]


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
                rows = await lifecycle.stuck(
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
            action = lifecycle.admin_retry if args.action == "retry" else lifecycle.admin_repoll
            try:
                video = await action(session, video_id=args.video_id, now=now)
            except lifecycle.AdminError as exc:
                print(f"videorelay admin {args.action}: {exc}")
                return 1
            print(f"{video.id}: {video.status}, due now; the reconciler acts at its next tick")
            return 0
    finally:
        await engine.dispose()
