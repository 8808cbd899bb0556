"""DICOM matching (PS3.4 C.2.2.2) as SQL: every rule checked on a real index database.

Each case lists stored values and says which of them a request value must
select: the query service's term (services/query/matching.py) becomes the
store's SQL condition (store/cfind/conditions.py), run by SQLite on the
index's reader connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from appliance.base.errors import QueryError, QueryRefusal
from appliance.services.query.matching import Match, combined_datetime, term
from appliance.store import database
from appliance.store.cfind.conditions import (
    Condition,
    period_condition,
    register_functions,
)
from appliance.store.cfind.conditions import condition as sql_condition
from appliance.store.index import Index


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[Index]:
    async with Index(tmp_path / "index.sqlite3") as index:
        await database.run_sync(index.reader, register_functions)
        yield index


def condition(kind: Match, column: str, values: Sequence[str]) -> Condition | None:
    """The SQL condition for request `values` of a key of `kind` on `column`."""
    found = term(kind, values)
    return None if found is None else sql_condition(found, column)


async def rows_of(index: Index, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
    def run(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
        return [tuple(row) for row in conn.execute(sql, params).fetchall()]

    return await database.run_sync(index.reader, run)


async def selected(index: Index, found: Condition | None, stored: Sequence[object]) -> list[object]:
    """The stored values (column `v`) that the condition selects, in order."""
    if found is None:
        return list(stored)
    rows = ", ".join("(?, ?)" for _ in stored)
    flat = [item for pair in enumerate(stored) for item in pair]
    result = await rows_of(
        index,
        f"WITH t(n, v) AS (VALUES {rows}) SELECT v FROM t WHERE {found.sql} ORDER BY n",
        [*flat, *found.params],
    )
    return [row[0] for row in result]


async def match(index: Index, kind: Match, request: str | list[str],
                stored: Sequence[object], column: str = "v") -> list[object]:
    values = request if isinstance(request, list) else [request]
    return await selected(index, condition(kind, column, values), stored)


TEXT_STORED = ["CT", "ct", "C", "CTX", "", "A[1]", "A1", "a]b", "ACC_1", "ACCX1", "100%", "1000"]


@pytest.mark.parametrize(
    ("request_value", "expected"),
    [
        ("CT", ["CT"]),
        ("ct", ["ct"]),
        ("C?", ["CT"]),
        ("C*", ["CT", "C", "CTX"]),
        ("*T*", ["CT", "CTX"]),
        ("A[1]", ["A[1]"]),
        ("A[1*", ["A[1]"]),
        ("a]b", ["a]b"]),
        ("ACC_1", ["ACC_1"]),
        ("100%", ["100%"]),
        ("1?0*", ["100%", "1000"]),
        (["CT", "A1"], ["CT", "A1"]),
        (["C?", "*]*"], ["CT", "A[1]", "a]b"]),
    ],
)
async def test_text_matches_exactly_or_by_wildcard_and_case_sensitively(
    index: Index, request_value: str | list[str], expected: list[str]
) -> None:
    assert await match(index, Match.TEXT, request_value, TEXT_STORED) == expected


@pytest.mark.parametrize("request_value", ["", "*", "**", "  ", ["CT", "*"], []])
async def test_empty_or_star_only_values_are_universal(
    index: Index, request_value: str | list[str]
) -> None:
    for kind in Match:
        values = request_value if isinstance(request_value, list) else [request_value]
        assert condition(kind, "v", values) is None
    assert await match(index, Match.TEXT, request_value, TEXT_STORED) == TEXT_STORED


NAMES = [
    "Müller^Jürgen",
    "MÜLLER^ANNA",
    "MULLER^HANS",
    "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "SMITH^JOHN",
    "smith^jane",
    "O[Brien]^Pat",
    "Δημήτρης^Παπαδόπουλος",
    "Straße^Eva",
    "",
]


@pytest.mark.parametrize(
    ("request_value", "expected"),
    [
        ("MÜLLER^JÜRGEN", ["Müller^Jürgen"]),
        ("müller*", ["Müller^Jürgen", "MÜLLER^ANNA"]),
        ("MULLER*", ["MULLER^HANS"]),  # case folding, not accent folding
        ("m?ller*", ["Müller^Jürgen", "MÜLLER^ANNA", "MULLER^HANS"]),
        ("yamada*", ["Yamada^Tarou=山田^太郎=やまだ^たろう"]),
        ("*山田*", ["Yamada^Tarou=山田^太郎=やまだ^たろう"]),
        ("山田*", []),  # the whole PN string is matched, from its first group
        ("smith^john", ["SMITH^JOHN"]),
        ("SMITH", []),
        ("smith^?a*", ["smith^jane"]),
        ("SMITH^*", ["SMITH^JOHN", "smith^jane"]),
        ("o[brien]*", ["O[Brien]^Pat"]),
        ("ΔΗΜΉΤΡΗΣ^*", ["Δημήτρης^Παπαδόπουλος"]),
        ("STRASSE^EVA", ["Straße^Eva"]),
        ("*^*", NAMES[:-1]),
        (["smith^john", "*jürgen"], ["Müller^Jürgen", "SMITH^JOHN"]),
    ],
)
async def test_person_names_match_case_insensitively_in_any_script(
    index: Index, request_value: str | list[str], expected: list[str]
) -> None:
    assert await match(index, Match.PERSON_NAME, request_value, NAMES) == expected


DATES = ["20231231", "20240101", "20240115", "20240131", "20240201", ""]


@pytest.mark.parametrize(
    ("request_value", "expected"),
    [
        ("20240115", ["20240115"]),
        ("20240115-", ["20240115", "20240131", "20240201"]),
        ("-20240115", ["20231231", "20240101", "20240115"]),
        ("20240101-20240131", ["20240101", "20240115", "20240131"]),
        ("20240201-20240101", []),
        (["20231231", "20240131-"], ["20231231", "20240131", "20240201"]),
    ],
)
async def test_dates_match_single_values_and_inclusive_ranges(
    index: Index, request_value: str | list[str], expected: list[str]
) -> None:
    assert await match(index, Match.DATE, request_value, DATES) == expected


TIMES = ["", "08", "0814", "0815", "081530", "08:15:59.9", "081530.5", "081530.59", "0816",
         "0900", "090059", "0901", "235959.999999"]


@pytest.mark.parametrize(
    ("request_value", "expected"),
    [
        ("0815", ["0815", "081530", "08:15:59.9", "081530.5", "081530.59"]),
        ("08:15", ["0815", "081530", "08:15:59.9", "081530.5", "081530.59"]),
        ("081530.5", ["081530.5", "081530.59"]),
        ("08", TIMES[1:9]),
        ("0815-0816", ["0815", "081530", "08:15:59.9", "081530.5", "081530.59", "0816"]),
        ("-0814", ["08", "0814"]),
        ("0900-", ["0900", "090059", "0901", "235959.999999"]),
        ("0830-0900", ["0900", "090059"]),
        ("1000-0900", []),
    ],
)
async def test_times_match_their_whole_precision_and_ranges(
    index: Index, request_value: str, expected: list[str]
) -> None:
    found = await match(index, Match.TIME, request_value, TIMES, column="pacs_time_key(v)")
    assert found == expected


@pytest.mark.parametrize(
    ("kind", "request_value"),
    [
        (Match.DATE, "2024-01-01"),
        (Match.DATE, "2024011"),
        (Match.DATE, "2024*"),
        (Match.DATE, "-"),
        (Match.DATE, "20240230"),  # no such day: malformed, as the HL7 edge says
        (Match.DATE, "20241301-"),
        (Match.TIME, "noon"),
        (Match.TIME, "2530"),  # hour out of range
        (Match.TIME, "-1060"),
        (Match.TIME, "101061"),
        (Match.TIME, "08.x-09"),
        (Match.TIME, "08-09-10"),
        # Digits that make no HH, HHMM, HHMMSS or HHMMSS.F-FFFFFF: were keyed as if they
        # did (`101` as 10:10, `10150012` as 10:15:00, `7` as a 70th hour) and matched.
        (Match.TIME, "101"),
        (Match.TIME, "7"),
        (Match.TIME, "10150012"),
        (Match.TIME, "1015.5"),
        (Match.TIME, "101500.1234567"),
        (Match.TIME, "0900-101"),
        (Match.INTEGER, "five"),
    ],
)
def test_malformed_values_are_unable_to_process_without_quoting_them(
    kind: Match, request_value: str
) -> None:
    with pytest.raises(QueryError) as caught:
        condition(kind, "v", [request_value])
    assert caught.value.kind is QueryRefusal.MALFORMED_KEY
    assert request_value not in caught.value.message


UIDS = ["1.2.3", "1.2.3.4", "1.2.34", "1.2.3*"]


@pytest.mark.parametrize(
    ("request_value", "expected"),
    [
        ("1.2.3", ["1.2.3"]),
        (["1.2.3.4", "1.2.34", "9.9"], ["1.2.3.4", "1.2.34"]),
        ("1.2.3*", ["1.2.3*"]),  # no wildcards in UIDs: a literal
        ("1.2.3?", []),
    ],
)
async def test_uid_lists_match_any_listed_uid_exactly(
    index: Index, request_value: str | list[str], expected: list[str]
) -> None:
    assert await match(index, Match.UID, request_value, UIDS) == expected


async def test_a_long_uid_list_is_one_parameter(index: Index) -> None:
    wanted = [f"1.2.{n}" for n in range(40_000)]
    found = condition(Match.UID, "v", wanted)
    assert found is not None and len(found.params) == 1
    assert await selected(index, found, ["1.2.39999", "1.3"]) == ["1.2.39999"]


async def test_integers_match_by_value(index: Index) -> None:
    assert await match(index, Match.INTEGER, "5", [5, 50, None, 15]) == [5]
    assert await match(index, Match.INTEGER, "05", [5, 50]) == [5]
    assert await match(index, Match.INTEGER, ["1", "50"], [1, 5, 50]) == [1, 50]
    assert await match(index, Match.INTEGER, "*", [1, None]) == [1, None]


def test_return_only_keys_never_restrict() -> None:
    assert condition(Match.RETURN_ONLY, "v", ["3"]) is None


MOMENTS = [
    ("20240104", "1200"),
    ("20240105", "0959"),
    ("20240105", "1000"),
    ("20240105", ""),
    ("20240106", "0300"),
    ("20240106", ""),
    ("20240107", "1800"),
    ("20240107", "180059.9"),
    ("20240107", "1801"),
    ("", "1200"),
]


async def combined(index: Index, date_value: str, time_value: str) -> list[tuple[object, ...]]:
    period = combined_datetime(date_value, time_value)
    assert period is not None
    found = period_condition(period, "d", "pacs_time_key(tm)")
    rows = ", ".join("(?, ?)" for _ in MOMENTS)
    result = await rows_of(
        index,
        f"WITH t(d, tm) AS (VALUES {rows}) SELECT d, tm FROM t WHERE {found.sql}",
        [*(item for moment in MOMENTS for item in moment), *found.params],
    )
    return [(row[0], row[1]) for row in result]


@pytest.mark.parametrize(
    ("date_value", "time_value", "expected"),
    [
        ("20240105-20240107", "1000-1800",
         [("20240105", "1000"), ("20240106", "0300"), ("20240106", ""),
          ("20240107", "1800"), ("20240107", "180059.9")]),
        ("20240105-", "1000-", MOMENTS[2:3] + MOMENTS[4:9]),
        ("-20240105", "-1000", MOMENTS[0:4]),
        ("20240106-20240106", "-0300", [("20240106", "0300"), ("20240106", "")]),
    ],
)
async def test_combined_date_and_time_ranges_bound_one_period(
    index: Index, date_value: str, time_value: str, expected: list[tuple[str, str]]
) -> None:
    assert sorted(await combined(index, date_value, time_value)) == sorted(expected)


@pytest.mark.parametrize(("date_value", "time_value"),
                         [("20240105", "1000-1800"), ("20240105-", "1000"), ("", "1000-")])
def test_combined_matching_needs_two_ranges(date_value: str, time_value: str) -> None:
    assert combined_datetime(date_value, time_value) is None
