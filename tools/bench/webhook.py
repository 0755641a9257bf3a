"""Scenario 1, webhook ack: how many callbacks a burst can push through, and how fast each ack is.

Baselines, in the same run and with the same uvicorn flags:

* A: a bare FastAPI endpoint that parses the same JSON and answers 204 (``servers.bare_app``);
* B: one SQLAlchemy async session + ``INSERT ... ON CONFLICT DO NOTHING`` + commit per request
  (``servers.insert_app``), on each database.

Subject: videorelay itself (``app.main:create_app_from_env``) with its real route: HMAC token
check, JSON parse, the conditional ``UPDATE`` of ``lifecycle.apply_task``. Its rows are
inserted beforehand in ``processing`` with task ids. The callbacks report ``fail``, so no
download starts and the figure is the ack alone (a success would move the row the same way,
with one conditional UPDATE, and then start a download after the response).

Mixes: all-new callbacks (every request moves a row), and 50% duplicates (every other request
repeats a callback sent a little earlier, which the service answers ``duplicate``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from app.db import create_engine, utc_now
from app.hiapi.schemas import MODEL, Task, TaskError, TaskStatus
from app.models import Video
from app.security import webhook_token
from tools.bench.common import (
    BENCH_SECRET,
    BenchConfig,
    LoadResult,
    Measurement,
    ScenarioResult,
    database,
    insert_videos,
    interleave,
    repetition_details,
    run_loadgen,
    service_env,
    uvicorn_server,
    video_row,
    write_spec,
)
from tools.procs import Child, child_env

__all__ = ["callback_body", "run"]

CONCURRENCIES = (16, 64)
QUICK_CONCURRENCIES = (64,)  # --quick checks that the scenario runs; c=64 is the target's
DUPLICATE_LAG = 64  # a duplicate repeats the callback sent this many requests earlier
TARGET_P99_MS = 25.0
TARGET_NEW = {"sqlite": 0.3, "postgres": 0.4}
TARGET_DUP = 0.6


def callback_body(task_id: str) -> str:
    """A final ``fail`` callback as hiapi sends it (the bare task object)."""
    task = Task(
        task_id=task_id,
        status=TaskStatus.fail,
        model=MODEL,
        error=TaskError(
            code="generation_failed",
            message="the model could not generate a video for this input",
        ),
    )
    return json.dumps(task.wire())


def _callback(video_id: uuid.UUID, task_id: str) -> tuple[str, str, str]:
    token = webhook_token(BENCH_SECRET.encode(), video_id)
    return ("POST", f"/webhooks/hiapi/{video_id}/{token}", callback_body(task_id))


def _synthetic(count: int) -> list[tuple[str, str, str]]:
    return [_callback(uuid.uuid4(), f"bench-{uuid.uuid4().hex}") for _ in range(count)]


def _sequence(videos: list[tuple[uuid.UUID, str]], mix: str) -> list[tuple[str, str, str]]:
    if mix == "new":
        return [_callback(v, t) for v, t in videos]
    requests = []
    for i, (v, t) in enumerate(videos):
        requests.append(_callback(v, t))
        earlier = videos[max(0, i - DUPLICATE_LAG)]
        requests.append(_callback(*earlier))
    return requests


def _unique_sent(videos: list[tuple[uuid.UUID, str]], mix: str, sent: int) -> int:
    return min(sent, len(videos)) if mix == "new" else min((sent + 1) // 2, len(videos))


async def _count_failed(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            count = await conn.scalar(
                select(func.count()).select_from(Video).where(Video.status == "failed")
            )
    finally:
        await engine.dispose()
    return int(count or 0)


def _row(
    role: str,
    case: str,
    load: LoadResult,
    base_name: str,
    base: LoadResult,
    **extra: object,
) -> Measurement:
    details = load.details()
    details.update(extra)
    details["vs_A_concurrency"] = load.concurrency
    return Measurement(
        role=role,
        case=case,
        metric="req/s",
        value=load.rps,
        baseline=base_name,
        baseline_value=base.rps,
        details=details,
    )


def run(cfg: BenchConfig) -> ScenarioResult:
    result = ScenarioResult("webhook", "Webhook ack")
    duration = _duration(cfg)
    work = cfg.workdir
    # Baseline A's server stays up through every database's repetitions: each repetition runs
    # A, B, then the subject, so each subject figure has an A measured right beside it.
    spec_bare = write_spec(work / "bare.json", _synthetic(2_000), cycle=True)
    with uvicorn_server(
        "bare", "tools.bench.servers:bare_app", env=child_env(), workdir=work
    ) as bare:
        _load(cfg, bare, spec_bare, 16, _warmup(cfg))
        for db in cfg.databases:
            with database(db, f"webhook_{db}", work) as url:
                _run_database(cfg, result, db, url, bare, spec_bare)
    result.notes.append(
        "Callbacks report `fail` (no download is started), so the webhook figures are the ack "
        "alone: token check, JSON parse, one conditional UPDATE (duplicates: UPDATE + SELECT), "
        "commit. The service logs at INFO (its default) to a file."
    )
    result.notes.append(
        f"Each load run lasts {duration:g} s after a warm-up; load comes from a separate "
        "process (tools.bench.loadgen, keep-alive HTTP/1.1 on uvloop). Each figure is the "
        f"median of {cfg.reps} interleaved repetitions (A, B, subject new, subject 50% "
        "duplicates; then again), its ratio the median of each repetition's ratio against "
        "the A run beside it, and the range after it the lowest and highest of those ratios. "
        "`ratio_vs_B` in the JSON is against the insert-per-request baseline on the same "
        "database."
    )
    return result


def _concurrencies(cfg: BenchConfig) -> tuple[int, ...]:
    return QUICK_CONCURRENCIES if cfg.quick else CONCURRENCIES


def _duration(cfg: BenchConfig) -> float:
    return cfg.seconds(0.75, 5.0)


def _warmup(cfg: BenchConfig) -> float:
    return cfg.seconds(0.2, 1.0)


def _load(
    cfg: BenchConfig, server: Child, spec: Path, concurrency: int, seconds: float
) -> LoadResult:
    return run_loadgen(server, spec, concurrency=concurrency, duration=seconds, workdir=cfg.workdir)


def _run_database(
    cfg: BenchConfig,
    result: ScenarioResult,
    db: str,
    url: str,
    bare: Child,
    spec_bare: Path,
) -> None:
    work = cfg.workdir
    warmup = _warmup(cfg)
    # Enough distinct rows that no run can exhaust them before its time is up.
    per_run = cfg.count(6_000, 30_000)

    # The subject's rows, in `processing`: one set per run so every "new" callback moves a row.
    now = utc_now()
    rows: list[dict[str, object]] = []

    def plan(count: int) -> list[tuple[uuid.UUID, str]]:
        batch = [
            video_row(
                status="processing",
                now=now,
                due_in=timedelta(hours=1),
                task_id=f"bench-{uuid.uuid4().hex}",
            )
            for _ in range(count)
        ]
        rows.extend(batch)
        return [(r["id"], r["task_id"]) for r in batch]

    warm_plan = plan(2_000)
    plans = {
        (mix, c): [plan(per_run if mix == "new" else per_run // 2) for _ in range(cfg.reps)]
        for mix in ("new", "dup")
        for c in _concurrencies(cfg)
    }
    asyncio.run(insert_videos(url, rows))

    acked_unique = 0
    with (
        uvicorn_server(
            f"insert-{db}",
            "tools.bench.servers:insert_app",
            env=child_env(BENCH_DATABASE_URL=url),
            workdir=work,
        ) as insert,
        uvicorn_server(
            f"videorelay-{db}",
            "app.main:create_app_from_env",
            env=service_env(url, work),
            workdir=work,
        ) as subject,
    ):
        _load(cfg, insert, write_spec(work / "insert-warm.json", _synthetic(2_000)), 16, warmup)
        spec = write_spec(work / "subject-warm.json", _sequence(warm_plan, "new"))
        acked_unique += _unique_sent(warm_plan, "new", _load(cfg, subject, spec, 16, warmup).sent)
        for c in _concurrencies(cfg):
            inserts = [
                write_spec(work / f"insert-{c}-{i}.json", _synthetic(per_run))
                for i in range(cfg.reps)
            ]
            subjects = {
                mix: [
                    write_spec(work / f"subject-{mix}-{c}-{i}.json", _sequence(videos, mix))
                    for i, videos in enumerate(plans[(mix, c)])
                ]
                for mix in ("new", "dup")
            }
            a, b, new, dup = interleave(
                cfg.reps,
                _runner(cfg, bare, [spec_bare] * cfg.reps, c),
                _runner(cfg, insert, inserts, c),
                _runner(cfg, subject, subjects["new"], c),
                _runner(cfg, subject, subjects["dup"], c),
            )
            for mix, runs in (("new", new), ("dup", dup)):
                for videos, res in zip(plans[(mix, c)], runs, strict=True):
                    acked_unique += _unique_sent(videos, mix, res.sent)
            _rows(result, db, c, a, b, new, dup)
    recorded = asyncio.run(_count_failed(url))
    result.notes.append(
        f"{db}: {recorded} rows moved to `failed` for {acked_unique} distinct callbacks sent"
        + (" (every ack was recorded)." if recorded >= acked_unique else " (MISSING ROWS).")
    )


def _runner(
    cfg: BenchConfig, server: Child, specs: list[Path], concurrency: int
) -> Callable[[], LoadResult]:
    """A load run against ``server`` with the next of ``specs`` each time it is called."""
    remaining = iter(specs)
    return lambda: _load(cfg, server, next(remaining), concurrency, _duration(cfg))


def _rows(
    result: ScenarioResult,
    db: str,
    c: int,
    a: list[LoadResult],
    b: list[LoadResult],
    new: list[LoadResult],
    dup: list[LoadResult],
) -> None:
    a_rps = [r.rps for r in a]
    name_a = f"A, c={c}"
    result.rows.append(
        Measurement.repeated(
            "baseline",
            f"A: bare FastAPI 204, c={c} (beside {db})",
            "req/s",
            a_rps,
            "itself",
            a_rps,
            details=repetition_details(a),
        )
    )
    result.rows.append(
        Measurement.repeated(
            "baseline",
            f"B: insert per request, {db}, c={c}",
            "req/s",
            [r.rps for r in b],
            name_a,
            a_rps,
            details=repetition_details(b),
        )
    )
    floor = TARGET_NEW[db]
    p99_target = c == 64
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"videorelay, {db}, all new, c={c}",
            "req/s",
            [r.rps for r in new],
            name_a,
            a_rps,
            details=repetition_details(new, ratio_vs_B=_median_ratio(new, b)),
            target=f">= {floor}x A" + (f", p99 <= {TARGET_P99_MS:g} ms" if p99_target else ""),
            meets=lambda i: (
                new[i].rps >= floor * a[i].rps
                and (not p99_target or new[i].p99_ms <= TARGET_P99_MS)
            ),
        )
    )
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"videorelay, {db}, 50% duplicates, c={c}",
            "req/s",
            [r.rps for r in dup],
            name_a,
            a_rps,
            details=repetition_details(dup, ratio_vs_B=_median_ratio(dup, b)),
            target=f">= {TARGET_DUP}x A",
            meets=lambda i: dup[i].rps >= TARGET_DUP * a[i].rps,
        )
    )


def _median_ratio(subject: list[LoadResult], base: list[LoadResult]) -> float:
    return statistics.median(
        s.rps / b.rps if b.rps else float("nan") for s, b in zip(subject, base, strict=True)
    )
