"""The power-loss model of tests/crashfs.py, with plain os calls: what survives a cut.

Each test makes changes through the mount, cuts the power and reads the durable view
crashfs materializes. These pin the model's strictness: a laxer model (contents kept
without their fsync, entries without their folder's fsync, a rename made durable by
either folder, identities keyed on reused inodes) fails one of them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from crashfs import CrashFS

Mount = Callable[..., CrashFS]


@pytest.fixture
def crash(tmp_path: Path) -> Iterator[Mount]:
    """mount(**options) -> a CrashFS over tmp_path/"backing" (made first, so a test can
    put files there that exist at mount time) at tmp_path/"mnt"; unmounted at the end."""
    (tmp_path / "backing").mkdir()
    mounts: list[CrashFS] = []

    def mount(**options: float) -> CrashFS:
        fs = CrashFS(tmp_path / "backing", tmp_path / "mnt", tmp_path / "state", **options)
        mounts.append(fs.__enter__())
        return fs

    yield mount
    for fs in mounts:
        fs.__exit__(None, None, None)


def after_cut(fs: CrashFS, tmp_path: Path) -> Path:
    fs.cut()
    fs.materialize(tmp_path / "durable")
    return tmp_path / "durable"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, *, sync: bool = False, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_a_file_written_and_never_fsynced_is_gone(crash: Mount, tmp_path: Path) -> None:
    fs = crash()
    write(fs.mount / "a", b"data")
    assert not (after_cut(fs, tmp_path) / "a").exists()


def test_a_file_whose_folder_was_fsynced_but_not_itself_is_empty(
        crash: Mount, tmp_path: Path) -> None:
    fs = crash()
    write(fs.mount / "a", b"data")
    fsync_path(fs.mount)
    assert (after_cut(fs, tmp_path) / "a").read_bytes() == b""


def test_a_file_fsynced_but_not_its_folder_is_gone(crash: Mount, tmp_path: Path) -> None:
    fs = crash()
    write(fs.mount / "a", b"data", sync=True)
    assert not (after_cut(fs, tmp_path) / "a").exists()


def test_a_file_and_its_folder_fsynced_survive(crash: Mount, tmp_path: Path) -> None:
    fs = crash()
    write(fs.mount / "a", b"data", sync=True, mode=0o600)
    fsync_path(fs.mount)
    durable = after_cut(fs, tmp_path) / "a"
    assert durable.read_bytes() == b"data"
    assert durable.stat().st_mode & 0o777 == 0o600  # modes copied: serve checks its secrets'


def test_what_was_there_at_mount_time_is_durable(crash: Mount, tmp_path: Path) -> None:
    (tmp_path / "backing" / "sub").mkdir()
    (tmp_path / "backing" / "sub" / "old").write_bytes(b"old")
    fs = crash()
    assert (after_cut(fs, tmp_path) / "sub" / "old").read_bytes() == b"old"


def test_contents_changed_after_the_fsync_go_back(crash: Mount, tmp_path: Path) -> None:
    (tmp_path / "backing" / "f").write_bytes(b"0123456789" * 10000)
    fs = crash()
    with open(fs.mount / "f", "r+b") as fh:
        fh.seek(70000)
        fh.write(b"synced")
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(5)
        fh.write(b"lost")
        fh.seek(0, os.SEEK_END)
        fh.write(b"tail lost")
    data = (after_cut(fs, tmp_path) / "f").read_bytes()
    expected = bytearray(b"0123456789" * 10000)
    expected[70000:70006] = b"synced"
    assert data == bytes(expected)


def test_a_truncation_is_durable_at_the_fsync(crash: Mount, tmp_path: Path) -> None:
    (tmp_path / "backing" / "f").write_bytes(b"x" * 1000)
    (tmp_path / "backing" / "g").write_bytes(b"y" * 1000)
    fs = crash()
    with open(fs.mount / "f", "r+b") as fh:
        fh.truncate(10)
        fh.seek(20)
        fh.write(b"z")
        fh.flush()
        os.fsync(fh.fileno())
    os.truncate(fs.mount / "g", 10)
    durable = after_cut(fs, tmp_path)
    assert (durable / "f").read_bytes() == b"x" * 10 + b"\0" * 10 + b"z"
    assert (durable / "g").read_bytes() == b"y" * 1000


def test_a_rename_without_the_new_folders_fsync_leaves_the_old_name(
        crash: Mount, tmp_path: Path) -> None:
    (tmp_path / "backing" / "src").mkdir()
    (tmp_path / "backing" / "dst").mkdir()
    (tmp_path / "backing" / "src" / "f").write_bytes(b"old")
    fs = crash()
    os.rename(fs.mount / "src" / "f", fs.mount / "dst" / "f")
    durable = after_cut(fs, tmp_path)
    assert (durable / "src" / "f").read_bytes() == b"old"
    assert not (durable / "dst" / "f").exists()


def test_a_rename_durable_in_the_old_folder_only_loses_the_file(
        crash: Mount, tmp_path: Path) -> None:
    """Each folder's entries are its own fsync's: one of the two is not the rename."""
    (tmp_path / "backing" / "src").mkdir()
    (tmp_path / "backing" / "dst").mkdir()
    (tmp_path / "backing" / "src" / "f").write_bytes(b"old")
    fs = crash()
    os.rename(fs.mount / "src" / "f", fs.mount / "dst" / "f")
    fsync_path(fs.mount / "src")
    durable = after_cut(fs, tmp_path)
    assert not (durable / "src" / "f").exists()
    assert not (durable / "dst" / "f").exists()


def test_a_rename_over_a_file_durable_in_its_folder_replaces_it(
        crash: Mount, tmp_path: Path) -> None:
    (tmp_path / "backing" / "f").write_bytes(b"old")
    fs = crash()
    write(fs.mount / "f.part", b"new", sync=True)
    os.replace(fs.mount / "f.part", fs.mount / "f")
    fsync_path(fs.mount)
    durable = after_cut(fs, tmp_path)
    assert (durable / "f").read_bytes() == b"new"
    assert sorted(os.listdir(durable)) == ["f"]


def test_an_unlink_without_the_folders_fsync_is_undone(crash: Mount, tmp_path: Path) -> None:
    (tmp_path / "backing" / "f").write_bytes(b"kept")
    fs = crash()
    os.unlink(fs.mount / "f")
    assert (after_cut(fs, tmp_path) / "f").read_bytes() == b"kept"


def test_identities_are_not_backing_inodes(crash: Mount, tmp_path: Path) -> None:
    """A file removed and another made (which may get its inode) are two objects."""
    fs = crash()
    write(fs.mount / "a", b"first", sync=True)
    fsync_path(fs.mount)
    os.unlink(fs.mount / "a")
    write(fs.mount / "b", b"second")
    os.rename(fs.mount / "b", fs.mount / "a")
    durable = after_cut(fs, tmp_path)
    assert (durable / "a").read_bytes() == b"first"
    assert sorted(os.listdir(durable)) == ["a"]


def test_a_new_folders_entry_needs_its_parents_fsync(crash: Mount, tmp_path: Path) -> None:
    """The shape of the first instance of a series: store/study/series/file."""
    fs = crash()
    os.makedirs(fs.mount / "study" / "series")
    write(fs.mount / "study" / "series" / "f", b"instance", sync=True)
    fsync_path(fs.mount / "study" / "series")
    fsync_path(fs.mount / "study")
    assert not (after_cut(fs, tmp_path) / "study").exists()


def test_a_new_folders_entry_with_every_parent_fsynced_survives(
        crash: Mount, tmp_path: Path) -> None:
    fs = crash()
    os.makedirs(fs.mount / "study" / "series")
    write(fs.mount / "study" / "series" / "f", b"instance", sync=True)
    for folder in (fs.mount / "study" / "series", fs.mount / "study", fs.mount):
        fsync_path(folder)
    assert (after_cut(fs, tmp_path) / "study" / "series" / "f").read_bytes() == b"instance"


def test_a_hard_link_is_an_entry_of_its_own_folder(crash: Mount, tmp_path: Path) -> None:
    (tmp_path / "backing" / "spool").mkdir()
    (tmp_path / "backing" / "series").mkdir()
    fs = crash()
    write(fs.mount / "spool" / "rx", b"instance", sync=True)
    os.link(fs.mount / "spool" / "rx", fs.mount / "series" / "f")
    os.unlink(fs.mount / "spool" / "rx")
    fsync_path(fs.mount / "series")
    durable = after_cut(fs, tmp_path)
    assert (durable / "series" / "f").read_bytes() == b"instance"
    assert os.listdir(durable / "spool") == []


def test_every_operation_after_the_cut_fails(crash: Mount, tmp_path: Path) -> None:
    fs = crash()
    write(fs.mount / "a", b"data")
    fs.cut()
    for operation in (lambda: os.listdir(fs.mount), lambda: (fs.mount / "b").write_bytes(b"x"),
                      lambda: os.mkdir(fs.mount / "d")):
        with pytest.raises(OSError) as failed:
            operation()
        assert failed.value.errno == 5  # EIO


def test_an_fsync_under_way_at_the_cut_counts_for_nothing(
        crash: Mount, tmp_path: Path) -> None:
    fs = crash(fsync_delay=2.0)
    write(fs.mount / "a", b"data")
    syncing = threading.Thread(target=lambda: _fsync_quietly(fs.mount))
    syncing.start()
    time.sleep(0.5)
    durable = after_cut(fs, tmp_path)
    syncing.join(10)
    assert not (durable / "a").exists()


def _fsync_quietly(folder: Path) -> None:
    with contextlib.suppress(OSError):  # EIO: the cut came first, as the test wants
        fsync_path(folder)


def test_sqlite_commits_survive_at_synchronous_full_only(crash: Mount, tmp_path: Path) -> None:
    """SQLite fsyncs its WAL at each commit (FULL) and a new WAL's folder itself; OFF
    leaves it to the OS. The model tells the two apart, as a power loss does."""
    setup = sqlite3.connect(tmp_path / "backing" / "x.db")
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute("CREATE TABLE t (n INTEGER)")
    setup.commit()
    setup.close()
    fs = crash()
    db = sqlite3.connect(fs.mount / "x.db", isolation_level=None)
    db.execute("PRAGMA synchronous = FULL")
    for n in range(50):
        db.execute("INSERT INTO t VALUES (?)", (n,))
    db.execute("PRAGMA synchronous = OFF")
    for n in range(50, 80):
        db.execute("INSERT INTO t VALUES (?)", (n,))
    durable = after_cut(fs, tmp_path)
    with contextlib.suppress(sqlite3.Error):  # its files fail with EIO now
        db.close()
    check = sqlite3.connect(durable / "x.db")
    try:
        assert check.execute("SELECT count(*), max(n) FROM t").fetchone() == (50, 49)
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        check.close()


def test_the_seeded_keep_mode_makes_some_unsynced_changes_durable(
        crash: Mount, tmp_path: Path) -> None:
    fs = crash(keep_probability=1.0, keep_seed=3)
    os.mkdir(fs.mount / "d")
    write(fs.mount / "d" / "f", b"never synced")
    assert (after_cut(fs, tmp_path) / "d" / "f").read_bytes() == b"never synced"
