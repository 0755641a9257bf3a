"""The webhook benchmark's two baselines, as uvicorn factories (``--factory``).

* ``bare_app``: a bare FastAPI endpoint on the webhook's own path that parses the same JSON
  body and answers 204. The ceiling of FastAPI + uvicorn on this machine.
* ``insert_app``: the plain way to make a callback durable: one SQLAlchemy async session per
  request, the task parsed as the service parses it, ``INSERT ... ON CONFLICT DO NOTHING`` of
  the callback, commit, 204. It uses
  ``app.db.create_engine`` (same pool and SQLite pragmas as the service) on
  ``BENCH_DATABASE_URL``.

The subject, videorelay's real route, is ``app.main:create_app_from_env`` itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from sqlalchemy import Column, MetaData, String, Table, Text
from sqlalchemy.dialects import postgresql, sqlite

from app.db import UTCDateTime, create_engine, create_sessionmaker, utc_now
from app.hiapi.schemas import parse_task_payload, task_object

__all__ = ["CALLBACKS", "bare_app", "insert_app"]

WEBHOOK_PATH = "/webhooks/hiapi/{video_id}/{token}"

metadata = MetaData()
CALLBACKS = Table(
    "bench_callbacks",
    metadata,
    Column("task_id", String(200), primary_key=True),
    Column("video_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
)


def _add_health(app: FastAPI) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}


def bare_app() -> FastAPI:
    app = FastAPI(title="bench: bare 204")
    _add_health(app)

    @app.post(WEBHOOK_PATH, status_code=204)
    async def callback(video_id: str, token: str, request: Request) -> Response:
        task = task_object(json.loads(await request.body()))
        if task is None:
            return Response(status_code=400)
        return Response(status_code=204)

    return app


def insert_app() -> FastAPI:
    url = os.environ["BENCH_DATABASE_URL"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        app.state.sessionmaker = create_sessionmaker(engine)
        app.state.insert = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(title="bench: insert per request", lifespan=lifespan)
    _add_health(app)

    @app.post(WEBHOOK_PATH, status_code=204)
    async def callback(video_id: str, token: str, request: Request) -> Response:
        raw = await request.body()
        try:
            task = parse_task_payload(json.loads(raw))
        except ValueError:
            return Response(status_code=400)
        stmt = (
            app.state.insert(CALLBACKS)
            .values(
                task_id=task.task_id,
                video_id=video_id,
                status=task.status.value,
                body=raw.decode(),
                received_at=utc_now(),
            )
            .on_conflict_do_nothing(index_elements=["task_id"])
        )
        async with app.state.sessionmaker() as session:
            await session.execute(stmt)
            await session.commit()
        return Response(status_code=204)

    return app
