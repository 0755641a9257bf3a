"""What every scenario shares: results, servers, load runs and scratch databases.

Child processes, ports and scratch Postgres come from ``tools.procs`` (every child dies with
the bench, every wait has a time limit).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from tools import procs
from tools.procs import Child, child_env, free_port, scratch_postgres

__all__ = [
    "BENCH_SECRET",
    "PG_ADMIN_DSN",
    "UVICORN_FLAGS",
    "BenchConfig",
    "LoadResult",
    "Measurement",
    "ScenarioResult",
    "database",
    "insert_videos",
    "interleave",
    "repetition_details",
    "run_loadgen",
    "service_env",
    "uvicorn_server",
    "video_row",
    "write_spec",
]

T = TypeVar("T")

BENCH_SECRET = "bench-webhook-secret-0123456789abcdef"
PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN_DSN", procs.PG_ADMIN_DSN)
# The services under test connect as this ``user@host:port`` (default: BENCH_PG_ADMIN_DSN's).
PG_HOST = os.environ.get("BENCH_PG_HOST")
# The same flags for the baselines and the subject (uvicorn picks uvloop and httptools).
UVICORN_FLAGS = ("--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5")


# --- results -----------------------------------------------------------------------------


@dataclass
class Measurement:
    """One figure beside its baseline.

    Measured once, ``ratio`` is ``value / baseline_value``. Measured in repetitions
    (``Measurement.repeated``), each repetition pairs a subject run with the baseline run next
    to it; ``value`` and ``baseline_value`` are then the medians, ``ratio`` the median of the
    repetitions' own ratios, ``spread`` their min and max, and ``verdict`` says whether every
    repetition met the target ("yes"), none did ("no"), or only some did ("unstable").
    """

    role: str  # "baseline" or "subject"
    case: str
    metric: str
    value: float
    baseline: str
    baseline_value: float
    better: str = "higher"  # which direction of ``ratio`` is good
    details: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    met: bool | None = None
    # One entry per repetition: its value, its baseline's value, its ratio, and whether it met
    # the target (None without a target).
    reps: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def repeated(
        cls,
        role: str,
        case: str,
        metric: str,
        values: Sequence[float],
        baseline: str,
        baseline_values: Sequence[float],
        *,
        better: str = "higher",
        details: dict[str, Any] | None = None,
        target: str | None = None,
        meets: Callable[[int], bool] | None = None,
    ) -> Measurement:
        """``values[i]`` was measured beside ``baseline_values[i]``; ``meets(i)`` says
        whether repetition ``i`` met ``target``."""
        if len(values) != len(baseline_values) or not values:
            raise ValueError("one baseline value per repetition, and at least one repetition")
        reps = [
            {
                "value": v,
                "baseline_value": b,
                "ratio": v / b if b else float("nan"),
                "met": meets(i) if meets is not None else None,
            }
            for i, (v, b) in enumerate(zip(values, baseline_values, strict=True))
        ]
        row = cls(
            role,
            case,
            metric,
            statistics.median(values),
            baseline,
            statistics.median(baseline_values),
            better=better,
            details=details or {},
            target=target,
            reps=reps,
        )
        if meets is not None:
            row.met = all(r["met"] for r in reps)
        return row

    @property
    def ratio(self) -> float:
        if self.reps:
            return float(statistics.median(r["ratio"] for r in self.reps))
        return self.value / self.baseline_value if self.baseline_value else float("nan")

    @property
    def spread(self) -> tuple[float, float] | None:
        """The lowest and highest ratio over the repetitions (None when measured once)."""
        if len(self.reps) < 2:
            return None
        ratios = [r["ratio"] for r in self.reps]
        return min(ratios), max(ratios)

    @property
    def verdict(self) -> str | None:
        """ "yes", "no" or "unstable" (some repetitions met the target, some did not)."""
        if self.met is None:
            return None
        if not self.reps:
            return "yes" if self.met else "no"
        hits = sum(1 for r in self.reps if r["met"])
        return "yes" if hits == len(self.reps) else "no" if hits == 0 else "unstable"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["spread"] = self.spread
        data["verdict"] = self.verdict
        return data


def interleave(reps: int, *runs: Callable[[], T]) -> list[list[T]]:
    """Run each of ``runs`` in turn, ``reps`` times over (a, b, a, b, ...); ``result[k]`` holds
    run k's results, one per repetition. Interleaved, a shared machine's slow moment falls on
    a baseline and its subject alike instead of on whichever happened to run then."""
    results: list[list[T]] = [[] for _ in runs]
    for _ in range(reps):
        for k, run in enumerate(runs):
            results[k].append(run())
    return results


@dataclass
class ScenarioResult:
    name: str
    title: str
    rows: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    appendix: list[str] = field(default_factory=list)  # query plans and such, verbatim
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        baselines = [r.to_json() for r in self.rows if r.role == "baseline"]
        results = [r.to_json() for r in self.rows if r.role == "subject"]
        return {
            "title": self.title,
            "baselines": baselines,
            "results": results,
            "notes": self.notes,
            "appendix": self.appendix,
            "seconds": self.seconds,
            "error": self.error,
        }


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    databases: tuple[str, ...]  # "sqlite" and/or "postgres"
    workdir: Path
    reps: int = 1  # interleaved repetitions of each load figure (``--reps``)

    def seconds(self, quick: float, full: float) -> float:
        return quick if self.quick else full

    def count(self, quick: int, full: int) -> int:
        return quick if self.quick else full


# --- servers -----------------------------------------------------------------------------


def uvicorn_server(
    name: str,
    factory: str,
    *,
    env: dict[str, str],
    workdir: Path,
    extra: Sequence[str] = (),
    health: str = "/healthz",
    port: int | None = None,
    nice: int = 0,
) -> Child:
    """``python -m uvicorn FACTORY --factory`` on 127.0.0.1, with the bench's flags: a ``Child``
    to use as a context manager (started, up once ``health`` answers, stopped at the end)."""
    port = port or free_port()
    # ``nice -n N`` execs the server: same pid, lower CPU priority.
    argv = [
        *(("nice", "-n", str(nice)) if nice else ()),
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *UVICORN_FLAGS,
        *extra,
    ]
    log = workdir / f"{name}.log"
    return Child(name, argv, env=env, cwd=workdir, log=log, port=port, health=health)


# --- load --------------------------------------------------------------------------------


@dataclass
class LoadResult:
    concurrency: int
    sent: int
    ok: int
    errors: int
    statuses: dict[str, int]
    elapsed_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    loadgen_cpu_s: float
    server_cpu_s: float = 0.0

    def details(self) -> dict[str, Any]:
        data = asdict(self)
        data["server_cpu_ms_per_req"] = (
            1000 * self.server_cpu_s / self.ok if self.ok else float("nan")
        )
        return data


def repetition_details(runs: Sequence[LoadResult], **extra: object) -> dict[str, Any]:
    """A repeated load figure's details: the median latencies the table shows, the errors of
    all repetitions, and every repetition's own figures."""
    return {
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "errors": sum(r.errors for r in runs),
        "repetitions": [r.details() for r in runs],
        **extra,
    }


