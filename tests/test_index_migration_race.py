"""Two processes open an index that needs migrating: one migrates, the other waits for it.

serve and the sync agent start together at boot, and an operator may run `status`
beside them. The first to open an upgraded index migrates it; the others must wait
for as long as that takes (store/migration_lock.py), not fail on SQLite's busy timeout
(30 s) and be restarted by systemd until the migration is done. Here the index is the
schema-19 dump of tests/test_index_upgrade.py, and a real process migrates it: the
product's Index, in a subprocess whose fold of migration 0033 holds on its first name
until the test lets it go, so the migration lasts as long as the test needs. The
other side gets a busy timeout of 0.1 s (the product's own is 30 s): past it, any
wait on SQLite's lock fails. The same held migration, killed, shows that a kill half-way
through leaves the index as the migration before it left it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import _env, init_home, pacs_edge_command
from test_index_upgrade import load_dump

from appliance.store import database
from appliance.store.index import Index

# The product's Index, in a process of its own, migrating `index`; migration 0033's
# fold (the patients' names) touches `started` on its first call and then holds until
# `release` exists.
MIGRATOR = """
import asyncio, sys, time
from pathlib import Path
from appliance.store import database
from appliance.store.index import Index

index, started, release = map(Path, sys.argv[1:])
fold = database.SCHEMA_FUNCTIONS["pacs_fold_pn_nfc"]

def held(name):
    if not started.exists():
        started.touch()
        while not release.exists():
            time.sleep(0.01)
    return fold(name)

database.SCHEMA_FUNCTIONS["pacs_fold_pn_nfc"] = held

async def main():
    async with Index(index):
        pass

asyncio.run(main())
"""
DEADLINE = 30.0
LATEST = max(version for version, _, _ in database.migration_scripts())


def wait_until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        time.sleep(0.02)


class Migrator:
    """The process that migrates, held in migration 0033 until released."""

    def __init__(self, index: Path) -> None:
        self.started = index.with_name("started")
        self.release = index.with_name("release")
        self.proc = subprocess.Popen([sys.executable, "-c", MIGRATOR, str(index),
                                      str(self.started), str(self.release)],
                                     env=_env(), stdin=subprocess.DEVNULL)
        wait_until("the migrator holds migration 0033",
                   lambda: self.started.exists() or self.proc.poll() is not None)
        assert self.proc.poll() is None, f"the migrator exited {self.proc.returncode}"

    def finish(self) -> int:
        self.release.touch()
        return self.proc.wait(DEADLINE)


@pytest.fixture
def old_index(tmp_path: Path) -> Path:
    path = tmp_path / "index.sqlite3"
    load_dump(path)
    return path


@pytest.fixture
def migrator(old_index: Path) -> Iterator[Migrator]:
    migrating = Migrator(old_index)
    yield migrating
    migrating.release.touch()
    migrating.proc.kill()
    migrating.proc.wait(DEADLINE)


async def test_opening_an_index_another_process_migrates_waits_for_it_past_the_busy_timeout(
        old_index: Path, migrator: Migrator, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance")
    monkeypatch.setattr(database, "BUSY_TIMEOUT_MS", 100)

    async def open_index() -> int:
        async with Index(old_index) as index, index.reader.execute(
                "SELECT MAX(version) FROM schema_migrations") as cur:
            row = await cur.fetchone()
            return int(row[0])

    opening = asyncio.create_task(open_index())
    deadline = time.monotonic() + DEADLINE
    while not (opening.done() or "waiting for it" in caplog.text):
        assert time.monotonic() < deadline, "the second opener neither waited nor failed"
        await asyncio.sleep(0.02)
    assert migrator.finish() == 0
    assert await opening == LATEST
    waited = [r.getMessage() for r in caplog.records]
    assert f"index migration under way in another process: waiting for it pid={migrator.proc.pid}" \
        in waited
    # The migrations were the other process's: none is reported as this one's.
    assert not [message for message in waited if message.startswith("index migrated")]


def test_status_during_a_migration_says_it_waits_for_it_then_answers(
        tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    index = home / "index.sqlite3"
    for made in home.glob("index.sqlite3*"):
        made.unlink()
    load_dump(index)
    migrating = Migrator(index)
    stderr = tmp_path / "status.err"
    with open(stderr, "wb") as err:
        status = subprocess.Popen([*pacs_edge_command(), "status", "--home", str(home)],
                                  env=_env(), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until("status says it waits for the migration",
                   lambda: b"waiting for it" in stderr.read_bytes())
        assert migrating.finish() == 0
        assert status.wait(DEADLINE) == 0
    finally:
        for proc in (migrating.proc, status):
            proc.kill()
            proc.wait(DEADLINE)
    assert (f"index migration under way in another process: waiting for it"
            f" pid={migrating.proc.pid}") in stderr.read_text()


async def test_a_migration_killed_half_way_leaves_the_last_one_committed_and_runs_again(
        old_index: Path, migrator: Migrator) -> None:
    """SIGKILL inside migration 0033 (systemd's kill at the end of a start timeout, a power
    cut): each migration is one transaction, so the index is as 0032 left it, and the
    next open applies 0033 from its start."""
    migrator.proc.kill()
    migrator.proc.wait(DEADLINE)
    with closing(sqlite3.connect(old_index)) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (32,)
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        trigger = conn.execute("SELECT sql FROM sqlite_master"
                               " WHERE name = 'patients_name_folded_insert'").fetchone()[0]
        assert "pacs_fold_pn(" in trigger  # 0029's trigger, not 0033's
    async with Index(old_index) as index, index.reader.execute(
            "SELECT MAX(version) FROM schema_migrations") as cur:
        assert tuple(await cur.fetchone()) == (LATEST,)
