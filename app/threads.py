"""Worker threads for bulk work (hashing and writing clips), and worker processes for work that
holds the GIL (checking a clip with PyAV and Pillow).

A download's CPU goes mostly to sha256 and to copying bytes into the page cache, in worker
threads. With threads of their own, many downloads at once would outnumber the cores several
times over, and the thread running the event loop (webhook acks, API reads) would get only a
thin slice of the CPU. Bulk work shares this pool of as many threads as there are cores
instead; downloads queue for it, the event loop does not.

Checking a clip (``app.media``) decodes frames, converts one to RGB and encodes a JPEG; parts of
that (Pillow's JPEG encoder, PyAV's frame conversion) hold the GIL for tens of milliseconds at
1080p, which a thread would take from the event loop (the bench measured a 5 ms timer woken
up to half a second late with four checks in threads). ``run_isolated`` runs such work in a
pool of worker processes instead, one per core, started by a fork server that has imported
``app.media`` already, so a check costs the loop nothing but the CPU the machine shares. A
worker that dies (a decoder crash on a hostile file, the OOM killer) breaks only that call:
``WorkerDied`` is raised and the next call gets a fresh pool.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import ParamSpec, TypeVar

__all__ = ["WorkerDied", "run_bulk", "run_isolated"]

P = ParamSpec("P")
T = TypeVar("T")

# At least two, so one download can hash one chunk while writing another.
_BULK = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="bulk")


async def run_bulk(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``asyncio.to_thread`` for bulk work, on the shared bulk threads."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_BULK, functools.partial(func, *args, **kwargs))


class WorkerDied(Exception):
    """The worker process running a call died before it answered."""


_WORKERS = max(1, os.cpu_count() or 1)
_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _isolated_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["app.media"])
            _pool = ProcessPoolExecutor(max_workers=_WORKERS, mp_context=context)
        return _pool


def _discard_pool(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


async def run_isolated(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``func`` (a module-level function; arguments and result are pickled) in a worker
    process, off the GIL of the event loop. ``WorkerDied`` if the process died meanwhile."""
    loop = asyncio.get_running_loop()
    pool = _isolated_pool()
    try:
        return await loop.run_in_executor(pool, functools.partial(func, *args, **kwargs))
    except BrokenProcessPool as exc:
        _discard_pool(pool)
        raise WorkerDied(f"the worker process died: {exc}") from None
