"""``videorelay chaos`` in a small configuration, as real subprocesses, on both databases.

Each run starts the simulator with faults on, real ``videorelay serve`` replicas that are
SIGKILLed and restarted, and checks the JSON report: nothing lost, nothing downloaded twice,
every video terminal. The report's own figures are tested with hand-made data below.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import IN_CI, PG_ADMIN_DSN, Service, Sim, child_env, in_thread
from tools.chaos_report import (
    KillEvent,
    RunData,
    Serve,
    SimTaskInfo,
    StoredFile,
    VideoRow,
    build_report,
    parse_callback_url,
    render_text,
)
from tools.procs import percentile

# A stall of the service's fixed 120 s reconciler hold (a replica killed right after claiming
# rows) must still finish inside the run's own limit; a normal run takes about 30 s.
RUN_TIMEOUT = 170
PROCESS_TIMEOUT = RUN_TIMEOUT + 90


def run_chaos(tmp_path: Path, *args: str) -> dict[str, Any]:
    report_path = tmp_path / "chaos.json"
    argv = [sys.executable, "-m", "app.cli", "chaos", "--videos", "30", "--kills", "2"]
    argv += ["--timeout", str(RUN_TIMEOUT), "--json", str(report_path), *args]
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=child_env(tmp_path),  # built from scratch: no setting of the developer's shell
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: a timeout kills the whole tree
    )
    try:
        output, _ = proc.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"chaos run did not finish in {PROCESS_TIMEOUT}s:\n{output.decode()}")
    text = output.decode(errors="replace")
    assert report_path.exists(), text
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert proc.returncode == 0, text
    assert report["lost"] == 0, text
    assert report["downloaded_twice"] == 0, text
    assert report["ready"] + report["failed"] == report["submitted"] == 30, text
    assert report["integrity"]["problems"] == 0, text
    assert report["integrity"]["partial_leftovers"] == 0, text
    assert len(report["kills"]) == 2, text
    assert "verdict: PASS" in text
    return report


def test_chaos_sqlite_one_replica(tmp_path: Path) -> None:
    report = run_chaos(tmp_path, "--database", "sqlite", "--replicas", "1", "--seed", "7")
    assert report["config"]["replicas"] == 1


async def _pg_reachable() -> bool:
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def test_chaos_postgres_two_replicas(tmp_path: Path) -> None:
    if not in_thread(lambda: asyncio.run(_pg_reachable())):
        if IN_CI:
            pytest.fail(f"Postgres is required under CI but {PG_ADMIN_DSN} is unreachable")
        pytest.skip(f"Postgres not reachable at {PG_ADMIN_DSN}; skipping the Postgres chaos run")
    report = run_chaos(
        tmp_path,
        "--database",
        "postgres",
        "--replicas",
        "2",
        "--seed",
        "8",
        "--pg-admin-dsn",
        PG_ADMIN_DSN,
    )
    assert report["config"]["replicas"] == 2
    assert {k["replica"] for k in report["kills"]} <= {0, 1}


# --- the report's figures, from hand-made data ---------------------------------------------

T0 = 1_000_000.0


def video(vid: str, status: str = "ready", **changes: Any) -> VideoRow:
    values: dict[str, Any] = {
        "id": vid,
        "idempotency_key": f"k-{vid}",
        "status": status,
        "error_code": None if status != "failed" else "generation_failed",
        "task_id": f"t-{vid}",
        "completed_via": "callback",
        "ambiguous_submits": 0,
        "submit_attempts": 1,
        "download_attempts": 1,
        "sha256": "aa" if status == "ready" else None,
        "size_bytes": 2 if status == "ready" else None,
        "storage_key": f"{vid}.mp4" if status == "ready" else None,
        "created_at": T0,
        "task_finished_at": T0 + 2,
        "ready_at": T0 + 4 if status == "ready" else None,
    }
    values.update(changes)
    return VideoRow(**values)


def task(vid: str, task_id: str | None = None, **changes: Any) -> SimTaskInfo:
    values: dict[str, Any] = {
        "task_id": task_id or f"t-{vid}",
        "video_id": vid,
        "replica_port": 8001,
        "created_at": T0 + 0.5,
        "create_timed_out": False,
        "status": "success",
        "fail": False,
        "drop_callback": False,
        "callback_copies": 1,
        "callback_delivered": True,
        "published_at": T0 + 1.5,
        "file_sha256": "aa",
        "serves": (Serve(T0 + 2, T0 + 3, 2, True),),
    }
    values.update(changes)
    return SimTaskInfo(**values)


DROPPED: dict[str, Any] = {"drop_callback": True, "callback_delivered": False}


def run_data(videos: list[VideoRow], tasks: list[SimTaskInfo], **changes: Any) -> RunData:
    values: dict[str, Any] = {
        "config": {"videos": len(videos), "database": "sqlite", "replicas": 1, "kills": 0},
        "started_at": T0,
        "all_terminal_at": T0 + 10,
        "finished_at": T0 + 12,
        "timed_out": False,
        "submitted": len(videos),
        "unsubmitted": [],
        "submit_errors": {},
        "submit_retries": 0,
        "videos": videos,
        "tasks": tasks,
        "kills": [],
        "stored": {
            v.storage_key: StoredFile(v.storage_key, "aa", 2) for v in videos if v.storage_key
        },
        "partial_leftovers": [],
        "sim_stats": {"tasks_created": len(tasks)},
    }
    values["config"]["seed"] = 1
    values.update(changes)
    return RunData(**values)


def test_clean_run_passes_and_renders() -> None:
    report = build_report(run_data([video("a"), video("b")], [task("a"), task("b")]))
    assert report["passed"]
    assert (report["lost"], report["downloaded_twice"], report["ready"]) == (0, 0, 2)
    assert report["success_to_stored_seconds"]["p50"] == 2.5  # ready_at - published_at
    assert "verdict: PASS" in render_text(report)


def test_a_second_complete_download_is_counted_unless_a_kill_explains_it() -> None:
    twice = task("a", serves=(Serve(T0 + 2, T0 + 3, 2, True), Serve(T0 + 9, T0 + 10, 2, True)))
    report = build_report(run_data([video("a")], [twice]))
    assert report["downloaded_twice"] == 1 and not report["passed"]

    kill = KillEvent(replica=0, port=8001, killed_at=T0 + 3.5, restarted_at=T0 + 5)
    report = build_report(run_data([video("a")], [twice], kills=[kill]))
    assert report["downloaded_twice"] == 0 and report["redownloaded_after_kill"] == 1

    interrupted = task(
        "a", serves=(Serve(T0 + 2, T0 + 2.5, 1, False), Serve(T0 + 6, T0 + 7, 2, True))
    )
    report = build_report(run_data([video("a")], [interrupted]))
    assert report["downloaded_twice"] == 0 and report["interrupted_downloads"] == 1


def test_lost_videos_and_second_tasks_are_classified() -> None:
    videos = [
        video("a", status="processing", sha256=None, storage_key=None, ready_at=None),
        video("b", status="failed", task_id="t-b2"),
        video("c", task_id="t-c2", ambiguous_submits=1),
        video("d", task_id="t-d2"),
    ]
    tasks = [
        task("a", status="handling", serves=()),
        # Succeeded and its callback was answered, yet the video failed on a second task.
        task("b", "t-b1", created_at=T0 + 0.5, serves=()),
        task("b", "t-b2", created_at=T0 + 6, status="fail", serves=()),
        # Ambiguous create, callback dropped: the second task is the README's known limit.
        task("c", "t-c1", serves=(), create_timed_out=True, **DROPPED),
        task("c", "t-c2", created_at=T0 + 6),
        # The replica died during the create, and no retry of the callback found it up.
        task("d", "t-d1", serves=(), callback_delivered=False),
        task("d", "t-d2", created_at=T0 + 6),
    ]
    kill = KillEvent(replica=0, port=8001, killed_at=T0 + 0.7, restarted_at=T0 + 3)
    report = build_report(run_data(videos, tasks, kills=[kill]))
    assert report["lost"] == 2
    reasons = " ".join(item["reason"] for item in report["lost_examples"])
    assert "ended processing" in reasons and "t-b1 succeeded" in reasons
    paid = report["paid_tasks"]
    assert paid["videos_with_multiple_tasks"] == 3
    assert paid["by_reason"] == {
        "callback_delivered": 1,
        "unexplained": 0,
        "replica_killed_during_submit": 1,
        "ambiguous_create_timeout": 1,
    }
    assert paid["videos_with_avoidable_second_task"] == 1


def test_a_callback_no_replica_answered_counts_like_a_dropped_one() -> None:
    """The replica was killed during the create, and every retry of the success callback
    found it still down: videorelay never learned of the clip, as with a dropped callback.
    The same video whose callback was answered, yet not kept, is lost."""
    videos = [
        video("u", status="failed", task_id="t-u2"),
        video("k", status="failed", task_id="t-k2"),
    ]
    tasks = [
        task("u", "t-u1", created_at=T0 + 0.5, serves=(), callback_delivered=False),
        task("u", "t-u2", created_at=T0 + 6, status="fail", serves=()),
        task("k", "t-k1", created_at=T0 + 0.5, serves=()),
        task("k", "t-k2", created_at=T0 + 6, status="fail", serves=()),
    ]
    kill = KillEvent(replica=0, port=8001, killed_at=T0 + 0.7, restarted_at=T0 + 3)
    report = build_report(run_data(videos, tasks, kills=[kill]))
    assert report["lost"] == 1
    assert "t-k1 succeeded" in report["lost_examples"][0]["reason"]
    assert len(report["unreported_examples"]) == 1


def test_a_second_task_after_a_delivered_callback_fails_the_run() -> None:
    """The first create timed out, but its callback was answered before the second create:
    videorelay knew the task and paid again. Not the ambiguous-timeout limit: a FAIL."""
    videos = [video("a", task_id="t-a2", ambiguous_submits=1)]
    tasks = [
        task(
            "a",
            "t-a1",
            create_timed_out=True,
            serves=(),
            callback_delivered_at=T0 + 1.6,
        ),
        task("a", "t-a2", created_at=T0 + 8),
    ]
    report = build_report(run_data(videos, tasks))
    assert (report["lost"], report["downloaded_twice"]) == (0, 0)
    paid = report["paid_tasks"]
    assert paid["by_reason"]["callback_delivered"] == 1
    assert paid["by_reason"]["ambiguous_create_timeout"] == 0
    assert paid["videos_with_avoidable_second_task"] == 1
    assert paid["examples"][0]["causes"] == ["callback_delivered"]
    assert not report["passed"]
    text = render_text(report)
    assert "avoidable: callback delivered 1, create not ambiguous 0) FAIL" in text
    assert "avoidable second task:" in text and "verdict: FAIL" in text

    # Read from the simulator without a delivery time: any delivery counts.
    untimed = task("a", "t-a1", create_timed_out=True, serves=(), callback_delivered_at=None)
    report = build_report(run_data(videos, [untimed, tasks[1]]))
    assert report["paid_tasks"]["by_reason"]["callback_delivered"] == 1
    assert not report["passed"]


def test_a_second_task_after_a_create_that_was_not_ambiguous_fails_the_run() -> None:
    """No timeout, no kill: the first task's id was known, so the second is avoidable."""
    videos = [video("a", task_id="t-a2")]
    tasks = [task("a", "t-a1", serves=(), **DROPPED), task("a", "t-a2", created_at=T0 + 8)]
    report = build_report(run_data(videos, tasks))
    assert report["paid_tasks"]["by_reason"]["unexplained"] == 1
    assert report["paid_tasks"]["videos_with_avoidable_second_task"] == 1
    assert not report["passed"]
    assert "create not ambiguous 1) FAIL" in render_text(report)


