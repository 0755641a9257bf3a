"""A frontend on another origin, holding only a client token, in headless Chromium.

The test plays the customer's backend: it mints a client token with the API key and serves
one HTML page from a second origin (another port on 127.0.0.1, listed in ``CORS_ORIGINS``)
with only that token in it. The page's own script draws a still, uploads it, submits a video
with ``Authorization: Bearer <token>``, follows ``new EventSource(events_url)`` until
``ready``, shows ``poster_url`` (an ``<img>`` and the ``<video poster>``), plays
``content_url`` in a ``<video>`` and seeks; it reads the submit's ``RateLimit-*`` headers
(exposed through CORS) and ``GET /v1/usage``. The same page with the ``sig`` of
``content_url`` altered gets no video. Every request to a host other than 127.0.0.1 is
aborted.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from tests.conftest import RunningServer, ServiceFactory, Sim, free_socket

# ``chromium`` is the fixture that skips (or fails under CI) without Debian's browser.
from tests.test_playground import CHROMIUM, CHROMIUM_ARGS, chromium, wait_js  # noqa: F401

# The browser's side does not depend on the database: the SQLite half is enough.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

KEY = "frontend-key-0123456789abcdef"
SECRET = "client-token-secret-" + "0123456789abcdef" * 3

# The page the customer's server renders for a signed-in user: the API's address and that
# user's client token, nothing else. ``?tamper`` alters the signature of ``content_url``.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>frontend</title></head>
<body>
<video id="player" muted playsinline></video>
<img id="poster" alt="">
<script>
const API = __API__;
const TOKEN = __TOKEN__;
const state = (window.state = {
  events: [], error: null, videoError: false, seeked: false, rate: {},
});
const auth = { Authorization: "Bearer " + TOKEN };

async function call(path, init) {
  const response = await fetch(API + path, { ...init, headers: { ...auth, ...init.headers } });
  const body = await response.json();
  for (const name of ["Limit", "Remaining", "Reset"]) {
    state.rate[name] = response.headers.get("RateLimit-" + name);
  }
  if (!response.ok) throw new Error(path + ": " + response.status + " " + JSON.stringify(body));
  return body;
}

function still() {
  const canvas = document.createElement("canvas");
  canvas.width = 320;
  canvas.height = 240;
  const g = canvas.getContext("2d");
  g.fillStyle = "#1e78c8";
  g.fillRect(0, 0, 320, 240);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

function untilReady(eventsUrl) {
  return new Promise((resolve, reject) => {
    const source = new EventSource(eventsUrl);
    for (const kind of ["status", "ready", "failed"]) {
      source.addEventListener(kind, (event) => {
        const video = JSON.parse(event.data);
        state.events.push(kind + ":" + video.status);
        if (kind === "status") return;
        source.close();
        kind === "ready" ? resolve(video) : reject(new Error("failed: " + event.data));
      });
    }
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) reject(new Error("events refused"));
    };
  });
}

async function main() {
  const form = new FormData();
  form.append("file", await still(), "still.png");
  const image = await call("/v1/images", { method: "POST", body: form, headers: {} });
  const video = await call("/v1/videos", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ image_id: image.id, prompt: "slow zoom", duration: 3 }),
  });
  state.submitted = video;
  state.submitRate = { ...state.rate };
  state.usage = await call("/v1/usage", { headers: {} });
  const ready = await untilReady(video.events_url);
  state.ready = ready;
  const poster = document.getElementById("poster");
  poster.addEventListener("load", () => {
    state.poster = [poster.naturalWidth, poster.naturalHeight];
  });
  poster.src = ready.poster_url;  // signed like content_url: no header needed
  document.getElementById("player").poster = ready.poster_url;
  let src = ready.content_url;
  if (new URLSearchParams(location.search).has("tamper")) {
    const url = new URL(src);
    const sig = url.searchParams.get("sig");
    url.searchParams.set("sig", (sig[0] === "A" ? "B" : "A") + sig.slice(1));
    src = url.toString();
  }
  state.src = src;
  const player = document.getElementById("player");
  player.addEventListener("error", () => { state.videoError = true; });
  player.addEventListener("seeked", () => { state.seeked = true; });
  player.src = src;
}

main().catch((err) => { state.error = String(err); });
</script>
</body></html>
"""


