"""Engine and session factories, the aware-UTC column type, and the SQL that differs by
dialect: the dialect's ``INSERT`` (for ``ON CONFLICT``), the due-row claim (``SKIP LOCKED``
matters on Postgres only) and many rows as one statement's ``FROM`` source (``BulkStatement``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import DateTime, TextualSelect, and_, bindparam, event, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    AsyncSessionTransaction,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = [
    "BulkStatement",
    "UTCDateTime",
    "claim_due_rows",
    "create_engine",
    "create_sessionmaker",
    "dialect_insert",
    "is_sqlite",
    "lock_first",
    "utc_now",
]


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC on every dialect (SQLite drops the zone)."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, *, timeout: float = 10.0, **kwargs: Any) -> AsyncEngine:
    """One engine per process. ``timeout`` bounds how long a request waits for the database
    (SQLite lock wait; Postgres connect and statement time) before it fails with a 503."""
    if is_sqlite(url):
        _ensure_sqlite_dir(url)
        engine = create_async_engine(url, connect_args={"timeout": timeout}, **kwargs)

        def pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the one writer; busy_timeout waits, then fails.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        event.listen(engine.sync_engine, "connect", pragmas)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_timeout", timeout)
    kwargs.setdefault(
        "connect_args",
        # UTC sessions: naive timestamps then mean the same thing on every server.
        {"timeout": timeout, "command_timeout": timeout, "server_settings": {"timezone": "UTC"}},
    )
    return create_async_engine(url, **kwargs)


def _ensure_sqlite_dir(url: str) -> None:
    from pathlib import Path

    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def create_sessionmaker(
    engine: AsyncEngine, *, timeout: float = 10.0
) -> async_sessionmaker[AsyncSession]:
    """``timeout``: on SQLite, how long a transaction waits for its turn (``_WriteTurns``)
    before it fails as the database being unavailable; pass the engine's ``timeout``."""
    if is_sqlite(str(engine.url)):
        # One class per engine: its sessions share that engine's turns.
        turns = _WriteTurns(timeout)
        session_class = type("SqliteSession", (_SqliteSession,), {"turns": turns})
        return async_sessionmaker(engine, class_=session_class, expire_on_commit=False)
    return async_sessionmaker(engine, expire_on_commit=False)


