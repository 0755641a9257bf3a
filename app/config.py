"""Settings: every knob comes from an environment variable (or ``.env``) of the same name.

The README's configuration table documents exactly these fields.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.net import is_public_address
from app.storage.base import StorageLocation, parse_storage_url
from app.tokens import ClientTokens

__all__ = ["ConfigError", "Settings"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./data/videorelay.db"
_LOCAL_SUFFIXES = (".local", ".internal", ".home.arpa", ".lan")
# Path segments of letters, digits and -._~, none of them `.` or `..`.
_SEGMENT = r"(?!\.\.?(?:/|$))[A-Za-z0-9._~-]+"
_ACCEL_PREFIX = re.compile(rf"/(?:{_SEGMENT}/)+")
_ROOT_PATH = re.compile(rf"(?:/{_SEGMENT})+")


class ConfigError(ValueError):
    """Settings that would make the service unsafe or unable to work."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=True)

    HIAPI_KEY: SecretStr | None = Field(
        default=None, description="hiapi API key (sk-...). Required unless --simulate."
    )
    HIAPI_BASE_URL: str = Field(default="https://api.hiapi.ai")
    HIAPI_TIMEOUT_SECONDS: float = Field(default=15.0, gt=0)
    PUBLIC_BASE_URL: str = Field(
        default="http://127.0.0.1:8000",
        description="Where hiapi reaches this service; callback URLs are built from it.",
    )
    WEBHOOK_SECRET: SecretStr | None = Field(
        default=None,
        description="Key for the per-video callback token (HMAC). Required in production.",
    )
    DATABASE_URL: str = Field(default=DEFAULT_DATABASE_URL)
    DATABASE_TIMEOUT_SECONDS: float = Field(default=10.0, gt=0)
    STORAGE_DIR: Path = Field(default=Path("./data/videos"))
    STORAGE_URL: str | None = Field(
        default=None,
        description="`file://<path>` or `s3://bucket/prefix`; unset = `file://` + STORAGE_DIR.",
    )
    S3_ENDPOINT_URL: str | None = Field(
        default=None, description="S3 API endpoint for MinIO, R2, ...; unset = AWS S3."
    )
    S3_REGION: str = Field(default="us-east-1", min_length=1)
    S3_PRESIGN_SECONDS: int = Field(
        default=300, ge=1, le=604800, description="Lifetime of a presigned content URL."
    )
    SIGNED_URL_TTL_SECONDS: int = Field(
        default=3600,
        ge=60,
        le=604800,
        description="Lifetime of the signed content_url and events_url (API keys on).",
    )
    DOWNLOAD_ALLOWED_HOSTS: str = Field(default="*.hiapi.ai")
    MAX_VIDEO_BYTES: int = Field(default=512 * 1024 * 1024, gt=0)
    DOWNLOAD_LEASE_SECONDS: float = Field(default=60.0, gt=0)
    DOWNLOAD_CONCURRENCY: int = Field(default=4, ge=0)
    DOWNLOAD_MAX_RETRY_SECONDS: float = Field(
        default=86400.0,
        gt=0,
        description="A clip is retried until min(expires_at, task finished + this), then expired.",
    )
    RECONCILE_AFTER_SECONDS: float = Field(default=600.0, ge=0)
    RECONCILE_INTERVAL_SECONDS: float = Field(default=30.0, gt=0)
    TASK_TIMEOUT_SECONDS: float = Field(
        default=86400.0, gt=0, description="A task still running this long after submit fails."
    )
    RECONCILE_BATCH_SIZE: int = Field(default=100, ge=1)
    RETRY_BASE_SECONDS: float = Field(default=5.0, gt=0)
    RETRY_MAX_SECONDS: float = Field(default=300.0, gt=0)
    SHUTDOWN_GRACE_SECONDS: float = Field(default=10.0, ge=0)
    LOG_LEVEL: str = Field(default="INFO")
    LOG_FORMAT: Literal["text", "json"] = Field(
        default="text", description="`text` (readable lines) or `json` (one object per line)."
    )
    API_KEYS: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated `name:key` pairs (or bare keys); empty = open API.",
    )
    API_KEYS_FILE: Path | None = Field(
        default=None, description="File with one `name key` (or `name:key`) per line."
    )
    DAILY_VIDEO_SECONDS_LIMIT: int = Field(
        default=0, ge=0, description="Video-seconds per API key per UTC day; 0 = no limit."
    )
    DAILY_VIDEO_SECONDS_PER_SUBJECT: int = Field(
        default=0,
        ge=0,
        description="Video-seconds per client-token subject per API key per UTC day; 0 = none.",
    )
    CLIENT_TOKEN_SECRET: SecretStr | None = Field(
        default=None,
        description="Signs client tokens; comma-separated, the first signs, any verifies.",
    )
    NOTIFY_SECRET: SecretStr | None = Field(
        default=None,
        description="Signs notify_url deliveries (Standard Webhooks); `whsec_<base64>` or text.",
    )
    NOTIFY_MAX_ATTEMPTS: int = Field(default=12, ge=1)
    NOTIFY_ALLOW_LOCAL: bool = Field(
        default=False, description="Allow http:// and private addresses in notify_url (dev)."
    )
    IMAGE_MAX_BYTES: int = Field(default=20 * 1024 * 1024, gt=0)
    MAX_JSON_BODY_BYTES: int = Field(
        default=64 * 1024,
        gt=0,
        description="Largest JSON request body on /v1/*, capped while read.",
    )
    IMAGE_RETENTION_SECONDS: float = Field(default=7 * 86400.0, ge=0)
    VIDEO_RETENTION_SECONDS: float = Field(
        default=0.0,
        ge=0,
        description="Delete ready and failed videos (clip, poster, row made a tombstone) this "
        "long after they were created; 0 keeps them forever.",
    )
    EVENTS_POLL_SECONDS: float = Field(default=0.5, gt=0)
    EVENTS_MAX_STREAMS: int = Field(
        default=20, ge=1, description="Open event streams per caller (API key) per process."
    )
    EVENTS_MAX_STREAM_SECONDS: float = Field(
        default=3600.0, gt=0, description="An event stream ends after this; clients reconnect."
    )
    EVENTS_HEARTBEAT_SECONDS: float = Field(
        default=15.0, gt=0, description="An open event stream sends a comment this often."
    )
    METRICS_TOKEN: SecretStr | None = Field(
        default=None, description="Bearer token /metrics requires; unset = open (see METRICS_PORT)."
    )
    METRICS_PORT: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Serve /metrics on this second port only (not on the public one).",
    )
    METRICS_CACHE_SECONDS: float = Field(
        default=5.0, ge=0, description="How long /metrics reuses its database gauges."
    )
    CORS_ORIGINS: str = Field(default="", description="Comma-separated origins, or `*`.")
    CONTENT_ACCEL_REDIRECT: str | None = Field(
        default=None,
        description="nginx `internal` location (`/_clips/`) that serves local clips; unset = "
        "the service streams them.",
    )
    ROOT_PATH: str = Field(
        default="", description="Path prefix the proxy serves this service under (`/relay`)."
    )

    @field_validator(
        "STORAGE_URL",
        "S3_ENDPOINT_URL",
        "METRICS_TOKEN",
        "METRICS_PORT",
        "CLIENT_TOKEN_SECRET",
        "CONTENT_ACCEL_REDIRECT",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.WEBHOOK_SECRET is not None and len(self.WEBHOOK_SECRET.get_secret_value()) < 16:
            raise ConfigError("WEBHOOK_SECRET must be at least 16 characters long")
        if self.CLIENT_TOKEN_SECRET is not None:
            try:
                ClientTokens.parse_secrets(self.CLIENT_TOKEN_SECRET.get_secret_value())
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not self.PUBLIC_BASE_URL.startswith(("http://", "https://")):
            raise ConfigError("PUBLIC_BASE_URL must start with http:// or https://")
        try:
            location = self.storage_location
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if location.scheme == "s3" and importlib.util.find_spec("aioboto3") is None:
            raise ConfigError(
                "STORAGE_URL is s3://... but aioboto3 is not installed; "
                "install the s3 extra: pip install 'videorelay[s3]'"
            )
        accel = self.CONTENT_ACCEL_REDIRECT
        if accel is not None and not _ACCEL_PREFIX.fullmatch(accel):
            raise ConfigError(
                "CONTENT_ACCEL_REDIRECT must be the nginx location that serves the clips "
                "folder: a path that starts and ends with /, in letters, digits and -._~/, "
                "no . or .. segment (for example /_clips/)"
            )
        if self.ROOT_PATH and not _ROOT_PATH.fullmatch(self.ROOT_PATH):
            raise ConfigError(
                "ROOT_PATH must be empty or a path that starts with / and does not end with "
                "one, in letters, digits and -._~/, no . or .. segment (for example /relay)"
            )
        if self.S3_ENDPOINT_URL is not None and not self.S3_ENDPOINT_URL.startswith(
            ("http://", "https://")
        ):
            raise ConfigError("S3_ENDPOINT_URL must start with http:// or https://")
        return self

    @property
    def client_tokens(self) -> ClientTokens | None:
        """The signer of client tokens, or None when ``CLIENT_TOKEN_SECRET`` is unset."""
        if self.CLIENT_TOKEN_SECRET is None:
            return None
        found = ClientTokens.parse_secrets(self.CLIENT_TOKEN_SECRET.get_secret_value())
        return ClientTokens(found) if found else None

    def require_production_secrets(self) -> None:
        """``serve`` without ``--simulate`` talks to the real, paid hiapi: refuse to guess."""
        missing = []
        if self.HIAPI_KEY is None or not self.HIAPI_KEY.get_secret_value():
            missing.append("HIAPI_KEY (the hiapi API key used to create tasks)")
        if self.WEBHOOK_SECRET is None:
            missing.append(
                "WEBHOOK_SECRET (signs callback URLs; must be the same on every replica "
                "and stable across restarts, or hiapi's callbacks will be refused)"
            )
        if missing:
            raise ConfigError(
                "refusing to start against the real hiapi without: "
                + "; ".join(missing)
                + ". Set them in the environment or .env, or run `videorelay serve --simulate`."
            )

    def require_reachable_callbacks(self) -> None:
        """hiapi on the internet must be able to post callbacks to ``PUBLIC_BASE_URL``.

        Decided from the two URLs alone (no name is resolved): an upstream whose host is a
        name or a public IP is the real hiapi (or something on the internet like it); then
        the callback address must be https on a host that is not loopback, private, or a
        local-only name. A local simulator as upstream (a loopback or private IP, or
        ``localhost``) may call back to any address.
        """
        upstream = self._url_host(self.HIAPI_BASE_URL)
        if upstream is not None and self._local_only_host(upstream, names=False):
            return
        public = self.PUBLIC_BASE_URL.strip()
        host = self._url_host(public)
        problems = []
        if not public.lower().startswith("https://"):
            problems.append("it is not https")
        if host is None:
            problems.append("it has no host")
        elif self._local_only_host(host, names=True):
            problems.append(f"its host {host} is {self._describe_local(host)}")
        if problems:
            raise ConfigError(
                f"PUBLIC_BASE_URL is not an address hiapi can reach ({'; '.join(problems)}): "
                "hiapi posts every callback there, so each one would be lost until the "
                "reconciler polls. Set PUBLIC_BASE_URL to this service's public https address "
                "(for example https://relay.example.com), or point HIAPI_BASE_URL at a local "
                "simulator, or run `videorelay serve --simulate`."
            )

    @staticmethod
    def _url_host(url: str) -> str | None:
        """The URL's host, lower-case, without brackets or a trailing dot; None if unreadable."""
        try:
            host = urlsplit(url.strip()).hostname
        except ValueError:
            return None
        return (host.rstrip(".") or None) if host else None

    @staticmethod
    def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The IP literal ``host`` is, in any spelling (2130706433, 0177.0.0.1, 0x7f.1: no
        lookup), or None for a name."""
        try:
            return ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            try:
                return ipaddress.IPv4Address(socket.inet_aton(host))
            except OSError:
                return None

    @classmethod
    def _local_only_host(cls, host: str, *, names: bool) -> bool:
        """True for ``localhost`` and non-public IP literals; with ``names``, also for names
        the internet cannot resolve (no dot, ``.local``, ``.internal``, ``.home.arpa``)."""
        if host == "localhost" or host.endswith(".localhost"):
            return True
        ip = cls._ip(host)
        if ip is not None:  # the one classification the downloader and notifier use too
            return not is_public_address(str(ip))
        return names and ("." not in host or host.endswith(_LOCAL_SUFFIXES))

    @classmethod
    def _describe_local(cls, host: str) -> str:
        ip = cls._ip(host)
        if host == "localhost" or host.endswith(".localhost") or (ip and ip.is_loopback):
            return "a loopback address"
        if ip is None:
            return "a name only a local network can resolve"
        if ip.is_private:
            return "a private address"
        return "not a public address"

    @property
    def storage_location(self) -> StorageLocation:
        if self.STORAGE_URL is None:
            return StorageLocation(scheme="file", path=self.STORAGE_DIR)
        return parse_storage_url(self.STORAGE_URL)

    @property
    def public_base(self) -> str:
        return self.PUBLIC_BASE_URL.rstrip("/")
