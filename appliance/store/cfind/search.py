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

A `Window` is one page of the matches (QIDO-RS `offset` and `limit`), and pages
need an order that holds from one request to the next: the plan's order did
not (a match recorded between two requests, an instance of a study still
arriving, slid into a page already answered and pushed one match of it onto
the next page, answered twice, while the new one was never answered). A window
reads the matches in row id order, the order the index recorded them, so a
match recorded meanwhile lands on a later page. It reads in two steps, in one
read transaction: the matches' row ids in that order (and the value `keep`
tests), from which those `keep` refuses and the first `skip` kept ones are
passed over until `take` are held; then those rows' values, by row id. The
sort holds row ids only, and values such as ModalitiesInStudy are computed for
the page, not for every match; memory is the page's. With criteria the order is
`+id`, which SQLite cannot take from an index: it keeps the plan it would make
without an order (the index that narrows the query) and sorts the matches' ids,
where `ORDER BY id` let it scan the whole table in row id order instead
(tests/test_query_plans.py); without criteria the table is scanned anyway, in
row id order, and the scan stops at the page's end.

`search_ids` is for an answer that goes out match by match (DIMSE C-FIND, no
paging): the same scan keeps the first FETCH_BATCH matches whole and only the
row ids of the others (8 bytes each, not the ~0.6 KB of a row's values), which
`rows_by_id` reads a batch at a time as the answer is sent. The match set is
the scan's; a match deleted before its batch is read is left out, a changed one
answers with its new values.
"""

from __future__ import annotations

import json
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
    """The matches in row id order whose value of the key `keep[0]` passes `keep[1]`
    (every match when None), the first `skip` of them passed over, at most `take` of
    those after them (no bound when None)."""

    skip: int = 0
    take: int | None = None
    keep: tuple[Key, Callable[[object], bool]] | None = None


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
    """The `returned` values of every entity of `level` that meets all `criteria`, in
    no particular order; with `window`, of those it selects, in its order."""
    reader = await _reader(index)
    if window is not None:
        (ids_sql, params), rows_sql = window_statements(
            level, returned, criteria, keep=window.keep[0] if window.keep else None)
        return await database.run_sync(reader, _select_window, ids_sql, params, rows_sql,
                                       window)
    sql, params = statement(level, returned, criteria)
    rows = await database.run_sync(reader, _select, sql, params)
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


def window_statements(
    level: Level, returned: Sequence[Key], criteria: Sequence[Criterion | PeriodCriterion],
    *, keep: Key | None = None,
) -> tuple[tuple[str, list[object]], str]:
    """The two SELECTs of a window and the first one's parameters: the matches' row ids
    (with the value of `keep`) in row id order; the `returned` values, after the row
    id, of the rows whose ids are the JSON list that is its one parameter."""
    sql, params = statement(level, [keep] if keep else [], criteria, row_id=True)
    # `+`: see the module docstring.
    order = f"+{ROW_ID[level]}" if criteria else ROW_ID[level]
    selected = ", ".join([ROW_ID[level], *(key.column for key in returned)])
    return ((f"{sql} ORDER BY {order}", params),
            f"SELECT {selected} FROM {SOURCES[level]}"
            f" WHERE {ROW_ID[level]} IN (SELECT value FROM json_each(?))")


def _condition(criterion: Criterion | PeriodCriterion) -> Condition:
    if isinstance(criterion, PeriodCriterion):
        return period_condition(criterion.period, criterion.date.compared,
                                criterion.time.compared)
    found = condition(criterion.term, criterion.key.compared, folded=criterion.key.folded)
    if criterion.key.exists:  # the value lives in rows below: match through a subquery
        return Condition(criterion.key.exists.format(found.sql), found.params)
    return found


def _select_window(conn: sqlite3.Connection, ids_sql: str, params: list[object],
                   rows_sql: str, window: Window) -> list[Row]:
    """The rows `window` selects, by `window_statements`, in the reader's thread; one
    read transaction, so that the values are those of the ids' snapshot."""
    conn.execute("BEGIN")
    try:
        ids = _window_ids(conn, ids_sql, params, window)
        found = {row[0]: row[1:] for row in _select(conn, rows_sql, [json.dumps(ids)])}
    finally:
        conn.execute("COMMIT")
    return [found[row_id] for row_id in ids]


def _window_ids(conn: sqlite3.Connection, sql: str, params: list[object],
                window: Window) -> list[int]:
    """The row ids `window` selects from those `sql` reads (with the value it tests
    after each), read in batches."""
    cur = conn.execute(sql, params)
    kept: list[int] = []
    skipped = 0
    try:
        cur.row_factory = None
        while window.take is None or len(kept) < window.take:
            batch = cur.fetchmany(FETCH_BATCH)
            if not batch:
                break
            for row in batch:
                if window.keep is not None and not window.keep[1](row[1]):
                    continue
                if skipped < window.skip:
                    skipped += 1
                    continue
                kept.append(row[0])
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
