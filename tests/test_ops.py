"""Migrations, probes and the command line."""

from __future__ import annotations

import asyncio
import gc
import io
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.db import create_engine
from app.migrate import alembic_config, downgrade, upgrade
from tests.conftest import ChildServer, ServiceFactory, child_env, videorelay


def in_thread(fn, *args):
    return asyncio.to_thread(fn, *args)


async def migrate_beside_a_running_service(fn, *args) -> None:
    """``upgrade``/``downgrade`` while a service runs: its reconciler's image sweep (every
    0.1 s here) reads ``images`` then ``videos`` while the migration's DDL locks them in the
    other order, and Postgres may abort the migration as a deadlock. The migration is one
    transaction, rolled back whole, so it is run again."""
    for attempt in range(5):
        try:
            return await in_thread(fn, *args)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != "40P01" or attempt == 4:
                raise


class TestMigrations:
    async def test_downgrade_upgrade_round_trip_and_models_match(self, database_url: str):
        await in_thread(downgrade, database_url, "base")
        await in_thread(upgrade, database_url)
        # Fails if a model changed without a migration.
        await in_thread(command.check, alembic_config(database_url))

    async def test_a_failing_migration_closes_its_connection(self, database_url: str):
        # A migration that fails (here: a table is in the way; beside a running service: a
        # deadlock) must still close its pooled connection before its event loop ends; left to
        # the collector it is an "unclosed connection" warning, an error in this suite.
        await in_thread(downgrade, database_url, "base")
        engine = create_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE images (id INTEGER PRIMARY KEY)"))
            with pytest.raises(DBAPIError, match="images"):
                await in_thread(upgrade, database_url)
            gc.collect()
            async with engine.begin() as conn:
                await conn.execute(text("DROP TABLE images"))
        finally:
            await engine.dispose()
        await in_thread(upgrade, database_url)


class TestProbes:
    async def test_healthz_and_readyz(self, services: ServiceFactory):
        service = await services.start()
        assert (await service.client.get("/healthz")).json() == {"status": "ok"}
        ready = await service.client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["revision"] == service.ctx.head_revision

    async def test_readyz_fails_when_migrations_are_missing(
        self, services: ServiceFactory, database_url: str
    ):
        service = await services.start()
        await migrate_beside_a_running_service(downgrade, database_url, "base")
        try:
            ready = await service.client.get("/readyz")
            assert ready.status_code == 503
            # Downgraded to base, alembic's version table is left empty: the database answers
            # and says it has no revision. "database_unavailable" would be the wrong advice.
            error = ready.json()["error"]
            assert error["code"] == "migration_pending"
            assert "videorelay migrate" in error["message"]
        finally:
            await migrate_beside_a_running_service(upgrade, database_url)

    async def test_readyz_says_unavailable_when_the_database_cannot_be_read(
        self, services: ServiceFactory, database_url: str
    ):
        service = await services.start()
        engine = create_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("ALTER TABLE alembic_version RENAME TO alembic_gone"))
            ready = await service.client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "database_unavailable"
        finally:
            async with engine.begin() as conn:
                await conn.execute(text("ALTER TABLE alembic_gone RENAME TO alembic_version"))
            await engine.dispose()
        assert (await service.client.get("/readyz")).status_code == 200

    async def test_openapi_documents_every_route(self, services: ServiceFactory):
        service = await services.start()
        spec = (await service.client.get("/openapi.json")).json()
        assert {
            "/v1/videos",
            "/v1/videos/{video_id}",
            "/v1/videos/{video_id}/content",
            "/webhooks/hiapi/{video_id}/{token}",
            "/healthz",
            "/readyz",
        } <= set(spec["paths"])
        schemas = spec["components"]["schemas"]
        assert "ErrorOut" in schemas and schemas["ErrorOut"].get("examples")
        for path, methods in spec["paths"].items():
            for method, op in methods.items():
                where = f"{method.upper()} {path}"
                assert op.get("summary"), f"{where} has no summary"
                in_path = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                templated = set(re.findall(r"{(\w+)}", path))
                assert in_path == templated, f"{where} documents path parameters {in_path}"
                if path.startswith(("/v1/", "/webhooks/")):
                    errors = [r for code, r in op["responses"].items() if code.startswith("4")]
                    assert any("ErrorOut" in str(r.get("content", {})) for r in errors), (
                        f"{where} documents no error schema"
                    )
                    ok = next(r for code, r in op["responses"].items() if code.startswith("2"))
                    json_schema = ok.get("content", {}).get("application/json", {}).get("schema")
                    if json_schema and "$ref" in json_schema:
                        name = json_schema["$ref"].rsplit("/", 1)[1]
                        assert schemas[name].get("examples"), f"{where}: {name} has no example"


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``videorelay <args>`` in a scratch folder, with an environment built from scratch."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=child_env(cwd, **(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


