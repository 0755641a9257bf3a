"""FastAPI dependencies, one ``Annotated`` alias per resource a route may use.

A route names what it needs (``session: SessionDep, submission: SubmissionDep``) and nothing
else; each alias reads one member of the running service's ``AppContext``. The dependencies
are ``async`` on purpose: a sync one would run in the thread pool on every request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth import ApiKeys, Caller
from app.config import Settings
from app.context import AppContext, context_of
from app.deletion import Deleter
from app.limits import CALLER_STATE, authenticate
from app.metrics import MetricsEndpoint
from app.signing import VideoUrls
from app.storage import Storage
from app.streams import StreamSlots
from app.submission import Submission

__all__ = [
    "ApiKeysDep",
    "CallerDep",
    "ClockDep",
    "DeleterDep",
    "EngineDep",
    "EventStreamsDep",
    "HeadRevisionDep",
    "ImagesRootDep",
    "MetricsDep",
    "SecretDep",
    "SessionDep",
    "SessionmakerDep",
    "SettingsDep",
    "StopDep",
    "StorageDep",
    "SubmissionDep",
    "VideoUrlsDep",
]


async def _context(request: Request) -> AppContext:
    return context_of(request.app)


_ContextDep = Annotated[AppContext, Depends(_context)]


async def get_settings(ctx: _ContextDep) -> Settings:
    return ctx.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_engine(ctx: _ContextDep) -> AsyncEngine:
    return ctx.engine


EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


async def get_head_revision(ctx: _ContextDep) -> str | None:
    """The migration this code expects the database to be at."""
    return ctx.head_revision


HeadRevisionDep = Annotated[str | None, Depends(get_head_revision)]


async def get_sessionmaker(ctx: _ContextDep) -> async_sessionmaker[AsyncSession]:
    """For work that opens short sessions of its own (an event stream's polls)."""
    return ctx.sessionmaker


SessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]


async def get_session(sessionmaker: SessionmakerDep) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_clock(ctx: _ContextDep) -> Callable[[], datetime]:
    return ctx.clock


ClockDep = Annotated[Callable[[], datetime], Depends(get_clock)]


async def get_stop(ctx: _ContextDep) -> asyncio.Event:
    """Set when the service shuts down: long responses end then."""
    return ctx.stop


StopDep = Annotated[asyncio.Event, Depends(get_stop)]


async def get_secret(ctx: _ContextDep) -> bytes:
    """The service's signing secret (``WEBHOOK_SECRET``): list cursors are derived from it."""
    return ctx.secret


SecretDep = Annotated[bytes, Depends(get_secret)]


async def get_video_urls(ctx: _ContextDep) -> VideoUrls:
    """A video's ``content_url`` and ``events_url``: signed when API keys are on."""
    return ctx.video_urls


VideoUrlsDep = Annotated[VideoUrls, Depends(get_video_urls)]


async def get_storage(ctx: _ContextDep) -> Storage:
    return ctx.storage


StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_deleter(ctx: _ContextDep) -> Deleter:
    return ctx.deleter


DeleterDep = Annotated[Deleter, Depends(get_deleter)]


async def get_images_root(ctx: _ContextDep) -> Path:
    return ctx.images_root


ImagesRootDep = Annotated[Path, Depends(get_images_root)]


async def get_submission(ctx: _ContextDep) -> Submission:
    return ctx.submission


SubmissionDep = Annotated[Submission, Depends(get_submission)]


async def get_event_streams(ctx: _ContextDep) -> StreamSlots:
    return ctx.event_streams


EventStreamsDep = Annotated[StreamSlots, Depends(get_event_streams)]


async def get_metrics(ctx: _ContextDep) -> MetricsEndpoint:
    return ctx.metrics


MetricsDep = Annotated[MetricsEndpoint, Depends(get_metrics)]


async def get_api_keys(ctx: _ContextDep) -> ApiKeys:
    return ctx.api_keys


ApiKeysDep = Annotated[ApiKeys, Depends(get_api_keys)]


# Documents the credential in OpenAPI (the security scheme of every operation that takes a
# caller, and /docs' Authorize button); it never refuses a request itself.
bearer = HTTPBearer(
    scheme_name="bearerAuth",
    description=(
        "`Authorization: Bearer <API key or client token>`; required when the service has "
        "API keys configured (`API_KEYS`), ignored when it has none (a client token is "
        "still honoured then)."
    ),
    auto_error=False,
)


async def get_caller(
    ctx: _ContextDep,
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Caller:
    """Who is calling (``app.auth.Caller``).

    ``app.limits.RequestGuard`` has made the check before the body was read and left its
    answer in the request's state; the header is checked here only if a route is ever served
    without the guard, by the same ``authenticate`` on the header as sent.
    """
    checked: Caller | None = getattr(request.state, CALLER_STATE, None)
    if checked is not None:
        return checked
    return authenticate(
        ctx.api_keys,
        request.headers.get("authorization"),
        tokens=ctx.client_tokens,
        now=ctx.clock(),
    )


CallerDep = Annotated[Caller, Depends(get_caller)]
