"""Errors raised by the hiapi client.

HiapiError
├── HiapiRejected     4xx except 429: hiapi said no. Never retried; has hiapi's code.
└── HiapiUnavailable  connect error, 429, 500, 503: no task was created; retry.
    └── HiapiTimeout  no answer, or 502/504 from a gateway: a task *may* exist upstream.
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
