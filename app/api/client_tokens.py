"""``POST /v1/client-tokens``: an API key's holder mints a short-lived token for one end user."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, status

from app.api.deps import CallerDep, ClockDep
from app.context import context_of
from app.errors import AppError
from app.schemas import ClientTokenCreate, ClientTokenOut, ErrorOut
from app.tokens import ClientTokens

__all__ = ["router"]

router = APIRouter(prefix="/v1/client-tokens", tags=["client tokens"])


async def _client_tokens(request: Request) -> ClientTokens | None:
    return context_of(request.app).client_tokens


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ClientTokenOut,
    summary="Mint a client token for one end user",
    description=(
        "For your backend, with its API key: a short-lived bearer for one end user "
        "(`subject`) that a browser or app sends as `Authorization: Bearer <token>`. What it "
        "creates belongs to that subject, and it sees nothing else of the key's. A client "
        "token cannot mint tokens."
    ),
    responses={
        401: {
            "model": ErrorOut,
            "description": (
                "No `Authorization: Bearer <API key>`, or an unknown key (`unauthorized`); "
                "only when the service has API keys configured."
            ),
        },
        403: {
            "model": ErrorOut,
            "description": "Called with a client token (`api_key_required`).",
        },
        422: {"model": ErrorOut, "description": "Invalid request; `error.field` names the field."},
        501: {
            "model": ErrorOut,
            "description": "The server has no `CLIENT_TOKEN_SECRET` (`client_tokens_disabled`).",
        },
    },
)
async def create_client_token(
    body: ClientTokenCreate,
    caller: CallerDep,
    clock: ClockDep,
    tokens: Annotated[ClientTokens | None, Depends(_client_tokens)],
) -> ClientTokenOut:
    if caller.subject is not None or caller.video_id is not None:
        raise AppError(
            "client tokens are minted with an API key, not with a client token",
            code="api_key_required",
            status_code=403,
        )
    if tokens is None:
        raise AppError(
            "client tokens are disabled on this server: set CLIENT_TOKEN_SECRET "
            "(one or more comma-separated secrets of at least 32 characters) to enable them",
            code="client_tokens_disabled",
            status_code=501,
        )
    scopes = list(dict.fromkeys(body.scopes))
    token, expires_at = tokens.mint(
        key=caller.owner,
        subject=body.subject,
        scopes=scopes,
        ttl=timedelta(seconds=body.ttl_seconds),
        cap=body.max_video_seconds,
        now=clock(),
    )
    return ClientTokenOut(token=token, expires_at=expires_at, subject=body.subject, scopes=scopes)
