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
