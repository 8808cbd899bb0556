"""Prior versions keep their content, on disk or in a pack, whatever comes after.

Content re-sent for a SOP Instance UID becomes current and the earlier content
a prior version (docs/storage.md, "Re-sent instances"). A path is named by one
row at most, so eviction (which deletes the files of current rows) never takes
a prior version's file; a version superseded while its study was evicted keeps
its place in the pack, and `restore` rebuilds them so. Real processes:
`pacs-edge serve` with dcmtk storescu, `import`, `sync --once`, `evict`,
`recall`, `keys escrow`/`recover`, `restore`, `fsck`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
from conftest import EdgeServer, init_home, run_pacs_edge
from syncagent import (
    assert_fsck_clean,
    import_files,
    index_rows,
    paused,
    restore_elsewhere,
    stored_hashes,
    sync_once,
)

from appliance.store.index import Index


def corrected(instance: dicomgen.GeneratedInstance, folder: Path, tag: str) -> Path:
    """The same SOP Instance UID with other dataset bytes (a correction)."""
    return dicomgen.altered_copy(instance, folder / f"{tag}.dcm",
                                 ImageComments=f"corrected {tag}")


def digest(path: Path) -> str:
    return hashlib.sha256(dicomgen.dataset_bytes(path)).hexdigest()


def versions_of(home: Path, sop: str) -> tuple[list[str], list[str]]:
    """The dataset hashes of `sop`'s current row and of its prior versions (sorted)."""
    current = index_rows(home, f"SELECT sha256 FROM instances WHERE sop_uid = '{sop}'")
    prior = index_rows(home, f"SELECT sha256 FROM instance_versions WHERE sop_uid = '{sop}'")
    return [str(r[0]) for r in current], sorted(str(r[0]) for r in prior)


def assert_local_rows_have_their_files(home: Path) -> None:
    """Every row marked local, current or prior version, names a file with its content."""
    rows = index_rows(home, "SELECT path, sha256 FROM instances WHERE is_local = 1"
                            " UNION ALL SELECT path, sha256 FROM instance_versions"
                            " WHERE is_local = 1")
    for path, sha256 in rows:
        assert digest(home / "store" / str(path)) == sha256, path


def test_a_correction_sent_back_and_forth_is_stored_every_time(
    edge_server: EdgeServer, tmp_path: Path,
) -> None:
    """storescu X, Y, X, Y, Y: each C-STORE succeeds (the 4th was refused 0x0110, after
    its clean-up had deleted prior version Y's file), Y is current, X the prior version."""
    instance = dicomgen.make_study(tmp_path / "study", seed=81, series_per_study=1,
                                   instances_per_series=1, size=16)[0]
    x, y = instance.path, corrected(instance, tmp_path / "sent", "y")
    statuses = [status for path in (x, y, x, y, y) for status in
                dcmtk.storescu(edge_server.port, [path], args=("-d",)).dimse_statuses()]
    assert statuses == [0x0000] * 5
    assert versions_of(edge_server.home, instance.sop_instance_uid) == ([digest(y)],
                                                                         [digest(x)])
    assert_local_rows_have_their_files(edge_server.home)
    assert_fsck_clean(edge_server.home)


def test_a_study_whose_instances_all_went_into_another_study_is_no_longer_answered(
    edge_server: EdgeServer, tmp_path: Path,
) -> None:
    """An instance sent again under another Study (and Series) Instance UID becomes
    current there. Its first study kept its row, with no instance left, and C-FIND
    answered it (NumberOfStudyRelatedInstances 0; QIDO-RS and the viewer's study list
    alike; `pacs-edge status` counted it): a study with nothing to retrieve. Its
    patient had only it."""
    instance = dicomgen.make_study(tmp_path / "study", seed=82, series_per_study=1,
                                   instances_per_series=1, size=16)[0]
    ds = pydicom.dcmread(instance.path)
    ds.StudyInstanceUID = dicomgen.make_uid(82, "other study")
    ds.SeriesInstanceUID = dicomgen.make_uid(82, "other series")
    ds.PatientID = "OTHER82"
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved, enforce_file_format=True)
    dcmtk.storescu(edge_server.port, [instance.path, moved]).check()
    studies = dcmtk.findscu(edge_server.port, {"StudyInstanceUID": "",
                                               "NumberOfStudyRelatedInstances": ""}).check()
    assert list(zip(studies.values("StudyInstanceUID"),
                    studies.values("NumberOfStudyRelatedInstances"), strict=True)) == [
        (str(ds.StudyInstanceUID), "1")]
    patients = dcmtk.findscu(edge_server.port, {"PatientID": "",
                                                "NumberOfPatientRelatedStudies": ""},
                             level="PATIENT", model="patient").check()
    assert list(zip(patients.values("PatientID"),
                    patients.values("NumberOfPatientRelatedStudies"), strict=True)) == [
        ("OTHER82", "1")]
    status = json.loads(edge_server.cli("status", "--json").stdout)
    assert (status["patients"], status["studies"], status["tier_states"]) == (
        1, 1, {"local": 1})
    assert versions_of(edge_server.home, instance.sop_instance_uid) == (
        [digest(moved)], [digest(instance.path)])


