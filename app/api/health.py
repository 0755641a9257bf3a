"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import ContextDep
from app.metrics import METRICS

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


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "Counters of this process (submits, upstream requests, callbacks, recovered callbacks, "
        "downloads, notifications) and gauges read from the database (videos by status, "
        "oldest in-flight video). Expose it on the internal network only."
    ),
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(ctx: ContextDep) -> Response:
    try:
        async with ctx.sessionmaker() as session:
            await METRICS.refresh_from_database(session, ctx.clock())
    except SQLAlchemyError:
        pass  # counters are still worth serving; the gauges keep their last value
    return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)


def _not_ready(code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=503)
