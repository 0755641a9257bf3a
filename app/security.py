"""Per-video webhook tokens: the callback URL itself is the credential.

The token is an HMAC-SHA256 of the video id under ``WEBHOOK_SECRET``, so nothing is stored,
every replica can check it, and a guessed URL for another video never matches.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

__all__ = ["callback_url", "token_matches", "webhook_token"]


def webhook_token(secret: bytes, video_id: uuid.UUID) -> str:
    return hmac.new(secret, b"hiapi-callback:" + video_id.bytes, hashlib.sha256).hexdigest()[:40]


def token_matches(secret: bytes, video_id: uuid.UUID, token: str) -> bool:
    """Constant-time comparison, so timing tells an attacker nothing about the right token."""
    return hmac.compare_digest(webhook_token(secret, video_id).encode(), token.encode())


def callback_url(public_base: str, secret: bytes, video_id: uuid.UUID) -> str:
    return f"{public_base}/webhooks/hiapi/{video_id}/{webhook_token(secret, video_id)}"
