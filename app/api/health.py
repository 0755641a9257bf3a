"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import ContextDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Ready for traffic",
    description=(
        "200 when the database answers and is at the latest migration; "
        "503 otherwise, and while shutting down."
    ),
)
async def readyz(ctx: ContextDep) -> JSONResponse:
    if ctx.shutting_down:
        return _not_ready("shutting_down", "the service is shutting down")
    try:
        async with ctx.engine.connect() as conn:
            current = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except SQLAlchemyError:
        return _not_ready("database_unavailable", "the database is unreachable or not migrated")
    if current != ctx.head_revision:
        return _not_ready(
            "migration_pending",
            f"database is at revision {current}, code expects {ctx.head_revision}; "
            "run `videorelay migrate`",
        )
    return JSONResponse({"status": "ready", "revision": current})


def _not_ready(code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=503)
