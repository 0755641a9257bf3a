"""Who is calling and how much they may send, checked before a body byte is read.

FastAPI reads and parses a request's whole body before a route's dependencies run, so an
API-key dependency alone lets anyone make the server hold (or spool to disk) a body of any
size. ``RequestGuard`` is a pure ASGI middleware in front of the routes. On ``/v1/*`` it

- identifies the caller from the headers first (``authenticate``; 401 before any body byte is
  read, so an unauthenticated body costs nothing but the socket);
- refuses a declared ``Content-Length`` over the cap at once (413, nothing read);
- counts the body while it streams, chunked included, and ends it at the cap (413):
  ``MAX_JSON_BODY_BYTES`` for JSON, ``IMAGE_MAX_BYTES`` plus the multipart framing for
  ``POST /v1/images``, so no more than that is ever buffered or spooled to disk.

Every other path (the webhook, which caps itself and is the hot path; ``/i/``; health) passes
straight through after one prefix test.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import GRANT_OWNER, ApiKeys, Caller
from app.config import Settings
from app.context import context_of
from app.errors import AppError, error_body
from app.http_policies import route_path
from app.signing import BadSignature, SignedRequest, UrlExpired, UrlSigner, signed_request
from app.tokens import ClientTokens, TokenError, looks_like_token

__all__ = [
    "CALLER_STATE",
    "DRAIN_BYTES",
    "MULTIPART_ALLOWANCE",
    "RequestGuard",
    "authenticate",
    "image_too_large",
    "insufficient_scope",
    "install_request_guard",
    "require_scope",
    "unauthorized",
]

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"
# Where the guard leaves the caller it identified, in the request's state.
CALLER_STATE = "caller"
UPLOAD_PATH = "/v1/images"
# Room for the multipart framing around the one `file` part: boundaries, the part's headers
# (a long file name included) and the closing line. The route checks the file itself exactly.
MULTIPART_ALLOWANCE = 16 * 1024
# Past the cap, up to this much more is read and dropped so that a client slightly over it can
# read its 413 (closing a socket with unread data resets it, and the reply is lost with it).
# A body still going after that, or declared larger than this, ends with the connection.
DRAIN_BYTES = 1024 * 1024


def unauthorized() -> AppError:
    """The one 401 of ``/v1/*``, from the middleware and the route dependency alike."""
    return AppError(
        "missing or invalid API key: send `Authorization: Bearer <key>`",
        code="unauthorized",
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def insufficient_scope(scope: str) -> AppError:
    return AppError(
        f"this client token lacks the scope {scope!r}; mint one with it",
        code="insufficient_scope",
        status_code=403,
        extra={"scope": scope},
    )


def require_scope(caller: Caller, scope: str) -> None:
    """403 ``insufficient_scope`` unless the caller holds ``scope`` (an API key holds all)."""
    if not caller.may(scope):
        raise insufficient_scope(scope)


def _token_refused(error: TokenError) -> AppError:
    return AppError(
        error.message,
        code=error.code,
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def authenticate(
    api_keys: ApiKeys,
    authorization: str | None,
    *,
    signed: SignedRequest | None = None,
    signer: UrlSigner | None = None,
    tokens: ClientTokens | None = None,
    now: datetime | None = None,
) -> Caller:
    """The caller behind ``authorization`` (an open API's anonymous caller when no keys are
    set), else ``unauthorized()``.

    The single check for ``/v1/*``: ``RequestGuard`` calls it before the body is read, and
    ``app.api.deps.get_caller`` takes its answer from the request's state. Every other
    credential is accepted by extending this function.

    A JWT-shaped bearer is a client token when ``tokens`` is set (``CLIENT_TOKEN_SECRET``):
    verified against ``now`` (the service's clock), and only while the key that minted it
    exists.

    ``signed`` is what a request to a signable path offers (``app.signing.signed_request``):
    with API keys on and no ``Authorization`` header, its signature alone authenticates, as a
    grant to read that one video (403 ``bad_signature`` or ``url_expired`` otherwise).
    """
    if signed is not None and signer is not None and authorization is None and not api_keys.open:
        try:
            return Caller(GRANT_OWNER, video_id=signer.verify(signed))
        except BadSignature:
            raise AppError(
                "the URL's signature does not match: use the content_url or events_url exactly "
                "as the video JSON gave it",
                code="bad_signature",
                status_code=403,
            ) from None
        except UrlExpired:
            raise AppError(
                "this signed URL has expired: GET the video again for a fresh content_url and "
                "events_url",
                code="url_expired",
                status_code=403,
            ) from None
    if tokens is not None and authorization and authorization[:7].lower() == "bearer ":
        bearer = authorization[7:].strip()
        if looks_like_token(bearer):
            try:
                claims = tokens.verify(bearer, now=now or datetime.now(UTC))
            except TokenError as exc:
                raise _token_refused(exc) from None
            if not api_keys.has(claims.key):
                raise _token_refused(
                    TokenError("invalid_token", "the API key that minted this token is gone")
                )
            return Caller(
                claims.key,
                subject=claims.subject,
                scopes=claims.scopes,
                token_id=claims.token_id,
                cap=claims.cap,
                token_expires_at=claims.expires_at,
            )
    owner = api_keys.identify(authorization)
    if owner is None:
        raise unauthorized()
    return Caller(owner)


def image_too_large(limit: int) -> AppError:
    return AppError(
        f"image is larger than {limit} bytes (IMAGE_MAX_BYTES); upload a smaller image",
        code="too_large",
        status_code=413,
    )


def _json_too_large(limit: int) -> AppError:
    return AppError(
        f"request body is larger than {limit} bytes (MAX_JSON_BODY_BYTES); send a smaller body",
        code="too_large",
        status_code=413,
    )


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` at the cap. An HTTPException on purpose: FastAPI passes those
    through its body parsing (anything else becomes a 400), so the app's own handler answers
    it with the JSON error shape."""

    def __init__(self, error: AppError, *, close: bool) -> None:
        super().__init__(413, detail=error.message, headers=_CLOSE if close else None)
        self.error = error
        self.close = close


_CLOSE = {"Connection": "close"}


def _response(error: AppError, *, close: bool) -> JSONResponse:
    headers = dict(error.headers or {})
    if close:
        # The rest of the body is unread and large: end the connection rather than let the
        # server read and discard it.
        headers.update(_CLOSE)
    return JSONResponse(
        error_body(error.code, error.message), status_code=error.status_code, headers=headers
    )


class RequestGuard:
    """Pure ASGI middleware: caller first, then a capped body (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, json_max_bytes: int, image_max_bytes: int) -> None:
        self.app = app
        self.json_max_bytes = json_max_bytes
        self.image_max_bytes = image_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or not path.startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        authorization: str | None = None
        declared: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:  # the first one, as Starlette's Headers.get
                    authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = int(value) if value.isdigit() else None
            elif name == b"transfer-encoding":
                chunked = True
        # Answered before reading: a body the server would otherwise read and drop, whose
        # size is unknown or over DRAIN_BYTES, ends with the connection instead.
        unread_large = chunked or (declared is not None and declared > DRAIN_BYTES)

        ctx = context_of(scope["app"])
        signed = signed_request(scope["method"], path, scope.get("query_string", b""))
        try:
            # Kept for the route (``app.api.deps.get_caller``), so a request is checked once.
            scope.setdefault("state", {})[CALLER_STATE] = authenticate(
                ctx.api_keys,
                authorization,
                signed=signed,
                signer=ctx.url_signer if signed is not None else None,
                tokens=ctx.client_tokens,
                now=ctx.clock(),
            )
        except AppError as exc:
            await _response(exc, close=unread_large)(scope, receive, send)
            return

        if not chunked and not declared:
            await self.app(scope, receive, send)  # no body: nothing to count
            return
        if path.rstrip("/") == UPLOAD_PATH:
            cap = self.image_max_bytes + MULTIPART_ALLOWANCE
            error = image_too_large(self.image_max_bytes)
        else:
            cap = self.json_max_bytes
            error = _json_too_large(self.json_max_bytes)
        if declared is not None and declared > cap:
            await _response(error, close=unread_large)(scope, receive, send)
            return

        received = 0
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            if received > cap:
                raise BodyTooLarge(error, close=True)
            message = await receive()
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            if received <= cap:
                return message
            more = bool(message.get("more_body", False))
            while more and received <= cap + DRAIN_BYTES:  # read on, dropping each piece
                message = await receive()
                if message["type"] != "http.request":
                    break  # the client left; the answer goes nowhere
                received += len(message.get("body", b""))
                more = bool(message.get("more_body", False))
            raise BodyTooLarge(error, close=more)

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except BodyTooLarge as exc:
            # Normally the app's HTTPException handler has answered already; this is for a
            # reader outside it. Never a second response once one has started.
            if started:
                log.warning("request.body_too_large after the response started path=%s", path)
                return
            await _response(error, close=exc.close)(scope, receive, send)


def install_request_guard(app: FastAPI, settings: Settings) -> None:
    """Install before ``install_http_policies``: CORS and the security headers wrap it, so its
    401 and 413 carry them and CORS preflights never need a key."""
    app.add_middleware(
        RequestGuard,
        json_max_bytes=settings.MAX_JSON_BODY_BYTES,
        image_max_bytes=settings.IMAGE_MAX_BYTES,
    )