def test_evicting_a_study_keeps_the_files_of_prior_versions(tmp_path: Path) -> None:
    """X, Y, X then replicate and evict: X (current) leaves local disk with its study, Y
    (prior version) keeps its file; a recall brings X back."""
    home = init_home(tmp_path / "home")
    instances = dicomgen.make_study(tmp_path / "study", seed=82, series_per_study=1,
                                    instances_per_series=2, size=16)
    first, uid = instances[0], instances[0].study_uid
    x, y = first.path, corrected(first, tmp_path / "sent", "y")
    import_files(home, *instances)
    for path in (y, x):
        run_pacs_edge("import", "--home", str(home), str(path))
    sync_once(home)
    run_pacs_edge("evict", uid, "--home", str(home))
    assert versions_of(home, first.sop_instance_uid) == ([digest(x)], [digest(y)])
    assert stored_hashes(home) == {first.sop_instance_uid: digest(y)}
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)
    assert "recalled 2 instance(s)" in run_pacs_edge("recall", uid, "--home", str(home)).stdout
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)


# One more instance than the eviction deletes per transaction (sync.evict.DELETES_PER_
# COMMIT): paused in the middle of deleting, it has files left to delete.
BATCH_AND_ONE = 65


def test_a_correction_sent_back_while_an_eviction_deletes_keeps_its_file(
    edge_server: EdgeServer, tmp_path: Path,
) -> None:
    """Y, then X again, C-STOREd to serve while `evict` is paused with X's file not yet
    deleted: X's new row (local, in no pack) names the file the eviction had chosen, and
    the eviction deleted it, having decided before the row committed. X, acknowledged,
    was current with no file: fsck failed, and no later pass could upload or recall it."""
    home = edge_server.home
    instances = dicomgen.make_study(tmp_path / "study", seed=88, series_per_study=1,
                                    instances_per_series=BATCH_AND_ONE, size=8)
    uid = instances[0].study_uid
    import_files(home, *instances)
    sync_once(home)
    with paused(home, "evict:mid-delete", "evict", uid):
        left = [i for i in instances if i.sop_instance_uid in stored_hashes(home)]
        assert left, "the eviction deleted every file before its pause"
        x = left[-1]
        y = corrected(x, tmp_path / "sent", "y")
        for path in (y, x.path):
            assert dcmtk.storescu(edge_server.port, [path]).store_responses() == ["Success"]
    sop = x.sop_instance_uid
    assert versions_of(home, sop) == ([digest(x.path)], [digest(y)])
    assert stored_contents(home) == sorted([(sop, digest(x.path)), (sop, digest(y))])
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)
    sync_once(home)  # X goes up as a new version, then leaves local disk with its study
    assert stored_contents(home) == [(sop, digest(y))]  # a prior version keeps its file
    assert "recalled" in run_pacs_edge("recall", uid, "--home", str(home)).stdout
    assert stored_contents(home) == sorted(
        [(sop, digest(y)), *((i.sop_instance_uid, digest(i.path)) for i in instances)])
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)


