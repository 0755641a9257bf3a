"""Cross-origin rules (``CORS_ORIGINS``) and security headers on every response."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings

__all__ = ["RATE_LIMIT_HEADERS", "install_http_policies"]

# The quota of ``POST /v1/videos`` (``app.api.usage``), readable by a browser page via CORS.
RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")

# JSON and MP4 responses never need scripts, frames or plugins. /docs starts Swagger UI with
# an inline script, so it gets no CSP here.
API_CSP = b"default-src 'none'; frame-ancestors 'none'; sandbox"
# ReDoc: its script and the document from here, the styles it injects, its search worker
# from a blob:. Images only from here, so the Redocly logo it links to (on their CDN) is
# never requested: the page works the same with no internet.
REDOC_CSP = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"worker-src 'self' blob:; frame-ancestors 'none'"
)
# The playground loads its own script and style and plays clips from blob: URLs.
PAGE_CSP = (
    b"default-src 'self'; img-src 'self' blob: data: https:; media-src 'self' blob:; "
    b"style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")
PAGE_PATHS = ("/static/",)


def route_path(scope: Scope) -> str:
    """The request's path inside the app. Under ``ROOT_PATH`` (uvicorn's ``root_path``) the
    server prepends the prefix the proxy took off: ``/relay/v1/videos`` is ``/v1/videos``."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


class SecurityHeaders:
    """Pure ASGI middleware (no buffering, so streamed MP4s and Range responses pass through)."""

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        docs = path.startswith(DOCS_PATHS)
        page = path == "/" or path.startswith(PAGE_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                if page:
                    extra.append((b"content-security-policy", PAGE_CSP))
                elif path == "/redoc":
                    extra.append((b"content-security-policy", REDOC_CSP))
                elif not docs:
                    extra.append((b"content-security-policy", API_CSP))
                if self.hsts:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                headers += [(k, v) for k, v in extra if k not in names]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_http_policies(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(SecurityHeaders, hsts=settings.PUBLIC_BASE_URL.startswith("https://"))
    origins = [o.strip() for o in settings.CORS_ORIGINS.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Range"],
            expose_headers=[
                "Idempotent-Replayed",
                "Content-Range",
                "Accept-Ranges",
                "Retry-After",
                *RATE_LIMIT_HEADERS,
            ],
            max_age=600,
        )
