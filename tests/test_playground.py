"""The playground page in headless Chromium: upload, submit, watch it become playable.

Needs Debian's ``chromium`` (``scripts/test`` installs it when it can) and the Python
``playwright`` package, which drives /usr/bin/chromium (no browser download). A screenshot is
kept in ``artifacts/playground.png``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app.db import utc_now
from app.tokens import SCOPES, ClientTokens
from tests.conftest import IN_CI, ServiceFactory, Sim
from tests.test_signed_urls import Clock

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Chromium still looks up content-autofill and update.googleapis.com without these (seen
    # with the suite run in a network namespace): no name but the local ones is resolved.
    "--disable-features=AutofillServerCommunication,OptimizationHints,MediaRouter,Translate",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--autoplay-policy=no-user-gesture-required",
]


async def wait_js(page: Any, expression: str, timeout: float = 15.0) -> None:
    """Poll through the DevTools protocol: ``wait_for_function`` would need 'unsafe-eval',
    which the page's Content-Security-Policy rightly forbids."""
    for _ in range(int(timeout / 0.1)):
        if await page.evaluate(expression):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {expression}")


# Where a test's status panel is on screen: its status line wholly inside the viewport.
STATUS_IN_VIEW = """(() => {
  const r = document.querySelector('#status-line').getBoundingClientRect();
  return !document.querySelector('#current').hidden && r.top >= 0 && r.bottom <= innerHeight;
})()"""
# The four step chips: their tops, and whether any chip's text is cut.
STEP_CHIPS = """[...document.querySelectorAll('#steps li')].map(
  (li) => [li.getBoundingClientRect().top, li.scrollWidth > li.clientWidth])"""
FAVICON = """(async () => {
  const href = document.querySelector('link[rel=icon]').href;
  const response = await fetch(href);
  const image = new Image();
  image.src = href;
  await image.decode();  // rejects if the page's CSP (img-src) refused it
  return [href, response.status, response.headers.get('content-type'), image.naturalWidth];
})()"""


