"""Small file systems for the tests of a full disk: a tmpfs of a given size (and number
of inodes) mounted for a block (root only: the modules that use it skip otherwise), a
filler file that takes every block left, and a home without the store reserve, for the
tests of what the box does at the disk's last block (an operator may set
`[store] reserve_mb = 0`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EdgeServer

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(mount: Path, size_mb: int, *, inodes: int = 0) -> Iterator[Path]:
    """A tmpfs of `size_mb` at `mount` (made here) for the block, mode 0750 as a data
    home's disk; with `inodes`, that many at most (its root folder takes one), as an
    ext4 has a fixed number; lazily unmounted at the end, even if a process still
    holds a file."""
    mount.mkdir()
    options = f"size={size_mb}m,mode=0750" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path) -> Path:
    """Take every free block of `mount` with one file; returns it."""
    filler = mount / "filler.bin"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    subprocess.run(["fallocate", "-l", str(free), str(filler)], check=True)
    return filler


def no_reserve(home: Path) -> Path:
    """`home` with `[store] reserve_mb = 0`: ingest fills the disk to its last block."""
    EdgeServer(home).configure(store={"reserve_mb": 0})
    return home
