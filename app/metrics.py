"""Prometheus metrics: what operators watch (``GET /metrics``).

Counters and histograms live in this process, in one module-level ``METRICS`` (as
prometheus_client's own default registry does); with several uvicorn workers each worker
counts its own, so sum them in Prometheus. The ``videos`` and oldest-in-flight gauges are read
from the database at scrape time, so every replica reports the same global picture.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Status, Video

__all__ = ["METRICS", "Metrics"]

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
            "Download attempts by outcome (ready, retry, stopped, or the failure code).",
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

    async def refresh_from_database(self, session: AsyncSession, now: datetime) -> None:
        counts = dict(
            (await session.execute(select(Video.status, func.count()).group_by(Video.status))).all()
        )
        for status in Status:
            self.videos.labels(status.value).set(counts.get(status.value, 0))
        oldest = (
            await session.execute(
                select(func.min(Video.created_at)).where(
                    Video.status.notin_((Status.ready, Status.failed))
                )
            )
        ).scalar_one_or_none()
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        self.oldest_in_flight.set((now - oldest).total_seconds() if oldest else 0)


METRICS = Metrics()
