"""The figures of a ``videorelay chaos`` run, computed from what the run collected.

Pure functions over plain data, so they can be tested without starting anything:
``build_report`` turns a ``RunData`` (database rows, the simulator's per-task records, the
kills, the storage scan) into a JSON-able dict; ``render_text`` prints it; ``passed`` says
whether the promises held (nothing lost, nothing downloaded twice, every stored file intact,
no second paid task that could have been avoided).

Definitions used below:

* **lost**: a submitted video that is not terminal at the end, a video that is not ``ready``
  although one of its upstream tasks succeeded, or a submit that never got a video.
  Excepted, and counted apart as **unreported paid clips**: a succeeded task whose id never
  reached videorelay because its create was ambiguous (timed out, or the replica died during
  the call) *and* its callback never reached us: hiapi dropped it, or every retry found the
  replica it named down. No client of hiapi can find such a task (there
  is no idempotency key and no task listing); the README states this limit.
* **downloaded twice**: an output file of a video (any of its tasks) served *completely* a
  second time without a replica having been SIGKILLed while the earlier download ran or
  within ``KILL_EXPLAINS_SECONDS`` after its last byte. Such a kill explains it (the killed
  replica may have had the whole file and died before recording it, which the README
  accepts); those are reported as ``redownloaded_after_kill``. The simulator cannot tell
  which replica fetched a file, so a kill of *another* replica in that window also counts
  as an explanation.
* **paid tasks**: upstream tasks per video, mapped through the video id in the task's
  callback URL. Every task but the last of a video caused the next one; the reason is, first
  match wins:

  - ``callback_delivered``: its callback was answered 2xx before the next task was created,
    so videorelay had the task's id and still paid again. **Avoidable.**
  - ``ambiguous_create_timeout``: its create timed out, and its callback was dropped by
    hiapi, never answered, or answered only after the next task was created.
  - ``replica_killed_during_submit``: the replica that sent it was SIGKILLed before it could
    record the task id (and, as above, the callback did not arrive in time).
  - ``unexplained``: the create was not ambiguous, yet another task followed. **Avoidable.**

  An avoidable second task fails the run: the no-double-charge rule was broken.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from app.storage import poster_key
from tools.procs import percentile

__all__ = [
    "KillEvent",
    "RunData",
    "Serve",
    "SimTaskInfo",
    "StoredFile",
    "VideoRow",
    "build_report",
    "parse_callback_url",
    "passed",
    "render_text",
]

TERMINAL = ("ready", "failed")
EXAMPLES = 10
SUBMIT_KILL_SLACK_SECONDS = 1.0
KILL_EXPLAINS_SECONDS = 10.0
"""A kill this long after a complete download still explains downloading it again (the
killed replica may not have committed the file and marked the video ready yet)."""
CAUSES = (
    "callback_delivered",
    "unexplained",
    "replica_killed_during_submit",
    "ambiguous_create_timeout",
)
"""Why a task was followed by another one, the most worrying first."""
AVOIDABLE = frozenset({"callback_delivered", "unexplained"})
"""Causes of a second paid task that break the no-double-charge rule."""


@dataclass(frozen=True, slots=True)
class VideoRow:
    id: str
    idempotency_key: str | None
    status: str
    error_code: str | None
    task_id: str | None
    completed_via: str | None
    ambiguous_submits: int
    submit_attempts: int
    download_attempts: int
    sha256: str | None
    size_bytes: int | None
    storage_key: str | None
    created_at: float
    task_finished_at: float | None
    ready_at: float | None


@dataclass(frozen=True, slots=True)
class Serve:
    """One GET of an output file, as the simulator saw it."""

    started_at: float
    last_chunk_at: float
    bytes_sent: int
    complete: bool


@dataclass(frozen=True, slots=True)
class SimTaskInfo:
    task_id: str
    video_id: str | None
    replica_port: int | None
    created_at: float
    create_timed_out: bool
    status: str
    fail: bool
    drop_callback: bool
    callback_copies: int
    callback_delivered: bool
    published_at: float | None
    file_sha256: str | None
    serves: tuple[Serve, ...]
    callback_delivered_at: float | None = None
    """When a copy of the callback was first answered 2xx; ``None`` if never (or unknown)."""

    @classmethod
    def from_wire(cls, item: dict[str, Any]) -> SimTaskInfo:
        """Read one entry of the simulator's ``GET /_sim/tasks``."""
        video_id, port = parse_callback_url(item.get("callback_url"))
        fate = item.get("fate") or {}
        file = item.get("file") or {}
        serves = tuple(
            Serve(
                started_at=float(s["started_at"]),
                last_chunk_at=float(s["last_chunk_at"]),
                bytes_sent=int(s["bytes_sent"]),
                complete=bool(s["complete"]),
            )
            for s in file.get("serves", ())
        )
        published = file.get("published_at")
        delivered_at = item.get("callback_delivered_at")
        return cls(
            task_id=str(item["task_id"]),
            video_id=video_id,
            replica_port=port,
            created_at=float(item["created_at"]),
            create_timed_out=bool(item.get("create_timed_out")),
            status=str(item["status"]),
            fail=bool(fate.get("fail")),
            drop_callback=bool(fate.get("drop_callback")),
            callback_copies=int(fate.get("callback_copies", 1)),
            callback_delivered=bool(item.get("callback_delivered")),
            published_at=None if published is None else float(published),
            file_sha256=file.get("sha256"),
            serves=serves,
            callback_delivered_at=None if delivered_at is None else float(delivered_at),
        )