def test_content_sent_again_whose_file_an_eviction_deletes_before_its_commit_is_placed_again(
    edge_server: EdgeServer, tmp_path: Path,
) -> None:
    """X, Y, then X again into a study whose eviction has committed (its files not yet
    deleted): serve keeps X's file, found under its name, and waits for its commit
    while this test, as the agent's deletion does (tier_steps.drop_unneeded_files),
    holds the write lock, finds no local row naming the file, and deletes it. serve
    committed X's row as local without its file; it must look for the file inside its
    own transaction and place it again."""
    home = edge_server.home
    instances = dicomgen.make_study(tmp_path / "study", seed=89, series_per_study=1,
                                    instances_per_series=2, size=8)
    x = instances[0]
    uid, sop = x.study_uid, x.sop_instance_uid
    y = corrected(x, tmp_path / "sent", "y")
    import_files(home, *instances)
    sync_once(home)
    with paused(home, "evict:after-commit", "evict", uid):
        assert dcmtk.storescu(edge_server.port, [y]).store_responses() == ["Success"]
        [(relative,)] = index_rows(home, f"SELECT path FROM instance_versions"
                                         f" WHERE sop_uid = '{sop}' AND is_local = 0")
        kept = home / "store" / str(relative)
        os.utime(kept, (0, 0))  # serve keeping the file sets its mtime to now
        agent = sqlite3.connect(home / "index.sqlite3", isolation_level=None)
        agent.execute("BEGIN IMMEDIATE")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sent = pool.submit(dcmtk.storescu, edge_server.port, [x.path])
            wait_until("serve keeps the file", lambda: kept.stat().st_mtime > 0)
            assert agent.execute("SELECT COUNT(*) FROM instances WHERE path = ?",
                                 (relative,)).fetchone() == (0,)
            kept.unlink()
            agent.execute("COMMIT")
            agent.close()
            assert sent.result().store_responses() == ["Success"]
    assert versions_of(home, sop) == ([digest(x.path)], [digest(y)])
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}", pytrace=False)
        time.sleep(0.02)


def stored_contents(home: Path) -> list[tuple[str, str]]:
    """(SOP Instance UID, dataset SHA-256) of every file in the store, prior versions'
    too, sorted."""
    return sorted((str(dicomgen.read_header(p).SOPInstanceUID), digest(p))
                  for p in (home / "store").rglob("*.dcm"))


def test_new_content_for_an_evicted_instance_keeps_the_prior_one_in_its_pack(
    tmp_path: Path,
) -> None:
    """Y for an evicted X: X's version row keeps the pack location the evicted row had
    (not local), fsck stays clean through upload, recall and X sent once more."""
    home = init_home(tmp_path / "home")
    instances = dicomgen.make_study(tmp_path / "study", seed=83, series_per_study=1,
                                    instances_per_series=2, size=16)
    first, other, uid = instances[0], instances[1], instances[0].study_uid
    sop = first.sop_instance_uid
    x, y = first.path, corrected(first, tmp_path / "sent", "y")
    import_files(home, *instances)
    sync_once(home)
    run_pacs_edge("evict", uid, "--home", str(home))
    where = ("SELECT sha256, pack_fk, pack_offset, pack_length FROM instances"
             f" WHERE sop_uid = '{sop}'")
    evicted_x = index_rows(home, where)

    run_pacs_edge("import", "--home", str(home), str(y))
    assert index_rows(home, "SELECT sha256, pack_fk, pack_offset, pack_length, is_local"
                            " FROM instance_versions") == [(*evicted_x[0], 0)]
    assert_fsck_clean(home)
    sync_once(home)  # Y goes up as version 2; the study is evicted, so its file goes too
    assert_fsck_clean(home)
    assert "recalled 2 instance(s)" in run_pacs_edge("recall", uid, "--home", str(home)).stdout
    assert stored_hashes(home) == {sop: digest(y), other.sop_instance_uid: digest(other.path)}
    assert_fsck_clean(home)

    run_pacs_edge("import", "--home", str(home), str(x))  # X again: written anew, current
    assert versions_of(home, sop) == ([digest(x)], [digest(y)])
    assert index_rows(home, where.replace("pack_fk,", "is_local, pack_fk,")) == [
        (digest(x), 1, None, None, None)]  # in no pack yet: the next pass uploads it
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)


