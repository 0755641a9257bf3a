"""Scenario 3, the reconciler at scale: does its cost follow the stale rows or the table?

A table of N videos (100,000, and 1,000,000 on Postgres; 10,000 with ``--quick``) of which
1,000 are stale (300 queued past their retry time, 500 processing past their poll time,
200 downloading with an expired lease); the rest are ready, failed, or waiting with a due
time in the future. Baseline: the same
1,000 stale rows alone in a table. Measured, in this process, on the service's own code:

* one ``lifecycle.claim_due`` batch (``RECONCILE_BATCH_SIZE`` = 100 rows of ``processing``);
* one full ``Reconciler.tick()``: 100 resubmits and 100 polls against a hiapi address where
  nothing listens (each fails at once and is recorded for a retry), 100 downloads resumed
  (the job runner is stopped, so the claim happens but no download starts);
* the plan of the exact claim statement the service sends (captured from SQLAlchemy), with
  ``EXPLAIN (ANALYZE, BUFFERS)`` on Postgres in a rolled-back transaction and
  ``EXPLAIN QUERY PLAN`` on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import delete, event
from sqlalchemy.ext.asyncio import AsyncSession

from app import lifecycle
from app.config import Settings
from app.context import open_context
from app.db import create_engine, create_sessionmaker, utc_now
from app.models import Status, Video
from tools.bench.common import (
    BENCH_SECRET,
    BenchConfig,
    Measurement,
    ScenarioResult,
    database,
    insert_videos,
    video_row,
)
from tools.procs import free_port

__all__ = ["run"]

STALE = {Status.queued: 300, Status.processing: 500, Status.downloading: 200}
BATCH = 100
TARGET_CLAIM_MS = 20.0
MILLION = 1_000_000
INDEX = "ix_videos_status_due_at"


def _rows(total: int) -> Iterator[dict[str, Any]]:
    """The stale rows, then the healthy ones, made lazily (a million rows stay cheap)."""
    now = utc_now()
    past = timedelta(minutes=-5)
    for status, count in STALE.items():
        for _ in range(count):
            task = None if status == Status.queued else f"bench-{uuid.uuid4().hex}"
            yield video_row(
                status=status,
                now=now,
                due_in=past,
                task_id=task,
                created_ago=timedelta(hours=1),
            )
    rest = total - sum(STALE.values())
    # Healthy rows: mostly finished, some waiting with a due time in the future (same statuses
    # as the stale ones, so an index on status alone would not be enough).
    shares = [
        (Status.ready, 0.80, timedelta(days=1)),
        (Status.failed, 0.05, timedelta(days=1)),
        (Status.processing, 0.10, timedelta(minutes=10)),
        (Status.queued, 0.03, timedelta(minutes=10)),
        (Status.downloading, 0.02, timedelta(seconds=60)),
    ]
    for status, share, due in shares:
        for i in range(int(rest * share)):
            task = None if status == Status.queued else f"bench-{uuid.uuid4().hex}"
            yield video_row(
                status=status,
                now=now,
                due_in=due,
                task_id=task,
                created_ago=timedelta(seconds=i),
            )


async def _measure(url: str, total: int, workdir: Path) -> dict[str, Any]:
    await insert_videos(url, _rows(total))
    settings = Settings(
        _env_file=None,
        DATABASE_URL=url,
        HIAPI_KEY=SecretStr("sk-bench-0123456789"),
        HIAPI_BASE_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens: fails at once
        WEBHOOK_SECRET=SecretStr(BENCH_SECRET),
        STORAGE_DIR=workdir / "reconciler-videos",
        RECONCILE_BATCH_SIZE=BATCH,
    )
    engine = create_engine(url)
    sm = create_sessionmaker(engine)
    captured: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE VIDEOS") and "due_at <=" in statement:
            captured.append((statement, params))

    async def claim(session: AsyncSession) -> list[Any]:
        return await lifecycle.claim_due(
            session,
            status=Status.processing,
            now=utc_now(),
            hold=timedelta(seconds=120),
            owner=uuid.uuid4().hex,
            limit=BATCH,
        )

    try:
        # Warm the connection pool and the statement caches on a claim that finds nothing.
        async with sm() as session, session.begin():
            await lifecycle.claim_due(
                session,
                status=Status.failed,
                now=utc_now(),
                hold=timedelta(seconds=1),
                owner="warm",
                limit=BATCH,
            )
        # The plan of the exact statement, in a transaction that is rolled back.
        event.listen(engine.sync_engine, "before_cursor_execute", capture)
        async with sm() as session:
            await session.begin()
            await claim(session)
            event.remove(engine.sync_engine, "before_cursor_execute", capture)
            statement, params = captured[-1]
            conn = await session.connection()
            if engine.dialect.name == "postgresql":
                explain = "EXPLAIN (ANALYZE, BUFFERS) " + statement
            else:
                explain = "EXPLAIN QUERY PLAN " + statement
            plan_rows = (await conn.exec_driver_sql(explain, params)).all()
            await session.rollback()
        plan = "\n".join(" | ".join(str(c) for c in row) for row in plan_rows)

        ticks = []
        async with open_context(
            settings, engine=engine, sessionmaker=sm, clock=utc_now, head_revision=None
        ) as ctx:
            ctx.stop.set()  # the job runner starts no download (and claims none)
            for _ in range(2):
                started = time.perf_counter()
                stats = await ctx.reconciler.tick()
                ticks.append((time.perf_counter() - started) * 1000)
        claims = []
        claimed = 0
        for _ in range(3):
            started = time.perf_counter()
            async with sm() as session, session.begin():
                claimed += len(await claim(session))
            claims.append((time.perf_counter() - started) * 1000)
    finally:
        await engine.dispose()
    return {
        "claim_ms": statistics.median(claims),
        "claim_runs_ms": claims,
        "claimed": claimed,
        "tick_ms": min(ticks),
        "tick_runs_ms": ticks,
        "last_tick": {
            "resubmitted": stats.resubmitted,
            "polled": stats.polled,
            "downloads_resumed": stats.downloads_resumed,
        },
        "plan": plan,
        "statement": statement,
    }


async def _empty(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(delete(Video))
    finally:
        await engine.dispose()


def _index_used(db: str, plan: str) -> bool:
    if INDEX not in plan:
        return False
    return not (db == "postgres" and "Seq Scan on videos" in plan)


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """The service's log lines (one per failed resubmit or poll) go to a file, at INFO."""
    logger = logging.getLogger("app")
    handler = logging.FileHandler(path)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def run(cfg: BenchConfig) -> ScenarioResult:
    with _log_to(cfg.workdir / "reconciler.log"):
        return _run(cfg)


