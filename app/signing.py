"""Signed, expiring URLs for what a browser fetches by itself (``<video src>``,
``new EventSource``), which cannot send an ``Authorization`` header.

A signed URL is ``<path>?exp=<unix seconds>&sig=<signature>``, where the signature is
``base64url(HMAC-SHA256(key, path + "\\n" + exp))`` without padding and ``path`` is the URL
path (``/v1/videos/<id>/content``). The key is ``HMAC-SHA256(WEBHOOK_SECRET, "videorelay
signed urls")``, so it differs from the callback tokens'. Only ``GET``/``HEAD`` of a video's
``/content``, ``/poster.jpg`` and ``/events`` accept one, and it grants reading that one video
until ``exp`` (a URL signed for one of the three paths does not verify for another).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from urllib.parse import parse_qsl

__all__ = [
    "BadSignature",
    "SignedRequest",
    "UrlExpired",
    "UrlSigner",
    "VideoUrls",
    "signed_request",
]

_KEY_LABEL = b"videorelay signed urls"
_METHODS = frozenset({"GET", "HEAD"})
_SIGNED_PATH = re.compile(
    r"/v1/videos/(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"/(?:content|events|poster\.jpg)"
)


class SignedRequest:
    """The ``exp`` and ``sig`` a request offers for a path that accepts a signed URL."""

    __slots__ = ("exp", "path", "sig", "video_id")

    def __init__(self, path: str, video_id: uuid.UUID, exp: str | None, sig: str | None):
        self.path = path
        self.video_id = video_id
        self.exp = exp
        self.sig = sig


def signed_request(method: str, path: str, query: bytes) -> SignedRequest | None:
    """What a ``GET``/``HEAD`` of a signable path offers as ``exp``/``sig``; None for any other
    request, or one that offers neither (such a URL grants nothing)."""
    if method not in _METHODS:
        return None
    found = _SIGNED_PATH.fullmatch(path)
    if found is None or not query:
        return None
    exp: list[str] = []
    sig: list[str] = []
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "exp":
            exp.append(value)
        elif name == "sig":
            sig.append(value)
    if not exp and not sig:
        return None
    # One of each, or the URL was tampered with.
    return SignedRequest(
        path,
        uuid.UUID(found["id"]),
        exp[0] if len(exp) == 1 else None,
        sig[0] if len(sig) == 1 else None,
    )


class BadSignature(Exception):
    """The path, ``exp`` or ``sig`` was altered (or one is missing)."""


class UrlExpired(Exception):
    """An intact signed URL past its ``exp``."""


class UrlSigner:
    """Signs paths for ``ttl`` seconds from ``clock()``, and verifies them against it."""

    def __init__(self, secret: bytes, *, ttl: int, clock: Callable[[], datetime]) -> None:
        self._key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()
        self.ttl = ttl
        self.clock = clock

    def _signature(self, path: str, exp: str) -> bytes:
        mac = hmac.new(self._key, f"{path}\n{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=")

    def sign(self, path: str) -> str:
        """``path`` with ``?exp=...&sig=...``, valid ``ttl`` seconds from now."""
        exp = str(int(self.clock().timestamp()) + self.ttl)
        return f"{path}?exp={exp}&sig={self._signature(path, exp).decode()}"

    def verify(self, offered: SignedRequest) -> uuid.UUID:
        """The video the URL grants reading, else ``BadSignature`` (altered path, ``exp`` or
        ``sig``) or ``UrlExpired`` (intact, but past ``exp``)."""
        exp, sig = offered.exp, offered.sig
        if exp is None or sig is None or not exp.isascii() or not exp.isdigit():
            raise BadSignature
        # The text itself is compared: base64 decoders skip stray characters, and an altered
        # URL must not pass.
        if not hmac.compare_digest(sig.encode(), self._signature(offered.path, exp)):
            raise BadSignature
        if int(exp) <= self.clock().timestamp():
            raise UrlExpired
        return offered.video_id


class VideoUrls:
    """A video's absolute ``content_url`` and ``events_url``: signed when ``signer`` is set
    (API keys on), plain otherwise."""

    __slots__ = ("public_base", "signer")

    def __init__(self, public_base: str, signer: UrlSigner | None) -> None:
        self.public_base = public_base
        self.signer = signer

    def _url(self, path: str) -> str:
        return self.public_base + (self.signer.sign(path) if self.signer else path)

    def content(self, video_id: uuid.UUID) -> str:
        return self._url(f"/v1/videos/{video_id}/content")

    def poster(self, video_id: uuid.UUID) -> str:
        return self._url(f"/v1/videos/{video_id}/poster.jpg")

    def events(self, video_id: uuid.UUID) -> str:
        return self._url(f"/v1/videos/{video_id}/events")
