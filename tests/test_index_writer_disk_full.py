"""The index writer on a full disk: a statement whose changes spill into the WAL and
find no room makes SQLite roll the whole transaction back by itself; the writer's own
ROLLBACK must not then replace "no space" (OutOfSpace: 0x0213, 0xA700, ...) with "no
transaction is active" (IndexUnavailable: 0x0110)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosqlite
import pytest
from conftest import EdgeServer, init_home
from pydicom.uid import generate_uid
from smalldisk import NEEDS_ROOT, fill, no_reserve, tmpfs
from test_storage_commitment import MODALITY, Modality

from appliance.base.errors import OutOfSpace
from appliance.store import database

pytestmark = NEEDS_ROOT

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RESOURCE_LIMITATION, SUCCESS = 0x0213, 0x0000
# More rows than SQLite's page cache (2 MB) holds: the insert spills into the WAL.
SPILLING_ITEMS = 20_000
SPILLING_BLOB = 3 * 1024 * 1024


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", 16) as mount:
        yield mount


def test_a_commitment_request_that_fills_the_index_disk_answers_resource_limitation(
        edge_server_factory: Callable[..., EdgeServer], small_tmpfs: Path) -> None:
    """Its rows spill out of the page cache mid-statement: 0x0213, as for a full disk
    at COMMIT, not 0x0110 "cannot rollback"; sent again once there is room, it is taken."""
    modality = Modality()
    try:
        server = edge_server_factory(no_reserve(init_home(small_tmpfs / "home")), start=False)
        server.add_peer("modality", MODALITY, modality.port, allow="store,commit")
        server.start()
        items = [(CT_IMAGE, str(generate_uid())) for _ in range(SPILLING_ITEMS)]
        filler = fill(small_tmpfs)
        status, transaction_uid, _ = modality.request(server, items, keep_open=False)
        assert status == RESOURCE_LIMITATION
        assert "no transaction is active" not in server.log()
        assert server.echo().ok
        filler.unlink()
        status, _, _ = modality.request(server, items, transaction_uid=transaction_uid,
                                        keep_open=False)
        assert status == SUCCESS
    finally:
        modality.close()


def _insert(size: int) -> Callable[[sqlite3.Connection], None]:
    def insert(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (?)", (b"x" * size,))
    return insert


async def _insert_async(conn: aiosqlite.Connection) -> None:
    await conn.execute("INSERT INTO t VALUES (zeroblob(100))")


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixed"])
def test_a_group_whose_statement_fills_the_disk_fails_whole_with_out_of_space(
        small_tmpfs: Path, mixed: bool) -> None:
    """Its neighbours' rows went with SQLite's rollback: they fail too, saying no space,
    and nothing of the group is in the index."""
    path = small_tmpfs / "index.sqlite3"

    async def run() -> list[BaseException | None]:
        conn = await database.connect(path)
        await conn.execute("CREATE TABLE t (x BLOB)")
        writer = database.Writer(conn, window_ms=200)
        writer.start()
        fill(small_tmpfs)
        try:
            first = writer.submit(_insert_async) if mixed else writer.submit_sync(_insert(100))
            outcomes = await asyncio.gather(first, writer.submit_sync(_insert(SPILLING_BLOB)),
                                            return_exceptions=True)
        finally:
            await writer.stop()
            async with conn.execute("SELECT count(*) FROM t") as cur:
                assert (await cur.fetchone())[0] == 0
            await conn.close()
        return [o if isinstance(o, BaseException) else None for o in outcomes]

    outcomes = asyncio.run(run())
    assert all(isinstance(o, OutOfSpace) for o in outcomes), outcomes
