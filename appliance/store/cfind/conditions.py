"""Matching terms, and the SQL conditions they become.

The query service decides what a request value means (PS3.4 C.2.2.2, see
appliance/services/query/matching.py) and says it with the terms below: plain
values, no SQL. This module turns a term and a column expression of the key
table (attributes.py) into a `Condition`: SQL text with `?` placeholders and
its parameters. Column expressions come from the key table, never from a
request; request values only ever travel as parameters.

SQL details that are the store's business, not DICOM's:

- Wildcards become an SQLite GLOB, whose `*` and `?` mean what DICOM's do and
  whose only other special character `[` is escaped. GLOB keeps the index
  usable for a literal prefix (`ACC12*`).
- Person names are matched in one form, store/person_names.py `fold`: without
  PN padding (trailing empty components and groups, PS3.5 6.2.1) and
  case-folded. SQLite's own `lower()` folds ASCII only, so the exact test is
  that Python function (`pacs_fold_pn_nfc`); a cheap prefilter in C (pure-ASCII
  values without padding against an ASCII-folded pattern) runs first so the
  Python function sees only candidates, non-ASCII values and padded ones. A
  key with a `folded` column (the patient's name: kept in that form by the
  schema, migrations 0012, 0019 and 0033) is matched with a plain GLOB on that
  column instead, which uses its index for a literal prefix.
- A list of values is one JSON parameter (`json_each`): no limit on host
  parameters, however long the list.
- Ranges never select an empty value (`'' <= high` would).
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass

from appliance.store import person_names
from appliance.store.times import time_key

__all__ = [
    "AnyOf", "Between", "Condition", "Equals", "FoldedWildcard", "OneOf", "Period", "Term",
    "Wildcard", "condition", "period_condition", "register_functions",
]


@dataclass(frozen=True)
class Equals:
    """The value equals `value` (text, a date, an integer)."""

    value: str | int


@dataclass(frozen=True)
class Wildcard:
    """The value matches `pattern`, whose `*` and `?` are DICOM wildcards; case-sensitive."""

    pattern: str


@dataclass(frozen=True)
class FoldedWildcard:
    """The value as a person name, without padding and case-folded
    (`person_names.fold`), matches `pattern` (already in that form; `*` and `?` are
    wildcards)."""

    pattern: str


@dataclass(frozen=True)
class Between:
    """An inclusive string range over a non-empty value; an empty bound is open."""

    low: str
    high: str


@dataclass(frozen=True)
class OneOf:
    """The value is one of `values` (compared exactly, no wildcards)."""

    values: tuple[str, ...]


@dataclass(frozen=True)
class AnyOf:
    """Any of the terms holds (a key sent with several values)."""

    terms: tuple[Term, ...]


Term = Equals | Wildcard | FoldedWildcard | Between | OneOf | AnyOf


@dataclass(frozen=True)
class Period:
    """A date and a time read together as one moment, between two bounds (combined
    date-time matching). A day is YYYYMMDD, '' when that side is open; a time is a
    time key (appliance.store.times). An entity with a date but no time counts as
    midnight; one without a date never matches."""

    first_day: str
    first_time: str
    last_day: str
    last_time: str


@dataclass(frozen=True)
class Condition:
    sql: str
    params: tuple[object, ...]


# SQL functions the conditions may call; registered on the reader by search.py.
SQL_FUNCTIONS = {"pacs_fold_pn_nfc": person_names.fold, "pacs_time_key": time_key}

MIDNIGHT = "000000.000000"  # the time key of an entity that has a date but no time

# GLOB pattern true for any string holding a character outside ASCII.
_NON_ASCII = "*[^\x01-\x7f]*"
# GLOB patterns, one of which is true for any PN value with padding to strip (a group
# ending in `^`, an empty last group): what the prefilter cannot compare with lower().
_PADDED = ("*^", "*^=*", "*=")
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def register_functions(conn: sqlite3.Connection) -> None:
    """Make the functions of SQL_FUNCTIONS callable in statements on `conn`."""
    for name, func in SQL_FUNCTIONS.items():
        conn.create_function(name, 1, func, deterministic=True)


def condition(term: Term, column: str, *, folded: str = "") -> Condition:
    """The SQL condition that `term` holds for the value of `column` (an SQL expression);
    `folded`, when given, is a column holding that value case-folded."""
    match term:
        case Equals(value):
            return Condition(f"{column} = ?", (value,))
        case Wildcard(pattern):
            return Condition(f"{column} GLOB ?", (_glob(pattern),))
        case FoldedWildcard(pattern):
            if folded:
                return Condition(f"{folded} GLOB ?", (_glob(pattern),))
            # For a pure-ASCII value without padding, lower() equals the folded form; a
            # non-ASCII character of the pattern can then match nothing, so standing in
            # `*` keeps a superset.
            ascii_pattern = _glob(_NON_ASCII_RUN.sub("*", pattern))
            prefilter = " OR ".join([f"{column} GLOB ?"] * (1 + len(_PADDED)))
            return Condition(
                f"({prefilter} OR lower({column}) GLOB ?)"
                f" AND pacs_fold_pn_nfc({column}) GLOB ?",
                (_NON_ASCII, *_PADDED, ascii_pattern, _glob(pattern)),
            )
        case Between(low, high):
            return _between(column, low, high)
        case OneOf(values):
            if len(values) == 1:
                return Condition(f"{column} = ?", (values[0],))
            return Condition(f"{column} IN (SELECT value FROM json_each(?))",
                             (json.dumps(list(values)),))
        case AnyOf(terms):
            return _any([condition(each, column, folded=folded) for each in terms])
    raise TypeError(f"not a matching term: {type(term).__name__}")


def period_condition(period: Period, date_column: str, time_column: str) -> Condition:
    """The SQL condition that the moment (`date_column`, `time_column`) lies in `period`.

    `time_column` holds time keys. The plain date bounds are repeated so that
    the date index narrows the scan.
    """
    moment = (
        f"{date_column} || ' ' || CASE {time_column} WHEN '' THEN '{MIDNIGHT}'"
        f" ELSE {time_column} END"
    )
    parts = [f"{date_column} != ''"]
    params: list[object] = []
    if period.first_day:
        parts += [f"{date_column} >= ?", f"{moment} >= ?"]
        params += [period.first_day, f"{period.first_day} {period.first_time}"]
    if period.last_day:
        parts += [f"{date_column} <= ?", f"{moment} <= ?"]
        params += [period.last_day, f"{period.last_day} {period.last_time}"]
    return Condition(" AND ".join(parts), tuple(params))


def _any(conditions: list[Condition]) -> Condition:
    if len(conditions) == 1:
        return conditions[0]
    return Condition(
        " OR ".join(f"({c.sql})" for c in conditions),
        tuple(p for c in conditions for p in c.params),
    )


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern as a GLOB pattern: `*` and `?` kept, `[` made literal."""
    return pattern.replace("[", "[[]")


def _between(column: str, low: str, high: str) -> Condition:
    """Inclusive string range; empty values never match (`'' <= high` would)."""
    parts, params = [f"{column} != ''"], []
    if low:
        parts.append(f"{column} >= ?")
        params.append(low)
    if high:
        parts.append(f"{column} <= ?")
        params.append(high)
    return Condition(" AND ".join(parts), tuple(params))
