"""The sync agent's eviction by disk use (`[sync] disk_high_watermark_percent` and
`disk_low_watermark_percent`), on a real small file system: bytes and inodes are each
a room of their own. A store of many small instances runs out of inodes with bytes to
spare (one inode an instance file), and then refuses every new instance."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dicomgen
import pytest
from conftest import EdgeServer, init_home
from smalldisk import NEEDS_ROOT, tmpfs
from syncagent import import_files, sync_once, tier_state

pytestmark = NEEDS_ROOT

INSTANCES = 30  # per study: what evicting one frees, in inodes (the estimate eviction makes)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[EdgeServer]:
    """A home alone on a 256 MB tmpfs of 500 inodes, its cloud elsewhere."""
    with tmpfs(tmp_path / "disk", 256, inodes=500) as disk:
        server = EdgeServer(init_home(disk / "home"))
        server.configure(cloud={"url": f"file://{tmp_path / 'cloud'}"},
                         sync={"evict_after_days": 0.0})
        yield server


def used(path: Path) -> tuple[float, float]:
    """The percent of bytes and of inodes used on `path`'s file system."""
    stat = os.statvfs(path)
    return (100 * (stat.f_blocks - stat.f_bavail) / stat.f_blocks,
            100 * (stat.f_files - stat.f_favail) / stat.f_files)


def test_inodes_above_the_high_watermark_evict_the_least_recently_used_study(
        box: EdgeServer, tmp_path: Path) -> None:
    studies = [dicomgen.make_studies(tmp_path / f"study{n}", seed=70 + n, series_per_study=1,
                                     instances_per_series=INSTANCES) for n in range(3)]
    for study in studies:  # in this order: the first is the least recently used
        import_files(box.home, *study)
    box.configure(sync={"disk_high_watermark_percent": 100.0,
                        "disk_low_watermark_percent": 99.0})
    sync_once(box.home)
    uids = [study[0].study_uid for study in studies]
    assert [tier_state(box, uid) for uid in uids] == ["replicated"] * 3

    # Inodes just above the high watermark: evicting one study's 30 instances (6% of
    # 500 inodes) brings them under the low one. Bytes sit between the two watermarks,
    # where the agent leaves them: evicting for the inodes does not go on for the bytes.
    _, inodes = used(box.home)
    high, low = inodes - 0.2, inodes - 2.0
    stat = os.statvfs(box.home)
    middle = int(stat.f_blocks * stat.f_frsize * (high + low) / 200)
    filler = box.home.parent / "filler.bin"
    in_use = (stat.f_blocks - stat.f_bavail) * stat.f_frsize
    subprocess.run(["fallocate", "-l", str(middle - in_use), str(filler)], check=True)
    box.configure(sync={"disk_high_watermark_percent": high,
                        "disk_low_watermark_percent": low})
    passed = sync_once(box.home)
    assert re.search(r"\bevicted 1 ", passed.stdout), passed.stdout + passed.stderr
    assert [tier_state(box, uid) for uid in uids] == ["evicted", "replicated", "replicated"]
    after_bytes, after_inodes = used(box.home)
    assert after_inodes <= low and low < after_bytes < high