def page_app(html: dict[str, str]) -> FastAPI:
    """The customer's web server: one page, rendered when asked."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(html["page"])

    return app


@pytest.mark.usefixtures("chromium")
async def test_a_page_on_another_origin_with_only_a_client_token_submits_watches_and_plays(
    services: ServiceFactory, sim: Sim
):
    from playwright.async_api import Request as BrowserRequest
    from playwright.async_api import Response as BrowserResponse
    from playwright.async_api import Route, async_playwright

    sim.set(allow_http_image_urls=True, fetch_images=True, latency_seconds=0.3)
    page_socket = free_socket()
    origin = f"http://127.0.0.1:{page_socket.getsockname()[1]}"
    service = await services.start(
        API_KEYS=f"shop:{KEY}", CLIENT_TOKEN_SECRET=SECRET, CORS_ORIGINS=origin
    )
    assert service.server.url != origin
    minted = await service.client.post(
        "/v1/client-tokens",
        json={"subject": "user-42", "ttl_seconds": 600, "max_video_seconds": 30},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert minted.status_code == 201, minted.text
    token = minted.json()["token"]
    html = {
        "page": PAGE.replace("__API__", json.dumps(service.server.url)).replace(
            "__TOKEN__", json.dumps(token)
        )
    }
    assert KEY not in html["page"]
    site = RunningServer(page_app(html), page_socket)
    await site.start()

    outside: list[str] = []
    content: dict[str, int] = {}
    failed: dict[str, str | None] = {}
    errors: list[str] = []

    async def only_loopback(route: Route) -> None:
        parts = urlsplit(route.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != "127.0.0.1":
            outside.append(route.request.url)
            await route.abort()
        else:
            await route.continue_()

    def on_response(response: BrowserResponse) -> None:
        if urlsplit(response.url).path.endswith("/content"):
            content[response.url] = response.status

    def on_failed(request: BrowserRequest) -> None:
        if urlsplit(request.url).path.endswith("/content"):
            failed[request.url] = request.failure

    async def run(page: Any, query: str) -> dict[str, Any]:
        await page.goto(f"{origin}/{query}")
        await wait_js(page, "window.state.src || window.state.error", timeout=30)
        state: dict[str, Any] = await page.evaluate("window.state")
        assert state["error"] is None, state
        return state

    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context()
                await context.route("**/*", only_loopback)
                context.on("response", on_response)
                context.on("requestfailed", on_failed)
                page = await context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))

                state = await run(page, "")
                video = state["submitted"]
                assert video["subject"] == "user-42"
                assert urlsplit(video["events_url"]).query.startswith("exp=")
                assert state["events"][-1] == "ready:ready"
                # The submit's quota headers are readable from the page (CORS exposes them).
                rate = state["submitRate"]
                assert (rate["Limit"], rate["Remaining"]) == ("30", "27"), rate
                assert 0 < int(rate["Reset"]) <= 600  # until the token expires (ttl 600 s)
                assert state["usage"]["scope"] == "token"
                assert state["usage"]["remaining_video_seconds"] == 27
                assert "&sig=" in state["src"]
                # The poster shows: a JPEG of the clip's own size, from its signed URL.
                await wait_js(page, "window.state.poster")
                ready = await page.evaluate("window.state.ready")
                assert "&sig=" in ready["poster_url"]
                shown = await page.evaluate("window.state.poster")
                assert shown == [ready["width"], ready["height"]], (shown, ready)
                await wait_js(page, "document.querySelector('#player').readyState >= 2")
                assert await page.evaluate("document.querySelector('#player').duration") > 1
                # Seeking: the browser asks for a Range of the same signed URL.
                await page.evaluate("document.querySelector('#player').currentTime = 1.5")
                await wait_js(page, "window.state.seeked")
                position = await page.evaluate("document.querySelector('#player').currentTime")
                assert abs(position - 1.5) < 0.3
                assert content and set(content.values()) <= {200, 206}, content
                assert failed == {}

                # The same page, with the signature of content_url altered: no video at all.
                content.clear()
                state = await run(page, "?tamper")
                await wait_js(page, "window.state.videoError")
                assert await page.evaluate("document.querySelector('#player').readyState") == 0
                # The server answers 403 with a JSON error, which the browser does not even
                # hand to the media element (Chromium blocks it as an opaque response).
                assert content == {} and list(failed) == [state["src"]], (content, failed)
                refused = await service.client.get(state["src"])
                assert refused.status_code == 403
                assert refused.json()["error"]["code"] == "bad_signature"
            finally:
                await browser.close()
    finally:
        await site.stop()
    assert outside == []
    assert errors == []
    # The key itself sees both of the end user's videos.
    listed = await service.client.get(
        "/v1/videos", params={"subject": "user-42"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert [v["status"] for v in listed.json()["items"]] == ["ready", "ready"]