class _WriteTurns:
    """SQLite allows one writer at a time; the others wait in SQLite's busy handler, which
    polls the lock with growing sleeps, so under contention a commit could go on sleeping long
    after the lock was free. Transactions of one process instead take turns here, first come
    first served, and find the lock free when their turn comes.

    A task that already has the turn (a transaction opened inside another) goes on without
    waiting for itself. Other processes on the same file still meet in the busy handler. A
    turn that does not come within ``timeout`` (the database is held by someone else, say)
    raises ``TimeoutError``, which the API answers as 503 ``database_unavailable``: queued
    transactions fail after the same wait as SQLite's own, not one after another.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task[Any] | None = None
        self._depth = 0

    async def take(self) -> None:
        task = asyncio.current_task()
        if task is not None and task is self._holder:
            self._depth += 1
            return
        try:
            await asyncio.wait_for(self._lock.acquire(), self._timeout)
        except TimeoutError:
            raise TimeoutError(f"no turn to write to SQLite within {self._timeout:g} s") from None
        self._holder, self._depth = task, 1

    def give_back(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._holder = None
            self._lock.release()


class _TurnTransaction(AsyncSessionTransaction):
    __slots__ = ("turns",)

    def __init__(self, session: AsyncSession, turns: _WriteTurns) -> None:
        super().__init__(session)
        self.turns = turns

    async def __aenter__(self) -> AsyncSessionTransaction:
        await self.turns.take()
        try:
            return await super().__aenter__()
        except BaseException:
            self.turns.give_back()
            raise

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        try:
            await super().__aexit__(type_, value, traceback)
        finally:
            self.turns.give_back()


class _SqliteSession(AsyncSession):
    """``begin()`` transactions take turns (``_WriteTurns``); reads outside one do not."""

    turns: _WriteTurns

    def begin(self) -> AsyncSessionTransaction:
        return _TurnTransaction(self, self.turns)


# --- SQL that differs by dialect ---------------------------------------------------------


def dialect_insert(session: AsyncSession) -> Any:
    """The session's dialect's ``insert``: the one with ``on_conflict_do_nothing/_do_update``."""
    name = session.get_bind().dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


_Claimed = TypeVar("_Claimed")


async def claim_due_rows(
    session: AsyncSession,
    model: type[_Claimed],
    *,
    status: str,
    now: datetime,
    hold: timedelta,
    owner: str,
    limit: int,
    where: Any = None,
    **values: Any,
) -> list[_Claimed]:
    """The one claim statement, for any mapped table with ``id``, ``status``, ``due_at`` and
    ``lease_owner`` (videos and notifications); ``where`` narrows the rows further.

    The rows are locked first (``lock_first``), skipping rows another replica has locked
    (Postgres); the UPDATE pushes ``due_at`` forward so nobody else picks them up until
    ``hold`` passes. SQLite serializes writers, so the same is safe there without SKIP LOCKED.
    """
    table: Any = model  # a mapped class with the four columns above
    due_now = and_(table.status == status, table.due_at <= now)
    if where is not None:
        due_now = and_(due_now, where)
    ids = await lock_first(session, table, due_now, order_by=table.due_at, limit=limit)
    if not ids:
        return []
    stmt = (
        update(table)
        .where(table.id.in_(ids), due_now)
        .values(due_at=now + hold, lease_owner=owner, **values)
        .returning(table)
    )
    result = await session.execute(stmt, execution_options={"synchronize_session": False})
    return list(result.scalars().all())


async def lock_first(
    session: AsyncSession, table: Any, where: Any, *, order_by: Any, limit: int
) -> list[Any]:
    """The ids of the first ``limit`` rows of ``table`` matching ``where``, locked for this
    transaction, skipping rows another transaction holds (Postgres; SQLite serializes writers).

    A statement of its own, before the UPDATE that uses them: inside the UPDATE, as ``id IN
    (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)``, Postgres may run the subquery again for
    every row it considers and take far more than ``limit`` rows (5 of 5 with a limit of 1).
    """
    stmt = (
        select(table.id)
        .where(where)
        .order_by(order_by)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await session.execute(stmt)).scalars())


_BindProcessor = Callable[[Any], Any] | None


class BulkStatement:
    """One statement over many rows whose SQL text does not change with the number of rows,
    so it is compiled (and on Postgres prepared) once per dialect.

    ``{rows}`` in ``sql`` becomes the rows as a ``FROM`` source named ``alias`` with
    ``columns``: on Postgres one array per column (``unnest``), on SQLite one JSON document
    (``json_each``). Row values are bound as their column's type binds them, so ids and
    timestamps compare equal to the stored ones. ``binds`` types the statement's other named
    parameters, ``returns`` its result columns.
    """

    def __init__(
        self,
        sql: str,
        *,
        alias: str,
        columns: dict[str, TypeEngine[Any]],
        binds: dict[str, TypeEngine[Any]],
        returns: dict[str, TypeEngine[Any]],
    ) -> None:
        self._sql, self._alias, self._columns = sql, alias, columns
        self._binds, self._returns = binds, returns
        self._built: dict[tuple[str, str], tuple[TextualSelect, list[_BindProcessor]]] = {}

    def for_rows(
        self, dialect: Dialect, rows: Iterable[Sequence[Any]], **params: Any
    ) -> tuple[TextualSelect, dict[str, Any]]:
        """The statement for ``dialect`` and its parameters: ``rows`` (at least one, each a
        value per column) and ``params``."""
        stmt, processors = self._build(dialect)
        if dialect.name == "postgresql":
            columns = zip(self._columns, processors, zip(*rows, strict=True), strict=True)
            for name, process, values in columns:
                params[name] = list(values) if process is None else [process(v) for v in values]
        else:
            bound = [
                [
                    v if process is None else process(v)
                    for process, v in zip(processors, row, strict=True)
                ]
                for row in rows
            ]
            params["rows"] = json.dumps(bound)
        return stmt, params

    def _build(self, dialect: Dialect) -> tuple[TextualSelect, list[_BindProcessor]]:
        key = (dialect.name, dialect.driver)
        built = self._built.get(key)
        if built is None:
            if dialect.name == "postgresql":
                names = ", ".join(self._columns)
                arrays = ", ".join(
                    f"CAST(:{name} AS {type_.compile(dialect=dialect)}[])"
                    for name, type_ in self._columns.items()
                )
                rows = f"unnest({arrays}) AS {self._alias}({names})"
            else:
                fields = ", ".join(
                    f"json_extract(value, '$[{i}]') AS {name}"
                    for i, name in enumerate(self._columns)
                )
                rows = f"(SELECT {fields} FROM json_each(:rows)) AS {self._alias}"
            stmt = (
                text(self._sql.replace("{rows}", rows))
                .bindparams(*(bindparam(name, type_=type_) for name, type_ in self._binds.items()))
                .columns(**self._returns)
            )
            processors: list[_BindProcessor] = [
                type_.dialect_impl(dialect).bind_processor(dialect)
                for type_ in self._columns.values()
            ]
            built = self._built[key] = (stmt, processors)
        return built
