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
    warmup = _warmup(cfg)
    # Enough distinct rows that no run can exhaust them before its time is up.
    per_run = cfg.count(6_000, 30_000)
    work = cfg.workdir

    def load(server: Child, spec: Path, concurrency: int, seconds: float) -> LoadResult:
        return _load(cfg, server, spec, concurrency, seconds)

    # Baseline A runs before and after everything else (its server idles in between), and the
    # mean of the two is the reference: drift on a shared machine shows up in its details.
    spec_bare = write_spec(work / "bare.json", _synthetic(2_000), cycle=True)
    with uvicorn_server(
        "bare", "tools.bench.servers:bare_app", env=child_env(), workdir=work
    ) as server:
        load(server, spec_bare, 16, warmup)
        before = {c: load(server, spec_bare, c, duration) for c in _concurrencies(cfg)}
        for db in cfg.databases:
            with database(db, f"webhook_{db}", work) as url:
                _run_database(cfg, result, db, url, before, per_run)
        after = {c: load(server, spec_bare, c, duration) for c in _concurrencies(cfg)}
    rows = []
    for c in _concurrencies(cfg):
        runs = (before[c], after[c])
        rps = statistics.mean(r.rps for r in runs)
        details: dict[str, object] = {
            "p50_ms": statistics.mean(r.p50_ms for r in runs),
            "p99_ms": statistics.mean(r.p99_ms for r in runs),
            "errors": sum(r.errors for r in runs),
            "before": before[c].details(),
            "after": after[c].details(),
            "drift": after[c].rps / before[c].rps - 1 if before[c].rps else float("nan"),
        }
        rows.append(
            Measurement(
                "baseline",
                f"A: bare FastAPI 204, c={c}",
                "req/s",
                rps,
                "itself",
                rps,
                details=details,
            )
        )
        for row in result.rows:
            if row.details.get("vs_A_concurrency") == c:
                row.baseline_value = rps
    result.rows[:0] = rows
    drift = ", ".join(
        f"c={c}: {before[c].rps:.0f} then {after[c].rps:.0f} req/s" for c in _concurrencies(cfg)
    )
    result.notes.append(
        "Callbacks report `fail` (no download is started), so the webhook figures are the ack "
        "alone: token check, JSON parse, one conditional UPDATE (duplicates: UPDATE + SELECT), "
        "commit. The service logs at INFO (its default) to a file."
    )
    result.notes.append(
        f"Each load run lasts {duration:g} s after a warm-up; load comes from a separate "
        "process (tools.bench.loadgen, keep-alive HTTP/1.1 on uvloop). Ratios are against "
        "baseline A at the same concurrency (the mean of a run before and one after all the "
        f"others: {drift}); `ratio_vs_B` in the JSON is against the insert-per-request "
        "baseline on the same database."
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
    bare: dict[int, LoadResult],
    per_run: int,
) -> None:
    work = cfg.workdir
    warmup = _warmup(cfg)
    duration = _duration(cfg)

    def load(server: Child, spec: Path, concurrency: int, seconds: float) -> LoadResult:
        return _load(cfg, server, spec, concurrency, seconds)

    # Baseline B: insert per request.
    insert: dict[int, LoadResult] = {}
    with uvicorn_server(
        f"insert-{db}",
        "tools.bench.servers:insert_app",
        env=child_env(BENCH_DATABASE_URL=url),
        workdir=work,
        extra=(),
    ) as server:
        load(server, write_spec(work / "insert-warm.json", _synthetic(2_000)), 16, warmup)
        for c in _concurrencies(cfg):
            spec = write_spec(work / f"insert-{c}.json", _synthetic(per_run))
            insert[c] = load(server, spec, c, duration)
            result.rows.append(
                _row(
                    "baseline",
                    f"B: insert per request, {db}, c={c}",
                    insert[c],
                    f"A, c={c}",
                    bare[c],
                )
            )

    # Subject: rows in `processing`, one set per run so every "new" callback moves a row.
    now = utc_now()
    plans: dict[tuple[str, int], list[tuple[uuid.UUID, str]]] = {}
    rows = []
    for key in [("warm", 16)] + [(m, c) for m in ("new", "dup") for c in _concurrencies(cfg)]:
        count = 2_000 if key[0] == "warm" else per_run if key[0] == "new" else per_run // 2
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
        plans[key] = [(r["id"], r["task_id"]) for r in batch]
    asyncio.run(insert_videos(url, rows))

    env = service_env(url, work)
    acked_unique = 0
    with uvicorn_server(
        f"videorelay-{db}", "app.main:create_app_from_env", env=env, workdir=work, extra=()
    ) as server:
        spec = write_spec(work / "subject-warm.json", _sequence(plans[("warm", 16)], "new"))
        warm = load(server, spec, 16, warmup)
        acked_unique += _unique_sent(plans[("warm", 16)], "new", warm.sent)
        for mix in ("new", "dup"):
            for c in _concurrencies(cfg):
                videos = plans[(mix, c)]
                spec = write_spec(work / f"subject-{mix}-{c}.json", _sequence(videos, mix))
                res = load(server, spec, c, duration)
                acked_unique += _unique_sent(videos, mix, res.sent)
                row = _row(
                    "subject",
                    f"videorelay, {db}, {'all new' if mix == 'new' else '50% duplicates'}, c={c}",
                    res,
                    f"A, c={c}",
                    bare[c],
                    ratio_vs_B=res.rps / insert[c].rps if insert[c].rps else float("nan"),
                )
                if mix == "new":
                    floor = TARGET_NEW[db]
                    row.target = f">= {floor}x A" + (
                        f", p99 <= {TARGET_P99_MS:g} ms" if c == 64 else ""
                    )
                    row.met = row.ratio >= floor and (c != 64 or res.p99_ms <= TARGET_P99_MS)
                else:
                    row.target = f">= {TARGET_DUP}x A"
                    row.met = row.ratio >= TARGET_DUP
                result.rows.append(row)
    recorded = asyncio.run(_count_failed(url))
    result.notes.append(
        f"{db}: {recorded} rows moved to `failed` for {acked_unique} distinct callbacks sent"
        + (" (every ack was recorded)." if recorded >= acked_unique else " (MISSING ROWS).")
    )