def test_restore_keeps_earlier_content_as_a_prior_version_in_its_pack(tmp_path: Path) -> None:
    """X in pack version 1, its correction Y in version 2, X again in version 3: the
    restored index holds X current and Y a prior version located in version 2 (not
    local), as the lost box did; a recall brings X back and fsck stays clean."""
    cloud, old = tmp_path / "cloud", tmp_path / "old"
    run_pacs_edge("init", "--home", str(old), "--dicom-port", "0", "--tls-port", "0",
                  "--cloud", f"file://{cloud}")
    instances = dicomgen.make_study(tmp_path / "study", seed=85, series_per_study=1,
                                    instances_per_series=2, size=16)
    first, other, uid = instances[0], instances[1], instances[0].study_uid
    x, y = first.path, corrected(first, tmp_path / "sent", "y")
    import_files(old, *instances)
    for path in (y, x):
        sync_once(old)
        run_pacs_edge("import", "--home", str(old), str(path))
    sync_once(old)
    new, restored = restore_elsewhere(old, cloud, tmp_path)
    assert "restored 3 pack version(s) of 1 study(ies), 4 instance(s)" in restored
    sop = first.sop_instance_uid
    assert versions_of(new, sop) == ([digest(x)], [digest(y)])
    assert index_rows(new, "SELECT p.version, v.is_local, v.pack_length > 0"
                           " FROM instance_versions v JOIN packs p ON v.pack_fk = p.id") == [
        (2, 0, 1)]
    assert_fsck_clean(new)
    assert "recalled 2 instance(s)" in run_pacs_edge("recall", uid, "--home", str(new)).stdout
    assert stored_hashes(new) == {sop: digest(x), other.sop_instance_uid: digest(other.path)}
    assert_fsck_clean(new)


def test_restore_takes_a_version_that_sends_a_series_again_whole(tmp_path: Path) -> None:
    """Version 2 holds corrections of both instances of the study's one series. Restore
    failed it (FOREIGN KEY constraint failed, exit 1): superseding version 1's rows, it
    judged the series empty by its count, which restore sets only after the version,
    and deleted it under the rows it had just put there."""
    cloud, old = tmp_path / "cloud", tmp_path / "old"
    run_pacs_edge("init", "--home", str(old), "--dicom-port", "0", "--tls-port", "0",
                  "--cloud", f"file://{cloud}")
    instances = dicomgen.make_study(tmp_path / "study", seed=86, series_per_study=1,
                                    instances_per_series=2, size=16)
    fixed = [corrected(i, tmp_path / "sent", f"fixed{n}") for n, i in enumerate(instances)]
    import_files(old, *instances)
    sync_once(old)
    run_pacs_edge("import", "--home", str(old), *(str(path) for path in fixed))
    sync_once(old)
    new, restored = restore_elsewhere(old, cloud, tmp_path)
    assert "restored 2 pack version(s) of 1 study(ies), 4 instance(s)" in restored
    for instance, path in zip(instances, fixed, strict=True):
        assert versions_of(new, instance.sop_instance_uid) == ([digest(path)],
                                                               [digest(instance.path)])
    assert index_rows(new, "SELECT series_count, instance_count FROM studies") == [(1, 2)]
    assert_fsck_clean(new)


def test_a_lost_index_rebuilt_keeps_current_what_was_received_last_in_another_study(
    tmp_path: Path,
) -> None:
    """X replicated in study A, then sent again under study B and not yet replicated;
    the index is lost and rebuilt as the operator guide says (restore, fsck --repair).
    fsck adopted B's newer file as a prior version of the X restore had made current
    from A's pack: C-FIND answered A with the old X, and B not at all."""
    home = init_home(tmp_path / "home")
    instances = dicomgen.make_study(tmp_path / "study", seed=86, series_per_study=1,
                                    instances_per_series=2, size=16)
    first, other, a = instances[0], instances[1], instances[0].study_uid
    ds = pydicom.dcmread(first.path)
    ds.StudyInstanceUID = b = dicomgen.make_uid(86, "other study")
    ds.SeriesInstanceUID = dicomgen.make_uid(86, "other series")
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved, enforce_file_format=True)
    import_files(home, *instances)
    sync_once(home)
    run_pacs_edge("import", "--home", str(home), str(moved))
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    run_pacs_edge("restore", "--home", str(home))
    run_pacs_edge("fsck", "--repair", "--home", str(home))

    assert versions_of(home, first.sop_instance_uid) == ([digest(moved)],
                                                         [digest(first.path)])
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)
    server = EdgeServer(home).start()
    try:
        found = dcmtk.findscu(server.port, {"StudyInstanceUID": "", "SOPInstanceUID": "",
                                            "SeriesInstanceUID": ""}, level="IMAGE").check()
    finally:
        server.stop()
    assert sorted(zip(found.values("StudyInstanceUID"), found.values("SOPInstanceUID"),
                      strict=True)) == sorted([(a, other.sop_instance_uid),
                                               (b, first.sop_instance_uid)])


