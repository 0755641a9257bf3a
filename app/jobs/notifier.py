"""Deliver the ``notify_url`` outbox: signed POSTs, retried with backoff, from any replica.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com): headers
``webhook-id`` (the notification id, stable across retries so receivers can dedupe),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature`` =
``v1,`` + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")). A ``whsec_``-prefixed
secret is base64-decoded first, as the spec's libraries do.

The receiver's name is resolved once, every address is checked, and the POST goes to a checked
address (``Host`` and TLS SNI stay the name, and the certificate is verified against it), so a
name cannot pass the check with one answer and be connected to with another. A private or
local answer is refused before any connection, so ``notify.last_error`` never tells an API
caller whether a port is open on the internal network. ``NOTIFY_ALLOW_LOCAL`` lifts the check.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
from aiohttp.abc import AbstractResolver
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import outbox
from app.jobs.hosts import canonical_host
from app.jobs.resolve import CheckedResolver
from app.logging import bind
from app.metrics import METRICS
from app.models import Notification
from app.net import is_ip_literal, is_public_address
from app.retry import backoff_seconds
from app.schemas import notify_url_problem

__all__ = ["Notifier", "secret_bytes", "sign"]

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
        resolver: AbstractResolver | None = None,
    ) -> None:
        """``resolver`` looks names up (aiohttp's default resolver unless given); its answers
        are checked, and connected to, by ``CheckedResolver``."""
        self._sm = sessionmaker
        self._http = http
        self._secret = secret
        self._render = render
        self._max_attempts = max_attempts
        self._allow_local = allow_local
        self._resolver = CheckedResolver(resolver, private_ok=lambda host, port: allow_local)
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._interval = interval
        self._clock = clock

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
            due = await outbox.claim_notifications(
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
                await outbox.record_delivery(
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
                log.info("notify.delivered event=%s", note.event)
            else:
                log.warning("notify.failed attempt=%d error=%s", note.attempts + 1, error)

    async def _post(self, note: Notification) -> int:
        if self._secret is None:
            raise ValueError("NOTIFY_SECRET is not set")
        problem = notify_url_problem(note.url, allow_local=self._allow_local)
        if problem:
            raise ValueError(f"notify_url {problem}")
        url = httpx.URL(note.url)
        addresses = await self._addresses(url)  # before anything is rendered or sent
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
        return await self._send(url, addresses, body, headers)

    async def _addresses(self, url: httpx.URL) -> list[tuple[str, int]]:
        """The checked addresses (and ports) to send to; raises ``LookupFailed`` (try again
        later) or ``AddressRefused`` before any connection is made."""
        host = canonical_host(url.raw_host.decode("ascii"))
        port = url.port or (443 if url.scheme == "https" else 80)
        if is_ip_literal(host):
            if not self._allow_local and not is_public_address(host):
                raise ValueError(
                    f"notify_url host {host} is a private or local address; refused before "
                    "connecting"
                )
            return [(host, port)]
        answers = await self._resolver.resolve(host, port, family=socket.AF_UNSPEC)
        return list(dict.fromkeys((answer["host"], answer["port"]) for answer in answers))

    async def _send(
        self, url: httpx.URL, addresses: list[tuple[str, int]], body: bytes, headers: dict[str, str]
    ) -> int:
        """POST to the first checked address that takes a connection. The URL's host becomes
        the address; ``Host`` and TLS SNI stay the name (the certificate is checked against
        it), so the receiver sees the request it was meant to get."""
        name = url.raw_host.decode("ascii")
        headers = {**headers, "host": url.netloc.decode("ascii")}
        failure: httpx.TransportError | None = None
        for address, port in addresses:
            try:
                response = await self._http.post(
                    url.copy_with(host=address, port=port),
                    content=body,
                    headers=headers,
                    extensions={"sni_hostname": name},
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = exc  # nothing was sent: the next address may take it
                continue
            return response.status_code
        assert failure is not None
        raise failure
