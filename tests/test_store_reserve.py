"""The store reserve (`[store] reserve_mb`, 64 MB by default): new instances and recalls
stop while that much is still free, so that the index, the audit log, HL7 orders, web
logins and the sync agent's eviction have room to write once the store is full. With
no reserve, ingest took the disk to its last block, and anything else that wrote there
(a recall, a file:// cloud folder on the same disk, another program) left the box with
no room to record even the eviction that would free space (SQLITE_FULL)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pytest
import rawpdu
from conftest import TEST_AE, EdgeServer, init_home, run_pacs_edge
from smalldisk import NEEDS_ROOT, tmpfs
from syncagent import sync_once, tier_state

pytestmark = NEEDS_ROOT

DISK_MB = 80
RESERVE = 64 << 20  # the default
SLICE = 512  # 512x512x16-bit: ~0.5 MB an instance
LARGE = 1024  # ~2 MB: 40 of them fill what the reserve leaves, and the reserve too


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def leave_free(disk: Path, keep: int) -> Path:
    """A filler that leaves `keep` bytes free on `disk` (other studies, in effect)."""
    filler = disk / "filler.bin"
    subprocess.run(["fallocate", "-l", str(free_bytes(disk) - keep), str(filler)], check=True)
    return filler


@pytest.fixture
def box(tmp_path: Path) -> Iterator[tuple[EdgeServer, Path]]:
    """A box whose data home is alone on a small disk, with its cloud elsewhere (a
    file:// folder on the same disk would fill with it) and the default reserve."""
    with tmpfs(tmp_path / "disk", DISK_MB) as disk:
        server = EdgeServer(init_home(disk / "home"))
        server.log_path = tmp_path / "serve.log"  # not on the disk that fills
        server.configure(cloud={"url": f"file://{tmp_path / 'cloud'}"})
        server.start()
        try:
            yield server, disk
        finally:
            server.stop()
        assert not server.unclean_stops, server.unclean_stops


def test_a_store_full_to_its_reserve_still_evicts_and_then_takes_instances_again(
        box: tuple[EdgeServer, Path], tmp_path: Path) -> None:
    server, disk = box
    old = dicomgen.make_studies(tmp_path / "old", seed=41, series_per_study=1,
                                instances_per_series=8, size=SLICE)
    dcmtk.storescu(server.port, [i.path for i in old]).check()
    assert "replicated 1 study version" in sync_once(server.home).stdout

    # Modalities send until the box refuses: with the reserve that is 64 MB before the
    # disk's end, without it the last block.
    leave_free(disk, RESERVE + (4 << 20))
    new = dicomgen.make_studies(tmp_path / "new", seed=42, series_per_study=1,
                                instances_per_series=40, size=LARGE)
    sent = dcmtk.storescu(server.port, [i.path for i in new], args=("-v", "-nh"))
    answers = sent.store_responses()
    assert "Success" in answers and answers[-1] != "Success", sent.output
    assert free_bytes(disk) >= RESERVE

    evicted = run_pacs_edge("evict", old[0].study_uid, "--home", str(server.home),
                            check=False)
    assert evicted.returncode == 0, evicted.stdout + evicted.stderr
    assert tier_state(server, old[0].study_uid) == "evicted"
    refused = [i.path for i, answer in zip(new, answers, strict=True) if answer != "Success"]
    again = dcmtk.storescu(server.port, refused[:1])
    assert again.store_responses() == ["Success"], again.output


def test_an_instance_larger_than_the_room_above_the_reserve_never_takes_the_reserve(
        box: tuple[EdgeServer, Path]) -> None:
    """A C-STORE data set is spooled as it arrives, and ingest checked the reserve only
    once all of it was on disk: an instance of GBs (a tomosynthesis, a whole-slide
    image) took the disk to its last block first, where the index, the audit log and
    the eviction that would free space have no room. The spool stops writing once free
    space drops below the reserve; the instance is refused 0xA700 when it ends."""
    server, disk = box
    leave_free(disk, RESERVE + (8 << 20))
    sock, results = rawpdu.negotiate(server.port, TEST_AE, server.ae_title,
                                     contexts=((1, rawpdu.CT_IMAGE_STORAGE),))
    try:
        assert results == {1: 0}
        pdus = rawpdu.c_store_pdus(1, 40 << 20, max_pdu=1 << 20)
        # All but the last fragment: the box has taken nearly all of it (sendall
        # returns once no more than the sockets' buffers are still in flight) and
        # waits for the rest.
        sock.sendall(b"".join(pdus[:-1]))
        deadline = time.monotonic() + 30
        while free_bytes(disk) < RESERVE:
            assert time.monotonic() < deadline, f"{free_bytes(disk) >> 20} MiB free"
            time.sleep(0.05)
        sock.sendall(pdus[-1])
        assert rawpdu.read_dimse(sock).Status == 0xA700
    finally:
        sock.close()
    assert free_bytes(disk) >= RESERVE


def evicted_study(server: EdgeServer, tmp_path: Path, *, seed: int, instances: int
                  ) -> list[dicomgen.GeneratedInstance]:
    """A study of `instances` slices stored by storescu, replicated and evicted."""
    study = dicomgen.make_studies(tmp_path / "study", seed=seed, series_per_study=1,
                                  instances_per_series=instances, size=SLICE)
    dcmtk.storescu(server.port, [i.path for i in study]).check()
    sync_once(server.home)
    run_pacs_edge("evict", study[0].study_uid, "--home", str(server.home))
    return study

def test_a_recall_that_would_cut_into_the_reserve_is_refused_before_it_downloads(
        box: tuple[EdgeServer, Path], tmp_path: Path) -> None:
    server, disk = box
    study = evicted_study(server, tmp_path, seed=43, instances=8)
    uid = study[0].study_uid
    study_bytes = sum(i.path.stat().st_size for i in study)

    filler = leave_free(disk, RESERVE + study_bytes // 2)
    refused = run_pacs_edge("recall", uid, "--home", str(server.home), check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "store reserve" in refused.stderr, refused.stderr
    assert tier_state(server, uid) == "evicted"
    assert not list((server.home / "store").rglob("*.dcm"))

    filler.unlink()
    run_pacs_edge("recall", uid, "--home", str(server.home))
    assert tier_state(server, uid) == "replicated"


def test_a_recall_on_a_disk_already_below_its_reserve_says_so(
        box: tuple[EdgeServer, Path], tmp_path: Path) -> None:
    """The refusal said '40.0 MB free, of which 64.0 MB is the store reserve' when the
    disk was already below it (the common case of a full disk)."""
    server, disk = box
    uid = evicted_study(server, tmp_path, seed=44, instances=2)[0].study_uid

    filler = leave_free(disk, RESERVE // 2)
    refused = run_pacs_edge("recall", uid, "--home", str(server.home), check=False)
    filler.unlink()
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "free, below the store reserve of 64.0 MB ([store] reserve_mb)" in refused.stderr, (
        refused.stderr)
    assert "of which" not in refused.stderr


def test_status_warns_while_the_disk_is_below_its_reserve(
        box: tuple[EdgeServer, Path]) -> None:
    """Below the reserve ingest refuses every instance (0xA700) and /readyz says why;
    `status` (and its /metrics gauge) said only that the disk was above its high
    watermark, which is also true of a box that takes studies, and nothing at all where
    the watermark is set above what the reserve leaves."""
    server, disk = box

    def codes() -> set[str]:
        report = json.loads(run_pacs_edge("status", "--json", "--home",
                                          str(server.home)).stdout)
        return {warning["code"] for warning in report["warnings"]}

    assert "disk_below_reserve" not in codes()
    filler = leave_free(disk, RESERVE // 2)
    assert "disk_below_reserve" in codes()
    filler.unlink()
    assert "disk_below_reserve" not in codes()


def test_status_says_a_box_without_a_reserve_still_stores_below_the_readyz_floor(
        tmp_path: Path) -> None:
    """A home from an `init` before the 64 MB default holds reserve_mb = 0: below 64 MB
    free /readyz says not ready and status warned that every instance is refused, while
    ingest goes on to the last block. The warning says what the box really does."""
    with tmpfs(tmp_path / "disk", DISK_MB) as disk:
        home = init_home(disk / "home")
        EdgeServer(home).configure(store={"reserve_mb": 0})
        filler = leave_free(disk, RESERVE // 2)
        report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
        filler.unlink()
    [said] = [w["message"] for w in report["warnings"] if w["code"] == "disk_below_reserve"]
    assert "are refused" not in said, said
    assert "reserve_mb = 0 the store takes new instances" in said, said
    assert "set reserve_mb = 64" in said, said