def test_a_lost_index_rebuilt_keeps_current_a_correction_sent_back(tmp_path: Path) -> None:
    """X, Y, X, never replicated, then the index is lost: X's second arrival keeps the
    file its first left (same name, same content), so that file looked older than Y's
    and `fsck --repair` made Y current again."""
    home = init_home(tmp_path / "home")
    instance = dicomgen.make_study(tmp_path / "study", seed=87, series_per_study=1,
                                   instances_per_series=1, size=16)[0]
    x, y = instance.path, corrected(instance, tmp_path / "sent", "y")
    for path in (x, y, x):
        run_pacs_edge("import", "--home", str(home), str(path))
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    run_pacs_edge("fsck", "--repair", "--home", str(home))
    assert versions_of(home, instance.sop_instance_uid) == ([digest(x)], [digest(y)])
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)


V14_VERSIONS = """
DROP INDEX instance_versions_pack;
CREATE TABLE v14 (id INTEGER PRIMARY KEY, sop_uid TEXT NOT NULL, path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, transfer_syntax TEXT NOT NULL,
    received_at REAL NOT NULL, superseded_at REAL NOT NULL);
INSERT INTO v14 SELECT id, sop_uid, path, size, sha256, transfer_syntax, received_at,
    superseded_at FROM instance_versions;
DROP TABLE instance_versions;
ALTER TABLE v14 RENAME TO instance_versions;
CREATE INDEX instance_versions_sop ON instance_versions(sop_uid);
DELETE FROM schema_migrations WHERE version = 15;
"""


async def test_migration_drops_version_rows_that_name_a_current_file(tmp_path: Path) -> None:
    """An index from before migration 15 where X, Y, X left a version row naming the
    current row's file: the migration drops that row (the current one holds the same
    content) and keeps the others, local."""
    home = init_home(tmp_path / "home")
    instance = dicomgen.make_study(tmp_path / "study", seed=84, series_per_study=1,
                                   instances_per_series=1, size=16)[0]
    y = corrected(instance, tmp_path / "sent", "y")
    for path in (instance.path, y, instance.path):
        run_pacs_edge("import", "--home", str(home), str(path))
    db = home / "index.sqlite3"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executescript(V14_VERSIONS)
        conn.execute("INSERT INTO instance_versions (sop_uid, path, size, sha256,"
                      " transfer_syntax, received_at, superseded_at) SELECT sop_uid, path,"
                      " size, sha256, transfer_syntax, received_at, 0 FROM instances")
    async with Index(db):
        pass
    assert versions_of(home, instance.sop_instance_uid) == ([digest(instance.path)],
                                                            [digest(y)])
    assert index_rows(home, "SELECT is_local, pack_fk FROM instance_versions") == [(1, None)]
    assert_fsck_clean(home)


