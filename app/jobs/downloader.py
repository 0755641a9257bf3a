"""Copy a finished clip from hiapi's temporary URL into our storage, exactly once.

The caller already holds the download lease (``lifecycle.apply_task`` or ``claim_due``). The
body is streamed through a ``ClipWriter`` of the storage backend (a partial file, or for S3 a
local spool) while its sha256 and size are computed; the first bytes must be an MP4 ``ftyp``
box; the size is capped while streaming, not trusted from Content-Length. The whole file is
then checked with PyAV (``app.media.prepare_clip``, in a worker process): no playable video is a
permanent ``bad_mp4`` failure; a ``moov`` at the end is remuxed to fast-start in place (and the
stored size and sha256 become the remuxed file's); the clip's facts and a poster JPEG come out
of the same pass. The writer then commits the poster and the clip (fsync and rename; an S3
upload of the spool), and only then is the video marked ``ready`` with its facts (still under
the lease). Hashing and local disk writes run in worker threads (``app.jobs.sink``), the check
in a worker process (``app.threads.run_isolated``), so the event loop keeps acking webhooks.
Any failure aborts the writer, so nothing half-written remains.
Transient failures (network, storage) give the lease back with a backoff until the deadline: the
URL's ``expires_at`` or the task's end plus ``DOWNLOAD_MAX_RETRY_SECONDS``, whichever comes
first. Any other exception is handled the same way (recorded in ``last_error``, logged with the
video's ids, counted as a failed attempt): no error leaves a lease held with nobody working on
it. A stop request (shutdown) gives the lease back at once so any replica can resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import urllib.request
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from yarl import URL

from app import lifecycle, repository
from app.jobs.hosts import HostAllowlist, Refused, resolves_to_public
from app.jobs.resolve import AddressRefused
from app.jobs.sink import Sink
from app.logging import bind
from app.media import BadClip, PreparedClip, prepare_clip, warnings_for
from app.metrics import METRICS
from app.models import Status
from app.retry import backoff_seconds
from app.storage import ClipWriter, Storage, StorageError
from app.threads import WorkerDied, run_isolated

__all__ = ["DownloadSettings", "Downloader", "is_mp4_header"]

log = logging.getLogger(__name__)

WRITE_CHUNK = 1024 * 1024  # what the sink takes at a time
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# How long a cancelled download may take to abort its upload before the task gives up on it.
ABORT_WAIT_SECONDS = 15.0


def is_mp4_header(head: bytes) -> bool:
    """An ISO-BMFF file starts with a box whose type (bytes 4..8) is ``ftyp``."""
    return len(head) >= 8 and head[4:8] == b"ftyp"


class DownloadError(Exception):
    code = "download_failed"


class Transient(DownloadError):
    pass


class Permanent(DownloadError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stopped(Exception):
    """Shutdown requested or the lease was lost: give up this attempt, keep nothing."""


# Failures retried without a traceback in the log. Any other exception is logged as a crash,
# and retried all the same: one unexpected error must not wedge the video.
_EXPECTED = (Transient, StorageError, aiohttp.ClientError, OSError)


@dataclass(frozen=True, slots=True)
class DownloadSettings:
    max_bytes: int
    lease: timedelta
    retry_base: float
    retry_max: float
    max_retry: timedelta = timedelta(days=1)  # DOWNLOAD_MAX_RETRY_SECONDS


class Downloader:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        http: aiohttp.ClientSession,
        storage: Storage,
        allowlist: HostAllowlist,
        settings: DownloadSettings,
        stop: asyncio.Event,
        clock: Callable[[], datetime],
    ) -> None:
        self._sm = sessionmaker
        self._http = http
        self._storage = storage
        self._allow = allowlist
        self._settings = settings
        self._stop = stop
        self._clock = clock

    async def run(self, video_id: uuid.UUID, owner: str) -> None:
        """Download one clip whose lease ``owner`` holds. Never raises (but for cancellation):
        whatever goes wrong is recorded on the video and counted as a failed attempt."""
        task_id: str | None = None
        attempts = 1
        deadline: datetime | None = None
        try:
            async with self._sm() as session:
                video = await repository.get(session, video_id)
            if video is None or video.lease_owner != owner or video.output_url is None:
                return
            task_id, attempts = video.task_id, video.download_attempts
            deadline = self.deadline(
                video.output_expires_at, video.task_finished_at or video.created_at
            )
            with bind(video_id=video.id, task_id=task_id):
                await self._attempt(video_id, owner, video.output_url, deadline, attempts)
        except Exception as exc:
            # Reading the row, marking it ready or failed, or giving it back failed (most
            # likely the database). Try once more to give the lease back with a backoff; if
            # that fails too, the lease runs out and the reconciler claims the video again.
            with bind(video_id=video_id, task_id=task_id):
                log.exception("download.crashed")
                try:
                    await self._give_back(video_id, owner, attempts, deadline, _describe(exc))
                except Exception as again:
                    log.error("download.release_failed error=%s", _describe(again))

    def deadline(self, expires_at: datetime | None, finished_at: datetime) -> datetime:
        """When retrying stops: ``expires_at`` or the task's end plus
        ``DOWNLOAD_MAX_RETRY_SECONDS``, whichever comes first (rows stored before expires_at was
        clamped get the bound too)."""
        bound = finished_at + self._settings.max_retry
        return bound if expires_at is None else min(expires_at, bound)

    async def _attempt(
        self, video_id: uuid.UUID, owner: str, url: str, deadline: datetime, attempts: int
    ) -> None:
        now = self._clock()
        if now >= deadline:
            await self._fail(
                video_id,
                owner,
                "expired",
                "the output URL expired (or DOWNLOAD_MAX_RETRY_SECONDS passed since the task "
                "finished) before the clip could be downloaded",
            )
            return
        lost = asyncio.Event()
        started = asyncio.get_running_loop().time()
        finished = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(video_id, owner, lost, finished))
        try:
            # ``_copy`` aborts its writer on every way out but success: nothing to clean here.
            stored = await self._until_stopped(self._copy(video_id, owner, url, lost))
        except Permanent as exc:
            await self._fail(video_id, owner, exc.code, str(exc))
            return
        except Stopped as exc:
            log.info("download.stopped reason=%s", exc)
            METRICS.downloads.labels("stopped").inc()
            await self._release(video_id, owner, self._clock(), f"stopped: {exc}")
            return
        except Exception as exc:  # transient, or unexpected: a failed attempt either way
            if not isinstance(exc, _EXPECTED):
                log.error("download.crashed error=%s", _describe(exc), exc_info=exc)
            await self._give_back(video_id, owner, attempts, deadline, _describe(exc))
            return
        except asyncio.CancelledError:
            # Cancelled after the shutdown grace: give the lease back, so another replica
            # resumes at once instead of after expiry (the writer was aborted on the way out).
            await asyncio.shield(self._abandon(video_id, owner))
            raise
        finally:
            # Never cancel the heartbeat: cancelling it inside its transaction could leave a
            # connection holding a write lock. It notices ``finished`` and ends by itself.
            finished.set()
            await asyncio.shield(heartbeat)
        clip = stored.clip
        async with self._sm() as session, session.begin():
            video = await repository.get(session, video_id)
            warnings = (
                warnings_for(clip.facts, duration=video.duration, resolution=video.resolution)
                if video is not None
                else []
            )
            ready = await lifecycle.mark_ready(
                session,
                video_id=video_id,
                owner=owner,
                size_bytes=stored.size,
                sha256=stored.sha256,
                storage_key=stored.key,
                now=self._clock(),
                facts=clip.facts,
                warnings=warnings,
                faststart_remuxed=clip.faststart_remuxed,
                poster_key=stored.poster_key,
            )
        size = stored.size
        if ready is None:
            await self._lost_before_ready(video_id, stored.key, stored.poster_key)
        else:
            log.info(
                "download.ready size=%d sha256=%s %dx%d %.2fs warnings=%s faststart_remuxed=%s",
                size,
                stored.sha256,
                clip.facts.width,
                clip.facts.height,
                clip.facts.duration_seconds,
                ",".join(warnings) or "-",
                clip.faststart_remuxed,
            )
            METRICS.downloads.labels("ready").inc()
            METRICS.download_bytes.inc(size)
            METRICS.download_seconds.observe(asyncio.get_running_loop().time() - started)
            if ready.task_finished_at is not None and ready.ready_at is not None:
                waited = (ready.ready_at - ready.task_finished_at).total_seconds()
                METRICS.success_to_stored.observe(max(waited, 0.0))

    async def _lost_before_ready(self, video_id: uuid.UUID, key: str, poster: str) -> None:
        """``mark_ready`` found the lease gone after the clip was committed under ``key`` (and
        its poster under ``poster``). If
        the video was deleted meanwhile, the file is nobody's: no transition leaves
        ``deleted``, so no other download can own this video's key. Remove it (or, if the
        store fails, list it on the tombstone for the reconciler to remove). Otherwise another
        download holds the lease, and the key is its own: leave it alone."""
        async with self._sm() as session:
            video = await repository.get(session, video_id)
        if video is None or video.status != Status.deleted:
            log.warning("download.lease_lost_before_ready")
            return
        log.info("download.video_deleted_meanwhile")
        METRICS.downloads.labels("deleted").inc()
        try:
            await self._storage.delete(poster)
            await self._storage.delete(key)
        except (StorageError, OSError) as exc:
            log.warning("download.orphan_kept error=%s (the reconciler removes it)", exc)
            async with self._sm() as session, session.begin():
                await lifecycle.files_to_remove(
                    session,
                    video_id=video_id,
                    storage_key=key,
                    poster_key=poster,
                    now=self._clock(),
                )

    async def _copy(
        self, video_id: uuid.UUID, owner: str, url: str, lost: asyncio.Event
    ) -> _Stored:
        # Confirm the lease before touching storage: it may have expired (and been taken by
        # another replica) while this download waited for a slot.
        await self._renew(video_id, owner)
        await self._storage.discard_leftovers(video_id, owner)
        writer = await self._storage.open_writer(video_id, owner)
        try:
            size, digest = await self._fetch(url, writer, lost)
            clip = await _prepare(await writer.spool())
            if lost.is_set():
                raise Stopped("lease lost")
            await writer.commit(poster=clip.facts.poster)
        except BaseException:
            # Shielded: a second cancellation must not leave half an upload behind.
            await asyncio.shield(writer.abort())
            raise
        return _Stored(
            key=writer.key,
            poster_key=writer.poster_key,
            size=clip.size_bytes if clip.size_bytes is not None else size,
            sha256=clip.sha256 or digest,
            clip=clip,
        )

    async def _until_stopped(self, work: Coroutine[Any, Any, _Stored]) -> _Stored:
        """Run ``work``; a shutdown request cancels it even while it waits on the network."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Cancelled from outside (the shutdown grace ran out): stop the copy too, and give
            # it a moment to abort its upload.
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait({task}, timeout=ABORT_WAIT_SECONDS)
            raise
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise Stopped("shutdown")
        return task.result()

    async def _heartbeat(
        self, video_id: uuid.UUID, owner: str, lost: asyncio.Event, finished: asyncio.Event
    ) -> None:
        """Renew the lease on a timer, whatever the transfer is doing (waiting for headers,
        stalled, fsyncing), so a slow download is never mistaken for a dead one."""
        every = self._settings.lease.total_seconds() / 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), every)
            if finished.is_set():
                return
            try:
                async with self._sm() as session, session.begin():
                    held = await lifecycle.renew_lease(
                        session,
                        video_id=video_id,
                        owner=owner,
                        now=self._clock(),
                        lease=self._settings.lease,
                    )
            except Exception as exc:  # the database may be briefly away; try again
                log.warning("download.renew_failed error=%s", _describe(exc))
                continue
            if not held:
                lost.set()
                return

    async def _give_back(
        self,
        video_id: uuid.UUID,
        owner: str,
        attempts: int,
        deadline: datetime | None,
        reason: str,
    ) -> None:
        """Count a failed attempt: give the lease back with a backoff, or fail the video
        ``expired`` if the next try would come after the deadline."""
        delay = backoff_seconds(
            attempts, base=self._settings.retry_base, cap=self._settings.retry_max
        )
        retry_at = self._clock() + timedelta(seconds=delay)
        if deadline is not None and retry_at >= deadline:
            await self._fail(
                video_id,
                owner,
                "expired",
                "gave up before the output URL expired (or DOWNLOAD_MAX_RETRY_SECONDS passed "
                f"since the task finished); last error: {reason}",
            )
            return
        log.warning("download.retry in=%.1fs error=%s", delay, reason)
        METRICS.downloads.labels("retry").inc()
        await self._release(video_id, owner, retry_at, reason)

    async def _abandon(self, video_id: uuid.UUID, owner: str) -> None:
        with contextlib.suppress(Exception):
            await self._release(video_id, owner, self._clock(), "stopped: cancelled")

    async def _fetch(self, url: str, writer: ClipWriter, lost: asyncio.Event) -> tuple[int, str]:
        target: str | httpx.URL = url
        for hop in range(MAX_REDIRECTS + 1):
            try:
                # Every hop in its canonical spelling, on the list (or refused for good).
                current, rule = self._allow.check(target)
            except Refused as exc:
                code = "bad_redirect" if hop and exc.code == "bad_output_url" else exc.code
                raise Permanent(code, str(exc)) from None
            # identity: a clip is already compressed; its bytes are stored as sent. The URL
            # goes out exactly as hiapi wrote it (httpx's parsing keeps every escape, which a
            # presigned signature depends on). The session's resolver checks every address
            # of a name admitted by a non-explicit rule and connects only to those
            # (``app.jobs.resolve``); a failed lookup is a transient ``ClientError``.
            if not rule.explicit and _through_proxy(current):
                await _check_before_proxy(current)
            try:
                response = await self._http.get(
                    URL(str(current), encoded=True),
                    headers={"Accept-Encoding": "identity"},
                    allow_redirects=False,
                )
            except AddressRefused:
                raise Permanent(
                    "host_not_allowed",
                    f"download host {current.host} resolves to a private or local address",
                ) from None
            async with response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise Permanent("bad_redirect", "redirect without a Location header")
                    try:
                        target = current.join(location)
                    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
                        raise Permanent(
                            "bad_redirect", f"cannot read the redirect's Location: {exc}"
                        ) from None
                    continue
                return await self._consume(response, writer, lost)
        raise Permanent("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    async def _consume(
        self, response: aiohttp.ClientResponse, writer: ClipWriter, lost: asyncio.Event
    ) -> tuple[int, str]:
        status = response.status
        if status in (408, 429) or status >= 500 or status in (403, 404, 410):
            # 403/404/410 before expires_at can be storage lag; the deadline bounds the retries.
            raise Transient(f"download answered HTTP {status}")
        if status != 200:
            raise Permanent(f"download_http_{status}", f"download answered HTTP {status}")
        limit = self._settings.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Permanent("too_large", f"clip is {declared} bytes; MAX_VIDEO_BYTES is {limit}")

        hasher = hashlib.sha256()
        sink = Sink(writer, hasher)
        total = 0
        checked = False
        pieces: list[bytes] = []
        pending = 0  # bytes in ``pieces``
        try:
            # Bytes as they come off the socket (decoded only if the server compressed them
            # anyway, which a clip should never be).
            async for chunk in response.content.iter_any():
                if lost.is_set():
                    raise Stopped("lease lost")
                total += len(chunk)
                if total > limit:
                    raise Permanent("too_large", f"clip exceeds MAX_VIDEO_BYTES ({limit} bytes)")
                if not checked and total >= 8:
                    if not is_mp4_header(b"".join([*pieces, chunk])[:8]):
                        raise Permanent(
                            "not_mp4", "the downloaded file is not an MP4 (no ftyp box)"
                        )
                    checked = True
                pieces.append(chunk)
                pending += len(chunk)
                if pending >= WRITE_CHUNK:
                    data = b"".join(pieces)  # the one copy of these bytes
                    pieces.clear()
                    pending = 0
                    await sink.put(data)
            if not checked:
                raise Permanent("not_mp4", "the downloaded file is not an MP4 (too short)")
            if pieces:
                await sink.put(b"".join(pieces))
            await sink.finish()
        finally:
            await sink.cancel()  # nothing left to do on success; on an error, stop the rest
        return total, hasher.hexdigest()

    async def _renew(self, video_id: uuid.UUID, owner: str) -> None:
        async def renew() -> bool:
            async with self._sm() as session, session.begin():
                return await lifecycle.renew_lease(
                    session,
                    video_id=video_id,
                    owner=owner,
                    now=self._clock(),
                    lease=self._settings.lease,
                )

        # Shielded: a shutdown that cancels the copy must not cut this transaction in half,
        # which could leave the connection holding the row (Postgres) or the file (SQLite).
        held = await asyncio.shield(renew())
        if not held:
            raise Stopped("lease lost")

    async def _release(
        self, video_id: uuid.UUID, owner: str, retry_at: datetime, error: str
    ) -> None:
        async with self._sm() as session, session.begin():
            await lifecycle.release_download(
                session,
                video_id=video_id,
                owner=owner,
                retry_at=retry_at,
                error=error,
                now=self._clock(),
            )

    async def _fail(self, video_id: uuid.UUID, owner: str, code: str, message: str) -> None:
        async with self._sm() as session, session.begin():
            failed = await lifecycle.fail_download(
                session,
                video_id=video_id,
                owner=owner,
                code=code,
                message=message,
                now=self._clock(),
            )
        if failed is not None:
            log.warning("download.failed code=%s message=%s", code, message)
            METRICS.downloads.labels(code).inc()


