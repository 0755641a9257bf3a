"""Scenario 5, end to end: from hiapi's success to the stored file, minus the raw transfer.

The simulator (its own uvicorn process) renders real clips with no extra latency and sends
real callbacks; videorelay (its own process) gets N submits from the load generator, then
each callback moves the video to ``downloading`` and the download stores it. Per video,
``ready_at - task_finished_at`` (callback applied → file stored and marked ready) is the
subject. Baseline: the raw transfer of the same files, fetched straight from the simulator by
the load generator at c=1. The overhead is the difference of the two.

Two runs: submits paced at ``PACED_RATE`` per second (a load the process sustains; the target
is judged here), and submits as fast as 8 connections allow (the process saturates its core,
so that figure is mostly time spent waiting for the CPU).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from sqlalchemy import select

from app.db import create_engine, create_sessionmaker
from app.models import Video
from tools.bench.common import (
    BenchConfig,
    Measurement,
    ScenarioResult,
    database,
    repetition_details,
    run_loadgen,
    service_env,
    uvicorn_server,
    write_spec,
)
from tools.procs import child_env, free_port, percentile

__all__ = ["run"]

TARGET_OVERHEAD_P99_MS = 100.0
WAIT_LIMIT_S = 300.0


async def _finished(url: str, expected: int, limit_s: float) -> list[Video]:
    """Wait until ``expected`` videos are terminal; return them (ready or failed)."""
    engine = create_engine(url)
    sessionmaker = create_sessionmaker(engine)
    deadline = time.monotonic() + limit_s
    try:
        while True:
            async with sessionmaker() as session:
                rows = list(
                    (
                        await session.execute(
                            select(Video).where(Video.status.in_(("ready", "failed")))
                        )
                    ).scalars()
                )
            if len(rows) >= expected or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.25)
    finally:
        await engine.dispose()


# Submits per second: about half of what one process sustains here (about 0.04 CPU s per
# video end to end, so some 25 videos/s saturate a core).
PACED_RATE = 10.0


def run(cfg: BenchConfig) -> ScenarioResult:
    result = ScenarioResult("e2e", "End to end")
    # The paced run (where the target is judged) is repeated; the flood shows queueing only.
    _report(cfg, result, [_pass(cfg, rate=PACED_RATE, rep=i) for i in range(cfg.reps)])
    _report(cfg, result, [_pass(cfg, rate=0.0, rep=0)])
    return result


def _pass(cfg: BenchConfig, *, rate: float, rep: int) -> dict[str, Any]:
    """One run of ``videos`` submits: paced at ``rate`` per second, or as fast as c=8 allows
    (``rate=0``: the process is saturated and the figure is mostly queueing)."""
    work = cfg.workdir / f"{'paced' if rate else 'flood'}-{rep}"
    work.mkdir()
    videos = cfg.count(20, 200)
    db = cfg.databases[0]
    sim_port, relay_port = free_port(), free_port()
    sim_origin = f"http://127.0.0.1:{sim_port}"
    sim_env = child_env(
        HIAPI_SIM_PUBLIC_BASE_URL=sim_origin,
        HIAPI_SIM_LATENCY_SECONDS="0",
        HIAPI_SIM_FETCH_IMAGES="false",
        HIAPI_SIM_CALLBACK_ENVELOPE="bare",
        HIAPI_SIM_SEED="6",
    )
    submit = json.dumps({"image_url": "https://example.com/still.jpg", "duration": 3})
    spec = write_spec(work / "e2e-submit.json", [("POST", "/v1/videos", submit)], cycle=True)
    with (
        uvicorn_server(
            "e2e-simulator",
            "app.simulator:create_simulator_app",
            env=sim_env,
            workdir=work,
            health="/_sim/stats",
            port=sim_port,
        ) as sim,
        database(db, "e2e", work) as url,
    ):
        env = service_env(
            url,
            work,
            HIAPI_BASE_URL=sim.url,
            PUBLIC_BASE_URL=f"http://127.0.0.1:{relay_port}",
            DOWNLOAD_ALLOWED_HOSTS=sim_origin,
        )
        with uvicorn_server(
            f"videorelay-e2e-{db}",
            "app.main:create_app_from_env",
            env=env,
            workdir=work,
            port=relay_port,
        ) as relay:
            cpu0 = relay.cpu_seconds()
            started = time.monotonic()
            submitted = run_loadgen(
                relay,
                spec,
                concurrency=8,
                duration=120,
                max_requests=videos,
                workdir=work,
                rate=rate,
            )
            done = asyncio.run(_finished(url, submitted.ok, WAIT_LIMIT_S))
            wall = time.monotonic() - started
            relay_cpu = relay.cpu_seconds() - cpu0
            ready = [v for v in done if v.status == "ready" and v.ready_at and v.task_finished_at]
            if not ready:
                raise RuntimeError(f"no video became ready ({len(done)} terminal)")
            files = [
                ("GET", str(v.output_url).removeprefix(sim_origin), "")
                for v in ready
                if v.output_url
            ]
            raw = run_loadgen(
                sim,
                write_spec(work / "e2e-files.json", files),
                concurrency=1,
                duration=60,
                workdir=work,
            )
    stored_ms = sorted(
        (v.ready_at - v.task_finished_at).total_seconds() * 1000
        for v in ready
        if v.ready_at and v.task_finished_at
    )
    p50, p99 = percentile(stored_ms, 50), percentile(stored_ms, 99)
    assert p50 is not None  # `ready` is not empty
    assert p99 is not None
    return {
        "rate": rate,
        "db": db,
        "raw": raw,
        "files": len(files),
        "p50_ms": p50,
        "p99_ms": p99,
        "overhead_p50_ms": p50 - raw.p50_ms,
        "overhead_p99_ms": p99 - raw.p99_ms,
        "submitted": submitted.ok,
        "ready": len(ready),
        "terminal": len(done),
        "relay_cpu_s_per_video": relay_cpu / max(1, len(done)),
        "wall_s": wall,
    }


def _report(cfg: BenchConfig, result: ScenarioResult, runs: list[dict[str, Any]]) -> None:
    rate, db = runs[0]["rate"], runs[0]["db"]
    label = f"paced at {rate:g}/s" if rate else "as fast as c=8 allows"
    raw_p99 = [r["raw"].p99_ms for r in runs]
    overhead = [r["overhead_p99_ms"] for r in runs]
    result.rows.append(
        Measurement.repeated(
            "baseline",
            f"raw transfer of the {runs[0]['files']} clips from the simulator, c=1 ({label} run)",
            "p99 ms",
            raw_p99,
            "itself",
            raw_p99,
            better="lower",
            details=repetition_details([r["raw"] for r in runs]),
        )
    )
    details = [{k: v for k, v in r.items() if k != "raw"} for r in runs]
    median = {k: statistics.median(d[k] for d in details) for k in details[0] if k != "db"}
    row = Measurement.repeated(
        "subject",
        f"callback applied → stored and ready, {db}, {runs[0]['ready']} videos, submits {label}",
        "p99 ms",
        [r["p99_ms"] for r in runs],
        "raw transfer",
        raw_p99,
        better="lower",
        details={**median, "repetitions": details},
        # The target is judged at a sustainable rate; flooded, the wait is queueing for CPU.
        target=f"overhead p99 <= {TARGET_OVERHEAD_P99_MS:g} ms" if rate else None,
        meets=(lambda i: overhead[i] <= TARGET_OVERHEAD_P99_MS) if rate else None,
    )
    result.rows.append(row)
    result.notes.append(
        f"End to end, submits {label} ({len(runs)} run{'s' if len(runs) > 1 else ''}, medians): "
        f"{median['submitted']:.0f} submits at c=8, {median['ready']:.0f} stored, "
        f"{median['terminal']:.0f} terminal after {median['wall_s']:.1f} s; overhead (stored − "
        f"raw transfer) p50 {median['overhead_p50_ms']:.1f} ms, p99 "
        f"{median['overhead_p99_ms']:.1f} ms (runs: "
        + ", ".join(f"{o:.1f}" for o in overhead)
        + f" ms); videorelay used {median['relay_cpu_s_per_video']:.3f} CPU s per video "
        "(submit, callback, download, bookkeeping). The start is when the callback is applied "
        "(`task_finished_at`), the closest the service sees to hiapi's success."
        + (
            ""
            if rate
            else " Submitted as fast as possible, the process runs at full CPU and every step "
            "of every download waits its turn: this row shows the queueing at saturation, "
            "the paced row the overhead itself."
        )
    )
