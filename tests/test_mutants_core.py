"""Tests that kill mutants ``make mutate`` found surviving in ``app/security.py`` and
``app/group_commit.py`` (docs/mutants.md). Pure functions are tested directly; group commit
runs against a real migrated SQLite database.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import create_engine, create_sessionmaker
from app.group_commit import GroupCommit
from app.metrics import METRICS
from app.security import callback_url, token_matches, webhook_token

SECRET = b"test-secret"
VIDEO = uuid.UUID(int=1)
# Callback URLs handed to hiapi before a deploy must still match after it, on every replica:
# the token's derivation is fixed (HMAC-SHA256 of "hiapi-callback:" + the id's 16 bytes).
KNOWN_TOKEN = "15fdb77274e19a3c9eb95d9d494e2af4dd5e3fcb"


def test_the_token_of_a_known_video_never_changes():
    assert webhook_token(SECRET, VIDEO) == KNOWN_TOKEN
    assert callback_url("http://127.0.0.1:8000", SECRET, VIDEO) == (
        f"http://127.0.0.1:8000/webhooks/hiapi/{VIDEO}/{KNOWN_TOKEN}"
    )


def test_a_token_that_is_not_ascii_is_refused_not_an_error():
    assert token_matches(SECRET, VIDEO, KNOWN_TOKEN) is True
    assert token_matches(SECRET, VIDEO, "é" * 40) is False
    assert token_matches(SECRET, VIDEO, KNOWN_TOKEN[:-1] + "é") is False


# --- group commit ------------------------------------------------------------------------
# A real SQLite database with one table; every wait has a deadline, so a caller left waiting
# forever fails in seconds instead of hanging the run.

DEADLINE = 5.0


class Table:
    """``apply`` for GroupCommit: inserts each item as a primary key, records every batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.fail_with: Exception | None = None

    async def apply(self, session: AsyncSession, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        if self.fail_with is not None:
            raise self.fail_with
        for item in items:
            await session.execute(text("INSERT INTO t (k) VALUES (:k)"), {"k": item.split("#")[0]})
        return [f"ok:{item}" for item in items]


@pytest.fixture
async def sm(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'gc.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY)"))
    yield create_sessionmaker(engine)
    await engine.dispose()


async def stored(sm: async_sessionmaker[AsyncSession]) -> list[str]:
    async with sm() as session:
        return list((await session.execute(text("SELECT k FROM t ORDER BY k"))).scalars())


async def submit_all(committer: GroupCommit[str, str], items: list[str]) -> list[Any]:
    return await asyncio.wait_for(
        asyncio.gather(*(committer.submit(i) for i in items), return_exceptions=True), DEADLINE
    )


async def test_batches_are_capped_sorted_by_key_and_answered_per_caller(sm):
    table = Table()
    committer = GroupCommit(sm, table.apply, key=lambda i: i, max_batch=2, name="mut-cap")
    before = METRICS.group_commit_size.labels("mut-cap")._sum.get()
    results = await submit_all(committer, ["e", "c", "d", "a", "b"])
    assert results == ["ok:e", "ok:c", "ok:d", "ok:a", "ok:b"]
    # Arrival order split into batches of two, each sorted by key.
    assert table.batches == [["c", "e"], ["a", "d"], ["b"]]
    assert await stored(sm) == ["a", "b", "c", "d", "e"]
    assert METRICS.group_commit_size.labels("mut-cap")._sum.get() - before == 5


async def test_default_batch_holds_128(sm):
    table = Table()
    committer = GroupCommit(sm, table.apply, key=lambda i: i)
    await submit_all(committer, [f"{n:03}" for n in range(130)])
    assert [len(b) for b in table.batches] == [128, 2]


async def test_a_conflict_is_retried_one_by_one_and_fails_alone(sm, caplog):
    table = Table()
    committer = GroupCommit(sm, table.apply, key=lambda i: i, name="mut-conflict")
    with caplog.at_level(logging.WARNING, logger="app.group_commit"):
        results = await submit_all(committer, ["a", "a#again"])
    assert results[0] == "ok:a"
    assert isinstance(results[1], IntegrityError)
    assert table.batches == [["a", "a#again"], ["a"], ["a#again"]]
    assert await stored(sm) == ["a"]
    # Two items are a batch: its conflict is logged.
    assert [r.getMessage() for r in caplog.records if r.name == "app.group_commit"] == [
        "group_commit.conflict size=2; retrying one by one"
    ]
    # The others in a batch are written: three items, one conflicting.
    more = await submit_all(committer, ["c", "b", "c#again"])
    assert more[:2] == ["ok:c", "ok:b"] and isinstance(more[2], IntegrityError)
    assert await stored(sm) == ["a", "b", "c"]


async def test_a_lone_conflict_is_not_logged_as_a_batch_conflict(sm, caplog):
    table = Table()
    committer = GroupCommit(sm, table.apply, key=lambda i: i)
    assert await submit_all(committer, ["a"]) == ["ok:a"]
    with caplog.at_level(logging.WARNING, logger="app.group_commit"):
        [result] = await submit_all(committer, ["a"])
    assert isinstance(result, IntegrityError)
    assert not [r for r in caplog.records if r.name == "app.group_commit"]


async def test_any_other_error_reaches_every_caller_without_retries(sm):
    table = Table()
    table.fail_with = RuntimeError("database is down")
    committer = GroupCommit(sm, table.apply, key=lambda i: i)
    results = await submit_all(committer, ["b", "a"])
    assert [str(r) for r in results] == ["database is down", "database is down"]
    assert table.batches == [["a", "b"]]
    # The committer keeps working once the database is back.
    table.fail_with = None
    assert await submit_all(committer, ["c"]) == ["ok:c"]


async def test_a_caller_that_goes_away_does_not_cancel_its_write_and_drain_waits(sm):
    table = Table()
    committer = GroupCommit(sm, table.apply, key=lambda i: i, name="mut-drain")
    caller = asyncio.create_task(committer.submit("a"))
    await asyncio.sleep(0)  # submitted: the writer is scheduled
    assert "group-commit-mut-drain" in {t.get_name() for t in asyncio.all_tasks()}
    caller.cancel()
    later = asyncio.create_task(committer.submit("b"))
    await asyncio.wait_for(committer.drain(), DEADLINE)
    assert later.done() and later.result() == "ok:b"
    assert caller.cancelled()
    assert await stored(sm) == ["a", "b"]
