"""Prometheus metrics: what operators watch (``GET /metrics``).

Counters and histograms live in this process, in one module-level ``METRICS`` (as
prometheus_client's own default registry does); with several uvicorn workers each worker
counts its own, so sum them in Prometheus. The ``videos`` and oldest-in-flight gauges are read
from the database at scrape time (at most once per ``METRICS_CACHE_SECONDS``, however many
scrapes come), so every replica reports the same global picture.

``MetricsEndpoint`` is the one place that answers a scrape: the ``METRICS_TOKEN`` check and
the cached gauges, for the public route and for the ``METRICS_PORT`` listener alike.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.errors import error_body
from app.models import TERMINAL, Status, Video

__all__ = [
    "METRICS",
    "DatabaseSnapshot",
    "Metrics",
    "MetricsEndpoint",
    "UNAUTHORIZED_MESSAGE",
    "metrics_port_problem",
    "serve_metrics_port",
]

log = logging.getLogger(__name__)

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series only add noise

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.submits = Counter(
            "videorelay_submits",
            "POST /v1/videos and resubmits by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.upstream = Counter(
            "videorelay_upstream_requests",
            "Requests to hiapi by endpoint and result (HTTP status or error class).",
            ["endpoint", "result"],
            registry=registry,
        )
        self.callbacks = Counter(
            "videorelay_callbacks",
            "hiapi callbacks by outcome (download_claimed/download_queued/failed = new, "
            "duplicate, stale_task, foreign_task, bad_token, bad_body).",
            ["outcome"],
            registry=registry,
        )
        self.recovered = Counter(
            "videorelay_reconciler_recovered",
            "Videos whose result was found by polling because no callback came.",
            registry=registry,
        )
        self.downloads = Counter(
            "videorelay_downloads",
            "Download attempts by outcome (ready, retry, stopped, deleted: the video was deleted "
            "while its clip was being stored, or the failure code).",
            ["outcome"],
            registry=registry,
        )
        self.download_bytes = Counter(
            "videorelay_download_bytes", "Bytes of clips stored.", registry=registry
        )
        self.download_seconds = Histogram(
            "videorelay_download_duration_seconds",
            "Time of successful downloads.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.success_to_stored = Histogram(
            "videorelay_success_to_stored_seconds",
            "From learning of hiapi's success to the clip stored.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.group_commit_size = Histogram(
            "videorelay_group_commit_size",
            "Callbacks written per transaction (group commit).",
            ["writer"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.notifications = Counter(
            "videorelay_notifications",
            "notify_url delivery attempts by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.deleted = Counter(
            "videorelay_videos_deleted",
            "Videos deleted, by reason (api: DELETE /v1/videos/{id}; retention: "
            "VIDEO_RETENTION_SECONDS).",
            ["reason"],
            registry=registry,
        )
        for reason in ("api", "retention"):
            self.deleted.labels(reason)  # shown from the start, at 0
        self.deleted_files_kept = Counter(
            "videorelay_deleted_files_kept",
            "Removals of a deleted video's files that failed (the store was down); the "
            "reconciler tries again.",
            registry=registry,
        )
        self.videos = Gauge(
            "videorelay_videos",
            "Videos by status (from the database).",
            ["status"],
            registry=registry,
        )
        self.oldest_in_flight = Gauge(
            "videorelay_oldest_in_flight_seconds",
            "Age of the oldest video not yet ready or failed (from the database).",
            registry=registry,
        )

    async def read_database(self, session: AsyncSession) -> DatabaseSnapshot:
        counts = dict(
            (await session.execute(select(Video.status, func.count()).group_by(Video.status))).all()
        )
        oldest = (
            await session.execute(
                select(func.min(Video.created_at)).where(Video.status.notin_(TERMINAL))
            )
        ).scalar_one_or_none()
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return DatabaseSnapshot(counts={str(k): int(v) for k, v in counts.items()}, oldest=oldest)

    def set_database_gauges(self, snapshot: DatabaseSnapshot, now: datetime) -> None:
        for status in Status:
            self.videos.labels(status.value).set(snapshot.counts.get(status.value, 0))
        oldest = snapshot.oldest
        self.oldest_in_flight.set(max(0.0, (now - oldest).total_seconds()) if oldest else 0)


@dataclass(frozen=True)
class DatabaseSnapshot:
    """What the database gauges show: videos per status, and when the oldest unfinished began."""

    counts: dict[str, int] = field(default_factory=dict)
    oldest: datetime | None = None


class MetricsEndpoint:
    """Answers a scrape: checks ``METRICS_TOKEN`` and serves the registry.

    The database gauges come from a snapshot at most ``cache_seconds`` old; concurrent scrapes
    of a stale snapshot wait for one read of it, so a scrape storm costs one pair of aggregate
    queries per ``cache_seconds``. The oldest-in-flight age is computed at each scrape from the
    snapshot's timestamp, so it keeps growing between reads.
    """

    def __init__(
        self,
        metrics: Metrics,
        sessionmaker: async_sessionmaker[AsyncSession],
        clock: Callable[[], datetime],
        *,
        token: str | None,
        cache_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self._sessionmaker = sessionmaker
        self._clock = clock
        self._token = token.encode() if token else None
        self._cache_seconds = cache_seconds
        self._monotonic = monotonic
        self._snapshot = DatabaseSnapshot()
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    def authorized(self, authorization: str | None) -> bool:
        """True when no token is set, or ``authorization`` is ``Bearer <token>`` (constant time)."""
        if self._token is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest on the bytes of both, so the time doesn't depend on where they differ.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token
        )

    def _fresh(self) -> bool:
        return self._read_at is not None and self._monotonic() - self._read_at < self._cache_seconds

    async def render(self) -> bytes:
        if not self._fresh():
            async with self._lock:
                if not self._fresh():  # another scrape may have read it while this one waited
                    try:
                        async with self._sessionmaker() as session:
                            self._snapshot = await self.metrics.read_database(session)
                    except SQLAlchemyError:
                        pass  # counters are still worth serving; the gauges keep their last value
                    # A failed read waits its turn too: a storm must not hammer a sick database.
                    self._read_at = self._monotonic()
        self.metrics.set_database_gauges(self._snapshot, self._clock())
        return generate_latest(self.metrics.registry)


UNAUTHORIZED_MESSAGE = (
    "missing or invalid metrics token: send `Authorization: Bearer <METRICS_TOKEN>`"
)


def _json_error(code: str, message: str) -> bytes:
    return json.dumps(error_body(code, message)).encode()


def metrics_port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` can't be bound now (checked at ``serve`` start), or None if it can."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return f"METRICS_PORT {port} cannot be bound on {host} ({exc.strerror or exc})"
    return None


async def serve_metrics_port(
    endpoint: MetricsEndpoint, *, host: str, port: int, shared: bool
) -> web.AppRunner | None:
    """Serve ``GET /metrics`` on ``host:port``, beside the public listener (``METRICS_PORT``).

    A small aiohttp server on the service's own event loop, so it reads the same counters and
    the same cached gauges. With ``shared`` (several uvicorn workers start this), the first
    worker to bind the port serves it and the others, finding it taken, go without: returns
    None for them. Otherwise a port that can't be bound stops the start.
    """

    async def handle(request: web.Request) -> web.Response:
        if request.path != "/metrics" or request.method not in ("GET", "HEAD"):
            return web.Response(
                body=_json_error("not_found", "this port serves only GET /metrics"),
                status=404,
                content_type="application/json",
            )
        if not endpoint.authorized(request.headers.get("Authorization")):
            return web.Response(
                body=_json_error("unauthorized", UNAUTHORIZED_MESSAGE),
                status=401,
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return web.Response(
            body=await endpoint.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if shared and exc.errno == errno.EADDRINUSE:
            log.info("metrics.port_served_by_another_worker port=%d", port)
            return None
        log.error("metrics.port_unavailable host=%s port=%d error=%s", host, port, exc.strerror)
        raise
    log.info("metrics.listening host=%s port=%d", host, port)
    return runner


METRICS = Metrics()
