"""One tiering operation at a time per study, across processes (appliance/store/leases.py).

The interleaving tests stop one real `pacs-edge` process at a named step
(PACS_EDGE_PAUSE_AT, a barrier in sync/crashpoints.py), run a second operation
on the same study at exactly that step, then let the first one go on. Without
the lease each of these loses or breaks something: a recall whose files an
eviction then deletes, a late instance deleted under a recall, an upload
rolled back under its own feet.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import dicomgen
import pytest
import unitsandbox
from conftest import init_home, pacs_edge_command, run_pacs_edge
from syncagent import (
    PAUSE_TIMEOUT,
    assert_fsck_clean,
    import_files,
    index_rows,
    paused,
    sent_hashes,
    stored_hashes,
    sync_once,
)

from appliance.store.index import Index
from appliance.store.leases import Holder, LeaseLost, StudyBusy, StudyLease, is_free

UNITS = Path(__file__).parents[1] / "systemd"


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, list[dicomgen.GeneratedInstance]]:
    home = init_home(tmp_path / "home")
    instances = dicomgen.make_study(tmp_path / "study", seed=73, series_per_study=2,
                                    instances_per_series=2, size=32)
    config = home / "pacs-edge.toml"  # small segments: the upload streams in many chunks
    config.write_text(config.read_text().replace("segment_size = 1048576",
                                                 "segment_size = 8192"))
    return home, instances


def _under_the_units_proc() -> list[str]:
    """Command words that run a process with /proc mounted as the sync agent's unit
    mounts it."""
    words = unitsandbox.proc_view(UNITS / "pacs-edge-sync.service")
    probe = subprocess.run([*words, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount /proc as the units do here: {probe.stderr.strip()}")
    return words


@pytest.mark.parametrize("sandboxed", ["", "evict", "recall"],
                         ids=["cli", "evict-in-a-unit", "recall-in-a-unit"])
def test_recall_is_refused_while_an_eviction_deletes_the_files(
    study: tuple[Path, list[dicomgen.GeneratedInstance]], sandboxed: str,
) -> None:
    """Also when one of the two runs with /proc as the systemd units mount it: they
    hide /proc/sys, and the boot id with it, from their processes, and an operator's
    CLI beside them reads it. Each took the other's lease for one from before a
    restart: the recall went ahead while the eviction deleted the files."""
    home, instances = study
    uid = instances[0].study_uid
    import_files(home, *instances)
    sync_once(home)
    units_proc = _under_the_units_proc() if sandboxed else []
    evicting = units_proc if sandboxed == "evict" else []
    recalling = units_proc if sandboxed == "recall" else []
    with paused(home, "evict:after-commit", "evict", uid, prefix=evicting):
        recall = subprocess.run(
            [*recalling, *pacs_edge_command(), "recall", uid, "--home", str(home)],
            capture_output=True, text=True, check=False, timeout=PAUSE_TIMEOUT)
        assert recall.returncode != 0, recall.stdout
        assert "busy: evict is running" in recall.stdout + recall.stderr
    assert stored_hashes(home) == {}
    assert_fsck_clean(home)
    assert "recalled 4 instance(s)" in run_pacs_edge("recall", uid, "--home", str(home)).stdout
    assert stored_hashes(home) == sent_hashes(instances)


def _rot_in_place(path: Path) -> None:
    """Flip a byte in the middle of a blob file of the local-folder cloud, as bit rot
    does: same size, inode and mtime, so its ETag does not change."""
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_pack_found_damaged_while_an_eviction_deletes_keeps_the_files(
    study: tuple[Path, list[dicomgen.GeneratedInstance]],
) -> None:
    """A scrub takes no lease: its verdict landed between the eviction's commit and its
    unlinks, which then deleted the only good copy of every instance."""
    home, instances = study
    uid = instances[0].study_uid
    import_files(home, *instances)
    sync_once(home)
    [(pack,)] = index_rows(home, "SELECT pack_name FROM packs")
    with paused(home, "evict:after-commit", "evict", uid, returncode=2,
                says="4 file(s) of its instances are kept on local disk"):
        _rot_in_place(home / "cloud" / str(pack))
        scrub = run_pacs_edge("scrub", "--all", "--home", str(home), check=False)
        assert scrub.returncode == 1 and f"damaged {pack}" in scrub.stdout, scrub.stdout
    assert stored_hashes(home) == sent_hashes(instances)
    assert index_rows(home, "SELECT COUNT(*) FROM instances WHERE is_local = 1"
                            " AND pack_fk IS NULL") == [(4,)]
    assert_fsck_clean(home)
    sync_once(home)  # uploads them again, then deletes them: the study was evicted
    assert index_rows(home, "SELECT version, scrub_state FROM packs ORDER BY version") == [
        (1, "damaged"), (2, "")]
    assert index_rows(home, "SELECT tier_state FROM studies") == [("evicted",)]
    assert stored_hashes(home) == {}
    assert "recalled 4 instance(s)" in run_pacs_edge("recall", uid, "--home", str(home)).stdout
    assert stored_hashes(home) == sent_hashes(instances)
    assert_fsck_clean(home)


def test_recall_is_refused_while_late_instances_leave_local_disk(
    study: tuple[Path, list[dicomgen.GeneratedInstance]],
) -> None:
    home, instances = study
    uid = instances[0].study_uid
    import_files(home, *instances[:3])
    sync_once(home)
    run_pacs_edge("evict", uid, "--home", str(home))
    import_files(home, instances[3])
    with paused(home, "replicate:after-commit", "sync", "--once", "--stable-after", "0"):
        recall = run_pacs_edge("recall", uid, "--home", str(home), check=False)
        assert recall.returncode != 0
        assert "busy: replicate is running" in recall.stdout + recall.stderr
    assert stored_hashes(home) == {}
    assert_fsck_clean(home)
    assert "recalled 4 instance(s)" in run_pacs_edge("recall", uid, "--home", str(home)).stdout
    assert stored_hashes(home) == sent_hashes(instances)


def test_a_second_pass_leaves_a_running_upload_alone(
    study: tuple[Path, list[dicomgen.GeneratedInstance]],
) -> None:
    """Roll-back runs on every pass now; it must only touch work whose holder is gone."""
    home, instances = study
    import_files(home, *instances)
    with paused(home, "upload:mid-pack", "sync", "--once", "--stable-after", "0"):
        sync_once(home)  # finds the study replicating, its lease live: skips it
        assert index_rows(home, "SELECT tier_state FROM studies") == [("replicating",)]
        assert index_rows(home, "SELECT version, state FROM packs") == [(1, "uploading")]
    assert index_rows(home, "SELECT tier_state FROM studies") == [("replicated",)]
    assert index_rows(home, "SELECT version, state FROM packs") == [(1, "verified")]
    assert_fsck_clean(home)


# --- the lease rules, in process ---------------------------------------------------------

async def _seeded_index(path: Path) -> Index:
    index = Index(path)
    await index.open()
    assert index.writer is not None

    def seed(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO patients (patient_id) VALUES ('p')")
        conn.execute("INSERT INTO studies (patient_fk, study_uid, first_received_at,"
                     " last_received_at, last_access_at, tier_changed_at)"
                     " VALUES (1, '1.2', 0, 0, 0, 0)")

    await index.writer.submit_sync(seed)
    return index


async def test_a_live_lease_refuses_a_second_operation(tmp_path: Path) -> None:
    index = await _seeded_index(tmp_path / "index.sqlite3")
    try:
        assert index.writer is not None
        first = StudyLease(index.writer, 1, "evict")
        await index.writer.submit_sync(first.take)
        second = StudyLease(index.writer, 1, "recall")  # same process, another operation
        with pytest.raises(StudyBusy) as busy:
            await index.writer.submit_sync(second.take)
        assert busy.value.operation == "evict" and busy.value.pid == os.getpid()
        async with first.kept():
            await first.check()
        assert await index.writer.submit_sync(lambda c: is_free(c, 1))
        await index.writer.submit_sync(second.take)
    finally:
        await index.close()


async def test_a_dead_holders_lease_is_taken_over_at_once(tmp_path: Path) -> None:
    index = await _seeded_index(tmp_path / "index.sqlite3")
    try:
        assert index.writer is not None
        dead = subprocess.Popen(["true"])
        dead.wait()
        holder = Holder(Holder.new().boot_id, dead.pid, "1", "killed")
        await index.writer.submit_sync(lambda c: c.execute(
            "INSERT INTO study_leases (study_fk, operation, holder, acquired_at, expires_at)"
            " VALUES (1, 'evict', ?, ?, ?)", (str(holder), time.time(), time.time() + 3600)))
        assert await index.writer.submit_sync(lambda c: is_free(c, 1))
        await index.writer.submit_sync(StudyLease(index.writer, 1, "recover").take)
    finally:
        await index.close()


async def test_an_expired_lease_is_taken_over_and_fences_its_old_holder(tmp_path: Path) -> None:
    index = await _seeded_index(tmp_path / "index.sqlite3")
    try:
        assert index.writer is not None
        stalled = StudyLease(index.writer, 1, "replicate", seconds=0.01)
        await index.writer.submit_sync(stalled.take)
        deadline = time.monotonic() + 10
        while not await index.writer.submit_sync(lambda c: is_free(c, 1)):
            assert time.monotonic() < deadline
        await index.writer.submit_sync(StudyLease(index.writer, 1, "recall").take)
        with pytest.raises(LeaseLost):
            await stalled.check()
    finally:
        await index.close()


def _new_content(instance: dicomgen.GeneratedInstance, path: Path) -> Path:
    """The same SOP Instance UID with other content: a modality's corrected re-send."""
    import pydicom

    dataset = pydicom.dcmread(instance.path)
    dataset.ImageComments = "corrected and sent again"
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("evicted", [False, True], ids=["local", "evicted"])
def test_new_content_stored_during_an_upload_is_not_taken_for_the_packed_one(
    study: tuple[Path, list[dicomgen.GeneratedInstance]], tmp_path: Path, evicted: bool,
) -> None:
    """The superseding row may get the superseded row's id (SQLite reuses the highest
    rowid after a delete): the upload's commit took the new content for the packed one,
    so it was never uploaded, eviction deleted its only copy, and a recall failed."""
    home, instances = study
    uid = instances[0].study_uid
    last = instances[-1]
    resent = _new_content(last, tmp_path / "resent.dcm")
    import_files(home, *instances[:-1])
    if evicted:  # the last instance is then a late one, whose file the commit deletes
        sync_once(home)
        run_pacs_edge("evict", uid, "--home", str(home))
    import_files(home, last)
    with paused(home, "replicate:before-commit", "sync", "--once", "--stable-after", "0"):
        run_pacs_edge("import", "--home", str(home), str(resent))
    assert_fsck_clean(home)
    sync_once(home)  # uploads the new content as the next version
    if not evicted:
        run_pacs_edge("evict", uid, "--home", str(home))
    run_pacs_edge("recall", uid, "--home", str(home))
    ((path, sha256),) = index_rows(home, "SELECT path, sha256 FROM instances WHERE sop_uid ="
                                   f" '{last.sop_instance_uid}' AND is_local = 1")
    assert sha256 == hashlib.sha256(dicomgen.dataset_bytes(resent)).hexdigest()
    assert dicomgen.dataset_bytes(home / "store" / str(path)) == dicomgen.dataset_bytes(resent)
    assert_fsck_clean(home)


