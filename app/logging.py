"""Log configuration and per-video context.

``bind(video_id=..., task_id=...)`` sets context variables that a filter copies onto every
record, so each line about a video carries its ids without formatting them into messages.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["bind", "configure_logging", "redact"]

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("log_context", default={})  # noqa: B039


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        extra = {k: getattr(record, k) for k in ("video_id", "task_id") if hasattr(record, k)}
        fields = {**ctx, **{k: str(v) for k, v in extra.items()}}
        record.fields = fields
        record.ctx = "".join(f" {k}={v}" for k, v in fields.items())
        return True


_WEBHOOK_TOKEN = re.compile(r"(/webhooks/hiapi/[^/\s]+/)[^\s\"?]+")
_URL_SIGNATURE = re.compile(r"([?&]sig=)[^&\s\"'#]+")
# A client token (a JWT: three base64url parts, the first a JSON object), wherever it appears:
# a header echoed into a message, a URL's query.
_CLIENT_TOKEN = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


def redact(text: str) -> str:
    """Webhook URLs carry a credential in their last segment, signed URLs in their ``sig``
    parameter (access log lines print the query), client tokens are credentials whole, as is
    whatever follows ``Bearer``: never let one reach a log."""
    text = _URL_SIGNATURE.sub(r"\1***", _WEBHOOK_TOKEN.sub(r"\1***", text))
    text = _CLIENT_TOKEN.sub("***", text)
    return _BEARER.sub(r"\1***", text)


class _RedactFilter(logging.Filter):
    """Redacts the finished message, so a token is caught wherever it was interpolated."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # let the handler report the broken call as usual
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, and the bound ids."""

    converter = time.gmtime  # type: ignore[assignment]  # typeshed types gmtime too narrowly

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """``fmt`` is ``text`` (readable lines) or ``json`` (for log shippers), from LOG_FORMAT."""
    handler = logging.StreamHandler()
    handler.addFilter(_RedactFilter())
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s%(ctx)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_videorelay", False):
            root.removeHandler(old)
    handler._videorelay = True  # type: ignore[attr-defined]  # marks our handler for reconfigure
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # botocore's DEBUG lines carry signed request headers (the access key id, the signature).
    for name in ("botocore", "aiobotocore", "aioboto3"):
        logging.getLogger(name).setLevel(logging.WARNING)
