"""Small file systems for the tests of a full disk: a tmpfs of a given size mounted for
a block (root only: the modules that use it skip otherwise), and a filler file that
takes every block left."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(mount: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` at `mount` (made here) for the block, mode 0750 as a data
    home's disk; lazily unmounted at the end, even if a process still holds a file."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0750", "tmpfs",
                    str(mount)], check=True)
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
