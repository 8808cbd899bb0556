"""A full disk answers 0xA700, leaves nothing partial, and ingest resumes once space is freed.
So does a store whose file system turned read-only, or ran out of inodes, which /readyz
reports."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import EdgeServer, init_home, run_pacs_edge
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pynetdicom import AE
from smalldisk import NEEDS_ROOT, no_reserve, tmpfs

from appliance.services.box_health import READY_MIN_FREE_INODES

STATUS_OUT_OF_RESOURCES = 0xA700
TMPFS_MB = 12

pytestmark = NEEDS_ROOT


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small-store", TMPFS_MB) as mount:
        yield mount


@pytest.fixture
def roomy_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """Room above /readyz's 64 MB floor (a tmpfs takes memory only for what it holds)."""
    with tmpfs(tmp_path / "store", 128) as mount:
        yield mount


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
    edge_server.configure(store={"path": small_tmpfs, "reserve_mb": 0})
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
    server = edge_server_factory(no_reserve(init_home(small_tmpfs / "home")))
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


@contextlib.contextmanager
def read_only(mount: Path) -> Iterator[None]:
    """The file system at `mount` read-only meanwhile, as ext4 mounted errors=remount-ro
    turns itself after an I/O error."""
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        yield
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.read().decode()


def test_read_only_store_answers_out_of_resources_on_a_live_association(
    edge_server: EdgeServer, small_tmpfs: Path, tmp_path: Path
) -> None:
    """Each C-STORE gets 0xA700 and the association carries on to its release (the
    spool's cleanup once raised EROFS and the DUL aborted it), one log line each."""
    edge_server.stop()
    edge_server.configure(store={"path": small_tmpfs, "reserve_mb": 0})
    edge_server.start()
    instances = dicomgen.make_studies(tmp_path / "study", seed=13, series_per_study=1,
                                      instances_per_series=3, size=16)
    assert send(edge_server, [instances[0].path]) == [0x0000]
    before = len(edge_server.log())

    with read_only(small_tmpfs):
        statuses = send(edge_server, [i.path for i in instances[1:]])
    assert statuses == [STATUS_OUT_OF_RESOURCES] * 2
    log = edge_server.log()[before:]
    assert log.count("store's file system is read-only") == 2
    assert "Traceback" not in log and "aborting association" not in log
    assert not {i.header.SOPInstanceUID for i in instances} & set(log.split())

    assert send(edge_server, [i.path for i in instances[1:]]) == [0x0000] * 2
    assert json.loads(edge_server.cli("status", "--json").stdout)["instances"] == 3


def test_readyz_and_metrics_say_store_while_the_store_is_read_only(
    edge_server: EdgeServer, roomy_tmpfs: Path
) -> None:
    """Prometheus does not probe /readyz: /metrics carries its checks (PacsEdgeNotReady)."""
    port = dcmtk.free_port()
    edge_server.stop()
    edge_server.configure(store={"path": roomy_tmpfs}, metrics={"port": port})
    edge_server.start()
    store_check = ("pacs_edge_ready_check", (("check", "store"),))
    assert readyz(port) == (200, "ready\n")
    assert scrape(port)[store_check] == 1
    with read_only(roomy_tmpfs):
        assert readyz(port) == (503, "store: the file system is read-only\n")
        values = scrape(port)
    assert values[store_check] == 0
    assert {check: values[("pacs_edge_ready_check", (("check", check),))]
            for check in ("disk", "inodes", "index", "listeners")} == dict.fromkeys(
                ("disk", "inodes", "index", "listeners"), 1)
    assert readyz(port) == (200, "ready\n")
    assert scrape(port)[store_check] == 1


def test_serve_on_a_full_data_home_says_no_space_and_starts_once_there_is_room(
    edge_server_factory: Callable[..., EdgeServer], small_tmpfs: Path, tmp_path: Path
) -> None:
    """A clean stop checkpoints and removes the index's WAL; a disk filled meanwhile (an
    import, a recall, another program) leaves no room for SQLite to make its WAL index
    again. serve must say that, not "disk I/O error ... check permissions", which reads
    as a failing disk."""
    home = no_reserve(init_home(small_tmpfs / "home"))
    server = edge_server_factory(home, start=False)
    server.log_path = tmp_path / "serve.log"  # not on the file system that fills
    server.start()
    server.stop()
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler = small_tmpfs / "filler.bin"
    filler.write_bytes(b"\0" * free)

    refused = run_pacs_edge("serve", "--home", str(home), "--dicom-port", "0",
                            check=False, timeout=60)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "no space left" in said and "disk I/O error" not in said, said

    filler.unlink()
    server.start()
    assert server.echo().ok


