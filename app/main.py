"""The FastAPI application: ``create_app(settings)`` wires routes, errors and the lifespan.

The lifespan owns everything with a lifetime: the database engine, the HTTP clients, the
download runner and the reconciler loop. Shutdown stops new work, asks running downloads to
give their leases back, and waits at most ``SHUTDOWN_GRACE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api import client_tokens, health, images, playground, usage, videos, webhooks
from app.config import Settings
from app.context import open_context
from app.db import create_engine, create_sessionmaker, utc_now
from app.errors import register_exception_handlers
from app.http_policies import install_http_policies
from app.limits import install_request_guard
from app.logging import configure_logging
from app.metrics import serve_metrics_port
from app.migrate import head_revision

__all__ = ["create_app", "create_app_from_env"]

log = logging.getLogger(__name__)

DESCRIPTION = """
videorelay turns still images into short videos with hiapi's `happyhorse-1.1/image-to-video`
model and keeps every finished clip in its own storage.

Submit with `POST /v1/videos`, then read `GET /v1/videos/{id}` until `status` is `ready`
(or `failed`), and play `content_url`. Every error is `{"error": {"code", "message"}}`.

When the service has API keys configured (`API_KEYS`), every `/v1` request sends
`Authorization: Bearer <API key>` (*Authorize* in `/docs`); without it, or with an unknown key,
the answer is `401` `unauthorized`. Without API keys the API is open and the header is ignored.
A frontend sends a client token instead, minted by its backend with `POST /v1/client-tokens`
(`Authorization: Bearer <client token>`; `401` `token_expired` or `invalid_token`, `403`
`insufficient_scope`).
"""


def operation_id(route: APIRoute) -> str:
    """The route function's name in camelCase (``create_video`` is ``createVideo``): short,
    stable names for generated clients. A route whose name doesn't fit sets ``operation_id``."""
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utc_now,
    simulator: FastAPI | None = None,
    run_reconciler: bool = True,
    metrics_host: str = "127.0.0.1",
    metrics_port_shared: bool = False,
) -> FastAPI:
    """Build the service. ``simulator``, if given, is mounted at ``/simulator`` (``--simulate``).

    With ``METRICS_PORT`` set, the lifespan serves ``/metrics`` on ``metrics_host:METRICS_PORT``;
    ``metrics_port_shared`` says several workers try to, and the first to bind it serves it.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if simulator is not None:
                await stack.enter_async_context(simulator.router.lifespan_context(simulator))
            engine = create_engine(settings.DATABASE_URL, timeout=settings.DATABASE_TIMEOUT_SECONDS)
            stack.push_async_callback(engine.dispose)
            ctx = await stack.enter_async_context(
                open_context(
                    settings,
                    engine=engine,
                    sessionmaker=create_sessionmaker(
                        engine, timeout=settings.DATABASE_TIMEOUT_SECONDS
                    ),
                    clock=clock,
                    head_revision=await asyncio.to_thread(head_revision, settings.DATABASE_URL),
                )
            )
            await asyncio.to_thread(ctx.storage.ensure_dirs)
            app.state.ctx = ctx
            if settings.METRICS_PORT is not None:
                listener = await serve_metrics_port(
                    ctx.metrics,
                    host=metrics_host,
                    port=settings.METRICS_PORT,
                    shared=metrics_port_shared,
                )
                if listener is not None:
                    stack.push_async_callback(listener.cleanup)
            if ctx.api_keys.open:
                log.warning(
                    "service.open_api: API_KEYS is not set, so anyone who can reach /v1/* can "
                    "submit (and spend) and read every video; set API_KEYS in production"
                )
            else:
                log.info("service.api_keys count=%d", len(ctx.api_keys.names))
            background: list[asyncio.Task[None]] = []
            if run_reconciler:
                background.append(asyncio.create_task(ctx.reconciler.run(ctx.stop)))
                background.append(asyncio.create_task(ctx.notifier.run(ctx.stop)))
            log.info("service.started public_base=%s", settings.public_base)
            # Everything built so far lives as long as the process: keep the collector from
            # walking it again on every full collection (pauses that showed in the ack p99).
            gc.freeze()
            try:
                yield
            finally:
                await ctx.intake.drain()  # reports already received are written
                await ctx.runner.shutdown(settings.SHUTDOWN_GRACE_SECONDS)
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                log.info("service.stopped")

    # FastAPIOffline serves /docs and /redoc with Swagger UI and ReDoc from its own package
    # (under /static-offline-docs), so they render with no internet.
    app = FastAPIOffline(
        title="videorelay",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # Show each operation's id (the generated clients' method names); no validator badge,
        # which swagger.io would serve.
        swagger_ui_parameters={"displayOperationId": True, "validatorUrl": None},
    )
    register_exception_handlers(app)
    install_request_guard(app, settings)  # inside CORS and the security headers
    install_http_policies(app, settings)
    # The webhook's route first: routes are matched in order, and it takes the bursts. It is
    # served by a plain Starlette route (no FastAPI request handling: about a third of its
    # CPU); the FastAPI route behind it, never reached, documents it in OpenAPI.
    app.add_route(webhooks.PATH, webhooks.hiapi_callback, methods=["POST"], include_in_schema=False)
    app.include_router(webhooks.router)
    app.include_router(videos.router)
    app.include_router(images.router)
    app.include_router(images.public_router)
    app.include_router(client_tokens.router)
    app.include_router(usage.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    app.mount("/static", playground.static_files(), name="static")
    if simulator is not None:
        app.mount("/simulator", simulator)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (used by ``videorelay serve --workers N``)."""
    settings = Settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    # `videorelay serve --workers N` passes its --host as HOST; each worker's lifespan tries
    # METRICS_PORT there and the first to bind it serves /metrics (README, "Operations").
    return create_app(
        settings, metrics_host=os.environ.get("HOST", "127.0.0.1"), metrics_port_shared=True
    )
