"""The OpenAPI document and the pages that render it.

The document: a bearer security scheme on exactly the operations that take a caller, and
short, stable operationIds (generated clients' method names). The pages: ``/docs`` and
``/redoc`` render in headless Chromium from files this service ships, with every request to
a host other than 127.0.0.1 aborted and recorded.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.requests import Request

from app.api.deps import get_caller
from app.auth import Caller
from app.errors import AppError
from tests.conftest import ServiceFactory

# ``chromium`` is the fixture that skips (or fails under CI) without Debian's browser.
from tests.test_playground import CHROMIUM, CHROMIUM_ARGS, chromium, wait_js  # noqa: F401

# The documents don't depend on the database: the SQLite half is enough.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

KEY = "docs-key-0123456789abcdef"

OPERATION_IDS = {
    ("post", "/v1/videos"): "createVideo",
    ("get", "/v1/videos"): "listVideos",
    ("get", "/v1/videos/{video_id}"): "getVideo",
    ("delete", "/v1/videos/{video_id}"): "deleteVideo",
    ("get", "/v1/videos/{video_id}/content"): "getVideoContent",
    ("get", "/v1/videos/{video_id}/poster.jpg"): "getVideoPoster",
    ("get", "/v1/videos/{video_id}/events"): "streamVideoEvents",
    ("post", "/v1/images"): "uploadImage",
    ("post", "/v1/client-tokens"): "createClientToken",
    ("get", "/v1/usage"): "getUsage",
    ("get", "/i/{name}"): "publicImage",
    ("post", "/webhooks/hiapi/{video_id}/{token}"): "hiapiCallback",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
    ("get", "/metrics"): "metrics",
}


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): op
        for path, methods in spec["paths"].items()
        for method, op in methods.items()
    }


async def openapi(services: ServiceFactory) -> dict[str, Any]:
    service = await services.start(API_KEYS=f"docs:{KEY}")
    response = await service.client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


class TestOpenApiDocument:
    async def test_bearer_scheme_is_declared_and_says_when_it_is_required(
        self, services: ServiceFactory
    ):
        spec = await openapi(services)
        scheme = spec["components"]["securitySchemes"]["bearerAuth"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        assert "required when the service has API keys configured" in scheme["description"]
        assert list(spec["components"]["securitySchemes"]) == ["bearerAuth"]

    async def test_every_v1_operation_requires_the_bearer_and_no_other_does(
        self, services: ServiceFactory
    ):
        spec = await openapi(services)
        for (method, path), op in operations(spec).items():
            where = f"{method.upper()} {path}"
            if path.startswith("/v1/"):
                assert op.get("security") == [{"bearerAuth": []}], where
                # The scheme documents the header; it is not a parameter of its own too.
                headers = {
                    p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"
                }
                assert "authorization" not in headers, where
                assert "Authorization: Bearer <API key>" in op["responses"]["401"]["description"]
            else:
                assert "security" not in op, where
        assert "security" not in spec  # no global requirement: the webhook and probes are open
        assert "Authorization: Bearer <API key>" in spec["info"]["description"]

    async def test_operation_ids_are_exact_unique_and_camel_case(self, services: ServiceFactory):
        spec = await openapi(services)
        ids = {key: op["operationId"] for key, op in operations(spec).items()}
        assert ids == OPERATION_IDS
        assert len(set(ids.values())) == len(ids)
        assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z]*)*", name) for name in ids.values())


class TestCallerCheck:
    async def test_every_scope_checked_operation_documents_its_403(self, services: ServiceFactory):
        # Each of these refuses a client token without its scope (``require_scope``).
        checked = [op for key, op in OPERATION_IDS.items() if key[1].startswith("/v1/")]
        checked.remove("createClientToken")  # a token's 403 there is api_key_required
        checked.remove("getUsage")  # any caller may read its own quotas: no scope
        by_id = {op["operationId"]: op for op in operations(await openapi(services)).values()}
        for operation_id in checked:
            forbidden = by_id[operation_id]["responses"].get("403", {})
            assert "insufficient_scope" in forbidden.get("description", ""), operation_id

    async def test_the_401_is_unchanged_and_any_bearer_spelling_still_works(
        self, services: ServiceFactory
    ):
        service = await services.start(API_KEYS=f"docs:{KEY}")
        for headers in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer nope"}):
            refused = await service.client.get("/v1/videos", headers=headers)
            assert refused.status_code == 401
            assert refused.json() == {
                "error": {
                    "code": "unauthorized",
                    "message": "missing or invalid API key: send `Authorization: Bearer <key>`",
                }
            }
            assert refused.headers["www-authenticate"] == "Bearer"
        for spelling in ("Bearer", "bearer", "BEARER"):
            ok = await service.client.get(
                "/v1/videos", headers={"Authorization": f"{spelling} {KEY}"}
            )
            assert ok.status_code == 200

    async def test_get_caller_checks_the_header_itself_without_the_guard(
        self, services: ServiceFactory
    ):
        service = await services.start(API_KEYS=f"docs:{KEY}")

        def bare(authorization: str | None) -> Request:
            headers = [] if authorization is None else [(b"authorization", authorization.encode())]
            return Request(
                {"type": "http", "method": "GET", "path": "/v1/videos", "headers": headers}
            )

        assert await get_caller(service.ctx, bare(f"Bearer {KEY}"), None) == Caller("docs")
        for authorization in (None, "Bearer nope", f"Basic {KEY}"):
            with pytest.raises(AppError) as refused:
                await get_caller(service.ctx, bare(authorization), None)
            assert (refused.value.status_code, refused.value.code) == (401, "unauthorized")


class TestDocsOffline:
    async def test_pages_load_only_files_this_service_ships(self, services: ServiceFactory):
        service = await services.start()
        for page in ("/docs", "/redoc"):
            html = (await service.client.get(page)).text
            assert "//" not in re.sub(r"<!--.*?-->", "", html, flags=re.S), page
            for url in re.findall(r'(?:src|href)="([^"]+)"', html):
                asset = await service.client.get(url)
                assert asset.status_code == 200, url
                assert len(asset.content) > 1000, url
        # ReDoc's page may load images from this service only (see the browser test).
        redoc = await service.client.get("/redoc")
        assert "img-src 'self' data:;" in redoc.headers["content-security-policy"]

    @pytest.mark.usefixtures("chromium")
    async def test_docs_and_redoc_render_with_every_outside_request_aborted(
        self, services: ServiceFactory
    ):
        from playwright.async_api import Request as BrowserRequest
        from playwright.async_api import Route, async_playwright

        service = await services.start(API_KEYS=f"docs:{KEY}")
        # Requests for any host but 127.0.0.1: every one the page made (``requested``), the
        # ones that reached the network stack (``routed``: aborted here), and why each failed.
        requested: list[str] = []
        routed: list[str] = []
        failed: dict[str, str | None] = {}
        errors: list[str] = []

        def outside(url: str) -> bool:
            parts = urlsplit(url)
            return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != "127.0.0.1"

        async def only_loopback(route: Route) -> None:
            if outside(route.request.url):
                routed.append(route.request.url)
                await route.abort()
            else:
                await route.continue_()

        def on_request(request: BrowserRequest) -> None:
            if outside(request.url):
                requested.append(request.url)

        def on_failed(request: BrowserRequest) -> None:
            failed[request.url] = request.failure

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context()
                await context.route("**/*", only_loopback)
                context.on("request", on_request)
                context.on("requestfailed", on_failed)
                page = await context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))

                await page.goto(f"{service.server.url}/docs")
                create = page.locator("#operations-videos-createVideo")
                await create.wait_for(timeout=15_000)
                assert "createVideo" in await create.inner_text()
                authorize = page.locator("button.authorize")
                await authorize.click()
                dialog = page.locator(".auth-container").first
                await dialog.wait_for()
                assert "bearerAuth" in await dialog.inner_text()
                assert (requested, routed) == ([], [])

                await page.goto(f"{service.server.url}/redoc")
                await page.locator("h1", has_text="videorelay").wait_for(timeout=15_000)
                # ReDoc names each operation's section after its operationId.
                await wait_js(page, "document.body.innerHTML.includes('operation/createVideo')")
                assert "bearerAuth" in await page.locator("body").inner_text()
                # ReDoc always shows Redocly's logo from their CDN: the page's policy makes
                # the browser refuse it before any lookup or connection.
                for _ in range(50):
                    if set(failed) >= set(requested):
                        break
                    await page.wait_for_timeout(100)
                assert routed == []
                assert {url: failed.get(url) for url in requested} == {
                    url: "csp" for url in requested
                }
            finally:
                await browser.close()
        assert errors == []
