"""What changes on the box after a study reached the cloud reaches its readers and restore.

A remote reader sees one study's pack versions only, and readers and restore take the
study's patient from its newest version; each change below gets the study a version
(store/amendments.py, docs/cloud-format.md), with no instance of its own if nothing
else arrived:

- an instance sent again under another Study Instance UID (the first study was the
  wrong one) moves on the box, and C-FIND answers it in the new study only; the
  reader went on showing it in the study it left, often another patient's. That
  study's next version withdraws it;
- an ADT^A40 merge or an ADT^A08 update changes the study's patient on the box; the
  reader went on listing the study under the old ID and name, and a restored box
  filed it there. The next version states the study with its patient as it is.

Real processes: `pacs-edge serve` (its HL7 listener, over MLLP), `import`, `sync
--once`, `readers add`, `reader list`/`pull`, `evict`, `recall`, `keys
escrow`/`recover`, `restore`, `fsck`, on a local-folder cloud.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import hl7peer
import pydicom
import pytest
from conftest import EdgeServer, run_pacs_edge
from syncagent import (
    assert_fsck_clean,
    import_files,
    index_rows,
    paused,
    restore_elsewhere,
    stored_hashes,
    sync_once,
)


def moved_copy(instance: dicomgen.GeneratedInstance, folder: Path, seed: int) -> Path:
    """The same SOP Instance UID sent again in another study, series and patient."""
    return dicomgen.altered_copy(
        instance, folder / f"{instance.sop_instance_uid}.dcm",
        StudyInstanceUID=dicomgen.make_uid(seed, "right study"),
        SeriesInstanceUID=dicomgen.make_uid(seed, "right series"), PatientID=f"RIGHT{seed}")


def edge_home(tmp_path: Path) -> tuple[Path, Path]:
    cloud, home = tmp_path / "cloud", tmp_path / "edge"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0",
                  "--cloud", f"file://{cloud}")
    return home, cloud


def reader_with_everything(edge: Path, cloud: Path, home: Path, scope: str = "all") -> Path:
    key = run_pacs_edge("reader", "init", "--home", str(home), "--cloud",
                        f"file://{cloud}").stdout.strip().splitlines()[-1]
    run_pacs_edge("readers", "add", "everyone", key, "--scope", scope, "--home", str(edge))
    return home


@pytest.fixture
def hl7_box(edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int],
            tmp_path: Path) -> tuple[EdgeServer, int, Path]:
    """A started server with its HL7 listener on a free port and a local-folder cloud:
    (server, HL7 port, cloud folder)."""
    cloud = tmp_path / "cloud"
    server = edge_server_factory(start=False)
    server.configure(cloud={"url": f"file://{cloud}"}, sync={"stable_after_seconds": 3600.0})
    hl7_port = free_port()
    hl7peer.listen(server, hl7_port)
    server.start()
    return server, hl7_port, cloud


def reader_patients(home: Path) -> dict[str, tuple[str, str]]:
    """Study Instance UID -> (Patient ID, name), as `reader list` shows them."""
    rows = json.loads(run_pacs_edge("reader", "list", "--json", "--home", str(home)).stdout)
    return {row["study_uid"]: (row["patient_id"], row["patient_name"]) for row in rows}


def reader_studies(home: Path) -> dict[str, int]:
    """Study Instance UID -> instances, as `reader list` shows them."""
    rows = json.loads(run_pacs_edge("reader", "list", "--json", "--home", str(home)).stdout)
    return {row["study_uid"]: row["instances"] for row in rows}


def pulled(home: Path, study_uid: str, to: Path) -> set[bytes]:
    run_pacs_edge("reader", "pull", study_uid, "--to", str(to), "--home", str(home))
    return {dicomgen.dataset_bytes(p) for p in to.rglob("*.dcm")}


def test_a_reader_no_longer_sees_an_instance_in_the_study_it_left(tmp_path: Path) -> None:
    """Study A (X, Y) and study C (Z) replicated and granted; X and Z are then sent again
    under study B. The next pass uploads B and a version of A and of C that withdraw
    them: the reader lists A with Y alone and pulls Y alone, B with X, and no longer
    lists C, which holds nothing now. Before, A still showed and gave X, and C Z."""
    edge, cloud = edge_home(tmp_path)
    a = dicomgen.make_study(tmp_path / "a", seed=91, series_per_study=1,
                            instances_per_series=2, size=16)
    c = dicomgen.make_study(tmp_path / "c", seed=92, series_per_study=1,
                            instances_per_series=1, size=16)
    x, y, z = a[0], a[1], c[0]
    import_files(edge, *a, *c)
    sync_once(edge)
    reader = reader_with_everything(edge, cloud, tmp_path / "reader")
    assert reader_studies(reader) == {x.study_uid: 2, z.study_uid: 1}

    moved = [moved_copy(x, tmp_path / "moved", 93), moved_copy(z, tmp_path / "moved", 93)]
    run_pacs_edge("import", "--home", str(edge), *map(str, moved))
    b = str(pydicom.dcmread(moved[0]).StudyInstanceUID)
    sync_once(edge)

    assert reader_studies(reader) == {x.study_uid: 1, b: 2}
    assert pulled(reader, x.study_uid, tmp_path / "pull-a") == {dicomgen.dataset_bytes(y.path)}
    assert pulled(reader, b, tmp_path / "pull-b") == {dicomgen.dataset_bytes(p) for p in moved}
    refused = run_pacs_edge("reader", "pull", z.study_uid, "--to", str(tmp_path / "pull-c"),
                            "--home", str(reader), check=False)
    assert refused.returncode == 2
    assert "the study holds no instance any more" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The versions that withdraw hold no instance: a pack of no file, and nothing again
    # at the next pass.
    assert index_rows(edge, "SELECT st.study_uid, p.version, p.instance_count FROM packs p"
                            " JOIN studies st ON st.id = p.study_fk ORDER BY st.id, p.version") \
        == [(x.study_uid, 1, 2), (x.study_uid, 2, 0), (z.study_uid, 1, 1),
            (z.study_uid, 2, 0), (b, 1, 2)]
    sync_once(edge)
    assert len(list(cloud.rglob("*.manifest"))) == 5
    assert index_rows(edge, "SELECT COUNT(*) FROM withdrawals") == [(0,)]


def test_a_reader_whose_scope_the_study_left_is_still_told_of_the_withdrawal(
    tmp_path: Path,
) -> None:
    """A reader scoped to MR holds study A (one MR series); both its instances are sent
    again under study B. A has no series left, so no modality, and fell out of the
    reader's scope: the version that withdraws them was never granted to the reader,
    who went on listing A beside B."""
    edge, cloud = edge_home(tmp_path)
    a = dicomgen.make_study(tmp_path / "a", seed=100, series_per_study=1,
                            instances_per_series=2, size=16, modalities=("MR",))
    import_files(edge, *a)
    sync_once(edge)
    reader = reader_with_everything(edge, cloud, tmp_path / "reader", "modality:MR")
    assert reader_studies(reader) == {a[0].study_uid: 2}
    moved = [moved_copy(i, tmp_path / "moved", 101) for i in a]
    run_pacs_edge("import", "--home", str(edge), *map(str, moved))
    sync_once(edge)
    assert reader_studies(reader) == {str(pydicom.dcmread(moved[0]).StudyInstanceUID): 2}


def test_an_evicted_study_is_withdrawn_from_and_stays_evicted(tmp_path: Path) -> None:
    """X leaves an evicted study: the study's withdrawing version is uploaded without a
    recall, the study stays evicted, and a recall brings back the others only."""
    edge, cloud = edge_home(tmp_path)
    a = dicomgen.make_study(tmp_path / "a", seed=94, series_per_study=1,
                            instances_per_series=3, size=16)
    import_files(edge, *a)
    sync_once(edge)
    run_pacs_edge("evict", a[0].study_uid, "--without-escrow", "--home", str(edge))
    run_pacs_edge("import", "--home", str(edge), str(moved_copy(a[0], tmp_path / "m", 95)))
    sync_once(edge)
    assert index_rows(edge, "SELECT tier_state FROM studies"
                            f" WHERE study_uid = '{a[0].study_uid}'") == [("evicted",)]
    reader = reader_with_everything(edge, cloud, tmp_path / "reader")
    assert reader_studies(reader)[a[0].study_uid] == 2
    recalled = run_pacs_edge("recall", a[0].study_uid, "--home", str(edge)).stdout
    assert "recalled 2 instance(s)" in recalled
    assert_fsck_clean(edge)
    assert index_rows(edge, "SELECT COUNT(*) FROM withdrawals") == [(0,)]


def test_restore_keeps_a_withdrawn_instance_out_of_the_study_it_left(tmp_path: Path) -> None:
    """A's versions hold X, then withdraw it; the study X went to never reached the
    cloud (the box was lost first). The restored box answers A without X, whose
    content is a prior version in A's first pack, and fsck finds nothing amiss."""
    edge, cloud = edge_home(tmp_path)
    a = dicomgen.make_study(tmp_path / "a", seed=96, series_per_study=1,
                            instances_per_series=2, size=16)
    x, y = a
    import_files(edge, *a)
    sync_once(edge)
    folders = set((cloud / "studies").iterdir())
    moved = moved_copy(x, tmp_path / "moved", 97)
    run_pacs_edge("import", "--home", str(edge), str(moved))
    sync_once(edge)
    b = str(pydicom.dcmread(moved).StudyInstanceUID)
    # B's folder is the new one: gone, as if the box was lost before it uploaded B.
    (b_folder,) = set((cloud / "studies").iterdir()) - folders
    shutil.rmtree(b_folder)

    new, restored = restore_elsewhere(edge, cloud, tmp_path)
    assert "restored 2 pack version(s) of 1 study(ies)" in restored
    assert index_rows(new, "SELECT st.study_uid, st.instance_count, i.sop_uid FROM studies st"
                           " JOIN series se ON se.study_fk = st.id"
                           " JOIN instances i ON i.series_fk = se.id") == [
        (x.study_uid, 1, y.sop_instance_uid)]
    assert index_rows(new, "SELECT v.sop_uid, p.version FROM instance_versions v"
                           " JOIN packs p ON p.id = v.pack_fk") == [(x.sop_instance_uid, 1)]
    assert b not in {row[0] for row in index_rows(new, "SELECT study_uid FROM studies")}
    recalled = run_pacs_edge("recall", x.study_uid, "--home", str(new)).stdout
    assert "recalled 1 instance(s)" in recalled
    assert set(stored_hashes(new)) == {y.sop_instance_uid}
    assert_fsck_clean(new)


