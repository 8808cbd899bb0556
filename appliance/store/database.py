"""Opening the SQLite index: pragmas, migrations, and the writer's group commit.

Durability contract: every write goes through `Writer.submit`, which runs in
`BEGIN IMMEDIATE ... COMMIT` on the one writer connection, in WAL mode with
`synchronous=FULL`. When `submit` returns, the WAL frame holding the change
has been fsynced: the row survives a power loss. Operations that arrive
within `commit_window_ms` of each other share one transaction and one fsync
(group commit); each runs inside its own SAVEPOINT so one failing operation
does not undo its neighbours.

Two processes (the appliance and the sync agent) share the file, so the
connections set a busy timeout instead of failing on a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from appliance.errors import IndexUnavailable, OutOfSpace

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[aiosqlite.Connection], Awaitable[Any]]

BUSY_TIMEOUT_MS = 30_000
MAX_BATCH = 256


async def connect(path: Path, *, readonly: bool = False) -> aiosqlite.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
    conn.row_factory = aiosqlite.Row
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")
    return conn


def migration_scripts() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every packaged migration, in order."""
    folder = resources.files("appliance.store") / "migrations"
    scripts = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            scripts.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(scripts)


async def migrate(conn: aiosqlite.Connection) -> int:
    """Apply pending migrations, each in its own transaction; return the schema version."""
    await conn.execute("BEGIN IMMEDIATE")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    await conn.execute("COMMIT")
    async with conn.execute("SELECT version FROM schema_migrations") as cur:
        applied = {int(r[0]) for r in await cur.fetchall()}
    current = max(applied, default=0)
    for version, name, sql in migration_scripts():
        if version in applied:
            continue
        await conn.execute("BEGIN IMMEDIATE")
        try:
            async with conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
            ) as cur:
                already = await cur.fetchone()
            if not already:  # another process may have migrated meanwhile
                for statement in _statements(sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        log.info("index migrated version=%d name=%s", version, name)
        current = max(current, version)
    return current


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def map_sqlite_error(exc: BaseException) -> Exception:
    """SQLite's disk-full becomes OutOfSpace; other failures IndexUnavailable."""
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        text = str(exc).lower()
        if "full" in text or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return OutOfSpace("no space left for the index")
        return IndexUnavailable(f"index write failed: {exc}",
                                hint="check the data home's disk and permissions")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


class Writer:
    """The single writer of one process, batching operations into group commits."""

    def __init__(self, conn: aiosqlite.Connection, *, window_ms: float) -> None:
        self._conn = conn
        self._window = window_ms / 1000.0
        self._queue: asyncio.Queue[tuple[Operation, asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="index-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, operation: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `operation` in a committed transaction; return its result once durable."""
        if self._task is None:
            raise IndexUnavailable("index writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put((operation, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._window > 0:
                deadline = asyncio.get_running_loop().time() + self._window
                while len(batch) < MAX_BATCH:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[Operation, asyncio.Future[Any]]]) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        conn = self._conn
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for operation, future in batch:
                await conn.execute("SAVEPOINT op")
                try:
                    result = await operation(conn)
                except Exception as exc:
                    await conn.execute("ROLLBACK TO op")
                    await conn.execute("RELEASE op")
                    outcomes.append((future, None, map_sqlite_error(exc)))
                else:
                    await conn.execute("RELEASE op")
                    outcomes.append((future, result, None))
            await conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            error = map_sqlite_error(exc)
            log.error("index commit failed batch=%d error=%s", len(batch), type(error).__name__)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for future, result, error in outcomes:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