def test_a_series_that_followed_its_instance_into_another_study_is_restored(
    tmp_path: Path,
) -> None:
    """X, the one instance of series S in study A, sent again under study B with S kept
    (S goes along), then Z, new in B's S; each study replicated after. The index is
    lost and restore meets A's version 1 (S holds X), then B's version 1, before A's
    version 2 that withdraws X: B's version lists Z (instance 1) before X and was
    refused ("its Series Instance UID belongs to another study on this box"), so study
    B stayed out of the index until A's version 2 was restored, for ever without it."""
    home = init_home(tmp_path / "home")
    first = dicomgen.make_study(tmp_path / "study", seed=88, series_per_study=1,
                                instances_per_series=1, size=16)[0]
    x = dicomgen.altered_copy(first, tmp_path / "sent" / "x.dcm", InstanceNumber=2)
    moved = dicomgen.altered_copy(first, tmp_path / "sent" / "moved.dcm", InstanceNumber=2,
                                  StudyInstanceUID=dicomgen.make_uid(88, "study B"))
    z = dicomgen.altered_copy(first, tmp_path / "sent" / "z.dcm", InstanceNumber=1,
                              StudyInstanceUID=dicomgen.make_uid(88, "study B"),
                              SOPInstanceUID=dicomgen.make_uid(88, "z"))
    run_pacs_edge("import", "--home", str(home), str(x))
    sync_once(home)
    run_pacs_edge("import", "--home", str(home), str(moved), str(z))
    sync_once(home)
    folders = {uid: str(name).split("/")[1] for uid, name in index_rows(
        home, "SELECT st.study_uid, p.manifest_name FROM packs p"
              " JOIN studies st ON st.id = p.study_fk")}
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    staged = tmp_path / "staged"
    b = str(pydicom.dcmread(moved).StudyInstanceUID)
    for study, version in ((first.study_uid, 1), (b, 1), (first.study_uid, 2)):
        source = home / "cloud" / "studies" / folders[study]
        target = staged / "studies" / folders[study]
        target.mkdir(parents=True, exist_ok=True)
        for blob in source.iterdir():  # the version's manifest, pack, keys and metadata
            if f"v{version:06d}." in blob.name:
                copy = shutil.copytree if blob.is_dir() else shutil.copy2
                copy(blob, target / blob.name)
        run_pacs_edge("restore", "--home", str(home), "--cloud", f"file://{staged}")

    found = index_rows(home, "SELECT st.study_uid, se.series_uid, i.sop_uid FROM instances i"
                             " JOIN series se ON se.id = i.series_fk"
                             " JOIN studies st ON st.id = se.study_fk")
    assert sorted(found) == sorted([(b, first.series_uid, first.sop_instance_uid),
                                    (b, first.series_uid, str(pydicom.dcmread(z).SOPInstanceUID))])
    assert versions_of(home, first.sop_instance_uid) == ([digest(moved)], [digest(x)])
    assert_fsck_clean(home)


def test_a_lost_index_rebuilt_from_the_store_keeps_a_series_that_followed_its_instance(
    tmp_path: Path,
) -> None:
    """X, the one instance of series S in study A, sent again under study B with S kept
    (S goes along), then Z, new in B's S; never replicated, and the index is lost.
    `fsck --repair` adopted the files in path order: A's X (current), then Z, whose
    series was still A's: "unreadable, left in place" (its Series Instance UID belongs
    to another study), though it was stored and answered before the loss."""
    home = init_home(tmp_path / "home")
    first = dicomgen.make_study(tmp_path / "study", seed=89, series_per_study=1,
                                instances_per_series=1, size=16)[0]
    # UIDs in the order that put A's file first and Z's before X's in B's series
    a, b = sorted(dicomgen.make_uid(89, "study", n) for n in range(2))
    z_uid, x_uid = sorted(dicomgen.make_uid(89, "instance", n) for n in range(2))
    x = dicomgen.altered_copy(first, tmp_path / "sent" / "x.dcm", StudyInstanceUID=a,
                              SOPInstanceUID=x_uid)
    moved = dicomgen.altered_copy(first, tmp_path / "sent" / "moved.dcm",
                                  StudyInstanceUID=b, SOPInstanceUID=x_uid)
    z = dicomgen.altered_copy(first, tmp_path / "sent" / "z.dcm", StudyInstanceUID=b,
                              SOPInstanceUID=z_uid)
    for path in (x, moved, z):
        run_pacs_edge("import", "--home", str(home), str(path))
    for path in home.glob("index.sqlite3*"):
        path.unlink()
    run_pacs_edge("fsck", "--repair", "--home", str(home))

    found = index_rows(home, "SELECT st.study_uid, se.series_uid, i.sop_uid FROM instances i"
                             " JOIN series se ON se.id = i.series_fk"
                             " JOIN studies st ON st.id = se.study_fk")
    assert sorted(found) == [(b, first.series_uid, z_uid), (b, first.series_uid, x_uid)]
    assert versions_of(home, x_uid) == ([digest(moved)], [digest(x)])
    assert_local_rows_have_their_files(home)
    assert_fsck_clean(home)