def _run(cfg: BenchConfig) -> ScenarioResult:
    result = ScenarioResult("reconciler", "Reconciler at scale")
    stale = sum(STALE.values())
    for db in cfg.databases:
        sizes = [cfg.count(10_000, 100_000)]
        if db == "postgres" and not cfg.quick:
            sizes.append(MILLION)  # COPY makes a million rows affordable on Postgres
        # One scratch database per engine, emptied between table sizes (a migration each
        # would cost more than the measurements).
        with database(db, "reconciler", cfg.workdir) as url:
            small = asyncio.run(_measure(url, stale, cfg.workdir))
            bigs = []
            for total in sizes:
                asyncio.run(_empty(url))
                bigs.append((total, asyncio.run(_measure(url, total, cfg.workdir))))
        base_name = f"same, {stale:,}-row table"
        result.rows.append(
            Measurement(
                "baseline",
                f"claim_due batch ({BATCH}), {db}, {stale:,} rows (all stale)",
                "ms",
                small["claim_ms"],
                "itself",
                small["claim_ms"],
                better="lower",
                details={k: v for k, v in small.items() if k not in ("plan", "statement")},
            )
        )
        result.rows.append(
            Measurement(
                "baseline",
                f"Reconciler.tick(), {db}, {stale:,} rows (all stale)",
                "ms",
                small["tick_ms"],
                "itself",
                small["tick_ms"],
                better="lower",
            )
        )
        for total, big in bigs:
            used = _index_used(db, big["plan"])
            claim = Measurement(
                "subject",
                f"claim_due batch ({BATCH}), {db}, {total:,} rows ({stale:,} stale)",
                "ms",
                big["claim_ms"],
                base_name,
                small["claim_ms"],
                better="lower",
                details={
                    "index_used": used,
                    **{k: v for k, v in big.items() if k not in ("plan", "statement")},
                },
                target=f"<= {TARGET_CLAIM_MS:g} ms, index used",
            )
            claim.met = big["claim_ms"] <= TARGET_CLAIM_MS and used
            result.rows.append(claim)
            result.rows.append(
                Measurement(
                    "subject",
                    f"Reconciler.tick(), {db}, {total:,} rows ({stale:,} stale)",
                    "ms",
                    big["tick_ms"],
                    base_name,
                    small["tick_ms"],
                    better="lower",
                    details={"last_tick": big["last_tick"]},
                )
            )
            result.appendix.append(
                f"{db}, {total:,} rows: plan of the claim statement "
                f"({'index used' if used else 'INDEX NOT USED'})\n\n{big['statement'].strip()}"
                f"\n\n{big['plan']}"
            )
    result.notes.append(
        f"Reconciler: a tick claims up to {BATCH} rows of each of queued/processing/downloading; "
        "its resubmits and polls fail at once (nothing listens at the hiapi address) and each is "
        "recorded in its own transaction, so the tick's time is mostly those per-row writes. "
        "Claim times are the median of 3 batches, tick times the best of 2."
    )
    return result
