"""Worker threads for bulk work: hashing and writing clips.

A download's CPU goes mostly to sha256 and to copying bytes into the page cache, in worker
threads. With threads of their own, many downloads at once would outnumber the cores several
times over, and the thread running the event loop (webhook acks, API reads) would get only a
thin slice of the CPU. Bulk work shares this pool of as many threads as there are cores
instead; downloads queue for it, the event loop does not.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["run_bulk"]

P = ParamSpec("P")
T = TypeVar("T")

# At least two, so one download can hash one chunk while writing another.
_BULK = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="bulk")


async def run_bulk(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``asyncio.to_thread`` for bulk work, on the shared bulk threads."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_BULK, functools.partial(func, *args, **kwargs))
