"""Group commit: many small write transactions that arrive together share one.

The webhook's work per callback is one or two short statements; what costs is everything
around them: a pooled connection, BEGIN, COMMIT (and on SQLite, writers queueing for the one
write lock, each waiting in SQLite's busy handler). Here callbacks that arrive while a batch
is being written wait for the next batch, and each batch is one transaction. Nobody waits on
a timer: a lone callback is written at once, and under load batches grow by themselves.

A caller's result is only handed back after its batch has committed, so an ack always
means "durably recorded". If the batch fails:

* on an integrity error (one item conflicts), every item is retried in a transaction of its
  own, so one bad item cannot fail the others;
* on anything else (database unreachable, lock timeout), every caller gets the error (the
  webhook answers 503 and hiapi retries), without retrying item by item against a database
  that is down.

Items are handed to ``apply`` sorted by ``key`` (stable, so copies of one callback keep their
arrival order and the first one wins). Statements run per item then lock rows in that order;
a bulk ``UPDATE … FROM`` locks them in the order of its plan, so two replicas writing
batches that share rows at the same moment can still deadlock on Postgres: one batch is
aborted, its callers get 503, and hiapi retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.metrics import METRICS

__all__ = ["GroupCommit"]

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        apply: Callable[[AsyncSession, list[Item]], Awaitable[list[Result]]],
        *,
        key: Callable[[Item], str],
        max_batch: int = 128,
        name: str = "batch",
    ) -> None:
        self._sm = sessionmaker
        self._apply = apply
        self._key = key
        self._max_batch = max_batch
        self._name = name
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """Apply ``item`` in the next batch; return its result once that batch committed."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name=f"group-commit-{self._name}")
        # A caller that goes away (client disconnect) does not cancel the batch it is in.
        return await asyncio.shield(future)

    async def drain(self) -> None:
        """Wait until everything submitted so far is written (used at shutdown)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write_all(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            batch.sort(key=lambda entry: self._key(entry[0]))
            METRICS.group_commit_size.labels(self._name).observe(len(batch))
            try:
                results = await self._transaction([item for item, _ in batch])
            except IntegrityError:
                if len(batch) > 1:
                    log.warning("group_commit.conflict size=%d; retrying one by one", len(batch))
                await self._one_by_one(batch)
                continue
            except asyncio.CancelledError:
                for _, future in batch + self._pending:
                    future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                for _, future in batch:
                    _settle(future, exc=exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result=result)

    async def _transaction(self, items: list[Item]) -> list[Result]:
        async with self._sm() as session, session.begin():
            return await self._apply(session, items)

    async def _one_by_one(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        for item, future in batch:
            try:
                (result,) = await self._transaction([item])
            except Exception as exc:
                _settle(future, exc=exc)
            else:
                _settle(future, result=result)


def _settle(
    future: asyncio.Future[Result],
    *,
    result: Result | None = None,
    exc: Exception | None = None,
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
