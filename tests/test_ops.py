"""Migrations, probes and the command line."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
from alembic import command

from app.migrate import alembic_config, downgrade, upgrade
from tests.conftest import ServiceFactory, free_socket


def in_thread(fn, *args):
    return asyncio.to_thread(fn, *args)


class TestMigrations:
    async def test_downgrade_upgrade_round_trip_and_models_match(self, database_url: str):
        await in_thread(downgrade, database_url, "base")
        await in_thread(upgrade, database_url)
        # Fails if a model changed without a migration.
        await in_thread(command.check, alembic_config(database_url))


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
        await in_thread(downgrade, database_url, "base")
        try:
            ready = await service.client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] in ("migration_pending", "database_unavailable")
        finally:
            await in_thread(upgrade, database_url)

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
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HIAPI_", "WEBHOOK_"))}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**clean, **(env or {})},
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
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HIAPI_", "WEBHOOK_", "DATABASE_"))
    }
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "app.cli", "serve", "--simulate", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            video = (
                await client.post(
                    "/v1/videos", json={"image_url": "https://example.invalid/a.jpg", "duration": 3}
                )
            ).json()
            for _ in range(300):
                current = (await client.get(f"/v1/videos/{video['id']}")).json()
                if current["status"] in ("ready", "failed"):
                    break
                await asyncio.sleep(0.05)
            assert current["status"] == "ready", current
            content = await client.get(f"/v1/videos/{video['id']}/content")
            assert content.status_code == 200 and content.content[4:8] == b"ftyp"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "videorelay is running" in out and "curl" in out
    # hiapi's callback was logged by the access log, with its token masked.
    callbacks = re.findall(r"/webhooks/hiapi/\S+", out)
    assert callbacks, out[-2000:]
    assert all(path.endswith("/***") for path in callbacks), callbacks
    assert not re.search(r"/webhooks/hiapi/[0-9a-f-]{36}/[0-9a-f]{40}", out)
    assert "sk-simulator" not in out
    assert (tmp_path / "data" / "videorelay.db").exists()
