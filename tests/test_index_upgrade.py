"""An index an older release wrote is migrated by this one, keeps every row, and answers.

tests/old_indexes/index-7c535d4.sql is the SQL dump of an index that pacs-edge at 7c535d4
(schema version 19) wrote during a box's life: studies received, replicated, evicted and
recalled, orders with MPPS and a Storage Commitment, web users and a session, prefetch
requests, a legacy migration paused half-way (the file's header says more). Each test
loads it into a new file and opens it with this version's Index, which runs the
migrations since; the rows must all be there afterwards, the schema must be the one a new
box gets, and the services must read the old rows as the old version left them. A
migration that rebuilds a table and loses a column, a row or a value fails here, without
the old commit checked out.

When a migration rewrites an old column on purpose (as 0019 refolded the patients' names),
name the column in REWRITTEN with that migration's number.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import TypeVar

import pytest_asyncio
from pydicom.dataset import Dataset

from appliance.services.passwords import verify_password
from appliance.services.query.find import QueryModel, find
from appliance.store import database, migration_rows, order_rows, user_rows
from appliance.store.index import Index

T = TypeVar("T")
DUMP = Path(__file__).with_name("old_indexes") / "index-7c535d4.sql"
OLD_VERSION = 19
# (table, column) -> the migration that rewrites its values on purpose.
REWRITTEN: dict[tuple[str, str], int] = {}
PASSWORD = "correct horse battery staple"  # the old box's users' (generated test data)
EVICTED = "1.2.826.0.1.3680043.10.1234.119007439550093669886622464533028834"


def load_dump(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        for name, func in database.SCHEMA_FUNCTIONS.items():
            conn.create_function(name, 1, func, deterministic=True)
        conn.executescript(DUMP.read_text(encoding="utf-8"))


def tables(conn: sqlite3.Connection) -> dict[str, tuple[list[str], Counter[tuple[object, ...]]]]:
    """Each table's columns and rows (as a multiset)."""
    out = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                " AND name NOT LIKE 'sqlite_%'").fetchall():
        columns = [row[1] for row in conn.execute(f'PRAGMA table_info("{name}")')]
        out[name] = (columns, Counter(conn.execute(f'SELECT * FROM "{name}"').fetchall()))
    return out


def schema(path: Path) -> set[tuple[str, str, str]]:
    with closing(sqlite3.connect(path)) as conn:
        return set(conn.execute("SELECT type, name, COALESCE(sql, '') FROM sqlite_master"
                                " WHERE name NOT LIKE 'sqlite_%'").fetchall())


@pytest_asyncio.fixture
async def migrated(tmp_path: Path) -> AsyncIterator[tuple[Index, Path]]:
    path = tmp_path / "index.sqlite3"
    load_dump(path)
    async with Index(path) as index:
        yield index, path


async def test_an_old_index_keeps_every_row_and_gets_the_new_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    load_dump(path)
    with closing(sqlite3.connect(path)) as conn:
        before = tables(conn)
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (
            OLD_VERSION,)
    async with Index(path):
        pass  # the migrations run
    async with Index(tmp_path / "new.sqlite3"):
        pass  # a new box's index
    assert schema(path) == schema(tmp_path / "new.sqlite3")

    with closing(sqlite3.connect(path)) as conn:
        latest = max(version for version, _, _ in database.migration_scripts())
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (latest,)
        after = tables(conn)
        for name, (columns, rows) in before.items():
            assert name in after, f"table {name} is gone"
            kept = [c for c in columns if (name, c) not in REWRITTEN]
            assert set(kept) <= set(after[name][0]), (name, kept, after[name][0])
            select = ", ".join(f'"{c}"' for c in kept)
            now = Counter(conn.execute(f'SELECT {select} FROM "{name}"').fetchall())
            wanted = Counter({tuple(row[columns.index(c)] for c in kept): n
                              for row, n in rows.items()})
            if name == "schema_migrations":
                assert wanted <= now, name
            else:
                assert now == wanted, (name, wanted - now, now - wanted)
        # What migrations since derived from the old rows (0023: counts per stored syntax).
        counted = {(c, s): n for c, s, n in conn.execute(
            "SELECT sop_class_uid, transfer_syntax, instance_count FROM stored_syntaxes")}
        grouped = {(c, s): n for c, s, n in conn.execute(
            "SELECT sop_class_uid, transfer_syntax, COUNT(*) FROM instances GROUP BY 1, 2")}
        assert counted == grouped and sum(grouped.values()) == 26


async def test_an_old_index_answers_as_the_old_version_left_it(
        migrated: tuple[Index, Path]) -> None:
    index, _ = migrated
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientID = ""
    query.InstanceAvailability = ""
    query.NumberOfStudyRelatedInstances = ""
    found = {str(ds.StudyInstanceUID): (str(ds.InstanceAvailability),
                                        int(ds.NumberOfStudyRelatedInstances))
             for ds in await find(index, QueryModel.STUDY_ROOT, query)}
    assert len(found) == 5 and sum(n for _, n in found.values()) == 26
    assert found[EVICTED][0] == "NEARLINE"
    assert {a for uid, (a, _) in found.items() if uid != EVICTED} == {"ONLINE"}
    totals = await index.totals()
    assert (totals.studies, totals.instances, totals.tier_states) == (
        5, 26, {"evicted": 1, "replicated": 4})
    summary = await index.sync_summary()
    assert (summary["studies_at_risk"], summary["last_pass_error"]) == (0, "")
    assert summary["last_successful_pass_at"] is not None

    def read(fn: Callable[..., T], *args: object) -> Awaitable[T]:
        return database.run_sync(index.reader, fn, *args)

    orders = {o.accession_number: o.status for o in await read(order_rows.list_orders)}
    assert orders == {"UPG1": "COMPLETED", "UPG2": "IN PROGRESS", "UPG3": "DISCONTINUED",
                      "UPG4": "SCHEDULED"}
    for name, role in (("boss", "admin"), ("rad", "radiologist")):
        user = await read(user_rows.find_user, name)
        assert user is not None and user.role == role
        assert verify_password(PASSWORD, user.password_hash)
    run = await read(migration_rows.latest_run)
    assert run is not None and run.state == "paused"
    summary_run = await read(migration_rows.summary, run.id)
    assert (summary_run.studies_found, summary_run.studies_done, summary_run.studies_failed,
            summary_run.days_total) == (10, 4, 0, 3)
