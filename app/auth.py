"""API keys for ``/v1/*``: who is calling, checked in constant time.

Keys come from ``API_KEYS`` (``name:key`` pairs, comma-separated; a bare key is named
``key1``, ``key2``, ...) and/or ``API_KEYS_FILE`` (one ``name key`` or ``name:key`` per line,
``#`` starts a comment, on its own line or after an entry). With no keys at all the API is
open and every video belongs to ``""``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = ["GRANT_OWNER", "OPEN_OWNER", "ApiKeys", "ApiKeysError", "Caller"]

OPEN_OWNER = ""
# The owner of a one-video grant (a signed URL), which names no key: no key's name has white
# space, so it owns nothing and lists nothing.
GRANT_OWNER = " signed url"
_COMMENT = re.compile(r"(^|\s)#.*$")
_SEPARATOR = re.compile(r"[:\s]")


class ApiKeysError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling ``/v1/*``, as ``app.limits.authenticate`` established it.

    ``owner`` is the API key's name (``OPEN_OWNER`` on an open API): everything a caller
    creates belongs to it. A client token adds ``subject`` (its end user: what the token
    creates belongs to ``(owner, subject)``, and it sees nothing else), its ``scopes`` (None:
    all, as for the key itself), ``token_id``, ``cap`` (the seconds it may spend in all) and
    ``token_expires_at``.
    ``video_id`` set means the credential grants reading that one video and nothing else.
    """

    owner: str
    video_id: uuid.UUID | None = None
    subject: str | None = None
    scopes: frozenset[str] | None = None
    token_id: str | None = None
    cap: int | None = None
    token_expires_at: datetime | None = None

    @property
    def stored_subject(self) -> str:
        """The ``subject`` column of what this caller creates (``""``: the key itself)."""
        return self.subject or ""

    def may(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes

    def may_read(self, owner: str, video_id: uuid.UUID, subject: str = "") -> bool:
        """Whether this caller may read a video of ``(owner, subject)`` with id ``video_id``: a
        one-video grant reads that video whoever owns it, and nothing else; a client token
        reads its own subject's videos only."""
        if self.video_id is not None:
            return self.video_id == video_id
        if self.subject is not None and self.subject != subject:
            return False
        return owner == self.owner


class ApiKeys:
    def __init__(self, keys: dict[str, str]) -> None:
        # Compare fixed-length digests so neither length nor content leaks through timing.
        self._digests = [
            (name, hashlib.sha256(key.encode()).digest()) for name, key in keys.items()
        ]

    @property
    def open(self) -> bool:
        return not self._digests

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def has(self, name: str) -> bool:
        """Whether a key of this name is configured (an open API has the one name ``""``)."""
        return name == OPEN_OWNER if self.open else any(n == name for n, _ in self._digests)

    @classmethod
    def load(cls, spec: str, file: Path | None) -> ApiKeys:
        keys: dict[str, str] = {}
        entries = [e.strip() for e in spec.split(",") if e.strip()]
        if file is not None:
            try:
                lines = file.read_text().splitlines()
            except OSError as exc:
                raise ApiKeysError(f"API_KEYS_FILE cannot be read: {exc.strerror}") from None
            # A comment runs from "#" at the start of a line, or after white space, to its end
            # (a "#" inside a key is part of the key).
            stripped = (_COMMENT.sub("", ln).strip() for ln in lines)
            entries += [ln for ln in stripped if ln]
        for index, entry in enumerate(entries, start=1):
            name, key = _split(entry, index)
            if len(key) < 16:
                raise ApiKeysError(f"API key {name!r} is shorter than 16 characters")
            if name in keys:
                raise ApiKeysError(f"API key name {name!r} is used twice")
            keys[name] = key
        return cls(keys)

    def identify(self, authorization: str | None) -> str | None:
        """The key's name for a valid ``Bearer`` header, else None. Checks every key."""
        if self.open:
            return OPEN_OWNER
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        offered = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found: str | None = None
        for name, digest in self._digests:
            if hmac.compare_digest(digest, offered):
                found = name
        return found


def _split(entry: str, index: int) -> tuple[str, str]:
    """``name:key``, ``name key`` or a bare key: the first separator splits, so a key may
    contain ``:`` after a space-separated name."""
    found = _SEPARATOR.search(entry)
    if found is not None:
        name, key = entry[: found.start()].strip(), entry[found.end() :].strip()
        if name and key:
            return name, key
    return f"key{index}", entry
