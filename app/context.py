"""The objects one running service shares, built once in ``lifespan`` by ``open_context``.

Everything is made here, in dependency order, and handed to what uses it at construction:

    settings ─┬─ Storage, HostAllowlist, OutputCheck, HTTP clients (closed on exit)
              ├─ Downloader ── JobRunner (claims queued downloads itself: ``refill``)
              ├─ GroupCommit(apply_reports) ── Intake(outputs, runner)   ← webhook, reconciler
              ├─ HiapiClient ── Submitter(callback URL) ─┬─ Submission   ← POST /v1/videos
              │                                          └─ Reconciler(intake, runner)
              └─ Notifier, MetricsEndpoint, ApiKeys, StreamSlots

Routes take single members through ``app.api.deps``; the hot paths (the webhook, the request
guard) read the context through ``context_of(app)``. Jobs never see the context.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from app import lifecycle, repository
from app.auth import ApiKeys
from app.config import Settings
from app.deletion import Deleter
from app.group_commit import GroupCommit
from app.hiapi.client import HiapiClient
from app.intake import Intake
from app.jobs.downloader import Downloader, DownloadSettings
from app.jobs.hosts import HostAllowlist
from app.jobs.notifier import Notifier, secret_bytes
from app.jobs.reconciler import Reconciler
from app.jobs.resolve import CheckedResolver, download_private_ok
from app.jobs.runner import JobRunner
from app.jobs.submitter import SubmitPolicy, Submitter
from app.metrics import METRICS, MetricsEndpoint
from app.outputs import OutputCheck
from app.schemas import VideoOut
from app.security import callback_url
from app.signing import UrlSigner, VideoUrls
from app.storage import Storage, open_storage
from app.streams import StreamSlots
from app.submission import Submission
from app.tokens import ClientTokens

__all__ = ["AppContext", "context_of", "download_session", "open_context"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AppContext:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    clock: Callable[[], datetime]
    head_revision: str | None  # the migration this code expects (``/readyz``)
    stop: asyncio.Event  # set at shutdown: loops, streams and downloads end
    secret: bytes  # WEBHOOK_SECRET (or one per process): callback URL tokens, list cursors
    api_keys: ApiKeys
    url_signer: UrlSigner  # signed content and events URLs (``app.signing``)
    video_urls: VideoUrls  # a video's content_url and events_url: signed when keys are on
    client_tokens: ClientTokens | None  # CLIENT_TOKEN_SECRET unset: no client tokens
    storage: Storage  # the clips
    deleter: Deleter  # DELETE /v1/videos/{id} and the retention sweep
    images_root: Path  # uploaded stills: on STORAGE_DIR, whatever the clip store
    intake: Intake
    submission: Submission
    runner: JobRunner
    reconciler: Reconciler
    notifier: Notifier
    metrics: MetricsEndpoint
    event_streams: StreamSlots


def context_of(app: Starlette) -> AppContext:
    """The running service's context, as ``lifespan`` left it on ``app.state``."""
    ctx: AppContext = app.state.ctx
    return ctx


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


