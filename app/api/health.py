"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import EngineDep, HeadRevisionDep, MetricsDep, SettingsDep
from app.errors import AppError, NotFound
from app.metrics import UNAUTHORIZED_MESSAGE
from app.schemas import ErrorOut

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Ready for traffic",
    description=(
        "200 when the database answers and is at the latest migration; 503 otherwise. On "
        "SIGTERM the service stops taking connections at once, so a probe sees it refuse."
    ),
)
async def readyz(engine: EngineDep, head_revision: HeadRevisionDep) -> JSONResponse:
    try:
        async with engine.connect() as conn:
            current = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except SQLAlchemyError:
        return _not_ready("database_unavailable", "the database is unreachable or not migrated")
    if current != head_revision:
        return _not_ready(
            "migration_pending",
            f"database is at revision {current}, code expects {head_revision}; "
            "run `videorelay migrate`",
        )
    return JSONResponse({"status": "ready", "revision": current})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "Counters of this process (submits, upstream requests, callbacks, recovered callbacks, "
        "downloads, notifications) and gauges read from the database (videos by status, "
        "oldest in-flight video), read at most once per `METRICS_CACHE_SECONDS`. With "
        "`METRICS_TOKEN` set it needs `Authorization: Bearer <METRICS_TOKEN>` (`401` "
        "otherwise). With `METRICS_PORT` set it is served on that port only, and this one "
        "answers `404`."
    ),
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}},
        401: {"model": ErrorOut, "description": "METRICS_TOKEN is set: token missing or wrong."},
        404: {"model": ErrorOut, "description": "METRICS_PORT is set: /metrics is served there."},
    },
)
async def metrics(
    settings: SettingsDep,
    endpoint: MetricsDep,
    authorization: Annotated[
        str | None, Header(description="`Bearer <METRICS_TOKEN>` when one is set.")
    ] = None,
) -> Response:
    if settings.METRICS_PORT is not None:
        raise NotFound(
            "/metrics is served on the metrics port (METRICS_PORT), not on this one",
            code="not_found",
        )
    if not endpoint.authorized(authorization):
        raise AppError(
            UNAUTHORIZED_MESSAGE,
            code="unauthorized",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Response(await endpoint.render(), media_type=CONTENT_TYPE_LATEST)


def _not_ready(code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=503)
