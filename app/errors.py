"""Application errors and the one place that turns them (and validation errors) into HTTP.

Every error response has the same shape as a video's ``error`` field::

    {"error": {"code": "...", "message": "..."}}

with an optional ``field`` (validation) or ``video`` (the video the error is about).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import FIELD_HINTS, FIELD_RULE
from app.storage import StorageError

__all__ = ["AppError", "register_exception_handlers"]

log = logging.getLogger(__name__)


class AppError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.extra = extra or {}
        self.headers = headers


class NotFound(AppError):
    status_code = 404
    code = "not_found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"


class UpstreamRejected(AppError):
    status_code = 502
    code = "upstream_rejected"


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _field_of(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err.get("type") == FIELD_RULE and "field" in ctx:
        return str(ctx["field"])  # a rule of the whole body, blamed on one of its fields
    return _field_name(tuple(err.get("loc", ())))


def _field_name(loc: tuple[Any, ...]) -> str:
    if loc[:1] == ("body",) and len(loc) == 2 and isinstance(loc[1], int):
        return "body"  # a JSON syntax error: the int is the character position
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_message(err: dict[str, Any]) -> str:
    field = _field_of(err)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return (
            f"{field}: unknown field; allowed fields are image_url (or image_id), prompt, "
            "resolution, duration, notify_url, metadata"
        )
    if kind == "missing":
        return f"{field}: field required"
    if kind == "json_invalid":
        return "body: not valid JSON"
    if kind == FIELD_RULE:
        return f"{field}: {err.get('msg')}"
    if field in FIELD_HINTS and "body" in tuple(err.get("loc", ())):
        return f"{field}: {FIELD_HINTS[field]} (got {_shown(err.get('input'))})"
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{field}: {msg}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def register_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        body = error_body(exc.code, exc.message)
        body.update(jsonable_encoder(exc.extra))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        details = [{"field": _field_of(e), "message": _validation_message(e)} for e in errors]
        body = error_body(
            "validation_error",
            _validation_message(first),
            field=_field_of(first),
            details=details,
        )
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(IntegrityError)
    async def _conflict(_: Request, exc: IntegrityError) -> JSONResponse:
        log.warning("database.constraint_violation error=%s", type(exc.orig).__name__)
        return JSONResponse(
            error_body("conflict", "the request conflicts with the current state; retry it"),
            status_code=409,
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("request.unexpected_error", exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "an unexpected error occurred; it has been logged"),
            status_code=500,
        )

    @app.exception_handler(StorageError)
    async def _storage_down(_: Request, exc: StorageError) -> JSONResponse:
        log.error("storage.unavailable error=%s", exc)
        return JSONResponse(
            error_body("storage_unavailable", "the clip store is unavailable; retry shortly"),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(ConnectionError)
    @app.exception_handler(TimeoutError)
    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        log.error("database.unavailable error=%s", type(exc).__name__)
        return JSONResponse(
            error_body("database_unavailable", "the database is unavailable; retry shortly"),
            status_code=503,
            headers={"Retry-After": "5"},
        )