@dataclass(frozen=True, slots=True)
class KillEvent:
    replica: int
    port: int
    killed_at: float
    restarted_at: float | None


@dataclass(frozen=True, slots=True)
class StoredFile:
    key: str
    sha256: str
    size: int


@dataclass
class RunData:
    """Everything a chaos run collected; times are unix seconds."""

    config: dict[str, Any]
    started_at: float
    all_terminal_at: float | None
    finished_at: float
    timed_out: bool
    submitted: int
    unsubmitted: list[str]
    submit_errors: dict[str, int]
    submit_retries: int
    videos: list[VideoRow]
    tasks: list[SimTaskInfo]
    kills: list[KillEvent]
    stored: dict[str, StoredFile]
    partial_leftovers: list[str]
    sim_stats: dict[str, Any]
    log_findings: dict[str, int] = field(default_factory=dict)
    hiapi_timeout_seconds: float = 2.0
    setup_seconds: float = 0.0
    submit_latencies: list[float] = field(default_factory=list)
    """Seconds per accepted ``POST /v1/videos`` (the last, successful request of each)."""


def parse_callback_url(url: Any) -> tuple[str | None, int | None]:
    """``(video_id, port)`` of ``http://host:port/webhooks/hiapi/{video_id}/{token}``."""
    if not isinstance(url, str):
        return None, None
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    video_id = None
    if len(segments) >= 4 and segments[-4:-2] == ["webhooks", "hiapi"]:
        video_id = segments[-2]
    try:
        port = parts.port
    except ValueError:
        port = None
    return video_id, port


def _kill_between(kills: Iterable[KillEvent], start: float, end: float) -> bool:
    return any(start <= k.killed_at <= end for k in kills)


def _chain(data: RunData, tasks: list[SimTaskInfo]) -> list[dict[str, Any]]:
    """A video's upstream tasks in creation order, times relative to the run's start."""
    return [
        {
            "task_id": t.task_id,
            "created_at": round(t.created_at - data.started_at, 3),
            "create_timed_out": t.create_timed_out,
            "callback_dropped": t.drop_callback,
            "callback_delivered_at": None
            if not t.callback_delivered or t.callback_delivered_at is None
            else round(t.callback_delivered_at - data.started_at, 3),
            "status": t.status,
            "replica_port": t.replica_port,
        }
        for t in sorted(tasks, key=lambda t: t.created_at)
    ]


def _delivered_before(task: SimTaskInfo, later: SimTaskInfo) -> bool:
    """Whether ``task``'s callback was acknowledged before ``later`` was created. Without a
    delivery time (an older simulator), any delivery counts: the stricter reading."""
    if not task.callback_delivered:
        return False
    return task.callback_delivered_at is None or task.callback_delivered_at < later.created_at


