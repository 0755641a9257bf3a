"""``videorelay bench``: runs the scenarios in order, each in a scratch directory, then
publishes the report.

A scenario that fails is reported as failed (with its error) and the others still run; the
exit code is then 1 (2 when the bench cannot run as asked). Everything the bench starts is
stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg

from tools.bench import download, e2e, media, reconciler, report, submit, webhook
from tools.bench.common import PG_ADMIN_DSN, BenchConfig, ScenarioResult
from tools.procs import postgres_reachable

__all__ = ["SCENARIOS", "BenchError", "build_parser", "main", "run_bench"]

SCENARIOS: list[tuple[str, str, Callable[[BenchConfig], ScenarioResult]]] = [
    ("webhook", "Webhook ack", webhook.run),
    ("download", "Download", download.run),
    ("media", "Clip check (PyAV)", media.run),
    ("reconciler", "Reconciler at scale", reconciler.run),
    ("submit", "Submit overhead", submit.run),
    ("e2e", "End to end", e2e.run),
]


# Interleaved repetitions of each load figure: three give a median and a range, two (quick)
# check that the repetition machinery runs.
FULL_REPS = 3
QUICK_REPS = 2


class BenchError(Exception):
    """The bench cannot run as asked (for example, Postgres requested but unreachable)."""


def _databases(choice: str) -> tuple[tuple[str, ...], str | None]:
    if choice == "sqlite":
        return ("sqlite",), None
    if asyncio.run(postgres_reachable(PG_ADMIN_DSN)):
        return (("postgres",) if choice == "postgres" else ("sqlite", "postgres")), None
    if choice == "postgres":
        raise BenchError(f"Postgres is not reachable at {PG_ADMIN_DSN}")
    return ("sqlite",), f"Postgres not reachable at {PG_ADMIN_DSN}: measured on SQLite only"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> str:
    cpu = _cpu_model()
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} × {cpu}{mem}, {platform.system()} {platform.release()}"


async def _pg_version() -> str:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def _versions(databases: tuple[str, ...]) -> str:
    parts = [f"Python {platform.python_version()}"]
    for dist in ("fastapi", "uvicorn", "sqlalchemy", "httpx", "asyncpg", "aiosqlite", "uvloop"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    parts.append(f"SQLite {sqlite3.sqlite_version}")
    if "postgres" in databases:
        try:
            parts.append(f"PostgreSQL {asyncio.run(_pg_version())}")
        except (OSError, asyncpg.PostgresError, TimeoutError):
            pass
    return ", ".join(parts)


def run_bench(
    *,
    quick: bool,
    json_path: Path | None,
    database: str,
    only: list[str] | None = None,
    reps: int | None = None,
) -> int:
    known = [name for name, _, _ in SCENARIOS]
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        raise BenchError(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(known)}")
    reps = reps or (QUICK_REPS if quick else FULL_REPS)
    started = time.monotonic()
    load_before = os.getloadavg()
    databases, db_note = _databases(database)
    mode = "quick" if quick else "full"
    report.progress(f"{mode} run on {', '.join(databases)}")
    results: list[ScenarioResult] = []
    with tempfile.TemporaryDirectory(prefix="videorelay-bench-") as tmp:
        for name, title, scenario in SCENARIOS:
            if only and name not in only:
                continue
            cfg = BenchConfig(quick=quick, databases=databases, workdir=Path(tmp) / name, reps=reps)
            cfg.workdir.mkdir()
            t0 = time.monotonic()
            report.progress(f"{name} ...")
            try:
                result = scenario(cfg)
            except Exception as exc:
                trace = traceback.format_exc(limit=-3).strip().splitlines()
                result = ScenarioResult(name, title, error=f"{type(exc).__name__}: {exc}")
                result.notes.append("Traceback (last frames): " + " / ".join(trace[-6:]))
            result.seconds = time.monotonic() - t0
            # Each scenario starts on a quiet disk: the files one leaves (a 1 GiB source clip
            # that was never fsynced) would otherwise be written back during the next one,
            # and every Postgres commit there would wait behind that writeback.
            shutil.rmtree(cfg.workdir, ignore_errors=True)
            os.sync()
            report.progress(
                f"{name} {'FAILED' if result.error else 'done'} in {result.seconds:.1f} s"
            )
            results.append(result)
    if db_note is not None:
        results[0].notes.insert(0, db_note)
    meta: dict[str, Any] = {
        "mode": mode,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "databases": list(databases),
        "machine": _machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "reps": reps,
        "versions": _versions(databases),
        "python": sys.version.split()[0],
        "total_seconds": time.monotonic() - started,
        # The machine may be shared: a high load average before the run means other work
        # competed with it (every ratio is still taken within the run).
        "loadavg_1min_before": load_before[0],
        "loadavg_1min_after": os.getloadavg()[0],
        "loadavg_before": list(load_before),  # 1, 5 and 15 minutes
        "loadavg_after": list(os.getloadavg()),
    }
    report.publish(meta, results, json_path)
    return 1 if any(r.error for r in results) else 0


def build_parser(prog: str = "python -m tools.bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="benchmark the hot paths against baselines measured in the same run"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small and short, for CI: checks that it runs (1-2 minutes)",
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        default="bench-results.json",
        metavar="PATH",
        help="where to write the JSON results (default: bench-results.json)",
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres", "both"),
        default="both",
        help="default both (SQLite only, with a note, if Postgres is unreachable)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help="comma-separated scenarios to run (webhook, download, media, reconciler, submit, "
        "e2e); default all",
    )
    parser.add_argument(
        "--reps",
        type=_positive,
        default=None,
        metavar="N",
        help=f"interleaved repetitions of each load figure (default {FULL_REPS}, "
        f"{QUICK_REPS} with --quick): figures are medians, printed with their range",
    )
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m tools.bench") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run_bench(
            quick=args.quick,
            json_path=Path(args.json_path),
            database=args.database,
            only=[name for name in args.only.split(",") if name],
            reps=args.reps,
        )
    except BenchError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
