"""Fixtures: real databases (SQLite and Postgres), real servers on 127.0.0.1, the simulator.

Every test that touches a database runs once per database. Postgres tests get a database of
their own for the session (created from the trusted local server, dropped at the end) and a
TRUNCATE between tests; SQLite tests get a fresh copy of a migrated template file.
Under ``CI`` (any non-empty value) a missing Postgres is an error, and so is any skipped
Postgres-parametrised test; locally those tests are skipped.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from app.migrate import upgrade
from app.simulator import SimulatorConfig, create_simulator_app

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_HOST = os.environ.get("TEST_PG_HOST", "postgres@127.0.0.1:5432")
T = TypeVar("T")
# CI systems set CI to "true", "1", "yes"...: any non-empty value means the run must be whole.
IN_CI = bool(os.environ.get("CI"))
WEBHOOK_SECRET = "test-webhook-secret-0123456789abcdef"
HIAPI_KEY = "sk-test-key-0123456789"


# --- CI: no quiet skips of the Postgres half ---------------------------------------------

_SKIPPED_POSTGRES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "postgres" in report.nodeid:
        _SKIPPED_POSTGRES.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Under pytest-xdist this runs in each worker and in the controller, which receives every
    # worker's reports through pytest_runtest_logreport: the controller's verdict is the run's.
    if IN_CI and _SKIPPED_POSTGRES:
        terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is not None:
            terminal.write_line("")  # after the progress line, not on it
            terminal.write_line(
                f"under CI, {len(_SKIPPED_POSTGRES)} Postgres test(s) were skipped, e.g.:"
            )
            for nodeid in _SKIPPED_POSTGRES[:10]:
                terminal.write_line(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- the developer's environment ---------------------------------------------------------

# Every variable the service reads: Settings' fields, and serve's HOST and PORT defaults.
_OUR_VARIABLES = frozenset({*Settings.model_fields, "HOST", "PORT"})


@pytest.fixture(scope="session", autouse=True)
def _without_the_developers_settings() -> Iterator[None]:
    """Settings exported in the developer's shell (``API_KEYS``, ``LOG_LEVEL``, ...) would
    reach every in-process service (``make_settings`` passes only some fields) and every
    child that copies ``os.environ``: the test run goes without them."""
    with pytest.MonkeyPatch.context() as patch:
        for name in _OUR_VARIABLES & set(os.environ):
            patch.delenv(name)
        yield


# --- databases ---------------------------------------------------------------------------


async def _pg_reachable() -> bool:
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def in_thread(fn: Callable[[], T]) -> T:
    """Run blocking setup (which may call asyncio.run) outside any running event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test session's own on the local Postgres, migrated to head."""
    if not in_thread(lambda: asyncio.run(_pg_reachable())):
        if IN_CI:
            pytest.fail(f"Postgres is required under CI but {PG_ADMIN_DSN} is unreachable")
        pytest.skip(f"Postgres not reachable at {PG_ADMIN_DSN}; skipping Postgres runs")
    name = f"videorelay_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    in_thread(lambda: asyncio.run(admin(f'CREATE DATABASE "{name}"')))
    url = f"postgresql+asyncpg://{PG_HOST}/{name}"
    in_thread(lambda: upgrade(url))
    yield url
    in_thread(lambda: asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    in_thread(lambda: upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path
) -> AsyncIterator[str]:
    if request.param == "sqlite":
        target = tmp_path / "videorelay.db"
        shutil.copy(sqlite_template, target)
        yield f"sqlite+aiosqlite:///{target}"
        return
    url: str = request.getfixturevalue("postgres_database")
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "TRUNCATE videos, daily_spend, subject_spend, token_spend, images, notifications"
        )
    finally:
        await conn.close()
    yield url


# --- servers -----------------------------------------------------------------------------


def free_socket() -> socket.socket:
    """A socket bound to a free port, for a server in this process (no window for a race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class RunningServer:
    """A uvicorn server on a pre-bound socket, inside the test's event loop.

    ``log_level="info"`` turns uvicorn's access log on (for tests that read it)."""

    def __init__(self, app: FastAPI, sock: socket.socket, *, log_level: str = "warning") -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        for _ in range(500):
            if self.server.started:
                return
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        raise RuntimeError("server did not start")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task