def _causes(data: RunData, tasks: list[SimTaskInfo]) -> list[str]:
    """Why each task but the last was followed by another one (see the module docstring)."""
    causes = []
    ordered = sorted(tasks, key=lambda t: t.created_at)
    for task, following in zip(ordered, ordered[1:], strict=False):
        window_end = task.created_at + data.hiapi_timeout_seconds + SUBMIT_KILL_SLACK_SECONDS
        # Behind the balancer the callback URL names the balancer, not the replica that sent
        # the create; then any kill in the window counts.
        replica_ports = {k.port for k in data.kills}
        same_replica = task.replica_port in replica_ports
        killed = any(
            (k.port == task.replica_port or not same_replica)
            and task.created_at - 0.2 <= k.killed_at <= window_end
            for k in data.kills
        )
        if _delivered_before(task, following):
            causes.append("callback_delivered")
        elif task.create_timed_out:
            causes.append("ambiguous_create_timeout")
        elif killed:
            causes.append("replica_killed_during_submit")
        else:
            causes.append("unexplained")
    return causes


def _lost(
    data: RunData, tasks_by_video: dict[str, list[SimTaskInfo]], unreported: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    lost: list[dict[str, Any]] = []
    for video in data.videos:
        if video.status not in TERMINAL:
            lost.append({"video_id": video.id, "reason": f"ended {video.status}"})
            continue
        tasks = tasks_by_video.get(video.id, [])
        succeeded = [t.task_id for t in tasks if t.status == "success"]
        if video.status != "ready" and succeeded:
            causes = _causes(data, tasks)
            ordered = sorted(tasks, key=lambda t: t.created_at)
            # Never reported: hiapi dropped the callback, or every retry of it failed (the
            # replica it named was down): either way we never learned of the clip.
            never_reported = all(
                (t.drop_callback or not t.callback_delivered) and cause not in AVOIDABLE
                for t, cause in zip(ordered[:-1], causes, strict=False)
                if t.status == "success"
            ) and all(t.task_id != ordered[-1].task_id for t in ordered[:-1])
            if never_reported and ordered[-1].status != "success":
                unreported.append(
                    {
                        "video_id": video.id,
                        "reason": f"task {succeeded[0]}: ambiguous create, and its callback "
                        f"never arrived; the video ended {video.status} ({video.error_code}) "
                        "on the next task",
                        "tasks": _chain(data, tasks),
                        "causes": causes,
                    }
                )
                continue
            lost.append(
                {
                    "video_id": video.id,
                    "reason": f"upstream task {succeeded[0]} succeeded but the video is "
                    f"{video.status} ({video.error_code}) with task {video.task_id}",
                    "tasks": _chain(data, tasks),
                    "causes": _causes(data, tasks),
                }
            )
    for key in data.unsubmitted:
        lost.append({"video_id": None, "reason": f"submit with Idempotency-Key {key} never landed"})
    return lost


def _downloads(
    data: RunData, tasks_by_video: dict[str, list[SimTaskInfo]]
) -> tuple[list[dict[str, Any]], int, int, int]:
    """Unexplained second complete downloads per video, plus explained and interrupted counts."""
    twice: list[dict[str, Any]] = []
    after_kill = 0
    interrupted = 0
    complete_total = 0
    for video_id, tasks in tasks_by_video.items():
        serves = sorted((s for t in tasks for s in t.serves), key=lambda s: s.started_at)
        interrupted += sum(1 for s in serves if not s.complete)
        complete = [s for s in serves if s.complete]
        complete_total += len(complete)
        unexplained = 0
        for earlier, later in zip(complete, complete[1:], strict=False):
            # The kill must hit while the earlier download ran or was being committed.
            until = min(later.started_at, earlier.last_chunk_at + KILL_EXPLAINS_SECONDS)
            if _kill_between(data.kills, earlier.started_at, until):
                after_kill += 1
            else:
                unexplained += 1
        if unexplained:
            twice.append(
                {
                    "video_id": video_id,
                    "complete_downloads": len(complete),
                    "unexplained": unexplained,
                    "serve_starts": [round(s.started_at - data.started_at, 3) for s in complete],
                }
            )
    return twice, after_kill, interrupted, complete_total


def _paid_tasks(data: RunData, tasks_by_video: dict[str, list[SimTaskInfo]]) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    multi = 0
    extra = 0
    avoidable = 0
    for video_id, tasks in tasks_by_video.items():
        if len(tasks) < 2:
            continue
        multi += 1
        extra += len(tasks) - 1
        causes = _causes(data, tasks)
        # One reason per video, the most worrying first.
        reasons[next(reason for reason in CAUSES if reason in causes)] += 1
        worrying = not AVOIDABLE.isdisjoint(causes)
        avoidable += worrying
        if len(examples) < EXAMPLES or worrying:
            examples.append({"video_id": video_id, "tasks": _chain(data, tasks), "causes": causes})
    return {
        "tasks_created": len(data.tasks),
        "videos_with_tasks": len(tasks_by_video),
        "videos_with_multiple_tasks": multi,
        "extra_tasks": extra,
        "by_reason": {reason: reasons[reason] for reason in CAUSES},
        "videos_with_avoidable_second_task": avoidable,
        "ambiguous_submits_recorded": sum(v.ambiguous_submits for v in data.videos),
        "videos_with_ambiguous_submit": sum(1 for v in data.videos if v.ambiguous_submits),
        "examples": examples,
    }


def _integrity(data: RunData, tasks_by_id: dict[str, SimTaskInfo]) -> dict[str, Any]:
    checked = 0
    problems: list[dict[str, Any]] = []
    referenced: set[str] = set()
    for video in data.videos:
        if video.status != "ready":
            continue
        checked += 1
        key = video.storage_key
        stored = data.stored.get(key) if key else None
        if key:
            referenced.update((key, poster_key(key)))  # the clip and its poster beside it
        if stored is None:
            problems.append({"video_id": video.id, "problem": f"stored file {key} is missing"})
            continue
        if stored.sha256 != video.sha256 or stored.size != video.size_bytes:
            problems.append(
                {
                    "video_id": video.id,
                    "problem": f"file sha256/size {stored.sha256[:12]}/{stored.size} != "
                    f"database {str(video.sha256)[:12]}/{video.size_bytes}",
                }
            )
            continue
        task = tasks_by_id.get(video.task_id or "")
        if task is not None and task.file_sha256 and task.file_sha256 != video.sha256:
            problems.append(
                {
                    "video_id": video.id,
                    "problem": "stored sha256 differs from the bytes hiapi served",
                }
            )
    orphans = sorted(set(data.stored) - referenced)
    return {
        "ready_checked": checked,
        "problems": len(problems),
        "problem_examples": problems[:EXAMPLES],
        "partial_leftovers": len(data.partial_leftovers),
        "partial_leftover_examples": data.partial_leftovers[:EXAMPLES],
        "orphan_files": len(orphans),
        "orphan_examples": orphans[:EXAMPLES],
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": _rounded(percentile(values, 50)),
        "p99": _rounded(percentile(values, 99)),
        "max": _rounded(max(values) if values else None),
    }


def _latency(data: RunData, tasks_by_id: dict[str, SimTaskInfo]) -> dict[str, Any]:
    """Upstream success (the simulator's publish time, else our ``task_finished_at``) → stored."""
    values: list[float] = []
    sources: Counter[str] = Counter()
    for video in data.videos:
        if video.status != "ready" or video.ready_at is None:
            continue
        task = tasks_by_id.get(video.task_id or "")
        if task is not None and task.published_at is not None:
            values.append(video.ready_at - task.published_at)
            sources["simulator"] += 1
        elif video.task_finished_at is not None:
            values.append(video.ready_at - video.task_finished_at)
            sources["task_finished_at"] += 1
    return {**_spread(values), "source": dict(sources)}


def build_report(data: RunData) -> dict[str, Any]:
    tasks_by_id = {t.task_id: t for t in data.tasks}
    tasks_by_video: dict[str, list[SimTaskInfo]] = {}
    foreign_tasks = 0
    known = {v.id for v in data.videos}
    for task in data.tasks:
        if task.video_id is None or task.video_id not in known:
            foreign_tasks += 1
            continue
        tasks_by_video.setdefault(task.video_id, []).append(task)

    statuses = Counter(v.status for v in data.videos)
    failed_by_code = Counter(v.error_code or "unknown" for v in data.videos if v.status == "failed")
    unreported: list[dict[str, Any]] = []
    lost = _lost(data, tasks_by_video, unreported)
    twice, after_kill, interrupted, complete_total = _downloads(data, tasks_by_video)
    recovered = [v for v in data.videos if v.completed_via == "poll"]
    recovered_dropped = sum(
        1 for v in recovered if (t := tasks_by_id.get(v.task_id or "")) and t.drop_callback
    )
    end = data.all_terminal_at if data.all_terminal_at is not None else data.finished_at
    report: dict[str, Any] = {
        "config": data.config,
        "submitted": data.submitted,
        "videos_in_database": len(data.videos),
        "ready": statuses.get("ready", 0),
        "failed": statuses.get("failed", 0),
        "failed_by_code": dict(sorted(failed_by_code.items())),
        "not_terminal": {s: n for s, n in sorted(statuses.items()) if s not in TERMINAL},
        "lost": len(lost),
        "lost_examples": lost[:EXAMPLES],
        "unreported_paid_clips": len(unreported),
        "unreported_examples": unreported[:EXAMPLES],
        "downloaded_twice": len(twice),
        "downloaded_twice_examples": twice[:EXAMPLES],
        "redownloaded_after_kill": after_kill,
        "interrupted_downloads": interrupted,
        "complete_downloads": complete_total,
        "integrity": _integrity(data, tasks_by_id),
        "paid_tasks": _paid_tasks(data, tasks_by_video),
        "tasks_without_video": foreign_tasks,
        "recovered_by_reconciler": len(recovered),
        "recovered_breakdown": {
            "callback_dropped_by_hiapi": recovered_dropped,
            "callback_undelivered_or_late": len(recovered) - recovered_dropped,
        },
        "success_to_stored_seconds": _latency(data, tasks_by_id),
        # Lease claims per ready video: >1 means a crash, a lost lease or a retry.
        "download_claims": _spread(
            [float(v.download_attempts) for v in data.videos if v.status == "ready"]
        ),
        "submit_seconds": _spread(data.submit_latencies),
        "submit_retries": data.submit_retries,
        "submit_errors": data.submit_errors,
        "kills": [
            {
                "replica": k.replica,
                "at_seconds": round(k.killed_at - data.started_at, 2),
                "down_seconds": None
                if k.restarted_at is None
                else round(k.restarted_at - k.killed_at, 2),
            }
            for k in data.kills
        ],
        "simulator_stats": data.sim_stats,
        "log_findings": data.log_findings,
        "timed_out": data.timed_out,
        "run_seconds": round(end - data.started_at, 2),
        "setup_seconds": round(data.setup_seconds, 2),
        "total_seconds": round(data.finished_at - data.started_at, 2),
    }
    report["passed"] = passed(report)
    return report


def passed(report: dict[str, Any]) -> bool:
    """Nothing lost, nothing downloaded twice, every stored file intact, nothing half-written,
    no avoidable second paid task."""
    integrity = report["integrity"]
    return (
        report["lost"] == 0
        and report["downloaded_twice"] == 0
        and integrity["problems"] == 0
        and integrity["partial_leftovers"] == 0
        and report["paid_tasks"]["videos_with_avoidable_second_task"] == 0
        and not report["timed_out"]
    )


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _mark(ok: bool) -> str:
    return "OK" if ok else "FAIL"


def render_text(report: dict[str, Any]) -> str:
    cfg = report["config"]
    paid = report["paid_tasks"]
    integ = report["integrity"]
    lat = report["success_to_stored_seconds"]
    sim = report["simulator_stats"]
    reasons = paid["by_reason"]
    lines = [
        "# videorelay chaos run",
        "",
        f"{cfg['database']}, {cfg['replicas']} replica(s), {cfg['videos']} videos, "
        f"{cfg['kills']} kills, seed {cfg['seed']}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| submitted | {report['submitted']} ({report['videos_in_database']} in the database, "
        f"{report['submit_retries']} submit retries; POST p50 {report['submit_seconds']['p50']} s, "
        f"p99 {report['submit_seconds']['p99']} s) |",
        f"| ready | {report['ready']} |",
        f"| failed | {report['failed']} ({_fmt_counts(report['failed_by_code'])}) |",
        f"| lost | {report['lost']} {_mark(report['lost'] == 0)} |",
        f"| paid clips never reported (ambiguous create + callback dropped or undelivered) | "
        f"{report['unreported_paid_clips']} |",
        f"| downloaded twice | {report['downloaded_twice']} "
        f"{_mark(report['downloaded_twice'] == 0)} (re-downloaded after a SIGKILL: "
        f"{report['redownloaded_after_kill']}; interrupted downloads: "
        f"{report['interrupted_downloads']}) |",
        f"| stored files | {integ['ready_checked']} checked, {integ['problems']} bad, "
        f"{integ['partial_leftovers']} .partial leftovers, {integ['orphan_files']} orphans "
        f"{_mark(integ['problems'] == 0 and integ['partial_leftovers'] == 0)} |",
        f"| paid tasks | {paid['tasks_created']} tasks for {paid['videos_with_tasks']} videos; "
        f"{paid['videos_with_multiple_tasks']} videos with 2+ tasks "
        f"(ambiguous create timeout {reasons['ambiguous_create_timeout']}, replica killed "
        f"during submit {reasons['replica_killed_during_submit']}; avoidable: callback "
        f"delivered {reasons['callback_delivered']}, create not ambiguous "
        f"{reasons['unexplained']}) {_mark(paid['videos_with_avoidable_second_task'] == 0)} |",
        f"| ambiguous creates | {paid['ambiguous_submits_recorded']} recorded on "
        f"{paid['videos_with_ambiguous_submit']} videos |",
        f"| recovered by the reconciler | {report['recovered_by_reconciler']} "
        f"({report['recovered_breakdown']['callback_dropped_by_hiapi']} callbacks dropped by "
        f"hiapi, {report['recovered_breakdown']['callback_undelivered_or_late']} undelivered "
        "or late) |",
        f"| upstream success -> stored | p50 {lat['p50']} s, p99 {lat['p99']} s, "
        f"max {lat['max']} s (n={lat['n']}) |",
        f"| download lease claims per ready video | p50 {report['download_claims']['p50']}, "
        f"p99 {report['download_claims']['p99']}, max {report['download_claims']['max']} |",
        f"| run time | {report['run_seconds']} s to all terminal"
        f"{' (TIMED OUT)' if report['timed_out'] else ''}; then {report['total_seconds']} s "
        f"with shutdown and checks; setup {report['setup_seconds']} s before |",
        "",
        "kills: "
        + (
            ", ".join(
                f"replica {k['replica']} at {k['at_seconds']} s (down {k['down_seconds']} s)"
                for k in report["kills"]
            )
            or "none"
        ),
        "simulator: "
        + ", ".join(
            f"{k}={sim[k]}"
            for k in (
                "tasks_created",
                "create_5xx",
                "create_timeouts",
                "polls",
                "callbacks_dropped",
                "callbacks_sent",
                "callback_failures",
                "file_requests",
            )
            if k in sim
        ),
    ]
    if report["log_findings"]:
        lines.append("replica logs: " + _fmt_counts(report["log_findings"]))
    if report["not_terminal"]:
        lines.append("not terminal: " + _fmt_counts(report["not_terminal"]))
    for title, key in (
        ("lost", "lost_examples"),
        ("never reported", "unreported_examples"),
        ("downloaded twice", "downloaded_twice_examples"),
    ):
        for item in report[key]:
            lines.append(f"{title}: {item}")
    for item in integ["problem_examples"]:
        lines.append(f"integrity: {item}")
    for example in paid["examples"]:
        if not AVOIDABLE.isdisjoint(example["causes"]):
            lines.append(f"avoidable second task: {example}")
    lines += ["", f"verdict: {'PASS' if report['passed'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"