def write_spec(
    path: Path,
    requests: Sequence[tuple[str, str, str]],
    *,
    headers: dict[str, str] | None = None,
    cycle: bool = False,
) -> Path:
    spec = {
        "requests": [list(r) for r in requests],
        "headers": {"Content-Type": "application/json", **(headers or {})},
        "cycle": cycle,
    }
    path.write_text(json.dumps(spec))
    return path


def run_loadgen(
    server: Child | str,
    spec: Path,
    *,
    concurrency: int,
    duration: float,
    workdir: Path,
    max_requests: int = 0,
    ok_status: Sequence[int] = (200, 201, 202, 204),
    rate: float = 0.0,
) -> LoadResult:
    """Run the load generator in its own process against ``server`` and return its figures."""
    url = server.url if isinstance(server, Child) else server
    port = int(url.rsplit(":", 1)[1])
    out = workdir / f"load-{uuid.uuid4().hex[:8]}.json"
    args = [
        sys.executable,
        "-m",
        "tools.bench.loadgen",
        "--port",
        str(port),
        "--spec",
        str(spec),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--max-requests",
        str(max_requests),
        "--rate",
        str(rate),
        "--out",
        str(out),
        "--ok-status",
        *(str(s) for s in ok_status),
    ]
    cpu0 = server.cpu_seconds() if isinstance(server, Child) else 0.0
    log = workdir / "loadgen.log"
    loadgen = Child("load generator", args, env=child_env(), cwd=workdir, log=log)
    code = loadgen.start().wait(duration + 60)
    cpu1 = server.cpu_seconds() if isinstance(server, Child) else 0.0
    if code != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the load generator failed (exit {code}): {tail}")
    data = json.loads(out.read_text())
    out.unlink()
    data.pop("answered", None)
    return LoadResult(server_cpu_s=cpu1 - cpu0, **data)


