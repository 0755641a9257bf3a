"""The playground page in headless Chromium: upload, submit, watch it become playable.

Needs Debian's ``chromium`` (``scripts/test`` installs it when it can) and the Python
``playwright`` package, which drives /usr/bin/chromium (no browser download). A screenshot is
kept in ``artifacts/playground.png``.
"""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import IN_CI, ServiceFactory, Sim

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

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 390, "height": 844})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{service.server.url}/")
            assert await page.title() == "videorelay playground"
            await page.set_input_files("#file", str(still))
            await page.fill("#prompt", "slow zoom")
            await page.fill("#duration", "3")
            await page.click("#submit")
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
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
            assert errors == []
        finally:
            await browser.close()


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
            page = await browser.new_page(viewport={"width": 390, "height": 844})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", record)
            await page.goto(f"{service.server.url}/")
            await page.click("summary")
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
            await page.click("summary")
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
