"""The drop folder on a full store: files stay where they were dropped, are retried every
rescan, and the pause is one log line, not one per file per rescan."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dicomgen
import pytest
from conftest import EdgeServer, init_home
from smalldisk import NEEDS_ROOT, fill, tmpfs

RESCAN_SECONDS = 0.5
PAUSED = "drop folder ingest paused"

pytestmark = NEEDS_ROOT


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}", pytrace=False)
        time.sleep(0.1)


@contextlib.contextmanager
def edge_on_a_small_store(tmp_path: Path, *,
                          reserve_mb: int) -> Iterator[tuple[EdgeServer, Path, Path]]:
    """A serving box whose store is alone on an 8 MB disk, with a drop folder; yields
    the server, the drop folder and the disk."""
    drop = tmp_path / "drop"
    drop.mkdir()
    with tmpfs(tmp_path / "store", 8) as disk:
        server = EdgeServer(init_home(tmp_path / "home"))
        server.configure(store={"path": disk / "store", "reserve_mb": reserve_mb},
                         dropfolder={"paths": [str(drop)], "stable_seconds": 0.2,
                                     "rescan_seconds": RESCAN_SECONDS})
        server.start()
        try:
            yield server, drop, disk
        finally:
            server.stop()
        assert not server.unclean_stops, server.unclean_stops


def test_full_store_pauses_the_drop_folder_with_one_log_line_and_resumes(
        tmp_path: Path) -> None:
    study = dicomgen.make_studies(tmp_path / "study", seed=21, series_per_study=1,
                                  instances_per_series=5, size=64)
    with edge_on_a_small_store(tmp_path, reserve_mb=0) as (server, drop, disk):
        filler = fill(disk)
        for instance in study:
            shutil.copy(instance.path, drop / instance.path.name)
        wait_until("the drop folder pauses", lambda: PAUSED in server.log())
        # Every file is retried each rescan; six rounds would have been 30 lines.
        time.sleep(6 * RESCAN_SECONDS)
        assert server.log().count(PAUSED) == 1, server.log()
        assert sorted(p.name for p in drop.iterdir()) == sorted(i.path.name for i in study)

        filler.unlink()
        wait_until("the dropped files are stored", lambda: not any(drop.iterdir()))
        assert server.log().count("drop folder ingest resumed") == 1
        assert server.log().count(PAUSED) == 1


def test_a_store_below_its_reserve_copies_no_dropped_file_into_the_spool(
        tmp_path: Path) -> None:
    """While the store is below its reserve every waiting file is refused at each
    rescan: it must be refused before it is copied, or a CD of 1 GB waiting on a full
    box is written to the spool and deleted again every rescan_seconds."""
    study = dicomgen.make_studies(tmp_path / "study", seed=22, series_per_study=1,
                                  instances_per_series=3, size=64)
    with edge_on_a_small_store(tmp_path, reserve_mb=16) as (server, drop, disk):
        spool = disk / "store" / ".spool"
        untouched = spool.stat().st_mtime_ns
        for instance in study:
            shutil.copy(instance.path, drop / instance.path.name)
        wait_until("the drop folder pauses", lambda: PAUSED in server.log())
        time.sleep(4 * RESCAN_SECONDS)
        assert spool.stat().st_mtime_ns == untouched  # no spool file made, or removed
        assert len(list(drop.iterdir())) == len(study)


def test_a_dropped_file_larger_than_the_free_space_is_not_copied_into_the_spool(
        tmp_path: Path) -> None:
    """A file larger than the store's free space (above its reserve) was copied into the
    spool until the disk was full, at every rescan: each time the store took nothing
    else meanwhile (a modality's C-STORE answered out of resources), and the pause said
    only "no space left". It is refused before the copy, as a store below its reserve
    is: the drop folder pauses, saying how much it needs."""
    [big] = dicomgen.make_studies(tmp_path / "study", seed=23, series_per_study=1,
                                  instances_per_series=1, size=2300)  # 10 MB
    with edge_on_a_small_store(tmp_path, reserve_mb=1) as (server, drop, disk):
        spool = disk / "store" / ".spool"
        untouched = spool.stat().st_mtime_ns
        shutil.copy(big.path, drop / big.path.name)
        wait_until("the drop folder pauses", lambda: PAUSED in server.log())
        time.sleep(4 * RESCAN_SECONDS)
        assert spool.stat().st_mtime_ns == untouched  # no spool file made, or removed
        assert "reason=10.1 MB needed" in server.log(), server.log()
        assert [p.name for p in drop.iterdir()] == [big.path.name]