async def run_curl(command: str, **env: str) -> dict[str, Any]:
    """Run what "Copy as curl" copied, in a shell, as a user would paste it."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command + " -w '\\n%{http_code}'",
        env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()
    body, _, code = out.decode().rpartition("\n")
    assert code == "202", out.decode()
    return dict(json.loads(body))


async def open_credential(page: Any) -> None:
    """Open the credential field (the page opens it by itself once the service says 401, so a
    click on its summary could close it instead)."""
    await page.evaluate("document.querySelector('#credential').open = true")


def chips_on_one_row(chips: list[list[Any]]) -> bool:
    return len(chips) == 4 and len({round(top) for top, _ in chips}) == 1


@pytest.fixture
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("chromium is required under CI (scripts/test installs it)")
        pytest.skip("chromium is not installed; the browser test is skipped")
    return CHROMIUM


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_upload_submit_watch_and_play_on_a_phone_sized_screen(
    database_url: str, services: ServiceFactory, sim: Sim, chromium: str, tmp_path: Path
):
    from playwright.async_api import async_playwright

    sim.set(allow_http_image_urls=True, latency_seconds=0.5, fetch_images=True)
    service = await services.start()
    still = tmp_path / "still.png"
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (30, 120, 200)).save(buffer, format="PNG")
    still.write_bytes(buffer.getvalue())

    prompt = "slow zoom out while the lighthouse beam sweeps across the fog, waves below"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 390, "height": 844},
                permissions=["clipboard-read", "clipboard-write"],
            )
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda m: errors.append(m.text) if m.type in ("error", "warning") else None,
            )
            await page.goto(f"{service.server.url}/")
            assert await page.title() == "videorelay playground"
            # The favicon: an SVG of this service's own, allowed by the page's CSP.
            href, code, kind, width = await page.evaluate(FAVICON)
            assert href == f"{service.server.url}/static/favicon.svg"
            assert (code, kind, width) == (200, "image/svg+xml", 32)

            await page.set_input_files("#file", str(still))
            await page.fill("#prompt", prompt)
            await page.fill("#duration", "3")
            form_bottom = await page.evaluate(
                "document.querySelector('#submit').getBoundingClientRect().bottom"
            )
            await page.click("#submit")
            # The status panel (below the form, off screen on a phone) scrolls into view.
            await wait_js(page, STATUS_IN_VIEW, timeout=5)
            assert form_bottom > 844 / 2, "the test needs the status below the fold"
            chips = await page.evaluate(STEP_CHIPS)
            assert chips_on_one_row(chips) and not any(cut for _, cut in chips), chips
            await page.wait_for_selector("#status-line[data-status=ready]", timeout=30_000)
            await wait_js(page, "document.querySelector('#player').readyState >= 2")
            duration = await page.evaluate("document.querySelector('#player').duration")
            assert duration > 1
            # Seeking works (the clip is served with HTTP Range).
            await page.evaluate("document.querySelector('#player').currentTime = 1.5")
            await wait_js(
                page, "Math.abs(document.querySelector('#player').currentTime - 1.5) < 0.3"
            )
            await page.wait_for_selector("#recent li .status.ready")
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, "the page overflows a phone-width screen"
            # The recent list: the prompt on one line, cut with an ellipsis, and the duration.
            shown, cut, meta = await page.evaluate(
                """(() => { const p = document.querySelector('#recent li .prompt');
                return [p.textContent, p.scrollWidth > p.clientWidth,
                        document.querySelector('#recent li .meta').textContent]; })()"""
            )
            assert shown == prompt and cut, (shown, cut)
            assert "· 3 s ·" in meta and "ready" in meta, meta
            chips = await page.evaluate(STEP_CHIPS)
            assert chips_on_one_row(chips) and not any(cut for _, cut in chips), chips
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
            await page.screenshot(path="/tmp/play-phone.png", full_page=True)

            # Download: the finished clip, byte for byte, saved rather than played.
            async with page.expect_download() as started:
                await page.click("#download")
            download = await started.value
            saved = Path(await download.path()).read_bytes()  # gone once the browser closes

            for narrow in (360, 320):  # the smallest phones still in use
                await page.set_viewport_size({"width": narrow, "height": 740})
                chips = await page.evaluate(STEP_CHIPS)
                assert chips_on_one_row(chips) and not any(c for _, c in chips), (narrow, chips)
                width = await page.evaluate("document.documentElement.scrollWidth")
                assert width <= narrow, (narrow, width)
            await page.set_viewport_size({"width": 390, "height": 844})

            # Copy as curl: the request just made; on an open API it needs no credential.
            await page.click("#copy-curl")
            await page.wait_for_selector("#curl-note:not([hidden])")
            copied = await page.evaluate("navigator.clipboard.readText()")
            assert copied == await page.text_content("#curl")
            assert "Authorization" not in copied
            assert errors == []
        finally:
            await browser.close()

    listed = (await service.client.get("/v1/videos")).json()["items"]
    (video,) = listed
    assert download.suggested_filename == f"{video['id']}.mp4"
    assert hashlib.sha256(saved).hexdigest() == video["sha256"]
    again = await run_curl(copied)
    assert again["image_id"] == video["image_id"] and again["prompt"] == prompt
    assert (again["duration"], again["resolution"]) == (3, video["resolution"])


KEY = "vr_playground_operator_key_0123456789"
SECRET = "playground-client-token-secret-0123456789abcdef"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_api_key_is_exchanged_for_a_client_token_and_the_clip_plays_signed(
    database_url: str, services: ServiceFactory, sim: Sim, chromium: str, tmp_path: Path
):
    """Given the API key, the page mints a client token and sends only that from then on; the
    clip plays straight from its signed content_url, not from a downloaded copy."""
    from playwright.async_api import Request as BrowserRequest
    from playwright.async_api import async_playwright

    sim.set(allow_http_image_urls=True, latency_seconds=0.3, fetch_images=True)
    service = await services.start(API_KEYS=f"ops:{KEY}", CLIENT_TOKEN_SECRET=SECRET)
    still = tmp_path / "still.png"
    Image.new("RGB", (320, 240), (200, 120, 30)).save(still, format="PNG")
    requests: list[tuple[str, str, dict[str, str]]] = []

    def record(request: BrowserRequest) -> None:
        requests.append((request.method, request.url, dict(request.headers)))

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 390, "height": 844},
                permissions=["clipboard-read", "clipboard-write"],
            )
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", record)
            await page.goto(f"{service.server.url}/")
            await open_credential(page)
            await page.fill("#api-key", KEY)
            await page.set_input_files("#file", str(still))
            await page.fill("#duration", "3")
            await page.click("#submit")
            await page.wait_for_selector("#status-line[data-status=ready]", timeout=30_000)
            await wait_js(page, "document.querySelector('#player').readyState >= 2")
            src = await page.evaluate("document.querySelector('#player').src")
            status = await page.evaluate("document.querySelector('#auth-status')?.textContent")
            stored = await page.evaluate("JSON.stringify(Object.values(localStorage))")
            field = await page.input_value("#api-key")
            await page.click("#copy-curl")
            await page.wait_for_selector("#curl-note:not([hidden])")
            copied = await page.evaluate("navigator.clipboard.readText()")
            note = await page.text_content("#curl-note")
            assert errors == []
        finally:
            await browser.close()

    assert not src.startswith("blob:"), src
    listed = await service.client.get(
        "/v1/videos", params={"subject": "playground"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert listed.status_code == 200, listed.text
    (video,) = listed.json()["items"]
    path, _, query = src.partition("?")
    assert path == video["content_url"].partition("?")[0]
    assert "sig=" in query and "exp=" in query
    assert (await service.client.get(src)).status_code == 200  # the signed URL works alone
    assert status is not None and "client token" in status
    assert KEY not in stored and KEY != field

    mints = [i for i, (m, u, _) in enumerate(requests) if m == "POST" and "/v1/client-tokens" in u]
    assert len(mints) == 1
    assert requests[mints[0]][2].get("authorization") == f"Bearer {KEY}"
    after = requests[mints[0] + 1 :]
    assert any("/v1/videos" in url for _, url, _ in after)
    for method, url, sent in after:
        assert KEY not in url and all(KEY not in value for value in sent.values()), (method, url)

    # "Copy as curl" names the credential, never holds it: neither the key nor the token.
    sent_bearers = {h["authorization"] for _, _, h in after if "authorization" in h}
    (token,) = {value.removeprefix("Bearer ") for value in sent_bearers}
    assert token.startswith("eyJ")
    assert KEY not in copied and token not in copied and field not in copied
    assert '-H "Authorization: Bearer $VIDEORELAY_TOKEN"' in copied
    assert note is not None and "VIDEORELAY_TOKEN" in note
    again = await run_curl(copied, VIDEORELAY_TOKEN=KEY)
    assert again["image_id"] == video["image_id"] and again["duration"] == 3


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_without_client_tokens_the_page_uses_the_key_and_says_so(
    database_url: str, services: ServiceFactory, sim: Sim, chromium: str, tmp_path: Path
):
    from playwright.async_api import async_playwright

    sim.set(allow_http_image_urls=True, latency_seconds=0.3, fetch_images=True)
    service = await services.start(API_KEYS=f"ops:{KEY}")
    still = tmp_path / "still.png"
    Image.new("RGB", (320, 240), (20, 160, 90)).save(still, format="PNG")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{service.server.url}/")
            await open_credential(page)
            await page.fill("#api-key", KEY)
            await page.set_input_files("#file", str(still))
            await page.fill("#duration", "3")
            await page.click("#submit")
            await page.wait_for_selector("#status-line[data-status=ready]", timeout=30_000)
            await wait_js(page, "document.querySelector('#player').readyState >= 2")
            src = await page.evaluate("document.querySelector('#player').src")
            status = await page.text_content("#auth-status")
            stored = await page.evaluate("JSON.stringify(Object.values(localStorage))")
        finally:
            await browser.close()
    assert "sig=" in src and not src.startswith("blob:")
    assert status is not None and "client tokens are disabled" in status
    assert KEY not in stored


def expired_token() -> str:
    """A client token of the `ops` key, signed with the service's secret, that expired an hour
    ago: minted on a clock set back two hours (no sleeping for a real one to run out)."""
    token, expires = ClientTokens([SECRET]).mint(
        key="ops",
        subject="playground",
        scopes=SCOPES,
        ttl=timedelta(seconds=3600),
        cap=None,
        now=utc_now() - timedelta(hours=2),
    )
    assert expires < utc_now()
    return token


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_expired_token_asks_for_the_credential_again_and_keeps_the_form(
    database_url: str, services: ServiceFactory, sim: Sim, chromium: str, tmp_path: Path
):
    """The page cannot renew a token by itself (it never keeps the key it minted from): on
    `401 token_expired` it says so, opens the credential field and keeps the form; the key
    pasted again mints a new token and the same form submits. The service runs on a clock the
    test moves past the token's 15 minutes."""
    from playwright.async_api import Request as BrowserRequest
    from playwright.async_api import async_playwright

    sim.set(allow_http_image_urls=True, latency_seconds=0.3, fetch_images=True)
    clock = Clock()
    service = await services.start(API_KEYS=f"ops:{KEY}", CLIENT_TOKEN_SECRET=SECRET, clock=clock)
    stale = expired_token()
    refused = await service.client.get("/v1/videos", headers={"Authorization": f"Bearer {stale}"})
    assert refused.json()["error"]["code"] == "token_expired"
    still = tmp_path / "kept.png"
    Image.new("RGB", (320, 240), (90, 30, 160)).save(still, format="PNG")
    posts: list[str] = []

    def record(request: BrowserRequest) -> None:
        if request.method == "POST":
            posts.append(request.url)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 390, "height": 844})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", record)
            # A token kept from an earlier visit has expired since: the page says so on load.
            # (Stored before the page's own script runs, on this test's one navigation.)
            await page.add_init_script(f"localStorage.setItem('videorelay.clientToken', '{stale}')")
            await page.goto(f"{service.server.url}/")
            await page.wait_for_selector("#auth-status:has-text('expired')")
            assert await page.evaluate("document.querySelector('#credential').open")
            assert await page.input_value("#api-key") == ""
            assert await page.evaluate("localStorage.length") == 0

            # The key gives a 15-minute token; it runs out while the form is filled in.
            await page.fill("#api-key", KEY)
            await page.fill("#prompt", "the form survives")  # leaving the field mints
            await page.wait_for_selector("#auth-status:has-text('using a client token')")
            await page.set_input_files("#file", str(still))
            await page.select_option("#resolution", "720p")
            await page.fill("#duration", "4")
            clock.offset = timedelta(minutes=16)
            await page.click("#submit")
            await page.wait_for_selector("#form-error:not([hidden])")
            error = await page.text_content("#form-error")
            status = await page.text_content("#auth-status")
            assert (
                error
                == "The client token has expired: paste the credential again under Credential."
            )
            assert status is not None and "Paste the API key again" in status
            assert await page.input_value("#api-key") == ""
            assert await page.evaluate("document.activeElement.id") == "api-key"
            assert await page.input_value("#prompt") == "the form survives"
            assert await page.input_value("#resolution") == "720p"
            assert await page.input_value("#duration") == "4"
            assert await page.text_content("#drop-text") == "kept.png"
            assert not await page.is_disabled("#submit")
            assert not [url for url in posts if url.endswith("/v1/videos")]
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "playground-expired.png"))

            # The key pasted again: a new token is minted and the same form goes through.
            await page.fill("#api-key", KEY)
            await page.click("#submit")
            await page.wait_for_selector("#status-line[data-status=ready]", timeout=30_000)
            field = await page.input_value("#api-key")
            stored = await page.evaluate("JSON.stringify(Object.values(localStorage))")
            assert errors == []
        finally:
            await browser.close()

    assert field.startswith("eyJ") and field != stale
    assert KEY not in stored and stale not in stored
    assert len([url for url in posts if url.endswith("/v1/client-tokens")]) == 2
    listed = await service.client.get("/v1/videos", headers={"Authorization": f"Bearer {KEY}"})
    (video,) = listed.json()["items"]
    assert (video["prompt"], video["resolution"], video["duration"]) == (
        "the form survives",
        "720p",
        4,
    )
    assert video["subject"] == "playground" and video["image_id"] is not None