class TestCli:
    def test_serve_refuses_to_start_without_hiapi_key(self, tmp_path: Path):
        result = run_cli("serve", cwd=tmp_path)
        assert result.returncode == 2
        assert "HIAPI_KEY" in result.stderr and "--simulate" in result.stderr

    def test_serve_refuses_to_start_without_webhook_secret(self, tmp_path: Path):
        result = run_cli("serve", env={"HIAPI_KEY": "sk-secret-value-123"}, cwd=tmp_path)
        assert result.returncode == 2
        assert "WEBHOOK_SECRET" in result.stderr
        assert "sk-secret-value-123" not in result.stderr + result.stdout

    def test_migrate_creates_the_sqlite_database(self, tmp_path: Path):
        url = f"sqlite+aiosqlite:///{tmp_path}/x.db"
        result = run_cli("migrate", env={"DATABASE_URL": url}, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "x.db").exists()


async def test_serve_simulate_turns_an_image_into_a_playable_mp4(tmp_path: Path):
    """The README's first command, as a newcomer runs it: no key, embedded simulator."""
    child = ChildServer(
        videorelay("serve", "--simulate", "--port", "{port}"),
        lambda port: child_env(tmp_path),
        cwd=tmp_path,
        log=tmp_path / "serve.log",
    )
    await asyncio.to_thread(child.start)
    try:
        async with httpx.AsyncClient(base_url=child.url, timeout=10) as client:
            video = (
                await client.post(
                    "/v1/videos", json={"image_url": "https://example.invalid/a.jpg", "duration": 3}
                )
            ).json()
            deadline = time.monotonic() + 30
            while (current := (await client.get(f"/v1/videos/{video['id']}")).json())[
                "status"
            ] not in ("ready", "failed"):
                assert time.monotonic() < deadline, current
                await asyncio.sleep(0.05)
            assert current["status"] == "ready", current
            content = await client.get(f"/v1/videos/{video['id']}/content")
            assert content.status_code == 200 and content.content[4:8] == b"ftyp"
            # hiapi's size by default: 1080p (the default resolution) is 1080 px high, and
            # the generated frame shown for an image that is not fetched is 16:9.
            with av.open(io.BytesIO(content.content), mode="r") as clip:
                stream = clip.streams.video[0]
                size = (stream.codec_context.width, stream.codec_context.height)
                assert (size, clip.duration) == ((1920, 1080), 3_000_000)
    finally:
        child.terminate()
    out = child.output()
    assert "videorelay is running" in out and "curl" in out
    # hiapi's callback was logged by the access log, with its token masked.
    callbacks = re.findall(r"/webhooks/hiapi/\S+", out)
    assert callbacks, out[-2000:]
    assert all(path.endswith("/***") for path in callbacks), callbacks
    assert not re.search(r"/webhooks/hiapi/[0-9a-f-]{36}/[0-9a-f]{40}", out)
    assert "sk-simulator" not in out
    assert (tmp_path / "data" / "videorelay.db").exists()
