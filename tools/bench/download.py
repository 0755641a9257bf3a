"""Scenario 2, download: copying a large clip into storage, against ``curl -o file``.

A file that starts with a real small MP4 clip (then a ``free`` box of zeros) is served by
``tools.bench.fileserver`` (sendfile, so the server is not the limit). Baseline: ``curl -s -o``
of the same URL. Subject: ``app.jobs.downloader.Downloader.run`` in its own process
(``tools.bench.download_child``): streaming, sha256, the MP4 check (PyAV), fsync, rename,
``mark_ready``. Runs alternate between the two (``--reps`` times) and the medians count. CPU
time comes from ``wait4``'s rusage (curl) and ``getrusage`` inside the child; peak RSS from
``VmHWM`` of each process.

Then the service under both loads at once: the webhook's ack p99 at c=64 while 8 downloads
run, against the same load without downloads; once with the downloads in the process that
takes the webhooks, once in a second process started with ``nice -n 10`` as the README
recommends (the webhook process runs with ``DOWNLOAD_CONCURRENCY=0`` and queues the
successes in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from app.db import create_engine, utc_now
from app.hiapi.schemas import Task, TaskOutput, TaskStatus
from app.models import Video
from app.security import webhook_token
from app.simulator.render import free_box_header, render_mp4
from tools.bench.common import (
    BENCH_SECRET,
    BenchConfig,
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
from tools.bench.webhook import callback_body
from tools.procs import Child, child_env, free_port

__all__ = ["make_mp4", "run"]

MIB = 1024 * 1024
GIB = 1024 * MIB
TARGET_RATIO = 0.6
TARGET_RSS_GROWTH_MIB = 64
TARGET_P99_GROWTH = 2.0
CHILD_TIMEOUT = 600.0
# The download worker runs at a lower CPU priority, as the README recommends: a clip has until
# expires_at, an ack has hiapi's timeout.
WORKER_NICE = 10


def make_mp4(path: Path, size: int) -> str:
    """Write ``size`` bytes: a real, small clip (the simulator's), then one ``free`` box of
    zeros, so the downloader's PyAV check passes and costs what a small clip costs. Returns
    sha256."""
    clip = render_mp4(None, resolution="720p", duration=3)
    free = free_box_header(size - len(clip))
    hasher = hashlib.sha256()
    zeros = bytes(MIB)
    with path.open("wb") as fh:
        head = clip + free
        fh.write(head)
        hasher.update(head)
        left = size - len(head)
        while left > 0:
            chunk = zeros if left >= MIB else zeros[:left]
            fh.write(chunk)
            hasher.update(chunk)
            left -= len(chunk)
    return hasher.hexdigest()


def _wait_port(server: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    assert server.port is not None
    while time.monotonic() < deadline:
        if not server.running:
            raise RuntimeError("the file server exited at start")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the file server did not start")


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _wait4(child: Child, timeout: float) -> tuple[int, Any, int]:
    """Reap ``child`` with ``os.wait4`` so its own CPU time is known; also return its peak RSS.

    The peak (KiB) is ``VmHWM`` sampled while it runs: ``ru_maxrss`` would start at this
    (forking) process's RSS.
    """
    proc = child.proc
    assert proc is not None
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        peak = max(peak, _hwm_kib(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage, peak
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise RuntimeError(f"{proc.args!r} did not finish in {timeout:g} s")
        time.sleep(0.01)


def _curl(url: str, out: Path, log: Path, cwd: Path) -> dict[str, float]:
    started = time.perf_counter()
    curl = Child("curl", ["curl", "-s", "-o", str(out), url], env=child_env(), cwd=cwd, log=log)
    code, usage, peak = _wait4(curl.start(), CHILD_TIMEOUT)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"curl failed with exit code {code}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_kib": float(peak),
        "size_bytes": float(out.stat().st_size),
    }


def _subject(cfg: BenchConfig, url: str, allow: str, size: int, label: str) -> dict[str, Any]:
    work = cfg.workdir
    with database("sqlite", f"download_{label}", work) as db_url:
        out = work / f"download-{label}.json"
        storage = work / f"storage-{label}"
        args = [
            sys.executable,
            "-m",
            "tools.bench.download_child",
            "--url",
            url,
            "--allow",
            allow,
            "--database-url",
            db_url,
            "--storage",
            str(storage),
            "--max-bytes",
            str(size * 2),
            "--out",
            str(out),
        ]
        started = time.perf_counter()
        log = work / "download-child.log"
        child = Child("download child", args, env=child_env(), cwd=work, log=log)
        code, _, _ = _wait4(child.start(), CHILD_TIMEOUT)
        wall = time.perf_counter() - started
        if code != 0 or not out.exists():
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the download child failed (exit {code}): {tail}")
        data: dict[str, Any] = json.loads(out.read_text())
        data["process_wall_s"] = wall
        _remove_tree(storage)
        return data


def _remove_tree(root: Path) -> None:
    if not root.exists():
        return
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    root.rmdir()


def run(cfg: BenchConfig) -> ScenarioResult:
    result = ScenarioResult("download", "Download")
    work = cfg.workdir
    size = cfg.count(64 * MIB, GIB)
    files = work / "files"
    files.mkdir(exist_ok=True)
    digest = make_mp4(files / "clip.mp4", size)
    port = free_port()
    server = Child(
        "file server",
        [sys.executable, "-m", "tools.bench.fileserver", "--dir", str(files), "--port", str(port)],
        env=child_env(),
        cwd=work,
        log=work / "fileserver.log",
        port=port,
    )
    with server:
        _wait_port(server)
        origin = server.url
        url = f"{origin}/clip.mp4"
        curls: list[dict[str, float]] = []
        subjects: list[dict[str, Any]] = []
        for i in range(cfg.reps):
            os.sync()
            out = work / "curl.out"
            curls.append(_curl(url, out, work / "curl.log", work))
            out.unlink()
            os.sync()
            got = _subject(cfg, url, origin, size, str(i))
            if not got["ready"] or got["sha256"] != digest or got["size_bytes"] != size:
                raise RuntimeError(f"the downloader did not store the file intact: {got}")
            subjects.append(got)
        _report(result, size, curls, subjects)
        _under_load(cfg, result, files, origin, split=False)
        _under_load(cfg, result, files, origin, split=True)
    return result


def _report(
    result: ScenarioResult, size: int, curls: list[dict[str, float]], subjects: list[dict[str, Any]]
) -> None:
    mib = size / MIB
    gib = size / GIB
    curl_rates = [mib / c["wall_s"] for c in curls]
    rates = [mib / s["wall_s"] for s in subjects]
    label = f"{mib:g} MiB" if size < GIB else f"{gib:g} GiB"
    result.rows.append(
        Measurement.repeated(
            "baseline",
            f"curl -s -o file, {label}",
            "MiB/s",
            curl_rates,
            "itself",
            curl_rates,
            details={"runs": curls},
        )
    )
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"Downloader.run, {label} (stream, sha256, ftyp, fsync, rename)",
            "MiB/s",
            rates,
            "curl -o file",
            curl_rates,
            details={"runs": subjects, "fsync_rename_s": [s["commit_s"] for s in subjects]},
            target=f">= {TARGET_RATIO}x curl",
            meets=lambda i: rates[i] >= TARGET_RATIO * curl_rates[i],
        )
    )
    result.rows.append(
        Measurement.repeated(
            "subject",
            "Downloader CPU time per GiB",
            "CPU s/GiB",
            [s["cpu_s"] / gib for s in subjects],
            "curl -o file",
            [c["cpu_s"] / gib for c in curls],
            better="lower",
        )
    )
    peaks = [s["peak_rss_kib"] / 1024 for s in subjects]
    befores = [s["rss_before_kib"] / 1024 for s in subjects]
    growth = [p - b for p, b in zip(peaks, befores, strict=True)]
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"Downloader peak RSS (process), {label}",
            "MiB",
            peaks,
            "same process before the download",
            befores,
            better="lower",
            details={
                "growth_mib": statistics.median(growth),
                "curl_peak_rss_mib": [c["peak_rss_kib"] / 1024 for c in curls],
            },
            target=f"growth <= {TARGET_RSS_GROWTH_MIB} MiB",
            meets=lambda i: growth[i] <= TARGET_RSS_GROWTH_MIB,
        )
    )
    commit = statistics.median(s["commit_s"] for s in subjects)
    wall = statistics.median(s["wall_s"] for s in subjects)
    result.notes.append(
        f"Download: {len(curls)} interleaved runs of each (curl, subject, curl, ...); the "
        "source file is in the page cache for both. The subject's time includes fsync + "
        f"rename (median {commit:.2f} s of {wall:.2f} s); curl does not fsync. Peak RSS of the "
        f"subject process is {statistics.median(peaks):.0f} MiB (median), "
        f"{statistics.median(growth):.0f} MiB above its RSS before the download (interpreter, "
        "SQLAlchemy, HTTP clients); curl's peak is "
        f"{statistics.median(c['peak_rss_kib'] for c in curls) / 1024:.0f} MiB. "
        "MAX_VIDEO_BYTES is raised above the file size."
    )


def _under_load(
    cfg: BenchConfig, result: ScenarioResult, files: Path, origin: str, *, split: bool
) -> None:
    """The webhook's ack p99 at c=64 with and without 8 downloads running.

    ``split=False``: the downloads run in the process that takes the webhooks. ``split=True``:
    that process has ``DOWNLOAD_CONCURRENCY=0`` (the successes are queued in the database) and
    a second videorelay process on the same database, which takes no webhooks, downloads them
    (Postgres when the run has it: that is the multi-process setup).
    """
    work = cfg.workdir
    db = "postgres" if split and "postgres" in cfg.databases else cfg.databases[0]
    label = "split" if split else "same"
    size = cfg.count(16 * MIB, 256 * MIB)
    make_mp4(files / "load.mp4", size)
    duration = cfg.seconds(1.0, 5.0)
    per_run = cfg.count(6_000, 30_000)
    concurrency = 64
    downloads = 8
    now = utc_now()

    def processing(count: int) -> list[dict[str, Any]]:
        return [
            video_row(
                status="processing",
                now=now,
                due_in=timedelta(hours=1),
                task_id=f"bench-{uuid.uuid4().hex}",
            )
            for _ in range(count)
        ]

    # One set of rows per repetition: each "new" callback moves a row, each success starts
    # a download of its own.
    warm = processing(1_000)
    quiets = [processing(per_run) for _ in range(cfg.reps)]
    busys = [processing(per_run) for _ in range(cfg.reps)]
    clip_sets = [processing(downloads) for _ in range(cfg.reps)]

    def spec(name: str, rows: list[dict[str, Any]]) -> Path:
        requests = [
            (
                "POST",
                f"/webhooks/hiapi/{r['id']}/{webhook_token(BENCH_SECRET.encode(), r['id'])}",
                callback_body(r["task_id"]),
            )
            for r in rows
        ]
        return write_spec(work / f"underload-{label}-{name}.json", requests)

    with database(db, f"download_under_load_{label}", work) as url, contextlib.ExitStack() as stack:
        everything = [warm, *quiets, *busys, *clip_sets]
        asyncio.run(insert_videos(url, [row for rows in everything for row in rows]))
        env = service_env(
            url,
            work,
            DOWNLOAD_CONCURRENCY="0" if split else str(downloads),
            DOWNLOAD_ALLOWED_HOSTS=origin,
            MAX_VIDEO_BYTES=str(size * 2),
        )
        if split:
            worker_env = {
                **env,
                "DOWNLOAD_CONCURRENCY": str(downloads),
                "RECONCILE_INTERVAL_SECONDS": "0.2",
            }
            stack.enter_context(
                uvicorn_server(
                    f"videorelay-worker-{db}",
                    "app.main:create_app_from_env",
                    env=worker_env,
                    workdir=work,
                    nice=WORKER_NICE,
                )
            )
        with uvicorn_server(
            f"videorelay-underload-{label}-{db}",
            "app.main:create_app_from_env",
            env=env,
            workdir=work,
            extra=(),
        ) as server:
            run_loadgen(server, spec("warm", warm), concurrency=16, duration=0.5, workdir=work)
            runs = [
                _with_and_without(
                    server,
                    url,
                    origin,
                    spec(f"quiet-{i}", quiets[i]),
                    spec(f"busy-{i}", busys[i]),
                    clip_sets[i],
                    concurrency=concurrency,
                    duration=duration,
                    workdir=work,
                )
                for i in range(cfg.reps)
            ]
    where = (
        f"in a second process at nice {WORKER_NICE} (webhook process: DOWNLOAD_CONCURRENCY=0)"
        if split
        else "in the same process"
    )
    without = [r["without"] for r in runs]
    busy = [r["with"] for r in runs]
    result.rows.append(
        Measurement.repeated(
            "subject",
            f"webhook ack p99, {db}, c={concurrency}, during {downloads} downloads {where}",
            "p99 ms",
            [r.p99_ms for r in busy],
            "same load without downloads",
            [r.p99_ms for r in without],
            better="lower",
            details={
                "repetitions": [
                    {**r, "with": r["with"].details(), "without": r["without"].details()}
                    for r in runs
                ],
                "download_bytes_each": size,
            },
            target=f"<= {TARGET_P99_GROWTH:g}x",
            meets=lambda i: busy[i].p99_ms <= TARGET_P99_GROWTH * without[i].p99_ms,
        )
    )
    result.notes.append(
        f"Under load ({db}, downloads {where}): in each of {len(runs)} repetitions, a "
        f"{duration:g} s webhook load at c={concurrency} without downloads, then {downloads} "
        f"callbacks with success start {downloads} downloads of {size // MIB} MiB each just "
        "before the same load again; the next repetition starts once they are stored. "
        + "; ".join(
            f"run {i + 1}: p99 {r['without'].p99_ms:.1f} → {r['with'].p99_ms:.1f} ms, "
            f"{r['without'].rps:.0f} → {r['with'].rps:.0f} req/s, load window "
            f"{r['load_window_s']:.1f} s, {r['downloads_ready']}/{downloads} stored after "
            f"{r['downloads_done_after_s']:.1f} s"
            for i, r in enumerate(runs)
        )
        + "."
    )


def _with_and_without(
    server: Child,
    url: str,
    origin: str,
    quiet: Path,
    busy: Path,
    clips: list[dict[str, Any]],
    *,
    concurrency: int,
    duration: float,
    workdir: Path,
) -> dict[str, Any]:
    """One repetition: the load without downloads, then with ``clips`` downloading."""
    without = run_loadgen(
        server, quiet, concurrency=concurrency, duration=duration, workdir=workdir
    )
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for r in clips:
            token = webhook_token(BENCH_SECRET.encode(), r["id"])
            task = Task(
                task_id=r["task_id"],
                status=TaskStatus.success,
                output=[
                    TaskOutput(
                        url=f"{origin}/load.mp4?v={r['id']}",
                        expires_at=int(time.time()) + 3600,
                    )
                ],
            )
            answer = client.post(f"/webhooks/hiapi/{r['id']}/{token}", json=task.wire())
            answer.raise_for_status()
    with_downloads = run_loadgen(
        server, busy, concurrency=concurrency, duration=duration, workdir=workdir
    )
    load_end = time.monotonic() - started
    finished = asyncio.run(_wait_ready(url, [r["id"] for r in clips], 300.0))
    return {
        "without": without,
        "with": with_downloads,
        "load_window_s": load_end,
        "downloads_ready": finished,
        "downloads_done_after_s": time.monotonic() - started,
    }


async def _wait_ready(url: str, ids: list[uuid.UUID], limit_s: float) -> int:
    engine = create_engine(url)
    deadline = time.monotonic() + limit_s
    try:
        while True:
            async with engine.connect() as conn:
                statuses = (
                    await conn.execute(select(Video.status).where(Video.id.in_(ids)))
                ).scalars()
                done = [s for s in statuses if s in ("ready", "failed")]
            if len(done) == len(ids) or time.monotonic() > deadline:
                return sum(1 for s in done if s == "ready")
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()
