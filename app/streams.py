"""Open event streams per caller in this process (``EVENTS_MAX_STREAMS``).

A stream holds a connection and polls the database for as long as it lives, so each API key
gets a bounded number of them. The count is per process on purpose: it guards this process's
connections, and an open stream is nothing the database needs to know about.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["StreamSlots"]


class StreamSlots:
    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def open_count(self, caller: str) -> int:
        return self._open.get(caller, 0)

    def acquire(self, caller: str, limit: int) -> Callable[[], None] | None:
        """A slot for ``caller``, or None when it already has ``limit`` open.

        The release function it returns gives the slot back once, however often it is called.
        """
        if self._open.get(caller, 0) >= limit:
            return None
        self._open[caller] = self._open.get(caller, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open[caller] - 1
            if left:
                self._open[caller] = left
            else:
                del self._open[caller]

        return release
