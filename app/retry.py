"""Backoff with jitter, shared by submits, polls and downloads."""

from __future__ import annotations

import random

__all__ = ["backoff_seconds"]


def backoff_seconds(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with "equal jitter": between half and all of ``base * 2**attempt``.

    The jitter spreads retries from many videos (and replicas) so that an outage that ends
    does not meet a synchronized storm of requests.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    r = rng or random
    jitter: float = r.uniform(0, ceiling / 2)
    return ceiling / 2 + jitter
