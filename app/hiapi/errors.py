"""Errors raised by the hiapi client.

HiapiError
├── HiapiRejected      400/401/403/404: hiapi said no. Never retried; carries hiapi's code/message.
└── HiapiUnavailable   connect error, 5xx, 429, bad body: nothing was created; retry with backoff.
    └── HiapiTimeout   the request may have reached hiapi: a task *may* exist upstream.
"""

from __future__ import annotations

__all__ = ["HiapiError", "HiapiRejected", "HiapiTimeout", "HiapiUnavailable"]


class HiapiError(Exception):
    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class HiapiRejected(HiapiError):
    """hiapi refused the request (validation, auth, unknown task). Retrying won't help."""

    def __init__(self, code: str, message: str, *, status_code: int) -> None:
        super().__init__(message, status_code=status_code)
        self.code = code


class HiapiUnavailable(HiapiError):
    """hiapi could not be reached or answered 5xx/429: no task was created."""


class HiapiTimeout(HiapiUnavailable):
    """The request was sent but no answer came in time: the outcome upstream is unknown."""