def test_second_tasks_the_readme_accepts_pass() -> None:
    """An ambiguous create whose callback was dropped, never answered, or answered only after
    the second create; or a replica killed during the create whose callback never came."""
    videos = [video(v, task_id=f"t-{v}2", ambiguous_submits=1) for v in ("d", "n", "l", "k")]
    tasks = [
        task("d", "t-d1", create_timed_out=True, serves=(), **DROPPED),
        task("n", "t-n1", create_timed_out=True, serves=(), callback_delivered=False),
        task("l", "t-l1", create_timed_out=True, serves=(), callback_delivered_at=T0 + 9),
        task("k", "t-k1", serves=(), callback_delivered=False, replica_port=8002),
    ]
    tasks += [task(v, f"t-{v}2", created_at=T0 + 8) for v in ("d", "n", "l", "k")]
    kill = KillEvent(replica=1, port=8002, killed_at=T0 + 1, restarted_at=T0 + 3)
    report = build_report(run_data(videos, tasks, kills=[kill]))
    paid = report["paid_tasks"]
    assert paid["by_reason"] == {
        "callback_delivered": 0,
        "unexplained": 0,
        "replica_killed_during_submit": 1,
        "ambiguous_create_timeout": 3,
    }
    assert paid["videos_with_avoidable_second_task"] == 0
    assert paid["extra_tasks"] == 4
    assert report["passed"]
    text = render_text(report)
    assert "avoidable: callback delivered 0, create not ambiguous 0) OK" in text
    assert "avoidable second task" not in text and "verdict: PASS" in text


