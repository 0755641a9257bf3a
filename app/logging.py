"""Log configuration and per-video context.

``bind(video_id=..., task_id=...)`` sets context variables that a filter copies onto every
record, so each line about a video carries its ids without formatting them into messages.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
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
        fields = {**ctx, **extra}
        record.ctx = "".join(f" {k}={v}" for k, v in fields.items())
        return True


_WEBHOOK_TOKEN = re.compile(r"(/webhooks/hiapi/[^/\s]+/)[^\s\"?]+")


def redact(text: str) -> str:
    """Webhook URLs carry a credential in their last segment; never let it reach a log."""
    return _WEBHOOK_TOKEN.sub(r"\1***", text)


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RedactFilter())
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s%(ctx)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_videorelay", False):
            root.removeHandler(old)
    handler._videorelay = True  # type: ignore[attr-defined]  # marks our handler for reconfigure
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