# --- databases ---------------------------------------------------------------------------


def video_row(
    *,
    status: str,
    now: datetime,
    due_in: timedelta,
    task_id: str | None = None,
    created_ago: timedelta = timedelta(0),
) -> dict[str, Any]:
    """Every column of a ``videos`` row, with aware UTC datetimes."""
    created = now - created_ago
    return {
        "id": uuid.uuid4(),
        "status": status,
        "image_url": "https://example.com/still.jpg",
        "prompt": "slow zoom",
        "resolution": "1080p",
        "duration": 5,
        "idempotency_key": None,
        "task_id": task_id,
        "error_code": None,
        "error_message": None,
        "due_at": now + due_in,
        "lease_owner": None,
        "submit_attempts": 1 if task_id else 0,
        "ambiguous_submits": 0,
        "poll_attempts": 0,
        "download_attempts": 0,
        "last_error": None,
        "output_url": "https://temp.hiapi.ai/clip.mp4" if status == "downloading" else None,
        "output_expires_at": now + timedelta(hours=1) if status == "downloading" else None,
        "completed_via": None,
        "size_bytes": None,
        "sha256": None,
        "storage_key": None,
        "created_at": created,
        "updated_at": created,
        "submitted_at": created if task_id else None,
        "task_finished_at": None,
        "ready_at": None,
    }


async def insert_videos(url: str, rows: Iterable[dict[str, Any]], chunk: int = 50_000) -> None:
    """Bulk-insert rows made by ``video_row``: COPY on Postgres, executemany on SQLite.

    ``rows`` may be a generator: it is consumed ``chunk`` rows at a time, so a million rows
    never sit in memory at once. The table is ANALYZEd at the end.
    """
    iterator = iter(rows)
    batches = iter(lambda: list(itertools.islice(iterator, chunk)), [])
    if url.startswith("postgresql"):
        dsn = url.replace("postgresql+asyncpg://", "postgresql://")
        conn = await asyncpg.connect(dsn)
        try:
            for batch in batches:
                columns = list(batch[0])
                records = [tuple(_naive(row[c]) for c in columns) for row in batch]
                await conn.copy_records_to_table("videos", records=records, columns=columns)
            await conn.execute("ANALYZE videos")
        finally:
            await conn.close()
        return
    from sqlalchemy import insert

    from app.db import create_engine
    from app.models import Video

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for batch in batches:
                await conn.execute(insert(Video), batch)
            await conn.exec_driver_sql("ANALYZE")
    finally:
        await engine.dispose()


def _naive(value: Any) -> Any:
    """The ``videos`` timestamps are naive UTC in the database (see ``app.db.UTCDateTime``)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


@contextlib.contextmanager
def database(kind: str, label: str, workdir: Path) -> Iterator[str]:
    """A migrated scratch database: a SQLite file in ``workdir`` or a Postgres database."""
    from app.migrate import upgrade

    if kind == "sqlite":
        path = workdir / f"{label}.db"
        url = f"sqlite+aiosqlite:///{path}"
        upgrade(url)
        try:
            yield url
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    with scratch_postgres(f"videorelay_bench_{label}", admin_dsn=PG_ADMIN_DSN, host=PG_HOST) as url:
        upgrade(url)
        yield url


def service_env(database_url: str, workdir: Path, **overrides: str) -> dict[str, str]:
    """Environment of a videorelay subprocess: none of the caller's settings leak in."""
    env = child_env(
        DATABASE_URL=database_url,
        WEBHOOK_SECRET=BENCH_SECRET,
        HIAPI_KEY="sk-bench-0123456789",
        # Nothing listens there: a poll or submit the bench did not plan fails fast.
        HIAPI_BASE_URL=f"http://127.0.0.1:{free_port()}",
        STORAGE_DIR=str(workdir / "videos"),
        LOG_LEVEL="INFO",
    )
    env.update(overrides)
    return env
