"""Scenario 4, submit overhead: what ``POST /v1/videos`` adds on top of hiapi's own create.

The hiapi simulator runs as its own uvicorn process (same flags) with tasks that never finish
during the run (no render, no callback), so only the create endpoint is exercised. Baseline:
the load generator creates tasks on the simulator directly, with the body videorelay sends.
Subject: the load generator calls ``POST /v1/videos`` on videorelay, which validates, inserts
the row, creates the task on the simulator and records it (``processing``) before answering.
At c=1 the difference of the latencies is videorelay's overhead; at c=16 the throughputs.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from app.hiapi.schemas import MODEL
from tools.bench.common import (
    BenchConfig,
    LoadResult,
    Measurement,
    ScenarioResult,
    database,
    interleave,
    repetition_details,
    run_loadgen,
    service_env,
    uvicorn_server,
    write_spec,
)
from tools.procs import Child, child_env, free_port

__all__ = ["run"]

API_KEY = "sk-bench-0123456789"
TARGET_ADDED_P50_MS = 3.0
THROUGHPUT_CONCURRENCY = 16


def run(cfg: BenchConfig) -> ScenarioResult:
    result = ScenarioResult("submit", "Submit overhead")
    work = cfg.workdir
    duration = cfg.seconds(0.75, 5.0)
    sim_env = child_env(
        HIAPI_SIM_LATENCY_SECONDS="3600",  # tasks stay `handling` for the whole run
        HIAPI_SIM_FAIL_RATE="1",  # a failing task renders nothing
        HIAPI_SIM_CALLBACK_DROP_RATE="1",  # and sends no callback
        HIAPI_SIM_FETCH_IMAGES="false",
    )
    create = json.dumps(
        {
            "model": MODEL,
            "input": {
                "image_urls": ["https://example.com/still.jpg"],
                "resolution": "1080p",
                "duration": 3,
                "prompt": "slow zoom",
            },
            "callback": {
                "url": "http://127.0.0.1:9/webhooks/hiapi/x/y",
                "when": "final",
            },
        }
    )
    submit = json.dumps(
        {"image_url": "https://example.com/still.jpg", "prompt": "slow zoom", "duration": 3}
    )
    direct_spec = write_spec(
        work / "submit-direct.json",
        [("POST", "/v1/tasks", create)],
        headers={"Authorization": f"Bearer {API_KEY}"},
        cycle=True,
    )
    relay_spec = write_spec(
        work / "submit-relay.json", [("POST", "/v1/videos", submit)], cycle=True
    )

    def load(server: Child, spec: Path, c: int, seconds: float) -> LoadResult:
        return run_loadgen(server, spec, concurrency=c, duration=seconds, workdir=work)

    db = cfg.databases[0]
    with (
        uvicorn_server(
            "simulator",
            "app.simulator:create_simulator_app",
            env=sim_env,
            workdir=work,
            health="/_sim/stats",
        ) as sim,
        database(db, "submit", work) as url,
    ):
        port = free_port()
        env = service_env(
            url, work, HIAPI_BASE_URL=sim.url, PUBLIC_BASE_URL=f"http://127.0.0.1:{port}"
        )
        with uvicorn_server(
            f"videorelay-submit-{db}",
            "app.main:create_app_from_env",
            env=env,
            workdir=work,
            port=port,
        ) as relay:
            load(sim, direct_spec, 4, cfg.seconds(0.2, 1.0))
            load(relay, relay_spec, 4, cfg.seconds(0.2, 1.0))
            c = THROUGHPUT_CONCURRENCY
            direct1, relay1, direct16, relay16 = interleave(
                cfg.reps,
                lambda: load(sim, direct_spec, 1, duration),
                lambda: load(relay, relay_spec, 1, duration),
                lambda: load(sim, direct_spec, c, duration),
                lambda: load(relay, relay_spec, c, duration),
            )

    added_p50 = [r.p50_ms - d.p50_ms for r, d in zip(relay1, direct1, strict=True)]
    added_p99 = [r.p99_ms - d.p99_ms for r, d in zip(relay1, direct1, strict=True)]
    result.rows.append(
        Measurement.repeated(
            "baseline",
            "simulator POST /v1/tasks direct, c=1",
            "p50 ms",
            [d.p50_ms for d in direct1],
            "itself",
            [d.p50_ms for d in direct1],
            better="lower",
            details=repetition_details(direct1),
        )
    )
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"videorelay POST /v1/videos, {db}, c=1",
            "p50 ms",
            [r.p50_ms for r in relay1],
            "simulator direct, c=1",
            [d.p50_ms for d in direct1],
            better="lower",
            details=repetition_details(
                relay1,
                added_p50_ms=statistics.median(added_p50),
                added_p99_ms=statistics.median(added_p99),
                added_p50_ms_range=[min(added_p50), max(added_p50)],
            ),
            target=f"added p50 <= {TARGET_ADDED_P50_MS:g} ms",
            meets=lambda i: added_p50[i] <= TARGET_ADDED_P50_MS,
        )
    )
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"videorelay POST /v1/videos, {db}, c=1 (p99)",
            "p99 ms",
            [r.p99_ms for r in relay1],
            "simulator direct, c=1",
            [d.p99_ms for d in direct1],
            better="lower",
            details={"added_p99_ms": statistics.median(added_p99)},
        )
    )
    result.rows.append(
        Measurement.repeated(
            "baseline",
            f"simulator POST /v1/tasks direct, c={c}",
            "req/s",
            [d.rps for d in direct16],
            "itself",
            [d.rps for d in direct16],
            details=repetition_details(direct16),
        )
    )
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"videorelay POST /v1/videos, {db}, c={c}",
            "req/s",
            [r.rps for r in relay16],
            f"simulator direct, c={c}",
            [d.rps for d in direct16],
            details=repetition_details(relay16),
        )
    )
    added = f"{statistics.median(added_p50):.2f} ms at p50 (range {min(added_p50):.2f} to "
    added += f"{max(added_p50):.2f}) and {statistics.median(added_p99):.2f} ms at p99"
    result.notes.append(
        f"Submit: added latency at c=1 is {added} over the simulator's own create (medians "
        f"of {cfg.reps} interleaved repetitions). The simulator's tasks never finish during "
        "the run (no render, no callback), so only the create path is measured; at c=16 videorelay "
        "and the simulator share the machine's 2 cores."
    )
    return result
