"""What the bench and the chaos run share: child processes, ports, scratch Postgres databases,
and the percentile both report.

Every child is started with a parent-death signal (Linux), so a tool that is killed leaves
no server behind, and every wait has a time limit. The module stays light to import (the load
generator imports it for ``percentile``): asyncpg, httpx and the service's settings are
imported by the functions that use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

__all__ = [
    "PG_ADMIN_DSN",
    "PROJECT_ROOT",
    "Child",
    "ChildFailed",
    "PostgresUnreachable",
    "child_env",
    "create_database",
    "database_url",
    "die_with_parent",
    "drop_database",
    "free_port",
    "percentile",
    "postgres_reachable",
    "scratch_postgres",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
"""The local Postgres where scratch databases are created and dropped (the default)."""

_PR_SET_PDEATHSIG = 1
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")
_SIMULATOR_PREFIX = "HIAPI_SIM_"


# --- environment and ports ------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, without any videorelay or simulator
    setting (the child gets exactly the ones in ``extra``) and without proxies (everything
    runs on 127.0.0.1), with this checkout first on ``PYTHONPATH``."""
    from app.config import Settings  # imported here: the load generator does not need it

    settings = set(Settings.model_fields)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in settings
        and not key.startswith(_SIMULATOR_PREFIX)
        and key.lower() not in _PROXY_VARS
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the child binds it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies (Linux only).

    ``prctl`` is looked up here, before the fork: the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return preexec


# --- child processes -----------------------------------------------------------------------


class ChildFailed(RuntimeError):
    """A child process exited, or did not answer or finish in time."""


class Child:
    """One subprocess whose output (stdout and stderr) is appended to ``log``.

    Start it from a thread that outlives it (the event loop's, in async code): Linux sends the
    parent-death signal when the *thread* that forked the child exits, not only the process.
    It may be started again after it stopped (the same log grows). As a context manager it is
    started, waited for (``health``, when given) and stopped at the end.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        cwd: Path,
        log: Path,
        port: int | None = None,
        health: str | None = None,
    ) -> None:
        self.name, self.argv, self.env, self.cwd, self.log = name, list(argv), env, cwd, log
        self.port = port
        self.url = f"http://127.0.0.1:{port}" if port is not None else ""
        self.health = health
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with self.log.open("ab") as out:  # the child keeps its own copy of the descriptor
            out.write(f"--- {time.strftime('%H:%M:%S')} start {self.name}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        return self

    def __enter__(self) -> Self:
        self.start()
        if self.health is not None:
            try:
                asyncio.run(self.wait_http(self.health))
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float) -> int:
        """The exit code; a child still running after ``timeout`` seconds is killed."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ChildFailed(f"{self.name} did not finish in {timeout:g} s") from None

    async def wait_http(self, path: str, within: float = 60.0) -> None:
        """Until ``GET url+path`` answers 200; ``ChildFailed`` if the child exits first or it
        takes longer than ``within`` seconds."""
        import httpx  # imported here: the load generator does not need it

        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                if not self.running:
                    raise ChildFailed(f"{self.name} exited with {self.returncode}:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}{path}")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise ChildFailed(
                        f"{self.name} did not answer {path} in {within:g} s:\n{self.tail()}"
                    )
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL and reap (idempotent)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Blocking (async code runs it in
        a thread)."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self.kill()

    def cpu_seconds(self) -> float:
        """User + system CPU of the running child, from ``/proc`` (0.0 where unavailable)."""
        if self.proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --- scratch Postgres ----------------------------------------------------------------------


class PostgresUnreachable(RuntimeError):
    """The admin DSN's server cannot be reached."""


def database_url(admin_dsn: str, name: str) -> str:
    """The service's URL (asyncpg) of database ``name`` on the server of ``admin_dsn``, as its
    user (``postgres`` when the DSN names none)."""
    parts = urlsplit(admin_dsn)
    userinfo, _, host = parts.netloc.rpartition("@")
    if parts.port is None:
        host += ":5432"
    return f"postgresql+asyncpg://{userinfo or 'postgres'}@{host}/{name}"


async def postgres_reachable(admin_dsn: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(admin_dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def _admin(admin_dsn: str, sql: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(admin_dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise PostgresUnreachable(f"cannot reach Postgres at {admin_dsn}: {exc}") from None
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(admin_dsn: str, name: str) -> None:
    await _admin(admin_dsn, f'CREATE DATABASE "{name}"')


async def drop_database(admin_dsn: str, name: str) -> None:
    await _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def scratch_postgres(
    prefix: str, *, admin_dsn: str = PG_ADMIN_DSN, host: str | None = None
) -> Iterator[str]:
    """A new, empty database on ``admin_dsn``'s server, dropped at the end; yields its URL.

    ``host`` (``user@host:port``) replaces the admin DSN's in that URL.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    asyncio.run(create_database(admin_dsn, name))
    try:
        yield f"postgresql+asyncpg://{host}/{name}" if host else database_url(admin_dsn, name)
    finally:
        asyncio.run(drop_database(admin_dsn, name))


# --- figures -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values`` in any order; ``None`` for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