def test_delivery_time_is_read_from_the_simulator() -> None:
    wire = {
        "task_id": "t-1",
        "status": "success",
        "created_at": T0,
        "callback_url": "http://127.0.0.1:8001/webhooks/hiapi/v1/tok",
        "create_timed_out": True,
        "callback_delivered": True,
        "callback_delivered_at": T0 + 1.25,
        "fate": {"fail": False, "drop_callback": False, "callback_copies": 1},
        "file": None,
    }
    info = SimTaskInfo.from_wire(wire)
    assert (info.callback_delivered, info.callback_delivered_at) == (True, T0 + 1.25)
    assert (
        SimTaskInfo.from_wire({**wire, "callback_delivered_at": None}).callback_delivered_at is None
    )


async def test_the_simulator_records_when_a_callback_was_delivered(
    service: Service, sim: Sim
) -> None:
    video = await service.submit()
    await service.wait_for(video["id"], "ready")
    (item,) = (await sim.client.get("/_sim/tasks")).json()["tasks"]
    info = SimTaskInfo.from_wire(item)
    assert info.callback_delivered and info.callback_delivered_at is not None
    assert info.created_at < info.callback_delivered_at < time.time()
    sim.set(callback_drop_rate=1.0)
    dropped = await service.submit()
    await sim.client.post(f"/_sim/tasks/{dropped['task_id']}/complete")
    items = (await sim.client.get("/_sim/tasks")).json()["tasks"]
    info = SimTaskInfo.from_wire(next(i for i in items if i["task_id"] == dropped["task_id"]))
    assert (info.callback_delivered, info.callback_delivered_at) == (False, None)


def test_integrity_problems_fail_the_run() -> None:
    videos = [video("a"), video("b")]
    data = run_data(videos, [task("a"), task("b")], partial_leftovers=["x.part"])
    data.stored["b.mp4"] = StoredFile("b.mp4", "bb", 2)
    report = build_report(data)
    assert report["integrity"]["problems"] == 1
    assert report["integrity"]["partial_leftovers"] == 1
    assert not report["passed"]


def test_helpers() -> None:
    url = "http://127.0.0.1:8123/webhooks/hiapi/0f0e/abc123"
    assert parse_callback_url(url) == ("0f0e", 8123)
    assert parse_callback_url(None) == (None, None)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
