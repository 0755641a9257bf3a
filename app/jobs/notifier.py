"""Deliver the ``notify_url`` outbox: signed POSTs, retried with backoff, from any replica.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com): headers
``webhook-id`` (the notification id, stable across retries so receivers can dedupe),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature`` =
``v1,`` + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")). A ``whsec_``-prefixed
secret is base64-decoded first, as the spec's libraries do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lifecycle
from app.jobs.hosts import resolves_to_public
from app.logging import bind
from app.metrics import METRICS
from app.models import Notification
from app.retry import backoff_seconds

__all__ = ["Notifier", "notify_url_problem", "sign"]

log = logging.getLogger(__name__)
HOLD = timedelta(seconds=60)


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def notify_url_problem(url: str, *, allow_local: bool) -> str | None:
    """Why ``url`` can't be a notify_url, or None. (Addresses are checked again on delivery.)"""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return "must be an absolute https URL"
    if parsed.scheme not in ("https", "http") or not parsed.host or parsed.userinfo:
        return "must be an absolute https URL without credentials"
    if parsed.scheme == "http" and not allow_local:
        return "must use https"
    return None


class Notifier:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        http: httpx.AsyncClient,
        secret: bytes | None,
        render: Callable[[uuid.UUID], Awaitable[dict[str, Any] | None]],
        max_attempts: int,
        allow_local: bool,
        retry_base: float,
        retry_max: float,
        interval: float,
        clock: Callable[[], datetime],
    ) -> None:
        self._sm = sessionmaker
        self._http = http
        self._secret = secret
        self._render = render
        self._max_attempts = max_attempts
        self._allow_local = allow_local
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._interval = interval
        self._clock = clock
        self.delivered = 0
        self.failed_attempts = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("notifier.tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def tick(self) -> int:
        owner = uuid.uuid4().hex
        async with self._sm() as session, session.begin():
            due = await lifecycle.claim_notifications(
                session, now=self._clock(), hold=HOLD, owner=owner, limit=50
            )
        await asyncio.gather(*(self._deliver(n, owner) for n in due))
        return len(due)

    async def _deliver(self, note: Notification, owner: str) -> None:
        with bind(video_id=note.video_id):
            status_code: int | None = None
            error: str | None = None
            try:
                status_code = await self._post(note)
                delivered = 200 <= status_code < 300
                if not delivered:
                    error = f"receiver answered HTTP {status_code}"
            except (httpx.HTTPError, OSError, ValueError) as exc:
                delivered, error = False, f"{type(exc).__name__}: {exc}"[:500]
            now = self._clock()
            retry_at: datetime | None = None
            if not delivered and note.attempts + 1 < self._max_attempts:
                delay = backoff_seconds(note.attempts, base=self._retry_base, cap=self._retry_max)
                retry_at = now + timedelta(seconds=delay)
            async with self._sm() as session, session.begin():
                await lifecycle.record_delivery(
                    session,
                    notification_id=note.id,
                    owner=owner,
                    delivered=delivered,
                    status_code=status_code,
                    error=error,
                    retry_at=retry_at,
                    now=now,
                )
            METRICS.notifications.labels(
                "delivered" if delivered else ("retry" if retry_at else "gave_up")
            ).inc()
            if delivered:
                self.delivered += 1
                log.info("notify.delivered event=%s", note.event)
            else:
                self.failed_attempts += 1
                log.warning("notify.failed attempt=%d error=%s", note.attempts + 1, error)

    async def _post(self, note: Notification) -> int:
        if self._secret is None:
            raise ValueError("NOTIFY_SECRET is not set")
        problem = notify_url_problem(note.url, allow_local=self._allow_local)
        if problem:
            raise ValueError(f"notify_url {problem}")
        url = httpx.URL(note.url)
        if not self._allow_local and not await resolves_to_public(url.host, url.port or 443):
            raise ValueError("notify_url resolves to a private or local address")
        video = await self._render(note.video_id)
        body = json.dumps(
            {"type": note.event, "timestamp": self._clock().isoformat(), "data": video},
            separators=(",", ":"),
            default=str,
        ).encode()
        timestamp = int(self._clock().timestamp())
        headers = {
            "content-type": "application/json",
            "webhook-id": str(note.id),
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secret, str(note.id), timestamp, body),
            "user-agent": "videorelay",
        }
        response = await self._http.post(url, content=body, headers=headers)
        return response.status_code
