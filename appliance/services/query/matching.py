"""DICOM attribute matching (PS3.4 C.2.2.2) translated to SQL conditions.

Every function returns a `Condition` (SQL text with `?` placeholders and its
parameters) or None for universal matching. Column expressions come from the
key table in `keys.py`, never from a request; request values only ever travel
as parameters.

Rules, per kind of attribute:

- Universal: an empty value, or a value made only of `*`, matches everything.
  A key with several values (backslash-separated) matches when any value does,
  which for UIDs is List of UID matching.
- TEXT (SH, LO, CS ...): case-sensitive. Without wildcards it is an equality;
  with `*` / `?` it is an SQLite GLOB, whose `*` and `?` mean what DICOM's do,
  and whose only other special character `[` is escaped. GLOB keeps the index
  usable for a literal prefix (`ACC12*`).
- PERSON_NAME (PN): case-insensitive, because many modalities send names in
  upper case and a workstation user types `mueller*` or `Müller*`. Both sides
  are compared after Unicode case folding (`str.casefold`), so `MÜLLER`
  matches `Müller`. The whole PN string is matched, component groups
  (`alphabetic=ideographic=phonetic`) included; `Yamada*` finds
  `Yamada^Tarou=山田^太郎`. SQLite's own `lower()` folds ASCII only, so the
  exact test is a Python function (`pacs_fold`); a cheap prefilter in C
  (pure-ASCII names against an ASCII-folded pattern) runs first so the
  Python function sees only candidates and non-ASCII names.
- DATE (DA): `YYYYMMDD`, or a range `A-`, `-B`, `A-B` (inclusive).
- TIME (TM): compared as normalised keys (`appliance.store.times`). A value
  with reduced precision stands for its whole period: `1015` matches
  10:15:00 to 10:15:59.999999, and `-1015` ends at 10:15:59.999999.
- UID: list of UID matching; no wildcards (a `*` in a UID is a literal).
- INTEGER (IS): equality.
- Entities whose value is empty never match a non-universal key.
- Combined date-time matching (an extended negotiation option): when both
  the date and the time of a pair are ranges, they bound one period, e.g.
  `20240105-20240107` with `1000-1800` is 5 Jan 10:00 to 7 Jan 18:00.

Malformed dates, times and integers raise QueryError 0xC000.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiosqlite

from appliance.base.errors import QueryError, QueryRefusal
from appliance.store.times import time_key


class Match(enum.Enum):
    TEXT = "text"
    PERSON_NAME = "person_name"
    DATE = "date"
    TIME = "time"
    UID = "uid"
    INTEGER = "integer"
    RETURN_ONLY = "return_only"  # counts, availability: returned, never matched


@dataclass(frozen=True)
class Condition:
    sql: str
    params: tuple[object, ...]


# SQL functions the conditions may call; find() registers them on the reader.
SQL_FUNCTIONS = {"pacs_fold": str.casefold, "pacs_time_key": time_key}

# GLOB pattern true for any string holding a character outside ASCII.
_NON_ASCII = "*[^\x01-\x7f]*"
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_DATE = re.compile("[0-9]{8}")
_DAY_START, _DAY_END = "000000.000000", "235959.999999"


async def register_functions(conn: aiosqlite.Connection) -> None:
    for name, func in SQL_FUNCTIONS.items():
        await conn.create_function(name, 1, func, deterministic=True)


def condition(kind: Match, column: str, values: Sequence[str]) -> Condition | None:
    """The condition for a key of `kind` on `column`; None when it matches everything."""
    wanted = [v.strip() for v in values if v.strip()]
    if kind is Match.RETURN_ONLY or not wanted or any(_universal(v) for v in wanted):
        return None
    if kind is Match.UID:
        return _uids(column, wanted)
    build = _BUILDERS[kind]
    return _any([build(column, value) for value in wanted])


def combined_datetime(
    date_column: str, time_column: str, date_value: str, time_value: str
) -> Condition | None:
    """One period bounded by a date range and a time range; None unless both are ranges.

    `time_column` holds normalised time keys; an entity with a date but no
    time counts as midnight. The plain date bounds are repeated so that the
    date index narrows the scan.
    """
    date_value, time_value = date_value.strip(), time_value.strip()
    if not (_is_range(date_value) and _is_range(time_value)):
        return None
    first_day, last_day = _range(date_value, _check_date)
    first_time, last_time = _range(time_value, _check_time)
    moment = (
        f"{date_column} || ' ' || CASE {time_column} WHEN '' THEN '{_DAY_START}'"
        f" ELSE {time_column} END"
    )
    parts = [f"{date_column} != ''"]
    params: list[object] = []
    if first_day:
        parts += [f"{date_column} >= ?", f"{moment} >= ?"]
        start = time_key(first_time) if first_time else _DAY_START
        params += [first_day, f"{first_day} {start}"]
    if last_day:
        parts += [f"{date_column} <= ?", f"{moment} <= ?"]
        end = _time_upper(last_time) if last_time else _DAY_END
        params += [last_day, f"{last_day} {end}"]
    return Condition(" AND ".join(parts), tuple(params))


def _is_range(value: str) -> bool:
    return "-" in value


def _universal(value: str) -> bool:
    return set(value) == {"*"}


def _any(conditions: list[Condition]) -> Condition:
    if len(conditions) == 1:
        return conditions[0]
    return Condition(
        " OR ".join(f"({c.sql})" for c in conditions),
        tuple(p for c in conditions for p in c.params),
    )


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern as a GLOB pattern: `*` and `?` kept, `[` made literal."""
    return pattern.replace("[", "[[]")


