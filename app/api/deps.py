"""FastAPI dependencies: the app context, a request session, and a video looked up by id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
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


# Documents the credential in OpenAPI (the security scheme of every operation that takes a
# caller, and /docs' Authorize button); it never refuses a request itself.
bearer = HTTPBearer(
    scheme_name="bearerAuth",
    description=(
        "`Authorization: Bearer <API key>`; required when the service has API keys "
        "configured (`API_KEYS`), ignored when it has none."
    ),
    auto_error=False,
)


async def get_caller(
    ctx: ContextDep,
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> str:
    """The name of the calling API key ('' when the API is open).

    ``app.limits.RequestGuard`` has made the check before the body was read and left its
    answer in the request's state; the header is checked here only if a route is ever served
    without the guard, by the same ``authenticate`` on the header as sent.
    """
    checked: str | None = getattr(request.state, CALLER_STATE, None)
    if checked is not None:
        return checked
    return authenticate(ctx, request.headers.get("authorization"))


CallerDep = Annotated[str, Depends(get_caller)]
