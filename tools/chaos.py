"""``videorelay chaos``: real processes, injected faults, SIGKILLs, and a report of what held.

In order, everything on 127.0.0.1 and bounded in time:

1. start the hiapi simulator (``videorelay simulator``) with faults on: 30% of callbacks
   dropped, 30% duplicated (2-3 copies, sent concurrently), 10% of creates answered 503, 5% of
   creates held past ``HIAPI_TIMEOUT_SECONDS`` after the task was made (ambiguous), 5% of
   tasks failing, and throttled, padded downloads (about 1.3 s each). Knobs the CLI lacks are
   set through ``PATCH /_sim/config``;
2. create a scratch database (a new Postgres database, or a SQLite file in a temp dir) and
   run ``videorelay migrate``;
3. start ``--replicas`` ``videorelay serve`` processes on their own ports, sharing the
   database, ``STORAGE_DIR`` and ``WEBHOOK_SECRET``, with short reconcile and retry timings.
   Callbacks go to the replica that created the task; while it is dead they fail, hiapi
   retries a few times, and then the reconciler has to find the result by polling;
4. submit the batch round-robin with bounded concurrency. A submit that fails because its
   replica died is sent again to another one with the same ``Idempotency-Key``;
5. meanwhile SIGKILL a random replica ``--kills`` times, spread over the run's progress, and
   restart it after a short pause;
6. wait until every video is ``ready`` or ``failed`` (or ``--timeout``), stop the replicas,
   then read the simulator's per-task records (``GET /_sim/tasks``), the database and the
   storage directory, and print the report of ``tools.chaos_report`` (JSON with ``--json``).

Exit code: 0 when nothing was lost, nothing was downloaded twice and every stored file is
intact; 1 otherwise; 2 when the run itself could not be carried out; 130 when interrupted.
Child processes (``tools.procs.Child``) are killed on every exit path (on Linux they also die
with this process, even on SIGKILL), and the scratch database and directory are removed
(``--keep`` keeps both; a failed run keeps the directory with its logs). ``python -m
tools.chaos`` is the same as ``videorelay chaos``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine
from app.models import Video
from tools.chaos_report import (
    KillEvent,
    RunData,
    SimTaskInfo,
    StoredFile,
    VideoRow,
    build_report,
    render_text,
)
from tools.procs import (
    PG_ADMIN_DSN,
    Child,
    ChildFailed,
    PostgresUnreachable,
    child_env,
    create_database,
    database_url,
    drop_database,
    free_port,
)

__all__ = [
    "ChaosError",
    "ChaosOptions",
    "build_parser",
    "main",
    "options_from_args",
    "run_chaos",
]

HIAPI_TIMEOUT_SECONDS = 2.0
SERVICE_SETTINGS = {
    "HIAPI_TIMEOUT_SECONDS": str(HIAPI_TIMEOUT_SECONDS),
    "RECONCILE_AFTER_SECONDS": "5",
    "RECONCILE_INTERVAL_SECONDS": "1",
    "RECONCILE_BATCH_SIZE": "100",
    "DOWNLOAD_LEASE_SECONDS": "5",
    "DOWNLOAD_CONCURRENCY": "8",
    "RETRY_BASE_SECONDS": "0.5",
    "RETRY_MAX_SECONDS": "5",
    "SHUTDOWN_GRACE_SECONDS": "3",
    "LOG_LEVEL": "INFO",
}
SIM_FLAGS = {
    "--latency": "1.0",
    "--fail-rate": "0.05",
    "--error-5xx-rate": "0.10",
    "--create-timeout-rate": "0.05",
    "--drop-rate": "0.30",
    "--duplicate-rate": "0.30",
    "--pad-bytes": "600000",
    "--render-scale": "0.2",  # small clips: the run is about faults, not about clip sizes
}
SIM_PATCH: dict[str, Any] = {
    # Longer than HIAPI_TIMEOUT_SECONDS, so the service gives up on the answer: ambiguous.
    "timeout_delay_seconds": HIAPI_TIMEOUT_SECONDS + 1.5,
    # ~0.63 MB per file at 500 kB/s: each download takes about 1.3 s.
    "download_bytes_per_second": 500_000,
    "callback_envelope": "random",
}
START_TIMEOUT = 60.0
MIGRATE_TIMEOUT = 120.0
STOP_GRACE = 10.0
SUBMIT_REQUEST_TIMEOUT = 20.0
PROGRESS_EVERY = 5.0
SETTLE_SECONDS = 1.0
KILL_PAUSE = (0.5, 3.0)
KILL_SPACING = 1.0


class ChaosError(RuntimeError):
    """The run could not be carried out (a process did not start, the database is missing)."""


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    videos: int = 500
    database: str = "postgres"
    replicas: int = 2
    kills: int = 5
    seed: int | None = None
    json_path: Path | None = None
    timeout: float = 900.0
    concurrency: int = 16
    keep: bool = False
    pg_admin_dsn: str = PG_ADMIN_DSN


def options_from_args(args: argparse.Namespace) -> ChaosOptions:
    replicas = args.replicas
    if replicas is None:
        replicas = 2 if args.database == "postgres" else 1
    if args.videos < 1 or replicas < 1 or args.kills < 0 or args.concurrency < 1:
        raise ChaosError("--videos, --replicas and --concurrency must be >= 1, --kills >= 0")
    return ChaosOptions(
        videos=args.videos,
        database=args.database,
        replicas=replicas,
        kills=args.kills,
        seed=args.seed,
        json_path=Path(args.json_path) if args.json_path else None,
        timeout=args.timeout,
        concurrency=args.concurrency,
        keep=args.keep,
        pg_admin_dsn=args.pg_admin_dsn,
    )


def _say(message: str) -> None:
    sys.stderr.write(f"chaos: {message}\n")
    sys.stderr.flush()


# --- replicas and the balancer -------------------------------------------------------------


async def _until(predicate: Callable[[], bool], deadline: float, interval: float) -> bool:
    """Poll ``predicate`` until it holds (True) or ``time.monotonic()`` passes ``deadline``."""
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


class LoadBalancer:
    """What production puts in front of the replicas: one public address (PUBLIC_BASE_URL)
    that hiapi's callbacks reach on whichever replica is alive. Each connection goes to the
    next replica in turn; a replica that refuses (killed) is skipped."""

    def __init__(self, ports: Callable[[], list[int]]) -> None:
        self._ports = ports
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ports = self._ports()
        self._turn += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in range(len(ports)):
            port = ports[(self._turn + i) % len(ports)]
            try:
                upstream = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        if upstream is None:
            writer.close()  # no replica alive: the caller (hiapi) retries later
            return
        up_reader, up_writer = upstream
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@dataclass
class Replica:
    index: int
    port: int
    child: Child
    alive: bool = False

    @property
    def url(self) -> str:
        return self.child.url


# --- the run -------------------------------------------------------------------------------


class ChaosRun:
    def __init__(self, options: ChaosOptions) -> None:
        self.options = options
        self.seed = (
            options.seed if options.seed is not None else random.SystemRandom().randrange(10**6)
        )
        self.run_id = uuid.uuid4().hex[:8]
        self.workdir = Path(tempfile.mkdtemp(prefix="videorelay-chaos-"))
        self.storage = self.workdir / "videos"
        self.logs = self.workdir / "logs"
        self.logs.mkdir()
        self.webhook_secret = "chaos-" + secrets.token_hex(16)
        self.children: list[Child] = []
        self.replicas: list[Replica] = []
        self.sim_child: Child | None = None
        self.ports: set[int] = set()
        self.pg_database: str | None = None
        self.database_url = ""
        self.sim_url = ""
        self.kills: list[KillEvent] = []
        self.accepted = 0
        self.terminal = 0
        self.submit_retries = 0
        self.submit_errors: Counter[str] = Counter()
        self.gave_up: list[str] = []
        self.submit_latencies: list[float] = []
        self.created_at = time.time()
        self.started_at = self.created_at
        self._http: httpx.AsyncClient | None = None
        self.balancer = LoadBalancer(lambda: [r.port for r in self.replicas])
        self.public_url = ""

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    def config(self) -> dict[str, Any]:
        return {
            "videos": self.options.videos,
            "database": self.options.database,
            "replicas": self.options.replicas,
            "kills": self.options.kills,
            "seed": self.seed,
            "timeout": self.options.timeout,
            "concurrency": self.options.concurrency,
            "simulator_flags": SIM_FLAGS,
            "simulator_patch": SIM_PATCH,
            "service_settings": SERVICE_SETTINGS,
        }

    # -- setup --------------------------------------------------------------------------

    async def _create_database(self) -> None:
        if self.options.database == "sqlite":
            self.database_url = f"sqlite+aiosqlite:///{self.workdir / 'videorelay.db'}"
            return
        name = f"videorelay_chaos_{self.run_id}"
        await create_database(self.options.pg_admin_dsn, name)
        self.pg_database = name
        self.database_url = database_url(self.options.pg_admin_dsn, name)

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "app.cli", *args]

    def _new_port(self) -> int:
        """A free port on 127.0.0.1 not handed out before in this run."""
        port = free_port()
        while port in self.ports:
            port = free_port()
        self.ports.add(port)
        return port

    async def _start_simulator(self) -> None:
        port = self._new_port()
        argv = self._command("simulator", "--port", str(port), "--no-fetch-images")
        for flag, value in SIM_FLAGS.items():
            argv += [flag, value]
        argv += ["--seed", str(self.seed)]
        child = self._child("simulator", argv, self._env(), "simulator.log", port=port)
        self.sim_child = child
        self.sim_url = child.url
        child.start()
        await child.wait_http("/_sim/stats", START_TIMEOUT)
        response = await self.http.patch(f"{self.sim_url}/_sim/config", json=SIM_PATCH)
        if response.status_code != 200:
            raise ChaosError(f"simulator refused {SIM_PATCH}: {response.text}")

    def _child(
        self, name: str, argv: list[str], env: dict[str, str], log: str, port: int | None = None
    ) -> Child:
        child = Child(name, argv, env=env, cwd=self.workdir, log=self.logs / log, port=port)
        self.children.append(child)
        return child

    @staticmethod
    def _env(**settings: str) -> dict[str, str]:
        # Unbuffered: a replica's last lines must reach its log before a SIGKILL.
        return child_env(PYTHONUNBUFFERED="1", **settings)

    def _service_env(self) -> dict[str, str]:
        return self._env(
            **SERVICE_SETTINGS,
            DATABASE_URL=self.database_url,
            STORAGE_DIR=str(self.storage),
            HIAPI_KEY="sk-chaos-" + self.run_id,
            HIAPI_BASE_URL=self.sim_url,
            DOWNLOAD_ALLOWED_HOSTS=self.sim_url,
            WEBHOOK_SECRET=self.webhook_secret,
            # Every replica is reached through the balancer, as behind a real load balancer.
            PUBLIC_BASE_URL=self.public_url,
        )

    async def _migrate(self) -> None:
        child = self._child("migrate", self._command("migrate"), self._service_env(), "migrate.log")
        child.start()
        if not await _until(lambda: not child.running, time.monotonic() + MIGRATE_TIMEOUT, 0.1):
            child.kill()
            raise ChaosError(f"videorelay migrate took over {MIGRATE_TIMEOUT:.0f}s")
        if child.returncode != 0:
            raise ChaosError(f"videorelay migrate failed:\n{child.tail()}")

    async def _start_replica(self, replica: Replica) -> None:
        replica.child.start()
        await replica.child.wait_http("/healthz", START_TIMEOUT)
        replica.alive = True

    async def _start_replicas(self) -> None:
        for index in range(self.options.replicas):
            port = self._new_port()
            child = self._child(
                f"replica {index}",
                self._command("serve", "--port", str(port)),
                self._service_env(),
                f"replica-{index}.log",
                port=port,
            )
            self.replicas.append(Replica(index=index, port=port, child=child))
        await asyncio.gather(*(self._start_replica(r) for r in self.replicas))
        await self.replicas[0].child.wait_http("/readyz", START_TIMEOUT)

    # -- load and faults ----------------------------------------------------------------

    def _bodies(self) -> list[dict[str, Any]]:
        rng = random.Random(self.seed)
        return [
            {
                "image_url": f"https://example.invalid/chaos/{i}.jpg",
                "prompt": f"chaos clip {i}",
                "resolution": rng.choice(("720p", "1080p")),
                "duration": rng.randint(3, 8),
            }
            for i in range(self.options.videos)
        ]

    async def _submit_all(self, deadline: float) -> None:
        slots = asyncio.Semaphore(self.options.concurrency)
        bodies = self._bodies()

        async def one(index: int) -> None:
            async with slots:
                await self._submit_one(index, bodies[index], deadline)

        await asyncio.gather(*(one(i) for i in range(self.options.videos)))

    async def _submit_one(self, index: int, body: dict[str, Any], deadline: float) -> None:
        key = f"chaos-{self.run_id}-{index:05d}"
        count = len(self.replicas)
        attempt = 0
        while time.time() < deadline:
            replica = self.replicas[(index + attempt) % count]
            attempt += 1
            if not replica.alive:
                if attempt % count == 0:
                    await asyncio.sleep(0.2)  # every replica is down: wait for a restart
                continue
            sent = time.monotonic()
            try:
                response = await self.http.post(
                    f"{replica.url}/v1/videos",
                    json=body,
                    headers={"Idempotency-Key": key},
                    timeout=SUBMIT_REQUEST_TIMEOUT,
                )
            except httpx.HTTPError:
                self.submit_retries += 1  # its replica died under it: same key, next replica
                await asyncio.sleep(0.1)
                continue
            status = response.status_code
            if status in (200, 202, 502):  # 502: hiapi rejected it; the video exists, failed
                self.submit_latencies.append(time.monotonic() - sent)
                self.accepted += 1
                return
            if status == 429 or status >= 500:
                self.submit_retries += 1
                await asyncio.sleep(0.2)
                continue
            self.submit_errors[f"http_{status}"] += 1
            break
        self.gave_up.append(key)

    def _reached(self, threshold: float) -> bool:
        """Progress: half for accepted submits, half for terminal videos."""
        return (self.accepted + self.terminal) / (2 * self.options.videos) >= threshold

    async def _monkey(self) -> None:
        """SIGKILL a random live replica at ``--kills`` random points of the run's progress."""
        rng = random.Random(self.seed + 1)
        thresholds = sorted(rng.uniform(0.05, 0.9) for _ in range(self.options.kills))
        for threshold in thresholds:
            await _until(partial(self._reached, threshold), float("inf"), 0.1)
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            alive = [r for r in self.replicas if r.alive]
            if not alive:
                continue
            victim = rng.choice(alive)
            victim.alive = False
            killed_at = time.time()
            victim.child.kill()
            self.kills.append(KillEvent(victim.index, victim.port, killed_at, None))
            _say(f"SIGKILL replica {victim.index} at {killed_at - self.started_at:.1f}s")
            await asyncio.sleep(rng.uniform(*KILL_PAUSE))
            await self._start_replica(victim)
            self.kills[-1] = KillEvent(victim.index, victim.port, killed_at, time.time())
            await asyncio.sleep(KILL_SPACING)

    async def _status_counts(self, engine: AsyncEngine) -> dict[str, int]:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(select(Video.status, func.count()).group_by(Video.status))
            ).all()
        return {str(status): int(n) for status, n in rows}

    async def _wait(
        self, deadline: float, submit: asyncio.Task[None], monkey: asyncio.Task[None]
    ) -> float | None:
        """Until every submitted video is terminal and every kill done (returns when), or the
        deadline (None)."""
        engine = create_engine(self.database_url)
        last = 0.0
        try:
            while True:
                if monkey.done() and not monkey.cancelled() and monkey.exception() is not None:
                    raise ChaosError(f"restarting a replica failed: {monkey.exception()}")
                try:
                    counts = await self._status_counts(engine)
                except Exception as exc:  # the database may be busy; try again
                    _say(f"progress query failed: {type(exc).__name__}: {exc}")
                    counts = {}
                rows = sum(counts.values())
                self.terminal = counts.get("ready", 0) + counts.get("failed", 0)
                now = time.time()
                # Every scheduled kill happens (and its replica is back) before the run ends:
                # on a slow machine the videos can all finish before the last threshold.
                if counts and submit.done() and monkey.done() and self.terminal == rows:
                    return now
                if now >= deadline:
                    return None
                if now - last >= PROGRESS_EVERY:
                    last = now
                    states = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                    _say(
                        f"t={now - self.started_at:5.1f}s accepted={self.accepted}/"
                        f"{self.options.videos} {states} kills={len(self.kills)}"
                    )
                await asyncio.sleep(0.5)
        finally:
            await engine.dispose()

    # -- collecting ---------------------------------------------------------------------

    async def _sim_details(self) -> tuple[list[SimTaskInfo], dict[str, Any]]:
        try:
            tasks = (await self.http.get(f"{self.sim_url}/_sim/tasks", timeout=30)).json()
            stats = (await self.http.get(f"{self.sim_url}/_sim/stats", timeout=30)).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ChaosError(f"cannot read the simulator's records: {exc}") from None
        return [SimTaskInfo.from_wire(t) for t in tasks["tasks"]], dict(stats)

    async def _read_videos(self) -> list[VideoRow]:
        engine = create_engine(self.database_url)
        columns = (
            Video.id,
            Video.idempotency_key,
            Video.status,
            Video.error_code,
            Video.task_id,
            Video.completed_via,
            Video.ambiguous_submits,
            Video.submit_attempts,
            Video.download_attempts,
            Video.sha256,
            Video.size_bytes,
            Video.storage_key,
            Video.created_at,
            Video.task_finished_at,
            Video.ready_at,
        )
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(*columns))).all()
        finally:
            await engine.dispose()
        return [
            VideoRow(
                id=str(r.id),
                idempotency_key=r.idempotency_key,
                status=r.status,
                error_code=r.error_code,
                task_id=r.task_id,
                completed_via=r.completed_via,
                ambiguous_submits=r.ambiguous_submits or 0,
                submit_attempts=r.submit_attempts or 0,
                download_attempts=r.download_attempts or 0,
                sha256=r.sha256,
                size_bytes=r.size_bytes,
                storage_key=r.storage_key,
                created_at=r.created_at.timestamp(),
                task_finished_at=r.task_finished_at.timestamp() if r.task_finished_at else None,
                ready_at=r.ready_at.timestamp() if r.ready_at else None,
            )
            for r in rows
        ]

    def _log_findings(self) -> dict[str, int]:
        patterns = {
            "tracebacks": "Traceback (most recent call last)",
            "lease_lost_before_ready": "download.lease_lost_before_ready",
            "download_stopped_lease_lost": "download.stopped reason=lease lost",
            "download_crashed": "download.crashed",
            "reconciler_tick_failed": "reconciler.tick_failed",
            "foreign_task_callbacks_refused": "webhook.foreign_task",
            "error_lines": " ERROR ",
        }
        found: Counter[str] = Counter()
        for replica in self.replicas:
            try:
                text = replica.child.log.read_text(errors="replace")
            except OSError:
                continue
            for name, needle in patterns.items():
                found[name] += text.count(needle)
        return {k: v for k, v in found.items() if v}

    # -- the whole run ------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            self._http = http
            _say(f"workdir {self.workdir}, seed {self.seed}, database {self.options.database}")
            await self._create_database()
            await self._start_simulator()
            balancer_port = self._new_port()
            self.public_url = f"http://127.0.0.1:{balancer_port}"
            await self.balancer.start(balancer_port)
            await self._migrate()
            await self._start_replicas()
            _say(
                f"simulator {self.sim_url}; replicas "
                + ", ".join(r.url for r in self.replicas)
                + f"; submitting {self.options.videos} videos"
            )
            self.started_at = time.time()
            deadline = self.started_at + self.options.timeout
            submit = asyncio.create_task(self._submit_all(deadline))
            monkey = asyncio.create_task(self._monkey())
            try:
                all_terminal_at = await self._wait(deadline, submit, monkey)
            finally:
                for task in (monkey, submit):
                    task.cancel()
                await asyncio.gather(monkey, submit, return_exceptions=True)
            if all_terminal_at is None:
                _say(f"timed out after {self.options.timeout:.0f}s; collecting what there is")
            await asyncio.sleep(SETTLE_SECONDS)
            await asyncio.gather(
                *(asyncio.to_thread(r.child.stop, STOP_GRACE) for r in self.replicas)
            )
            await self.balancer.close()
            tasks, sim_stats = await self._sim_details()
            if self.sim_child is not None:
                await asyncio.to_thread(self.sim_child.stop, STOP_GRACE)
            videos = await self._read_videos()
            stored, partials = await asyncio.to_thread(scan_storage, self.storage)
            keys = {v.idempotency_key for v in videos}
            data = RunData(
                config=self.config(),
                started_at=self.started_at,
                all_terminal_at=all_terminal_at,
                finished_at=time.time(),
                timed_out=all_terminal_at is None,
                submitted=self.options.videos,
                unsubmitted=[k for k in self.gave_up if k not in keys],
                submit_errors=dict(self.submit_errors),
                submit_retries=self.submit_retries,
                videos=videos,
                tasks=tasks,
                kills=list(self.kills),
                stored=stored,
                partial_leftovers=partials,
                sim_stats=sim_stats,
                log_findings=self._log_findings(),
                hiapi_timeout_seconds=HIAPI_TIMEOUT_SECONDS,
                setup_seconds=self.started_at - self.created_at,
                submit_latencies=self.submit_latencies,
            )
            return build_report(data)

    def cleanup(self, *, keep_dir: bool) -> None:
        """Kill every child, drop the scratch database, remove the work directory. Sync."""
        for child in self.children:
            child.kill()
        if self.pg_database is not None and not self.options.keep:
            drop = drop_database(self.options.pg_admin_dsn, self.pg_database)
            try:
                asyncio.run(asyncio.wait_for(drop, timeout=30))
                self.pg_database = None
            except Exception as exc:
                _say(f"could not drop database {self.pg_database}: {exc}")
        if keep_dir:
            _say(f"kept {self.workdir} (logs in {self.logs})")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def scan_storage(root: Path) -> tuple[dict[str, StoredFile], list[str]]:
    """sha256 and size of every stored clip, and whatever is left in ``.partial/``."""
    stored: dict[str, StoredFile] = {}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or rel.parts[0] == ".partial":
                continue
            digest = hashlib.sha256()
            size = 0
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            key = rel.as_posix()
            stored[key] = StoredFile(key=key, sha256=digest.hexdigest(), size=size)
    partial_dir = root / ".partial"
    partials = sorted(p.name for p in partial_dir.iterdir()) if partial_dir.is_dir() else []
    return stored, partials


