"""Client tokens: short-lived bearers an API key's holder mints for one end user (a subject).

A token is a JWT signed with HS256 (PyJWT) under the first secret of ``CLIENT_TOKEN_SECRET``;
any secret of the list verifies, so a new secret can be put first while tokens signed with
the old one stay valid until they expire. Claims:

- ``iss``: ``"videorelay"``; ``sub``: the subject (the end user's id in the customer's system);
- ``key``: the name of the API key that minted it (the token stops working with that key);
- ``scp``: its scopes, a subset of ``SCOPES``; ``cap``: ``max_video_seconds``, if any;
- ``jti``: a random id (the token's own spend is counted under it); ``iat`` and ``exp``.

Verifying needs no database: the signature, the claims' shapes and ``exp`` against the
service's clock (``now`` is passed in, so time is the service's, not the machine's). A browser
sends the same token on every request until it expires, and PyJWT's decode is the dominant
cost of a request's authentication, so the claims of tokens that verified are kept (bounded,
least recently used first out, keyed by the whole token, signature included); ``exp`` and the
key's existence are still checked on every request.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

__all__ = [
    "ISSUER",
    "MIN_SECRET_CHARS",
    "SCOPES",
    "ClientTokens",
    "TokenClaims",
    "TokenError",
    "looks_like_token",
]

ISSUER = "videorelay"
SCOPES = ("videos:create", "videos:read", "images:create")
MIN_SECRET_CHARS = 32
_ALGORITHM = "HS256"
# Three base64url parts, the first a JSON object ("eyJ" is how `{"` starts in base64).
_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Tokens whose claims are kept once verified (a few hundred bytes each).
VERIFIED_CACHE_SIZE = 4096


class TokenError(Exception):
    """A bearer that looks like a client token but is not a valid one now."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "token_expired" or "invalid_token"
        self.message = message


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    key: str
    scopes: frozenset[str]
    cap: int | None
    token_id: str
    expires_at: datetime


def looks_like_token(bearer: str) -> bool:
    """Whether a bearer is meant as a client token (API keys are never JWT-shaped)."""
    return _SHAPE.fullmatch(bearer) is not None


def _invalid(why: str) -> TokenError:
    return TokenError("invalid_token", f"invalid client token: {why}")


class ClientTokens:
    def __init__(self, secrets_: Sequence[str]) -> None:
        if not secrets_:
            raise ValueError("at least one secret is needed")
        self._secrets = [s.encode() for s in secrets_]
        # Per instance: an instance's secrets never change, so neither does what verified.
        self._verified = functools.lru_cache(maxsize=VERIFIED_CACHE_SIZE)(self._decode)

    @staticmethod
    def parse_secrets(spec: str) -> list[str]:
        """The secrets of a ``CLIENT_TOKEN_SECRET`` value; ``ValueError`` names a short one."""
        found = [s.strip() for s in spec.split(",") if s.strip()]
        for index, secret in enumerate(found, start=1):
            if len(secret) < MIN_SECRET_CHARS:
                raise ValueError(
                    f"CLIENT_TOKEN_SECRET: secret number {index} is shorter than "
                    f"{MIN_SECRET_CHARS} characters"
                )
        return found

    def mint(
        self,
        *,
        key: str,
        subject: str,
        scopes: Sequence[str],
        ttl: timedelta,
        cap: int | None,
        now: datetime,
    ) -> tuple[str, datetime]:
        """A token signed with the first secret, and when it expires (whole seconds)."""
        issued = int(now.timestamp())
        expires = issued + int(ttl.total_seconds())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": subject,
            "key": key,
            "scp": list(scopes),
            "jti": secrets.token_urlsafe(16),
            "iat": issued,
            "exp": expires,
        }
        if cap is not None:
            claims["cap"] = cap
        token = jwt.encode(claims, self._secrets[0], algorithm=_ALGORITHM, headers={"typ": "JWT"})
        return token, datetime.fromtimestamp(expires, UTC)

    def verify(self, token: str, *, now: datetime) -> TokenClaims:
        """The claims of a token signed by one of the secrets and not expired at ``now``;
        ``TokenError`` otherwise."""
        claims = self._verified(token)  # raises for a bad token (and keeps nothing then)
        if claims.expires_at <= now:
            raise TokenError(
                "token_expired",
                f"client token expired at {claims.expires_at.isoformat().replace('+00:00', 'Z')}; "
                "ask your backend for a new one",
            )
        return claims

    def _decode(self, token: str) -> TokenClaims:
        claims: dict[str, Any] | None = None
        for secret in self._secrets:
            try:
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=[_ALGORITHM],  # never "none", never another family
                    issuer=ISSUER,
                    # `exp` is checked below against the service's clock.
                    options={
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                        "require": ["iss", "sub", "exp", "jti"],
                    },
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise _invalid(str(exc).lower()) from None
        if claims is None:
            raise _invalid("bad signature")
        return _claims(claims)


def _claims(claims: dict[str, Any]) -> TokenClaims:
    subject, key, scopes = claims.get("sub"), claims.get("key"), claims.get("scp")
    cap, jti, exp = claims.get("cap"), claims.get("jti"), claims.get("exp")
    if not isinstance(subject, str) or not 1 <= len(subject) <= 128:
        raise _invalid("bad subject")
    if not isinstance(key, str) or not isinstance(jti, str) or not jti:
        raise _invalid("bad key or id")
    if not isinstance(scopes, list) or not all(s in SCOPES for s in scopes):
        raise _invalid("bad scopes")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
        raise _invalid("bad cap")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise _invalid("bad expiry")
    try:
        expires_at = datetime.fromtimestamp(exp, UTC)
    except (OverflowError, OSError, ValueError):
        raise _invalid("bad expiry") from None
    return TokenClaims(
        subject=subject,
        key=key,
        scopes=frozenset(scopes),
        cap=cap,
        token_id=jti,
        expires_at=expires_at,
    )
