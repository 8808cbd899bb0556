"""A full disk answers 0xA700, leaves nothing partial, and ingest resumes once space is freed."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import EdgeServer, init_home
from pydicom import dcmread
from pynetdicom import AE

STATUS_OUT_OF_RESOURCES = 0xA700
TMPFS_MB = 12

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-store"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0750", "tmpfs",
                    str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def send(server: EdgeServer, files: list[Path]) -> list[int]:
    """C-STORE each file with pynetdicom on one association; the status of each."""
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title="TESTSCU")
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_full_store_answers_out_of_resources_and_recovers_without_restart(
    edge_server: EdgeServer, small_tmpfs: Path, tmp_path: Path
) -> None:
    edge_server.stop()
    edge_server.configure(store={"path": small_tmpfs})
    edge_server.start()

    # 256x256x16-bit images are ~128 KiB; fill the tmpfs so only a few fit.
    instances = dicomgen.make_studies(tmp_path / "study", seed=11, series_per_study=1,
                                      instances_per_series=24, size=256)
    filler = small_tmpfs / "filler.bin"
    filler.write_bytes(b"\0" * ((TMPFS_MB - 1) * 1024 * 1024))

    statuses = send(edge_server, [i.path for i in instances])
    assert STATUS_OUT_OF_RESOURCES in statuses
    assert set(statuses) <= {0x0000, STATUS_OUT_OF_RESOURCES}
    stored_now = statuses.count(0x0000)

    # Nothing partial: only acknowledged instances have files and rows; no spool left over.
    status = json.loads(edge_server.cli("status", "--json").stdout)
    assert status["instances"] == stored_now
    fsck = edge_server.cli("fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout
    assert list((small_tmpfs / ".spool").iterdir()) == []

    # The rest of the service keeps working while the disk is full.
    assert edge_server.echo().ok
    find = edge_server_find_study(edge_server, instances[0].study_uid)
    assert find == stored_now

    filler.unlink()
    retry = [i.path for i, s in zip(instances, statuses, strict=True) if s != 0x0000]
    assert send(edge_server, retry) == [0x0000] * len(retry)
    status = json.loads(edge_server.cli("status", "--json").stdout)
    assert status["instances"] == len(instances)
    assert "out of resources" in edge_server.log()


def edge_server_find_study(server: EdgeServer, study_uid: str) -> int:
    result = dcmtk.findscu(server.port, {"StudyInstanceUID": study_uid,
                                         "NumberOfStudyRelatedInstances": None}).check()
    values = result.values("NumberOfStudyRelatedInstances")
    return int(values[0]) if values else 0


def test_full_disk_under_the_index_too_answers_out_of_resources(
    edge_server_factory: Callable[..., EdgeServer], small_tmpfs: Path, tmp_path: Path
) -> None:
    """The whole data home on the full file system: SQLite's disk-full is 0xA700 as well,
    and the file written before the failed commit is removed again."""
    server = edge_server_factory(init_home(small_tmpfs / "home"))
    instances = dicomgen.make_studies(tmp_path / "study", seed=12, series_per_study=1,
                                      instances_per_series=24, size=256)
    filler = small_tmpfs / "filler.bin"
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler.write_bytes(b"\0" * (free - 600 * 1024))

    statuses = send(server, [i.path for i in instances])
    assert STATUS_OUT_OF_RESOURCES in statuses
    assert set(statuses) <= {0x0000, STATUS_OUT_OF_RESOURCES}
    assert server.echo().ok
    filler.unlink()
    fsck = server.cli("fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout
    status = json.loads(server.cli("status", "--json").stdout)
    assert status["instances"] == statuses.count(0x0000)
    retry = [i.path for i, s in zip(instances, statuses, strict=True) if s != 0x0000]
    assert send(server, retry) == [0x0000] * len(retry)