def test_a_command_whose_first_index_migration_finds_the_disk_full_says_no_space(
    small_tmpfs: Path
) -> None:
    """A new home (or an upgrade's migrations) on a disk with a little room: the index's
    WAL index opens, a migration's COMMIT finds no room and SQLite rolls it back itself;
    the ROLLBACK that followed failed, and the command said "cannot rollback - no
    transaction is active" with the hint to check the disk's permissions."""
    home = init_home(small_tmpfs / "home")
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler = small_tmpfs / "filler.bin"
    filler.write_bytes(b"\0" * (free - 150 * 1024))  # less than the schema takes

    refused = run_pacs_edge("status", "--home", str(home), check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2, said
    assert "no space left on its disk" in said and "rollback" not in said, said

    filler.unlink()
    assert run_pacs_edge("status", "--home", str(home)).returncode == 0


def test_serve_on_a_data_home_with_too_little_room_for_its_metrics_says_no_space(
    small_tmpfs: Path
) -> None:
    """Each process's metric files are new (named by pid) and take their blocks first:
    on a disk with a little room, fewer blocks than those files, serve died at start
    with a traceback (posix_fallocate's ENOSPC names no file)."""
    home = init_home(small_tmpfs / "home")
    run_pacs_edge("status", "--home", str(home))  # the index made while there is room
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler = small_tmpfs / "filler.bin"
    filler.write_bytes(b"\0" * (free - 150 * 1024))

    refused = run_pacs_edge("serve", "--home", str(home), "--dicom-port", "0",
                            check=False, timeout=60)
    said = refused.stdout + refused.stderr
    filler.unlink()
    assert refused.returncode == 2, said
    assert "error: No space left on device:" in said and "hint: free disk space" in said, said
    assert "Traceback" not in said, said


@pytest.mark.parametrize("workers", [1, 2])
def test_full_data_home_keeps_answering_finds_and_retrieves(
    edge_server_factory: Callable[..., EdgeServer], small_tmpfs: Path, tmp_path: Path,
    workers: int
) -> None:
    """C-FIND and C-GET go on while the data home's disk is full (docs/operator-guide.md).
    Their first use counts new metric series into prometheus-client's memory-mapped
    files, whose pages were never written: on a full disk the kernel answered that
    write with SIGBUS and serve died without a word. With `[dicom] workers`, each worker
    process makes its own files: spawned, they were made sparse again, and the worker
    that counted a new series there died of SIGBUS (the supervisor started another)."""
    server = edge_server_factory(no_reserve(init_home(small_tmpfs / "home")), start=False)
    server.log_path = tmp_path / "serve.log"  # not on the file system that fills
    server.configure(dicom={"workers": workers})
    server.start()
    instances = dicomgen.make_studies(tmp_path / "study", seed=15, series_per_study=1,
                                      instances_per_series=2, size=32)
    assert send(server, [i.path for i in instances]) == [0x0000, 0x0000]
    filler = small_tmpfs / "filler.bin"
    with filler.open("wb", buffering=0) as fh:  # every block left, 4 KiB writes at the end
        for chunk in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * chunk)

    for attempt in range(workers * 2):  # the kernel spreads them over the workers
        assert edge_server_find_study(server, instances[0].study_uid) == 2
        got = dcmtk.getscu(server.port, {"StudyInstanceUID": instances[0].study_uid},
                           tmp_path / f"got{attempt}")
        assert server.running, server.log()[-2000:]
        assert got.ok and len(list((tmp_path / f"got{attempt}").iterdir())) == 2, got.output
    filler.unlink()


def test_a_store_out_of_inodes_with_bytes_free_is_not_ready_and_says_so(
    edge_server: EdgeServer, tmp_path: Path
) -> None:
    """ext4 with millions of small files runs out of inodes while bytes are free: /readyz
    says `inodes:`, `status` and /metrics warn `inodes_high` and export the count, and
    the C-STORE that finds none left gets 0xA700; once files go, all is well again."""
    port = dcmtk.free_port()
    total = READY_MIN_FREE_INODES + 500
    with tmpfs(tmp_path / "store", 128, inodes=total) as mount:
        edge_server.stop()
        edge_server.configure(store={"path": mount}, metrics={"port": port})
        edge_server.start()
        instances = dicomgen.make_studies(tmp_path / "study", seed=17, series_per_study=1,
                                          instances_per_series=2, size=16)
        assert readyz(port) == (200, "ready\n")
        fillers = mount / "fillers"
        fillers.mkdir()
        for n in range(os.statvfs(mount).f_favail - 100):  # 100 inodes left
            (fillers / str(n)).touch()

        status, reasons = readyz(port)
        assert status == 503 and re.fullmatch(
            rf"inodes: \d+ free, below {READY_MIN_FREE_INODES} \(.*\)\n", reasons), reasons
        metrics = scrape(port)
        assert metrics[("pacs_edge_disk_total_inodes", ())] == total
        assert metrics[("pacs_edge_disk_free_inodes", ())] <= 100
        assert metrics[("pacs_edge_disk_free_bytes", ())] > 100 << 20
        assert metrics[("pacs_edge_health_warning", (("code", "inodes_high"),))] == 1
        report = json.loads(edge_server.cli("status", "--json").stdout)
        assert report["disk_free_inodes"] <= 100
        assert "inodes_high" in {w["code"] for w in report["warnings"]}

        with contextlib.suppress(OSError):  # every inode left
            for n in itertools.count(total):
                (fillers / str(n)).touch()
        assert send(edge_server, [instances[0].path]) == [STATUS_OUT_OF_RESOURCES]

        shutil.rmtree(fillers)
        assert readyz(port) == (200, "ready\n")
        assert send(edge_server, [i.path for i in instances]) == [0x0000, 0x0000]
        edge_server.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics listener's /metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