@dataclass
class Sim:
    config: SimulatorConfig
    server: RunningServer
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.server.url

    async def stats(self) -> dict[str, int]:
        response = await self.client.get("/_sim/stats")
        data: dict[str, int] = response.json()
        return data

    def set(self, **knobs: Any) -> None:
        for key, value in knobs.items():
            setattr(self.config, key, value)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    """The hiapi simulator on a real port; fast and fault-free unless a test turns knobs."""
    sock = free_socket()
    port = sock.getsockname()[1]
    config = SimulatorConfig(
        public_base_url=f"http://127.0.0.1:{port}",
        latency_seconds=0.05,
        fetch_images=False,
        render_scale=0.2,  # 720p clips 144 px high: cheap, and the ratios stay hiapi's
        callback_envelope="random",
        seed=1234,
    )
    server = RunningServer(create_simulator_app(config), sock)
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield Sim(config=config, server=server, client=client)
    await server.stop()


def make_settings(
    database_url: str, storage: Path, sim_url: str, public_url: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "STORAGE_DIR": storage,
        "HIAPI_KEY": HIAPI_KEY,
        "HIAPI_BASE_URL": sim_url,
        "HIAPI_TIMEOUT_SECONDS": 5.0,
        "PUBLIC_BASE_URL": public_url,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DOWNLOAD_ALLOWED_HOSTS": f"*.hiapi.ai,{sim_url}",
        "RECONCILE_AFTER_SECONDS": 600.0,
        "RECONCILE_INTERVAL_SECONDS": 0.1,
        "RETRY_BASE_SECONDS": 0.05,
        "RETRY_MAX_SECONDS": 0.5,
        "DOWNLOAD_LEASE_SECONDS": 10.0,
        "SHUTDOWN_GRACE_SECONDS": 2.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@dataclass
class Service:
    settings: Settings
    server: RunningServer
    client: httpx.AsyncClient
    app: FastAPI

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    async def submit(self, **body: Any) -> dict[str, Any]:
        payload = {"image_url": "https://example.invalid/still.jpg", "duration": 3, **body}
        response = await self.client.post("/v1/videos", json=payload)
        assert response.status_code == 202, response.text
        data: dict[str, Any] = response.json()
        return data

    async def get(self, video_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/videos/{video_id}")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def wait_for(
        self, video_id: str, *statuses: str, timeout: float = 20.0
    ) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        video = await self.get(video_id)
        while video["status"] not in statuses:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"video stuck in {video['status']}, wanted {statuses}: {video}"
                )
            await asyncio.sleep(0.05)
            video = await self.get(video_id)
        return video


class ServiceFactory:
    def __init__(self, database_url: str, storage: Path, sim: Sim) -> None:
        self.database_url = database_url
        self.storage = storage
        self.sim = sim
        self.running: list[Service] = []

    async def start(
        self,
        *,
        log_level: str = "warning",
        clock: Callable[[], datetime] | None = None,
        **overrides: Any,
    ) -> Service:
        """A service on a real port; ``clock`` replaces its clock (time you control)."""
        sock = free_socket()
        public = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = make_settings(self.database_url, self.storage, self.sim.url, public, **overrides)
        app = create_app(settings) if clock is None else create_app(settings, clock=clock)
        server = RunningServer(app, sock, log_level=log_level)
        await server.start()
        client = httpx.AsyncClient(base_url=server.url, timeout=10)
        service = Service(settings=settings, server=server, client=client, app=app)
        self.running.append(service)
        return service

    async def stop(self, service: Service) -> None:
        await service.client.aclose()
        await service.server.stop()
        self.running.remove(service)


@pytest.fixture
async def services(database_url: str, tmp_path: Path, sim: Sim) -> AsyncIterator[ServiceFactory]:
    factory = ServiceFactory(database_url, tmp_path / "videos", sim)
    yield factory
    for service in list(factory.running):
        await factory.stop(service)


@pytest.fixture
async def service(services: ServiceFactory) -> Service:
    """videorelay on a real port, talking to the simulator over real HTTP."""
    return await services.start()


# --- child processes ---------------------------------------------------------------------