def _text(column: str, value: str) -> Condition:
    if _has_wildcard(value):
        return Condition(f"{column} GLOB ?", (_glob(value),))
    return Condition(f"{column} = ?", (value,))


def _person_name(column: str, value: str) -> Condition:
    folded = value.casefold()
    # For a pure-ASCII name, lower() equals casefold(); a non-ASCII character of
    # the pattern can then match nothing, so standing in `*` keeps a superset.
    ascii_pattern = _glob(_NON_ASCII_RUN.sub("*", folded))
    return Condition(
        f"({column} GLOB ? OR lower({column}) GLOB ?) AND pacs_fold({column}) GLOB ?",
        (_NON_ASCII, ascii_pattern, _glob(folded)),
    )


def _uids(column: str, values: list[str]) -> Condition:
    if len(values) == 1:
        return Condition(f"{column} = ?", (values[0],))
    # One JSON parameter, however long the list: no limit on host parameters.
    return Condition(f"{column} IN (SELECT value FROM json_each(?))", (json.dumps(values),))


def _integer(column: str, value: str) -> Condition:
    try:
        number = int(value)
    except ValueError:
        raise QueryError(QueryRefusal.MALFORMED_KEY, "an integer key is malformed") from None
    return Condition(f"{column} = ?", (number,))


def _date(column: str, value: str) -> Condition:
    if not _is_range(value):
        return Condition(f"{column} = ?", (_check_date(value),))
    first, last = _range(value, _check_date)
    return _between(column, first, last)


def _time(column: str, value: str) -> Condition:
    if not _is_range(value):
        _check_time(value)
        return _between(column, time_key(value), _time_upper(value))
    first, last = _range(value, _check_time)
    return _between(column, time_key(first) if first else "", _time_upper(last) if last else "")


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


def _range(value: str, check: Callable[[str], str]) -> tuple[str, str]:
    first, sep, last = value.partition("-")
    if not sep or "-" in last:
        raise QueryError(QueryRefusal.MALFORMED_KEY, "a range key is malformed")
    first, last = first.strip(), last.strip()
    if not first and not last:
        raise QueryError(QueryRefusal.MALFORMED_KEY, "a range key has no bound")
    return (check(first) if first else "", check(last) if last else "")


def _check_date(value: str) -> str:
    if not _DATE.fullmatch(value):
        raise QueryError(QueryRefusal.MALFORMED_KEY, "a date key is not YYYYMMDD")
    return value


def _check_time(value: str) -> str:
    if not time_key(value):
        raise QueryError(QueryRefusal.MALFORMED_KEY, "a time key is not HHMMSS.FFFFFF")
    return value


def _time_upper(value: str) -> str:
    """The last moment a reduced-precision time stands for, as a time key."""
    whole, _, fraction = value.strip().replace(":", "").partition(".")
    return f"{whole[:6]:9<6}.{fraction[:6]:9<6}"


_BUILDERS: dict[Match, Callable[[str, str], Condition]] = {
    Match.TEXT: _text,
    Match.PERSON_NAME: _person_name,
    Match.DATE: _date,
    Match.TIME: _time,
    Match.INTEGER: _integer,
}