@asynccontextmanager
async def open_context(
    settings: Settings,
    *,
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    clock: Callable[[], datetime],
    head_revision: str | None,
) -> AsyncIterator[AppContext]:
    """Build the service's objects; on exit close its HTTP clients and its storage (the
    engine belongs to the caller)."""
    async with AsyncExitStack() as closing:
        retry_base, retry_max = settings.RETRY_BASE_SECONDS, settings.RETRY_MAX_SECONDS
        secret = (
            settings.WEBHOOK_SECRET.get_secret_value().encode()
            if settings.WEBHOOK_SECRET is not None
            else secrets.token_bytes(32)
        )
        lease = timedelta(seconds=settings.DOWNLOAD_LEASE_SECONDS)
        stop = asyncio.Event()
        storage = open_storage(settings)
        closing.push_async_callback(storage.aclose)
        log.info("storage.configured url=%s", storage.url)
        allowlist = HostAllowlist.parse(settings.DOWNLOAD_ALLOWED_HOSTS)
        download_http = download_session(allowlist, concurrency=settings.DOWNLOAD_CONCURRENCY)
        closing.push_async_callback(download_http.close)
        hiapi_http = httpx.AsyncClient(
            base_url=settings.HIAPI_BASE_URL,
            timeout=httpx.Timeout(settings.HIAPI_TIMEOUT_SECONDS, connect=5.0),
            follow_redirects=False,
        )
        closing.push_async_callback(hiapi_http.aclose)
        notify_http = httpx.AsyncClient(
            timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=False
        )
        closing.push_async_callback(notify_http.aclose)

        max_retry = timedelta(seconds=settings.DOWNLOAD_MAX_RETRY_SECONDS)
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
        runner = JobRunner(
            downloader,
            sessionmaker=sessionmaker,
            clock=clock,
            lease=lease,
            batch_size=settings.RECONCILE_BATCH_SIZE,
            stop=stop,
            concurrency=settings.DOWNLOAD_CONCURRENCY,
        )
        reports: GroupCommit[lifecycle.TaskReport, lifecycle.ApplyOutcome] = GroupCommit(
            sessionmaker,
            lambda session, batch: lifecycle.apply_reports(
                session, batch, now=clock(), lease=lease
            ),
            key=lambda report: report.video_id.hex,
            name="callbacks",
        )
        intake = Intake(
            outputs=OutputCheck(allowlist=allowlist, max_retry=max_retry),
            runner=runner,
            writes=reports,
            clock=clock,
        )
        hiapi = HiapiClient(
            hiapi_http,
            api_key=settings.HIAPI_KEY.get_secret_value() if settings.HIAPI_KEY else "sk-unset",
            observe=lambda endpoint, result: METRICS.upstream.labels(endpoint, result).inc(),
        )
        submitter = Submitter(
            sessionmaker=sessionmaker,
            hiapi=hiapi,
            policy=SubmitPolicy(
                poll_after=timedelta(seconds=settings.RECONCILE_AFTER_SECONDS),
                retry_base=retry_base,
                retry_max=retry_max,
                in_flight_hold=timedelta(
                    seconds=max(
                        settings.RECONCILE_AFTER_SECONDS, 2 * settings.HIAPI_TIMEOUT_SECONDS
                    )
                ),
            ),
            clock=clock,
            callback_url=functools.partial(callback_url, settings.public_base, secret),
        )
        images_root = settings.STORAGE_DIR.resolve()
        deleter = Deleter(sessionmaker=sessionmaker, storage=storage, clock=clock)
        api_keys = ApiKeys.load(settings.API_KEYS.get_secret_value(), settings.API_KEYS_FILE)
        url_signer = UrlSigner(secret, ttl=settings.SIGNED_URL_TTL_SECONDS, clock=clock)
        video_urls = VideoUrls(settings.public_base, None if api_keys.open else url_signer)

        async def render(video_id: uuid.UUID) -> dict[str, Any] | None:
            async with sessionmaker() as session:
                video = await repository.get(session, video_id)
                if video is None:
                    return None
                note = await repository.latest_notification(session, video_id)
            out = VideoOut.of(video, urls=video_urls, notification=note)
            return out.model_dump(mode="json")

        yield AppContext(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            clock=clock,
            head_revision=head_revision,
            stop=stop,
            secret=secret,
            api_keys=api_keys,
            url_signer=url_signer,
            video_urls=video_urls,
            client_tokens=settings.client_tokens,
            storage=storage,
            deleter=deleter,
            images_root=images_root,
            intake=intake,
            submission=Submission(
                submitter=submitter,
                clock=clock,
                public_base=settings.public_base,
                daily_limit=settings.DAILY_VIDEO_SECONDS_LIMIT,
                subject_daily_limit=settings.DAILY_VIDEO_SECONDS_PER_SUBJECT,
                notify_allow_local=settings.NOTIFY_ALLOW_LOCAL,
                notify_signing=settings.NOTIFY_SECRET is not None,
            ),
            runner=runner,
            reconciler=Reconciler(
                sessionmaker=sessionmaker,
                hiapi=hiapi,
                submitter=submitter,
                intake=intake,
                runner=runner,
                interval=settings.RECONCILE_INTERVAL_SECONDS,
                batch_size=settings.RECONCILE_BATCH_SIZE,
                clock=clock,
                task_timeout=timedelta(seconds=settings.TASK_TIMEOUT_SECONDS),
                poll_hold=timedelta(
                    seconds=2 * settings.HIAPI_TIMEOUT_SECONDS + settings.RECONCILE_INTERVAL_SECONDS
                ),
                images_root=images_root,
                image_retention=timedelta(seconds=settings.IMAGE_RETENTION_SECONDS),
                deleter=deleter,
                video_retention=timedelta(seconds=settings.VIDEO_RETENTION_SECONDS),
            ),
            notifier=Notifier(
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
            ),
            metrics=MetricsEndpoint(
                METRICS,
                sessionmaker,
                clock,
                token=settings.METRICS_TOKEN.get_secret_value() if settings.METRICS_TOKEN else None,
                cache_seconds=settings.METRICS_CACHE_SECONDS,
            ),
            event_streams=StreamSlots(),
        )