def test_a_merged_and_renamed_patient_reaches_readers_and_a_restored_box(
    hl7_box: tuple[EdgeServer, int, Path], tmp_path: Path,
) -> None:
    """Study A of a temporary patient (an emergency registration) and study K of the
    patient's real record are replicated and granted. ADT^A40 merges the temporary
    patient into the real one, then ADT^A08 renames the real one. The next pass
    uploads a version of A and of K, no instance in either: the reader lists both under
    the real ID and the new name, and a box restored from the cloud files both there.
    The same A08 sent again changes nothing and uploads nothing."""
    server, hl7_port, cloud = hl7_box
    temporary = dicomgen.make_study(tmp_path / "a", seed=98, series_per_study=1,
                                    instances_per_series=2, size=16)
    real = dicomgen.make_study(tmp_path / "k", seed=99, series_per_study=1,
                               instances_per_series=1, size=16)
    a, k, real_id = temporary[0].study_uid, real[0].study_uid, real[0].patient_id
    dcmtk.storescu(server.port, [i.path for i in (*temporary, *real)]).check()
    sync_once(server.home)
    reader = reader_with_everything(server.home, cloud, tmp_path / "reader")
    assert reader_patients(reader) == {a: (temporary[0].patient_id, str(
        temporary[0].header.PatientName)), k: (real_id, str(real[0].header.PatientName))}

    merge = hl7peer.adt("AM1", "A40", patient_id=real_id, name="REAL^NAME",
                        prior=temporary[0].patient_id, issuer="")
    assert hl7peer.send(hl7_port, merge).code == "AA"
    rename = hl7peer.adt("AM2", "A08", patient_id=real_id, name="RENAMED^REAL", issuer="")
    assert hl7peer.send(hl7_port, rename).code == "AA"
    sync_once(server.home)
    assert reader_patients(reader) == {a: (real_id, "RENAMED^REAL"),
                                       k: (real_id, "RENAMED^REAL")}
    assert index_rows(server.home, "SELECT COUNT(*), SUM(instance_count) FROM packs") == [
        (4, 3)]

    again = hl7peer.adt("AM3", "A08", patient_id=real_id, name="RENAMED^REAL", issuer="")
    assert hl7peer.send(hl7_port, again).code == "AA"
    sync_once(server.home)
    assert index_rows(server.home, "SELECT COUNT(*) FROM packs") == [(4,)]

    new, restored = restore_elsewhere(server.home, cloud, tmp_path)
    assert "restored 4 pack version(s) of 2 study(ies)" in restored
    assert set(index_rows(new, "SELECT st.study_uid, p.patient_id, p.patient_name"
                               " FROM studies st JOIN patients p ON p.id = st.patient_fk")) == {
        (a, real_id, "RENAMED^REAL"), (k, real_id, "RENAMED^REAL")}
    assert index_rows(new, "SELECT COUNT(*) FROM patients") == [(1,)]


