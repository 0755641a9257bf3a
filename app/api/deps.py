"""FastAPI dependencies: the app context, a request session, and a video looked up by id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.context import AppContext
from app.limits import CALLER_STATE, authenticate

__all__ = ["CallerDep", "ContextDep", "SessionDep"]


async def get_context(request: Request) -> AppContext:
    # async on purpose: a sync dependency would run in the thread pool on every request.
    ctx: AppContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[AppContext, Depends(get_context)]


async def get_session(ctx: ContextDep) -> AsyncIterator[AsyncSession]:
    async with ctx.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_caller(
    ctx: ContextDep,
    request: Request,
    authorization: Annotated[
        str | None,
        Header(
            description="`Bearer <API key>`; required when the service has API keys configured.",
        ),
    ] = None,
) -> str:
    """The name of the calling API key ('' when the API is open).

    ``app.limits.RequestGuard`` has made the check before the body was read and left its
    answer in the request's state; the header is declared here to document it in OpenAPI, and
    is checked here only if a route is ever served without the guard.
    """
    checked: str | None = getattr(request.state, CALLER_STATE, None)
    return checked if checked is not None else authenticate(ctx, authorization)


CallerDep = Annotated[str, Depends(get_caller)]
