"""The store's file system: the room left in bytes and in inodes, from one statvfs(2).

Computed here only: ingest's reserve check (FileStore.check_space), /readyz and
the health report (`status`, the status page, /metrics) read the same figures.

Inodes are room of their own. ext4 fixes their number at mkfs (one per 16 KiB by
default), every instance file takes one, and a store of millions of small
instances (CR, ultrasound frames, SRs) can use them all with bytes to spare:
then creating a file fails with ENOSPC and ingest answers out of resources
(0xA700) while `df -h` shows free space (`df -i` shows the inodes). Some file
systems have no fixed number (btrfs, some network ones): statvfs reports 0 of
0, and nothing here counts inodes as used there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskState:
    """Free and total bytes and inodes of one file system; free as the service user
    may use them (statvfs f_bavail, f_favail: root's reserved blocks not counted)."""

    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int  # 0: the file system has no fixed number of inodes

    @property
    def used_percent(self) -> float:
        return _used_percent(self.free_bytes, self.total_bytes)

    @property
    def inodes_used_percent(self) -> float:
        return _used_percent(self.free_inodes, self.total_inodes)


def _used_percent(free: int, total: int) -> float:
    return 100.0 * (total - free) / total if total else 0.0


def disk_state(path: Path) -> DiskState:
    """The file system that holds `path`, now."""
    st = os.statvfs(path)
    return DiskState(free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize,
                     free_inodes=st.f_favail, total_inodes=st.f_files)
