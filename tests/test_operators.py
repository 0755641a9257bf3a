"""What operators use: /metrics, `videorelay admin`, JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.logging import bind, configure_logging
from tests.conftest import ServiceFactory, Sim, child_env


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        re.escape(name)
        + (r"\{" + re.escape(label_text) + r"\}" if labels else "")
        + r" ([0-9.e+-]+)"
    )
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


class TestMetrics:
    async def test_counters_and_database_gauges_after_a_run(
        self, services: ServiceFactory, sim: Sim
    ):
        # No gauge cache here: this test reads the gauges right after the run.
        service = await services.start(RECONCILE_AFTER_SECONDS=0.3, METRICS_CACHE_SECONDS=0)
        before = (await service.client.get("/metrics")).text
        video = await service.submit()
        await service.wait_for(video["id"], "ready")
        sim.set(callback_drop_rate=1.0)
        lost = await service.submit()
        await service.wait_for(lost["id"], "ready")
        response = await service.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text

        def grew(name: str, **labels: str) -> float:
            return metric(text, name, **labels) - metric(before, name, **labels)

        assert grew("videorelay_submits_total", outcome="created") == 2
        assert grew("videorelay_upstream_requests_total", endpoint="create", result="200") == 2
        assert grew("videorelay_callbacks_total", outcome="download_claimed") >= 1
        assert grew("videorelay_reconciler_recovered_total") == 1
        assert grew("videorelay_downloads_total", outcome="ready") == 2
        assert grew("videorelay_download_bytes_total") > 0
        assert metric(text, "videorelay_videos", status="ready") == 2
        assert metric(text, "videorelay_videos", status="queued") == 0
        assert "videorelay_success_to_stored_seconds_bucket" in text
        assert "videorelay_oldest_in_flight_seconds" in text


def admin(home: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``videorelay admin <args>`` as an operator runs it: in a folder of its own, with only
    DATABASE_URL set."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "admin", *args],
        env=child_env(home, DATABASE_URL=database_url),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )


class TestAdmin:
    async def test_stuck_list_and_repoll_recovers_a_lost_callback_now(
        self, services: ServiceFactory, sim: Sim, database_url: str, tmp_path: Path
    ):
        sim.set(callback_drop_rate=1.0)
        service = await services.start()  # RECONCILE_AFTER_SECONDS is 600 here
        video = await service.submit()
        # Stuck: processing, and its task finished upstream with the callback lost.
        await service.wait_for(video["id"], "processing")
        deadline = asyncio.get_running_loop().time() + 30
        while (await sim.stats())["callbacks_dropped"] < 1:
            assert asyncio.get_running_loop().time() < deadline, "the task never finished"
            await asyncio.sleep(0.05)
        listed = await asyncio.to_thread(
            admin, tmp_path, database_url, "stuck", "--older-than", "0"
        )
        assert listed.returncode == 0, listed.stderr
        assert video["id"] in listed.stdout and "1 stuck video(s)" in listed.stdout
        repoll = await asyncio.to_thread(admin, tmp_path, database_url, "repoll", video["id"])
        assert repoll.returncode == 0, repoll.stdout + repoll.stderr
        done = await service.wait_for(video["id"], "ready", timeout=15)
        assert done["sha256"]
        again = await asyncio.to_thread(admin, tmp_path, database_url, "repoll", video["id"])
        assert again.returncode == 1 and "processing videos only" in again.stdout

    async def test_retry_reruns_a_failed_download(
        self, services: ServiceFactory, sim: Sim, database_url: str, tmp_path: Path
    ):
        sim.set(pad_bytes=2_000_000)
        service = await services.start(MAX_VIDEO_BYTES=1_000_000)
        video = await service.submit()
        failed = await service.wait_for(video["id"], "failed")
        assert failed["error"]["code"] == "too_large"
        sim.set(pad_bytes=0)  # the operator fixed the cause (here: the clip is smaller now)
        retried = await asyncio.to_thread(admin, tmp_path, database_url, "retry", video["id"])
        assert retried.returncode == 0, retried.stdout + retried.stderr
        done = await service.wait_for(video["id"], "ready", timeout=15)
        assert done["error"] is None


class TestJsonLogs:
    def test_one_json_object_per_line_with_ids_and_redaction(
        self, capsys: pytest.CaptureFixture[str]
    ):
        root = logging.getLogger()
        saved = list(root.handlers), root.level
        try:
            configure_logging("INFO", "json")
            with bind(video_id="v-1", task_id="tk-1"):
                logging.getLogger("app.test").info("download.ready size=%d", 42)
            logging.getLogger("app.test.access").info(
                '"POST /webhooks/hiapi/v-1/%s HTTP/1.1" 200', "a" * 40
            )
        finally:
            for handler in list(root.handlers):
                if getattr(handler, "_videorelay", False):
                    root.removeHandler(handler)
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
        err = capsys.readouterr().err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        ready = next(line for line in lines if line["message"].startswith("download.ready"))
        assert (
            ready["video_id"] == "v-1" and ready["task_id"] == "tk-1" and ready["level"] == "info"
        )
        access = next(line for line in lines if line["logger"] == "app.test.access")
        assert "a" * 40 not in access["message"] and "/***" in access["message"]