async def _run_cancellable(run: ChaosRun) -> dict[str, Any]:
    """``run.run()``, cancelled cleanly by SIGTERM as asyncio.run already does for Ctrl-C."""
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert main_task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        return await run.run()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(report, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def run_chaos(options: ChaosOptions, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    run = ChaosRun(options)
    report: dict[str, Any] | None = None
    try:
        report = asyncio.run(_run_cancellable(run))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _say("interrupted; stopping every process")
        return 130
    except (ChaosError, ChildFailed, PostgresUnreachable) as exc:
        _say(f"the run could not be carried out: {exc}")
        return 2
    finally:
        keep_dir = options.keep or report is None or not report["passed"]
        run.cleanup(keep_dir=keep_dir)
        if report is not None and keep_dir:
            report["workdir"] = str(run.workdir)
    assert report is not None
    if options.json_path is not None:
        _write_json(options.json_path, report)
    out.write(render_text(report))
    out.flush()
    return 0 if report["passed"] else 1


def build_parser(prog: str = "python -m tools.chaos") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="fault-injection run: simulator with faults, replicas killed and "
        "restarted, report",
    )
    parser.add_argument("--videos", type=int, default=500, help="batch size (default 500)")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument(
        "--replicas", type=int, default=None, help="default: 2 on postgres, 1 on sqlite"
    )
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs of a random replica")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="limit for submitting and waiting until every video is terminal (default 900)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="submits in flight")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch database and work directory"
    )
    parser.add_argument(
        "--pg-admin-dsn",
        default=PG_ADMIN_DSN,
        help="where the scratch Postgres database is created and dropped",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m tools.chaos") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        options = options_from_args(args)
    except ChaosError as exc:
        _say(str(exc))
        return 2
    return run_chaos(options)


if __name__ == "__main__":
    raise SystemExit(main())
