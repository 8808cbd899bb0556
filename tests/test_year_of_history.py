"""A box after a year: work that must grow with what is on local disk, not with history.

After a year an imaging center's index holds millions of instance rows, most of
them evicted to the cloud (a 100,000-study box measured 3 million rows, 90%
evicted). What runs at every start, every sync pass or every scrape must not
read them all: each test below builds an index of evicted rows (a plain SQL
fill of the product's schema, as a year of evictions leaves it) and checks that
the operation's memory, or its query plan, does not follow them.
"""

from __future__ import annotations

import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from test_index_upgrade import load_dump

from appliance.services.fsck import fsck
from appliance.store import database
from appliance.store.files import FileStore
from appliance.store.index import Index
from appliance.store.recall_requests import pending_recalls
from appliance.store.study_rows import has_unpacked, instances_to_pack, stable_studies
from sync.blobstore.base import Tier
from sync.lifecycle import apply_lifecycle
from sync.rollback import sweep_leftover_files

pytestmark = pytest.mark.asyncio(loop_scope="module")

T = TypeVar("T")
EVICTED = 20_000
ROOT = "1.2.826.0.1.3680043.10.4713.20251206"
# A Python list or dict of EVICTED paths (~120 characters) takes several MB.
BOUND = 1 << 20


def fill_evicted(path: Path, studies: int, per_study: int) -> None:
    """`studies` evicted studies of `per_study` instances each, every one in a verified pack."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for name, func in database.SCHEMA_FUNCTIONS.items():
            conn.create_function(name, 1, func, deterministic=True)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO patients (patient_id) VALUES ('P1')")
        conn.execute(
            f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {studies})"
            " INSERT INTO studies (id, patient_fk, study_uid, first_received_at, last_received_at,"
            f" last_access_at, tier_state, tier_changed_at) SELECT i, 1, '{ROOT}.' || i, 0, 0, 0,"
            " 'evicted', 0 FROM c")
        conn.execute("INSERT INTO series (id, study_fk, series_uid)"
                     " SELECT id, id, study_uid || '.1' FROM studies")
        conn.execute("INSERT INTO packs (id, study_fk, version, pack_name, manifest_name, state,"
                     " created_at)"
                     " SELECT id, id, 1, 'p' || id, 'm' || id, 'verified', 0 FROM studies")
        conn.execute(
            f"WITH RECURSIVE k(m) AS (SELECT 1 UNION ALL SELECT m + 1 FROM k WHERE m < {per_study})"
            " INSERT INTO instances (series_fk, sop_uid, sop_class_uid, transfer_syntax, path,"
            " size, dataset_offset, sha256, received_at, pack_fk, is_local)"
            " SELECT se.id, se.series_uid || '.' || m, '1.2.840.10008.5.1.4.1.1.2',"
            " '1.2.840.10008.1.2.1', st.study_uid || '/' || se.series_uid || '/' || se.series_uid"
            " || '.' || m || '.0123456789abcdef.dcm', 1000, 132, 'x', 0, se.study_fk, 0"
            " FROM series se JOIN studies st ON se.study_fk = st.id, k")
        conn.execute("COMMIT")
    finally:
        conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def year(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SimpleNamespace]:
    folder = tmp_path_factory.mktemp("year")
    async with Index(folder / "index.sqlite3"):
        pass  # the schema
    fill_evicted(folder / "index.sqlite3", EVICTED // 20, 20)
    files = FileStore(folder / "store")
    files.create_folders()
    async with Index(folder / "index.sqlite3") as index:
        yield SimpleNamespace(index=index, files=files)


async def peak_python_bytes(operation: Any) -> int:
    tracemalloc.start()
    try:
        await operation
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_the_sync_agents_start_up_sweep_does_not_load_every_evicted_path(
        year: SimpleNamespace) -> None:
    """The agent's start-up sweep for files an interrupted eviction left walks the store
    and looks up what it finds. It loaded (and stat'ed) every evicted instance's path:
    60 s and 1.3 GB at 2.7 million evicted rows, before systemd's 90 s start timeout."""
    assert await sweep_leftover_files(year) == 0  # type: ignore[arg-type]
    assert await peak_python_bytes(sweep_leftover_files(year)) < BOUND  # type: ignore[arg-type]


async def test_fsck_at_start_up_does_not_load_every_evicted_path(year: SimpleNamespace) -> None:
    """fsck (run by serve after an unclean stop) needs the paths that must be local and
    the files on disk. It loaded every path of the index: 75 s and 1.3 GB at 3 million
    rows, at the start after a crash or a power cut."""
    report = await fsck(year.files, year.index, repair=False)
    assert report.clean and not report.orphan_files
    assert await peak_python_bytes(fsck(year.files, year.index, repair=False)) < BOUND


def traced(conn: sqlite3.Connection, operation: Callable[[sqlite3.Connection], object]
           ) -> list[str]:
    """The statements `operation` runs on `conn`, with their parameters bound."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        operation(conn)
    finally:
        conn.set_trace_callback(None)
    return statements


async def traced_reads(index: Index, operation: Awaitable[T]) -> tuple[T, list[str]]:
    """What `operation` returns, and the statements it ran on the index's reader."""
    statements: list[str] = []
    await database.run_sync(index.reader, lambda c: c.set_trace_callback(statements.append))
    try:
        return await operation, statements
    finally:
        await database.run_sync(index.reader, lambda c: c.set_trace_callback(None))


def plan(conn: sqlite3.Connection, sql: str) -> list[str]:
    return [str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]


async def test_replication_candidates_are_found_from_the_unpacked_instances(
        year: SimpleNamespace) -> None:
    """The sync pass's candidates (stable studies with unpacked local instances): the
    EXISTS per study walked every unpacked instance of the index for each study: 210 s a
    pass over 100,000 studies while one 5,000-instance study waited to replicate. The
    subquery must run once, not per study."""
    _, statements = await traced_reads(year.index,
                                       stable_studies(year.index, time.time(), 300.0))
    (sql,) = [s for s in statements if s.startswith("SELECT")]
    steps = await database.run_sync(year.index.reader, plan, sql)
    assert not any(step.startswith("CORRELATED") for step in steps), steps


@pytest.mark.parametrize("query", [has_unpacked, instances_to_pack])
async def test_a_studys_unpacked_instances_are_read_through_its_series(
        year: SimpleNamespace, query: Callable[[sqlite3.Connection, int], object]) -> None:
    """Per study (each replication reads them, and checks them again at its commit):
    through instances_pack, SQLite walked the unpacked instances of every study."""
    def steps(conn: sqlite3.Connection) -> list[str]:
        (sql,) = traced(conn, lambda c: query(c, 1))
        return plan(conn, sql)

    found = await database.run_sync(year.index.reader, steps)
    assert not any("instances_pack" in step for step in found), found
    assert any("instances_series" in step for step in found), found


async def test_the_totals_of_every_scrape_read_an_index_not_the_instance_table(
        year: SimpleNamespace) -> None:
    """`status`, the status page and each /metrics scrape sum the instances and their
    bytes (local and all): a scan of the instance table took 1.7 s warm (11 s cold) at 3
    million rows. An index of (size, is_local) covers every sum (migration 0020)."""
    _, statements = await traced_reads(year.index, year.index.totals())
    for sql in statements:
        steps = await database.run_sync(year.index.reader, plan, sql)
        table_scans = [step for step in steps if step.startswith("SCAN instances")
                       and "COVERING INDEX" not in step]
        assert not table_scans, steps


async def test_the_recall_poll_of_every_second_reads_only_pending_requests(
        year: SimpleNamespace) -> None:
    """The agent's recall poll runs every second; served requests stay (one per study
    ever recalled), and it scanned them all (migration 0021 indexes the pending ones)."""
    recalls, statements = await traced_reads(year.index, pending_recalls(year.index))
    assert recalls == []
    (sql,) = statements
    steps = await database.run_sync(year.index.reader, plan, sql)
    # A scan of the partial index walks the pending requests only.
    assert steps == ["SCAN recall_requests USING INDEX recall_requests_pending"], steps


async def test_the_drop_folder_count_of_every_scrape_reads_an_index(
        year: SimpleNamespace) -> None:
    """The drop folder's ingested count (status, status page, /metrics) counted the
    instances from its source AE by a scan of the instance table: 1.7 s warm at 3 million
    rows, on every scrape. Migration 0022 indexes the source AE."""
    count, statements = await traced_reads(year.index,
                                           year.index.instance_count_from("dropfolder"))
    assert count == 0
    (sql,) = statements
    steps = await database.run_sync(year.index.reader, plan, sql)
    assert steps == ["SEARCH instances USING COVERING INDEX instances_source_ae (source_ae=?)"], \
        steps


async def test_the_hourly_lifecycle_reads_only_the_packs_it_moves(tmp_path: Path) -> None:
    """The lifecycle read every verified pack each hour to find the few due for a colder
    tier (2 s and 190 MB at 97,000 packs); it asks the index for those only."""
    path = tmp_path / "index.sqlite3"
    async with Index(path):
        pass
    fill_evicted(path, 2000, 1)
    with sqlite3.connect(path) as conn:  # a year on: every pack already where its age puts it
        conn.execute("UPDATE packs SET access_tier = 'Cold'")
        conn.execute("UPDATE packs SET access_tier = 'Hot' WHERE id IN (1, 2)")
        conn.execute("UPDATE packs SET created_at = ? WHERE id = 2", (time.time(),))
    moves: list[tuple[str, Tier]] = []

    async def set_tier(name: str, tier: Tier) -> None:
        moves.append((name, tier))

    async with Index(path) as index:
        ctx = SimpleNamespace(index=index, packs=SimpleNamespace(set_tier=set_tier),
                              config=SimpleNamespace(sync=SimpleNamespace(
                                  cool_after_days=30.0, cold_after_days=90.0,
                                  archive_after_days=0.0)))
        assert await apply_lifecycle(ctx) == 1  # type: ignore[arg-type]
        assert moves == [("p1", Tier.COLD)]
        assert await peak_python_bytes(apply_lifecycle(ctx)) < 256 << 10  # type: ignore[arg-type]
        assert len(moves) == 1


CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


async def test_c_get_negotiation_reads_the_stored_syntaxes_not_the_instance_table(
        year: SimpleNamespace) -> None:
    """Each C-GET association, at most every 30 s, asks which syntaxes each SOP class is
    stored in: a GROUP BY over the instance table took 2.1 s at 3 million rows on the
    reader every C-FIND waits for. Triggers keep the counts (migration 0023)."""
    counts, statements = await traced_reads(year.index, year.index.syntax_counts())
    assert counts == {(CT, EXPLICIT): EVICTED}
    (sql,) = statements
    steps = await database.run_sync(year.index.reader, plan, sql)
    assert not any("instances" in step for step in steps), steps


async def filled_index(folder: Path, studies: int, per_study: int, then: str) -> Path:
    """A new index of evicted studies (fill_evicted), then the SQL script `then` on it."""
    path = folder / "index.sqlite3"
    async with Index(path):
        pass  # the schema
    fill_evicted(path, studies, per_study)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(then)
    finally:
        conn.close()
    return path


async def test_stored_syntax_counts_follow_instances_replaced_and_deleted(
        tmp_path: Path) -> None:
    path = await filled_index(tmp_path, 1, 3,
                              "UPDATE instances SET transfer_syntax = '1.2.840.10008.1.2.4.70'"
                              " WHERE id = 1;"  # a re-sent instance in another syntax
                              " DELETE FROM instances WHERE id = 2;")
    async with Index(path) as index:
        assert await index.syntax_counts() == {(CT, EXPLICIT): 1,
                                               (CT, "1.2.840.10008.1.2.4.70"): 1}


async def test_stored_syntax_counts_are_filled_from_the_instances_of_an_older_index(
        tmp_path: Path) -> None:
    """Migration 0023 on a box that already holds instances counts them once."""
    path = await filled_index(  # back to the index as version 22 left it, with its rows
        tmp_path, 2, 3,
        "DROP TABLE stored_syntaxes; DROP TRIGGER stored_syntaxes_insert;"
        " DROP TRIGGER stored_syntaxes_delete; DROP TRIGGER stored_syntaxes_update;"
        " CREATE INDEX instances_class_syntax ON instances(sop_class_uid, transfer_syntax);"
        " DELETE FROM schema_migrations WHERE version = 23;")
    async with Index(path) as index:
        assert await index.syntax_counts() == {(CT, EXPLICIT): 6}


async def test_an_upgrade_checks_every_foreign_key_only_after_a_table_rebuild(
        tmp_path: Path) -> None:
    """A check of every foreign key reads every row of every table that has one: 1.3 s at
    3 million instance rows. It ran after each migration, and an upgrade from schema 19
    (14 migrations) took 29 s at 3 million rows, most of it in those checks. Only a
    migration that rebuilds a table runs with foreign keys off and needs it (since 19,
    0029 alone); SQLite enforces them on the others as they run."""
    path = tmp_path / "index.sqlite3"
    load_dump(path)
    conn = await database.connect(path)
    statements: list[str] = []
    await conn.set_trace_callback(statements.append)
    try:
        await database.migrate(conn, path)
    finally:
        await conn.close()
    assert len([s for s in statements if s.startswith("PRAGMA foreign_key_check")]) == 1