def test_an_instance_that_leaves_during_the_upload_is_withdrawn_by_the_next_version(
    tmp_path: Path,
) -> None:
    """X leaves study A for B while A's first version is being uploaded with X in it
    (the pass stopped at the step before the upload): that version goes up as planned,
    and the next pass withdraws X in a second one."""
    edge, cloud = edge_home(tmp_path)
    a = dicomgen.make_study(tmp_path / "a", seed=102, series_per_study=1,
                            instances_per_series=2, size=16)
    import_files(edge, *a)
    moved = moved_copy(a[0], tmp_path / "moved", 103)
    with paused(edge, "replicate:before-upload", "sync", "--once", "--stable-after", "0"):
        run_pacs_edge("import", "--home", str(edge), str(moved))
    assert index_rows(edge, "SELECT p.version, p.instance_count, st.tier_state FROM packs p"
                            " JOIN studies st ON st.id = p.study_fk") == [(1, 2, "local")]
    sync_once(edge)
    reader = reader_with_everything(edge, cloud, tmp_path / "reader")
    assert reader_studies(reader) == {a[0].study_uid: 1,
                                      str(pydicom.dcmread(moved).StudyInstanceUID): 1}


def test_a_patient_renamed_during_the_upload_is_restated_by_the_next_version(
    hl7_box: tuple[EdgeServer, int, Path], tmp_path: Path,
) -> None:
    """ADT^A08 renames the patient while their study's first version is being uploaded
    with the old name (read when the version began): that version does not count as
    stating the new one, and the next pass uploads a version that does."""
    server, hl7_port, cloud = hl7_box
    study = dicomgen.make_study(tmp_path / "a", seed=104, series_per_study=1,
                                instances_per_series=1, size=16)
    dcmtk.storescu(server.port, [study[0].path]).check()
    rename = hl7peer.adt("RN1", "A08", patient_id=study[0].patient_id, name="NEW^NAME",
                         issuer="")
    with paused(server.home, "replicate:before-upload", "sync", "--once",
                "--stable-after", "0"):
        assert hl7peer.send(hl7_port, rename).code == "AA"
    reader = reader_with_everything(server.home, cloud, tmp_path / "reader")
    assert reader_patients(reader)[study[0].study_uid][1] == str(
        study[0].header.PatientName)
    sync_once(server.home)
    assert reader_patients(reader)[study[0].study_uid][1] == "NEW^NAME"
