"""Opening the SQLite index: pragmas, migrations, and the writer's group commit.

Durability contract: every write goes through `Writer.submit`, which runs in
`BEGIN IMMEDIATE ... COMMIT` on the one writer connection, in WAL mode with
`synchronous=FULL`. When `submit` returns, the WAL frame holding the change
has been fsynced: the row survives a power loss. Operations that arrive
within `commit_window_ms` of each other share one transaction and one fsync
(group commit); each runs inside its own SAVEPOINT so one failing operation
does not undo its neighbours.

Thread hops: every awaited aiosqlite call is a round trip to the connection's
thread and back through the event loop. Hot operations (recording an ingested
instance) are therefore plain functions of the sqlite3 connection, submitted
with `Writer.submit_sync` and run by `run_sync` in aiosqlite's thread: a batch
made only of those is BEGIN, every operation and COMMIT in one hop.

Threads that are not the event loop's (a DIMSE association's) commit with
`Writer.commit_blocking` without a hop through the loop: the threads waiting
to commit form a group; one of them (the leader) runs BEGIN, every waiting
operation and COMMIT on the writer connection while the others wait, and the
ones that arrive meanwhile form the next group (leader/follower group commit:
one WAL fsync acknowledges all of a group). A lock makes these groups and the
loop's batches take turns on the connection, so it still has one transaction
at a time, as if all went through one queue.

Two processes (the appliance and the sync agent) share the file, so the
connections set a busy timeout instead of failing on a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from appliance.base import compat
from appliance.base.errors import IndexUnavailable, OutOfSpace
from appliance.store import person_names
from appliance.store.migration_lock import migration_lock

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[aiosqlite.Connection], Awaitable[Any]]
SyncOperation = Callable[[sqlite3.Connection], Any]

BUSY_TIMEOUT_MS = 30_000
MAX_BATCH = 256


# SQL functions the schema itself calls (triggers, migrations): registered on every
# connection, since a write to patients without them fails. What one returns for a value
# must never change (stored rows hold its results): a new rule is a new name and a
# migration. pacs_fold (0012, case folding) is still called by migration 0012 on an old
# index; so are pacs_fold_pn (0019, person names without padding) by 0019 and 0029.
# pacs_fold_pn_nfc (0033, those names also in Unicode NFC: store/person_names.py) keeps
# the patient's folded name.
SCHEMA_FUNCTIONS = {"pacs_fold": str.casefold, "pacs_fold_pn": person_names.fold_0019,
                    "pacs_fold_pn_nfc": person_names.fold}


async def connect(path: Path, *, readonly: bool = False) -> aiosqlite.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    # Opened once here first: when aiosqlite's own open fails, it queues its thread's stop
    # without awaiting it, and the thread later reports "Event loop is closed" with a
    # traceback after the caller's error; a plain open fails the same way and cleanly.
    sqlite3.connect(uri, uri=True).close()
    # check_same_thread off: the writer's group commits also run in the threads that
    # wait for them (Writer.commit_blocking), one at a time under the Writer's lock.
    conn = await aiosqlite.connect(uri, uri=True, isolation_level=None,
                                   check_same_thread=readonly)
    try:
        conn.row_factory = aiosqlite.Row
        for name, func in SCHEMA_FUNCTIONS.items():
            await conn.create_function(name, 1, func, deterministic=True)
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        await conn.close()  # its thread would otherwise keep the process from exiting
        raise
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


async def migrate(conn: aiosqlite.Connection, path: Path) -> int:
    """Apply pending migrations, each in its own transaction; return the schema version.

    With any pending, under the index's migration lock (migration_lock.py): a process
    that finds another one migrating waits for it, then applies what is left.
    A migration that drops a table (to rebuild it: a UNIQUE constraint cannot be dropped
    otherwise, 0029) runs with foreign keys off and has them all checked before its
    commit, SQLite's recipe for rebuilding a table that others reference; the others
    run with foreign keys on, which SQLite enforces statement by statement. Not one
    check per migration: it reads every row of every table that has a foreign key (1.3 s
    at 3 million instances), and an upgrade over 14 migrations spent most of its time
    there. The pragma is a no-op inside a transaction, so it is set outside."""
    applied = await _applied(conn)
    if all(version in applied for version, _, _ in migration_scripts()):
        return max(applied)
    async with migration_lock(path):
        try:
            return await _migrate(conn)
        finally:
            await conn.execute("PRAGMA foreign_keys = ON")


async def _applied(conn: aiosqlite.Connection) -> set[int]:
    """The versions recorded in schema_migrations (none in a new file)."""
    async with conn.execute("SELECT 1 FROM sqlite_master"
                            " WHERE type = 'table' AND name = 'schema_migrations'") as cur:
        if await cur.fetchone() is None:
            return set()
    async with conn.execute("SELECT version FROM schema_migrations") as cur:
        return {int(r[0]) for r in await cur.fetchall()}


async def _migrate(conn: aiosqlite.Connection) -> int:
    await conn.execute("BEGIN IMMEDIATE")
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    await conn.execute("COMMIT")
    applied = await _applied(conn)  # again, under the lock: another process may have migrated
    current = max(applied, default=0)
    pending = [script for script in migration_scripts() if script[0] not in applied]
    if pending:
        log.info("index migrations to apply count=%d from=%d to=%d",
                 len(pending), current, pending[-1][0])
    for version, name, sql in pending:
        started = time.monotonic()
        statements = _statements(sql)
        rebuilds = any(_DROP_TABLE.match(statement) for statement in statements)
        await conn.execute(f"PRAGMA foreign_keys = {'OFF' if rebuilds else 'ON'}")
        await conn.execute("BEGIN IMMEDIATE")
        try:
            async with conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
            ) as cur:
                # A process of a version from before the migration lock may have applied it.
                already = await cur.fetchone()
            if not already:
                for statement in statements:
                    await conn.execute(statement)
                if rebuilds:
                    async with conn.execute("PRAGMA foreign_key_check") as cur:
                        if await cur.fetchone() is not None:
                            raise sqlite3.IntegrityError(f"migration {name} leaves rows whose"
                                                         " foreign keys point nowhere")
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
            await conn.execute("COMMIT")
        except BaseException:
            # SQLite rolls a transaction back by itself when its COMMIT finds the disk
            # full: a ROLLBACK then fails ("no transaction is active") and its error hid
            # the SQLITE_FULL that says why (serve said "check permissions").
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise
        if not already:
            log.info("index migrated version=%d name=%s seconds=%.1f", version, name,
                     time.monotonic() - started)
        current = max(current, version)
    return current


_DROP_TABLE = re.compile(r"DROP\s+TABLE\b", re.IGNORECASE)


def _statements(sql: str) -> list[str]:
    """The statements of a migration script. A `;` ends one only where SQLite says the
    statement is complete (sqlite3.complete_statement): not inside a trigger's BEGIN ...
    END, a string or a comment."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    statements, pending = [], ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip().removesuffix(";").strip())
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip().removesuffix(";").strip())
    return statements