def child_env(home: Path, **settings: str) -> dict[str, str]:
    """The whole environment of a child process, built from scratch: ``PATH``, this checkout
    on ``PYTHONPATH`` (the child runs the code under test), ``HOME`` in the test's scratch
    folder, and ``settings``. Nothing of the developer's environment leaks in; run the child
    with ``cwd`` in a scratch folder too, so no ``.env`` file is read either."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONPATH": str(PROJECT_ROOT),
        "HOME": str(home),
        **settings,
    }


def free_port() -> int:
    """A port that was free a moment ago. Only for a child process that binds it itself: see
    ``ChildServer``, which starts the child again on another port if it was taken meanwhile."""
    with free_socket() as sock:
        port: int = sock.getsockname()[1]
    return port


_BIND_FAILED = ("address already in use", "error while attempting to bind")


_RUNNING: weakref.WeakSet[ChildServer] = weakref.WeakSet()


@atexit.register
def _kill_leftover_children() -> None:
    """A test that failed before stopping its child (or a run cut short) leaves no process."""
    for child in list(_RUNNING):
        if child.proc is not None and child.proc.poll() is None:
            child.kill()


class ChildServer:
    """A real child process that serves HTTP (``videorelay serve``, ``videorelay simulator``).

    ``argv(port)`` and ``env(port)`` build its command line and environment for a port. The
    port is picked free here and bound by the child, so another process may take it in
    between: a child that exits because it could not bind is started again on another port.
    Its output (stdout and stderr) goes to ``log``. ``start`` blocks (run it with
    ``asyncio.to_thread`` in a test's event loop); it returns once ``up_path`` answers, or,
    with ``up_path=None``, once ``up_line`` appears in the output.
    """

    def __init__(
        self,
        argv: Callable[[int], list[str]],
        env: Callable[[int], dict[str, str]],
        *,
        cwd: Path,
        log: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        up_path: str | None = "/healthz",
        up_line: str = "Uvicorn running on",
    ) -> None:
        self._argv, self._env, self.cwd, self.log = argv, env, cwd, log
        self.host, self._fixed_port, self.up_path, self.up_line = host, port, up_path, up_line
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def output(self) -> str:
        """What the child wrote since its last start."""
        with self.log.open("rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def start(self, timeout: float = 60.0) -> None:
        for _ in range(5):
            self.port = self._fixed_port or free_port()
            self.log.touch()
            self._log_start = self.log.stat().st_size
            with self.log.open("ab") as out:  # the child keeps its own copy of the fd
                # Its own process group: ``kill`` reaches the workers of ``serve --workers N``
                # too, which a SIGKILL of the supervisor alone would leave running.
                self.proc = subprocess.Popen(
                    self._argv(self.port),
                    env=self._env(self.port),
                    cwd=self.cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            _RUNNING.add(self)
            if self._wait_up(timeout):
                return
            text = self.output()
            if self._fixed_port is None and any(m in text.lower() for m in _BIND_FAILED):
                continue  # another process took the port meanwhile: try another one
            raise AssertionError(f"child exited with {self.proc.returncode}:\n{text[-3000:]}")
        raise AssertionError("no free port could be bound in 5 tries")

    def _wait_up(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                if self.up_path is None:
                    if self.up_line in self.output():
                        return True
                else:
                    try:
                        client.get(f"{self.url}{self.up_path}")
                    except httpx.TransportError:
                        pass
                    else:  # it answers; and it is our child that does (still running)
                        return self.proc.poll() is None
                time.sleep(0.05)
        self.kill()
        raise AssertionError(f"child not up after {timeout}s:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        """Wait (without blocking the event loop) until the child has exited; its code."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"child did not exit within {timeout}s")
            await asyncio.sleep(0.05)
        return code

    def kill(self) -> None:
        """SIGKILL the child and every process it started (its process group)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit (SIGKILL after ``timeout``); the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        code: int = self.proc.returncode
        return code


def simulator_child(work: Path, *args: str) -> ChildServer:
    """``videorelay simulator <args>`` as a process of its own (not started), in ``work``;
    knobs change with PATCH /_sim/config."""
    return ChildServer(
        videorelay("simulator", "--port", "{port}", *args),
        lambda port: child_env(work),
        cwd=work,
        log=work / "simulator.log",
        up_path="/_sim/stats",
    )


def videorelay(*args: str) -> Callable[[int], list[str]]:
    """``argv`` for ``ChildServer``: ``videorelay <args>``, with ``{port}`` filled in."""
    return lambda port: [sys.executable, "-m", "app.cli", *(a.format(port=port) for a in args)]
