"""Run a C-FIND search on the index: one SELECT on the reader connection.

Contract for the query service::

    rows = await search(index, Level.STUDY, returned=[key, ...],
                        criteria=[Criterion(key, Equals("PID-1")), ...])

returns, per matching entity of `level`, a tuple of the `returned` keys'
values in that order (None or '' when unknown; a `multi` key's values joined
with a backslash; an empty tuple when nothing is returned). Every criterion
must hold. No order: DICOM sets none, and an ORDER BY would steer SQLite away
from the index that best narrows the query. The statement and the fetch are
one hop to the reader's thread.

A `Window` bounds what is kept (QIDO-RS paging): rows are read from the cursor
in batches, those `keep` refuses are passed over, the first `skip` kept ones
too, and the scan stops once `take` are held; memory is the page's, not the
matches'.

`search_ids` is for an answer that goes out match by match (DIMSE C-FIND, no
paging): the same scan keeps the first FETCH_BATCH matches whole and only the
row ids of the others (8 bytes each, not the ~0.6 KB of a row's values), which
`rows_by_id` reads a batch at a time as the answer is sent. The match set is
the scan's; a match deleted before its batch is read is left out, a changed one
answers with its new values.
"""

from __future__ import annotations

import sqlite3
import weakref
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiosqlite

from appliance.store import database
from appliance.store.cfind.attributes import ALWAYS, ROW_ID, SOURCES, Key, Level
from appliance.store.cfind.conditions import (
    Condition,
    Period,
    Term,
    condition,
    period_condition,
    register_functions,
)
from appliance.store.index import Index

Row = tuple[object, ...]

FETCH_BATCH = 500  # rows read from the cursor at a time with a Window


@dataclass(frozen=True)
class Window:
    """The rows `keep` accepts (every row when None), the first `skip` of them passed
    over, at most `take` of those after them (no bound when None)."""

    skip: int = 0
    take: int | None = None
    keep: Callable[[Row], bool] | None = None


@dataclass(frozen=True)
class Criterion:
    """`term` holds for the value `key` matches on."""

    key: Key
    term: Term


@dataclass(frozen=True)
class PeriodCriterion:
    """The moment made of the `date` and `time` keys' values lies in `period`."""

    date: Key
    time: Key
    period: Period


# Reader connections that have the SQL functions of conditions.py registered.
_prepared: weakref.WeakSet[aiosqlite.Connection] = weakref.WeakSet()


async def search(
    index: Index,
    level: Level,
    returned: Sequence[Key],
    criteria: Sequence[Criterion | PeriodCriterion],
    *,
    window: Window | None = None,
) -> list[Row]:
    """The `returned` values of every entity of `level` that meets all `criteria` (of
    those `window` selects, when given)."""
    sql, params = statement(level, returned, criteria)
    reader = await _reader(index)
    if window is None:
        rows = await database.run_sync(reader, _select, sql, params)
    else:
        rows = await database.run_sync(reader, _select_window, sql, params, window)
    # With nothing to return the SELECT lists the row id (SQL needs one column):
    # the caller still gets one empty tuple per entity.
    return rows if returned else [() for _ in rows]


@dataclass(frozen=True)
class Matches:
    """The matches of `search_ids`: the first ones read whole (`rows`), then the row ids
    of the others (`later`), for `rows_by_id`."""

    rows: list[Row]
    later: array[int]

    def __len__(self) -> int:
        return len(self.rows) + len(self.later)


async def search_ids(
    index: Index,
    level: Level,
    returned: Sequence[Key],
    criteria: Sequence[Criterion | PeriodCriterion],
) -> Matches:
    """As `search` with no window, holding the values of the first FETCH_BATCH matches
    and only the row ids of the others."""
    sql, params = statement(level, returned, criteria, row_id=True)
    found = await database.run_sync(await _reader(index), _select_ids, sql, params)
    return Matches([row[1:] for row in found.rows], found.later)


async def rows_by_id(index: Index, level: Level, returned: Sequence[Key],
                     ids: Sequence[int]) -> list[Row]:
    """The `returned` values of the entities of `level` with these row ids (at most
    FETCH_BATCH; those gone since are left out), in no particular order."""
    if not returned:
        return [() for _ in ids]
    sql = (f"SELECT {', '.join(key.column for key in returned)} FROM {SOURCES[level]}"
           f" WHERE {ROW_ID[level]} IN ({', '.join('?' * len(ids))})")
    return await database.run_sync(await _reader(index), _select, sql, list(ids))


async def _reader(index: Index) -> aiosqlite.Connection:
    """The index's reader connection, with the SQL functions of conditions.py."""
    reader = index.reader
    if reader not in _prepared:
        await database.run_sync(reader, register_functions)
        _prepared.add(reader)
    return reader


def statement(
    level: Level, returned: Sequence[Key], criteria: Sequence[Criterion | PeriodCriterion],
    *, row_id: bool = False,
) -> tuple[str, list[object]]:
    """The SELECT of `search` and its parameters (the row id first with `row_id`)."""
    conditions = [_condition(each) for each in criteria]
    columns = [key.column for key in returned]
    if row_id or not columns:
        columns.insert(0, ROW_ID[level])
    selected = ", ".join(columns)
    where = " AND ".join([ALWAYS[level], *(f"({c.sql})" for c in conditions)])
    return (f"SELECT {selected} FROM {SOURCES[level]} WHERE {where}",
            [param for c in conditions for param in c.params])


def _condition(criterion: Criterion | PeriodCriterion) -> Condition:
    if isinstance(criterion, PeriodCriterion):
        return period_condition(criterion.period, criterion.date.compared,
                                criterion.time.compared)
    found = condition(criterion.term, criterion.key.compared, folded=criterion.key.folded)
    if criterion.key.exists:  # the value lives in rows below: match through a subquery
        return Condition(criterion.key.exists.format(found.sql), found.params)
    return found


def _select_window(conn: sqlite3.Connection, sql: str, params: list[object],
                   window: Window) -> list[Row]:
    """The rows of `sql` that `window` selects, read in batches, in the reader's thread."""
    cur = conn.execute(sql, params)
    kept: list[Row] = []
    skipped = 0
    try:
        cur.row_factory = None
        while window.take is None or len(kept) < window.take:
            batch = cur.fetchmany(FETCH_BATCH)
            if not batch:
                break
            for row in batch:
                if window.keep is not None and not window.keep(row):
                    continue
                if skipped < window.skip:
                    skipped += 1
                    continue
                kept.append(row)
                if window.take is not None and len(kept) >= window.take:
                    break
        return kept
    finally:
        cur.close()


def _select_ids(conn: sqlite3.Connection, sql: str, params: list[object]) -> Matches:
    """The rows of `sql` (row id first): the first FETCH_BATCH whole, then ids only."""
    cur = conn.execute(sql, params)
    try:
        cur.row_factory = None
        rows = cur.fetchmany(FETCH_BATCH)
        later = array("q")
        while batch := cur.fetchmany(FETCH_BATCH):
            later.extend(row[0] for row in batch)
        return Matches(rows, later)
    finally:
        cur.close()


def _select(conn: sqlite3.Connection, sql: str, params: list[object]) -> list[Row]:
    """The rows of `sql`, in the reader's thread; the cursor is closed at once (no read
    transaction left open)."""
    cur = conn.execute(sql, params)
    try:
        cur.row_factory = None  # plain tuples: the caller reads values by position
        return cur.fetchall()
    finally:
        cur.close()
