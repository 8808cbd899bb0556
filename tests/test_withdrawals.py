"""An instance that left a study for another is withdrawn from the cloud's copy of the study.

A modality that sends an instance again under another Study Instance UID (the first
study was the wrong one) moves it on the box, and C-FIND answers it in the new study
only. The study it left was in the cloud with it, and a remote reader sees one study's
versions only: it went on showing the instance in the wrong study, often another
patient's. The study it left gets a version that withdraws it (docs/cloud-format.md),
and readers and restore drop it there. Real processes: `pacs-edge import`, `sync
--once`, `readers add`, `reader list`/`pull`, `evict`, `recall`, `keys escrow`/`recover`,
`restore`, `fsck`, on a local-folder cloud.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dicomgen
import pydicom
from conftest import run_pacs_edge
from syncagent import (
    assert_fsck_clean,
    import_files,
    index_rows,
    restore_elsewhere,
    stored_hashes,
    sync_once,
)


def moved_copy(instance: dicomgen.GeneratedInstance, folder: Path, seed: int) -> Path:
    """The same SOP Instance UID sent again in another study, series and patient."""
    ds = pydicom.dcmread(instance.path)
    ds.StudyInstanceUID = dicomgen.make_uid(seed, "right study")
    ds.SeriesInstanceUID = dicomgen.make_uid(seed, "right series")
    ds.PatientID = f"RIGHT{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{instance.sop_instance_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def edge_home(tmp_path: Path) -> tuple[Path, Path]:
    cloud, home = tmp_path / "cloud", tmp_path / "edge"
    run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", "--tls-port", "0",
                  "--hl7-port", "0", "--http-port", "0", "--metrics-port", "0",
                  "--cloud", f"file://{cloud}")
    return home, cloud


def reader_with_everything(edge: Path, cloud: Path, home: Path) -> Path:
    key = run_pacs_edge("reader", "init", "--home", str(home), "--cloud",
                        f"file://{cloud}").stdout.strip().splitlines()[-1]
    run_pacs_edge("readers", "add", "everyone", key, "--home", str(edge))
    return home


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