@dataclass(frozen=True, slots=True)
class _Stored:
    """A committed clip: what ``mark_ready`` records."""

    key: str
    poster_key: str
    size: int
    sha256: str
    clip: PreparedClip


async def _prepare(path: Path) -> PreparedClip:
    """``app.media.prepare_clip`` in a worker process; ``Permanent("bad_mp4")`` for a file
    that is no playable video. A cancellation waits for the worker to be done with the file
    before it goes on (the writer's abort removes that file next)."""
    work = asyncio.ensure_future(run_isolated(prepare_clip, path))
    try:
        return await asyncio.shield(work)
    except BadClip as exc:
        raise Permanent("bad_mp4", f"the downloaded file is not a playable MP4: {exc}") from None
    except WorkerDied as exc:  # retried like a network error: the deadline bounds it
        raise Transient(f"checking the clip failed: {exc}") from None
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait({work})
        raise


def _through_proxy(url: httpx.URL) -> bool:
    """Whether ``HTTP(S)_PROXY`` (honoured by the download session) carries this request."""
    return url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.host)


async def _check_before_proxy(url: httpx.URL) -> None:
    """Through a proxy the proxy resolves the host, so the session's checked resolver never
    sees it: check its addresses here first (a rebinding name is then the proxy's egress
    rules' to stop). A failed lookup is transient, never a pass."""
    try:
        public = await resolves_to_public(url.host, url.port or 443)
    except OSError as exc:
        raise Transient(f"could not resolve {url.host}: {exc}") from None
    if not public:
        raise Permanent(
            "host_not_allowed", f"download host {url.host} resolves to a private or local address"
        )


# aiohttp puts the request URL in some messages ("Connection timeout to host <url>"); a
# presigned URL's query is a credential, so it never reaches a log line or last_error.
_URL_QUERY = re.compile(r"(https?://[^\s?#'\"]*)[?#][^\s'\"]*")


def _describe(exc: BaseException) -> str:
    text = _URL_QUERY.sub(r"\1?…", str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