async def run_sync(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(sqlite3_connection, *args)` in `conn`'s own thread: one hop for many statements
    (aiosqlite has no public call for this: see appliance.base.compat)."""
    return await compat.run_in_connection_thread(conn, fn, *args)


def query_one(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first row of `sql` or None; the statement is reset at once (no read
    transaction left open by an unfinished cursor)."""
    cur = conn.execute(sql, params)
    try:
        return cur.fetchone()
    finally:
        cur.close()


# SQLite's codes for a full disk: SQLITE_FULL where a write finds no room, and
# SQLITE_IOERR_SHMSIZE where the WAL index (-shm) cannot grow or be made (it writes to
# allocate its pages); the latter's message is a bare "disk I/O error".
_NO_SPACE_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE}


def is_no_space(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed for want of disk space."""
    return "full" in str(exc).lower() or getattr(exc, "sqlite_errorcode", None) in _NO_SPACE_CODES


def map_sqlite_error(exc: BaseException) -> Exception:
    """SQLite's disk-full becomes OutOfSpace; other failures IndexUnavailable."""
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        if is_no_space(exc):
            return OutOfSpace("no space left for the index")
        return IndexUnavailable(f"index write failed: {exc}",
                                hint="check the data home's disk and permissions")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


class _Sync:
    """A queued operation that runs in the connection's thread (see Writer.submit_sync)."""

    __slots__ = ("fn",)

    def __init__(self, fn: SyncOperation) -> None:
        self.fn = fn


_Queued = tuple[Operation | _Sync, asyncio.Future[Any]]
_STOP: Any = object()  # queued by Writer.stop: commit what came before, then end
STOP_TIMEOUT = 60.0  # seconds stop() waits for the last batch (busy_timeout is 30 s)


class _Waiting:
    """An operation of a thread waiting in Writer.commit_blocking, and its outcome."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: SyncOperation) -> None:
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class Writer:
    """The single writer of one process, batching operations into group commits."""

    def __init__(self, conn: aiosqlite.Connection, *, window_ms: float) -> None:
        self._conn = conn
        self._window = window_ms / 1000.0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # One transaction at a time on the connection: the loop's batches and the
        # threads' groups (commit_blocking) take turns.
        self._turn = threading.Lock()
        self._group = threading.Condition(threading.Lock())
        self._waiting: list[_Waiting] = []
        self._leading = False

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="index-writer")

    async def stop(self) -> None:
        """Commit what is queued, then stop; a batch is never cut off mid-commit (its
        callers could not tell whether it committed)."""
        self._stopping = True
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        # Nothing queued may wait forever (a caller in another thread would hang).
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP and not item[1].done():
                item[1].set_exception(IndexUnavailable("index writer stopped"))
        # A group committing in another thread finishes before the connection closes.
        await asyncio.to_thread(self._wait_for_turn)

    def _wait_for_turn(self) -> None:
        with self._turn:
            pass

    def commit_blocking(self, operation: SyncOperation) -> Any:
        """As `submit_sync`, from a thread that is not the event loop's: blocks until
        the operation is committed and durable, and returns its result (or raises
        its error, mapped as `submit`'s are). See the module docstring."""
        if self._task is None or self._stopping:
            raise IndexUnavailable("index writer is not running")
        mine = _Waiting(operation)
        with self._group:
            self._waiting.append(mine)
            while not mine.done:
                if self._leading:
                    self._group.wait()
                    continue
                self._leading = True
                group, self._waiting = self._waiting, []
                self._group.release()
                try:
                    self._commit_group(group)
                finally:
                    self._group.acquire()
                    self._leading = False
                    for waiting in group:
                        waiting.done = True
                    self._group.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _commit_group(self, group: list[_Waiting]) -> None:
        conn = compat.sqlite_connection(self._conn)
        try:
            with self._turn:
                if self._stopping and self._task is None:
                    raise IndexUnavailable("index writer stopped")
                outcomes = _commit_sync(conn, [waiting.fn for waiting in group])
        except Exception as exc:
            error = map_sqlite_error(exc)
            log.error("index commit failed batch=%d error=%s", len(group), type(error).__name__)
            for waiting in group:
                waiting.error = error
            return
        for waiting, (result, op_error) in zip(group, outcomes, strict=True):
            waiting.result = result
            waiting.error = map_sqlite_error(op_error) if op_error is not None else None

    async def submit(self, operation: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `operation` in a committed transaction; return its result once durable."""
        return await self._enqueue(operation)  # type: ignore[no-any-return]

    async def submit_sync(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """As `submit`, for a plain function of the sqlite3 connection, run in the
        connection's thread: it must not touch the event loop."""
        return await self._enqueue(_Sync(operation))  # type: ignore[no-any-return]

    async def _enqueue(self, item: Operation | _Sync) -> Any:
        if self._task is None or self._stopping:
            raise IndexUnavailable("index writer is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            deadline = loop.time() + self._window
            while len(batch) < MAX_BATCH and not stop:
                if not self._queue.empty():
                    item = self._queue.get_nowait()
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is _STOP:
                    stop = True
                else:
                    batch.append(item)
            await self._commit(batch)
            if stop:
                return

    async def _commit(self, batch: list[_Queued]) -> None:
        try:
            if all(isinstance(item, _Sync) for item, _ in batch):
                fns = [item.fn for item, _ in batch]  # type: ignore[union-attr]
                outcomes = await run_sync(self._conn, self._commit_in_turn, fns)
            else:
                await run_sync(self._conn, lambda _conn: self._turn.acquire())
                try:
                    outcomes = await self._commit_mixed(batch)
                finally:
                    self._turn.release()
        except Exception as exc:
            error = map_sqlite_error(exc)
            log.error("index commit failed batch=%d error=%s", len(batch), type(error).__name__)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), (result, op_error) in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if op_error is not None:
                future.set_exception(map_sqlite_error(op_error))
            else:
                future.set_result(result)

    def _commit_in_turn(self, conn: sqlite3.Connection,
                        operations: list[SyncOperation]) -> list[tuple[Any, Exception | None]]:
        with self._turn:
            return _commit_sync(conn, operations)

    async def _commit_mixed(self, batch: list[_Queued]) -> list[tuple[Any, Exception | None]]:
        outcomes: list[tuple[Any, Exception | None]] = []
        conn = self._conn
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for item, _ in batch:
                await conn.execute("SAVEPOINT op")
                try:
                    if isinstance(item, _Sync):
                        result = await run_sync(conn, item.fn)
                    else:
                        result = await item(conn)
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # rolled back whole by SQLite: see _commit_sync
                    await conn.execute("ROLLBACK TO op")
                    await conn.execute("RELEASE op")
                    outcomes.append((None, exc))
                else:
                    await conn.execute("RELEASE op")
                    outcomes.append((result, None))
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            raise
        return outcomes


def _commit_sync(
    conn: sqlite3.Connection, operations: list[SyncOperation]
) -> list[tuple[Any, Exception | None]]:
    """One group commit of plain operations, in the connection's thread.

    A group of one (every instance on a single association) runs without a savepoint:
    if it fails, the transaction it was alone in is rolled back, which undoes as much
    as its savepoint would (two statements fewer, ~9 us, per instance).

    A statement that finds the disk full (SQLITE_FULL when its changes spill out of the
    page cache into the WAL) can make SQLite roll the whole transaction back by itself:
    the operations before it in the group are undone too, so the group fails with that
    error. A ROLLBACK (or ROLLBACK TO) then would fail, "no transaction is active", and
    its error replaced the disk-full one (a Storage Commitment of many instances was
    answered 0x0110 instead of 0x0213, a C-STORE would have been 0x0110, not 0xA700)."""
    outcomes: list[tuple[Any, Exception | None]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        if len(operations) == 1:
            try:
                result = operations[0](conn)
            except Exception as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return [(None, exc)]
            conn.execute("COMMIT")
            return [(result, None)]
        for operation in operations:
            conn.execute("SAVEPOINT op")
            try:
                result = operation(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    raise
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((None, exc))
            else:
                conn.execute("RELEASE op")
                outcomes.append((result, None))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    return outcomes
