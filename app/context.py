"""The objects one running service owns, built in ``lifespan`` and shared by routes and jobs."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app import lifecycle
from app.auth import ApiKeys
from app.config import Settings
from app.group_commit import GroupCommit
from app.hiapi.client import HiapiClient
from app.jobs.downloader import Downloader, DownloadSettings
from app.jobs.hosts import HostAllowlist
from app.jobs.notifier import Notifier, secret_bytes
from app.jobs.reconciler import Reconciler
from app.jobs.resolve import CheckedResolver, download_private_ok
from app.jobs.runner import JobRunner
from app.jobs.submitter import SubmitPolicy
from app.lifecycle import TaskReport
from app.metrics import METRICS, MetricsEndpoint
from app.outputs import OutputCheck
from app.schemas import VideoOut
from app.security import callback_url
from app.storage import Storage, open_storage
from app.streams import StreamSlots

__all__ = ["AppContext", "build_context", "download_session"]

log = logging.getLogger(__name__)


@dataclass
class AppContext:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    hiapi_http: httpx.AsyncClient
    download_http: aiohttp.ClientSession
    notify_http: httpx.AsyncClient
    hiapi: HiapiClient
    storage: Storage
    runner: JobRunner
    reconciler: Reconciler
    submit_policy: SubmitPolicy
    webhook_secret: bytes
    clock: Callable[[], datetime]
    head_revision: str | None
    stop: asyncio.Event
    api_keys: ApiKeys
    notifier: Notifier
    callbacks: GroupCommit[TaskReport, lifecycle.ApplyOutcome]
    outputs: OutputCheck  # vets hiapi's output URL before a report is applied
    metrics: MetricsEndpoint
    event_streams: StreamSlots = field(default_factory=StreamSlots)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    def callback_url(self, video_id: uuid.UUID) -> str:
        return callback_url(self.settings.public_base, self.webhook_secret, video_id)

    @property
    def images_root(self) -> Path:
        """Uploaded stills live on the local (or mounted) STORAGE_DIR, whatever the clip store."""
        return self.settings.STORAGE_DIR.resolve()

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.DOWNLOAD_LEASE_SECONDS)

    async def aclose(self) -> None:
        await self.hiapi_http.aclose()
        await self.download_http.close()
        await self.notify_http.aclose()
        await self.storage.aclose()
        await self.engine.dispose()


def download_session(
    allowlist: HostAllowlist, *, concurrency: int, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """The downloader's HTTP client. Clips come through aiohttp: it reads a clip with far less
    CPU than httpx, and the webhook acks share that CPU (README, "Dependencies"). Redirects are
    followed by hand, each hop checked; no cookies are kept. Names are resolved by ``resolver``
    (aiohttp's default unless given) through ``CheckedResolver``: the connection goes only to
    addresses it checked."""
    checked = CheckedResolver(resolver, private_ok=download_private_ok(allowlist))
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=60.0),
        connector=aiohttp.TCPConnector(limit=max(2, concurrency * 2), resolver=checked),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=True,  # HTTP(S)_PROXY, as for the other clients
    )


def build_context(
    settings: Settings,
    *,
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    clock: Callable[[], datetime],
    head_revision: str | None,
) -> AppContext:
    retry_base, retry_max = settings.RETRY_BASE_SECONDS, settings.RETRY_MAX_SECONDS
    secret = (
        settings.WEBHOOK_SECRET.get_secret_value().encode()
        if settings.WEBHOOK_SECRET is not None
        else secrets.token_bytes(32)
    )
    api_key = settings.HIAPI_KEY.get_secret_value() if settings.HIAPI_KEY else "sk-unset"
    hiapi_http = httpx.AsyncClient(
        base_url=settings.HIAPI_BASE_URL,
        timeout=httpx.Timeout(settings.HIAPI_TIMEOUT_SECONDS, connect=5.0),
        follow_redirects=False,
    )
    notify_http = httpx.AsyncClient(
        timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=False
    )
    stop = asyncio.Event()
    storage = open_storage(settings)
    log.info("storage.configured url=%s", storage.url)
    lease = timedelta(seconds=settings.DOWNLOAD_LEASE_SECONDS)
    allowlist = HostAllowlist.parse(settings.DOWNLOAD_ALLOWED_HOSTS)
    download_http = download_session(allowlist, concurrency=settings.DOWNLOAD_CONCURRENCY)
    max_retry = timedelta(seconds=settings.DOWNLOAD_MAX_RETRY_SECONDS)
    outputs = OutputCheck(allowlist=allowlist, max_retry=max_retry)
    downloader = Downloader(
        sessionmaker=sessionmaker,
        http=download_http,
        storage=storage,
        allowlist=allowlist,
        settings=DownloadSettings(
            max_bytes=settings.MAX_VIDEO_BYTES,
            lease=lease,
            retry_base=retry_base,
            retry_max=retry_max,
            max_retry=max_retry,
        ),
        stop=stop,
        clock=clock,
    )
    runner = JobRunner(downloader, stop=stop, concurrency=settings.DOWNLOAD_CONCURRENCY)
    policy = SubmitPolicy(
        poll_after=timedelta(seconds=settings.RECONCILE_AFTER_SECONDS),
        retry_base=retry_base,
        retry_max=retry_max,
        in_flight_hold=timedelta(
            seconds=max(settings.RECONCILE_AFTER_SECONDS, 2 * settings.HIAPI_TIMEOUT_SECONDS)
        ),
    )
    hiapi = HiapiClient(
        hiapi_http,
        api_key=api_key,
        observe=lambda endpoint, result: METRICS.upstream.labels(endpoint, result).inc(),
    )

    def make_callback_url(video_id: uuid.UUID) -> str:
        return callback_url(settings.public_base, secret, video_id)

    reconciler = Reconciler(
        sessionmaker=sessionmaker,
        hiapi=hiapi,
        runner=runner,
        policy=policy,
        callback_url=make_callback_url,
        outputs=outputs,
        interval=settings.RECONCILE_INTERVAL_SECONDS,
        batch_size=settings.RECONCILE_BATCH_SIZE,
        lease=lease,
        clock=clock,
        task_timeout=timedelta(seconds=settings.TASK_TIMEOUT_SECONDS),
        poll_hold=timedelta(
            seconds=2 * settings.HIAPI_TIMEOUT_SECONDS + settings.RECONCILE_INTERVAL_SECONDS
        ),
        images_root=settings.STORAGE_DIR.resolve(),
        image_retention=timedelta(seconds=settings.IMAGE_RETENTION_SECONDS),
    )

    runner.refill = reconciler.refill

    async def render(video_id: uuid.UUID) -> dict[str, Any] | None:
        async with sessionmaker() as session:
            video = await lifecycle.get(session, video_id)
            if video is None:
                return None
            note = await lifecycle.latest_notification(session, video_id)
        return VideoOut.of(video, public_base=settings.public_base, notification=note).model_dump(
            mode="json"
        )

    notifier = Notifier(
        sessionmaker=sessionmaker,
        http=notify_http,
        secret=secret_bytes(settings.NOTIFY_SECRET.get_secret_value())
        if settings.NOTIFY_SECRET
        else None,
        render=render,
        max_attempts=settings.NOTIFY_MAX_ATTEMPTS,
        allow_local=settings.NOTIFY_ALLOW_LOCAL,
        retry_base=retry_base,
        retry_max=retry_max,
        interval=min(1.0, settings.RECONCILE_INTERVAL_SECONDS),
        clock=clock,
    )
    return AppContext(
        settings=settings,
        engine=engine,
        sessionmaker=sessionmaker,
        hiapi_http=hiapi_http,
        download_http=download_http,
        notify_http=notify_http,
        hiapi=hiapi,
        storage=storage,
        runner=runner,
        reconciler=reconciler,
        submit_policy=policy,
        webhook_secret=secret,
        clock=clock,
        head_revision=head_revision,
        stop=stop,
        api_keys=ApiKeys.load(settings.API_KEYS.get_secret_value(), settings.API_KEYS_FILE),
        notifier=notifier,
        callbacks=GroupCommit(
            sessionmaker,
            lambda session, reports: lifecycle.apply_reports(
                session, reports, now=clock(), lease=lease
            ),
            key=lambda report: report.video_id.hex,
            name="callbacks",
        ),
        outputs=outputs,
        metrics=MetricsEndpoint(
            METRICS,
            sessionmaker,
            clock,
            token=settings.METRICS_TOKEN.get_secret_value() if settings.METRICS_TOKEN else None,
            cache_seconds=settings.METRICS_CACHE_SECONDS,
        ),
    )