@pytest.mark.parametrize("into", ["same study", "another study"])
def test_content_superseded_during_a_recall_keeps_the_file_the_recall_wrote(
    study: tuple[Path, list[dicomgen.GeneratedInstance]], tmp_path: Path, into: str,
) -> None:
    """New content for an evicted instance arrives while its study is recalled (ingest
    takes no lease): the recall still writes the earlier content's file, but its commit
    skips the superseded row. The file stayed, named by a prior version marked not
    local: fsck called the store consistent, and nothing would ever delete it."""
    import pydicom

    home, instances = study
    uid, first = instances[0].study_uid, instances[0]
    resent = _new_content(first, tmp_path / "resent.dcm")
    if into == "another study":
        dataset = pydicom.dcmread(resent)
        dataset.StudyInstanceUID = dicomgen.make_uid(73, "another study")
        dataset.SeriesInstanceUID = dicomgen.make_uid(73, "another series")
        dataset.save_as(resent, enforce_file_format=True)
    import_files(home, *instances)
    sync_once(home)
    run_pacs_edge("evict", uid, "--home", str(home))
    with paused(home, "recall:before-commit", "recall", uid):
        run_pacs_edge("import", "--home", str(home), str(resent))
    local = {str(path) for (path,) in index_rows(
        home, "SELECT path FROM instances WHERE is_local = 1"
              " UNION SELECT path FROM instance_versions WHERE is_local = 1")}
    on_disk = {str(p.relative_to(home / "store")) for p in (home / "store").rglob("*.dcm")}
    assert on_disk == local
    ((path, sha256),) = index_rows(home, "SELECT path, sha256 FROM instance_versions")
    assert sha256 == sent_hashes([first])[first.sop_instance_uid]
    assert hashlib.sha256(dicomgen.dataset_bytes(home / "store" / str(path))).hexdigest() == sha256
    assert_fsck_clean(home)
