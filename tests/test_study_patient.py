"""A study follows its instances to another patient only when every one of them names it.

A study is filed under the patient of its first instance. A technologist who keyed the
wrong Patient ID corrects it at the modality and sends the study again: each instance
comes back as new content (the earlier one kept as a prior version), naming the right
patient. Until this change the index kept the study under the wrong patient, silently:
C-FIND and the viewer showed the corrected images under the first ID. Now every instance
naming another patient than its study's is logged (PHI-free) and counted, and once every
current instance of the study names that patient the study moves to it. One stray
instance of another patient in a study (a wrong Study Instance UID) moves nothing.

Real peers: dcmtk's storescu and findscu against a real `pacs-edge serve`; /metrics by
curl. store/index.py (_record, _follow_instances), migration 0030.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import webpeer
from conftest import EdgeServer, run_pacs_edge
from prometheus_client.parser import text_string_to_metric_families
from syncagent import index_rows, restore_elsewhere, sync_once

from appliance.store import database, order_rows
from appliance.store.index import Index, StoredFile
from appliance.store.instance_header import InstanceHeader
from appliance.store.order_rows import PatientKey

WRONG, RIGHT, STRAY = ("WRONG1", "WRONG^PATIENT"), ("RIGHT7", "RIGHT^PATIENT"), \
    ("STRAY9", "STRAY^PATIENT")
COUNTER = "pacs_edge_instances_of_another_patient_total"
ROOT = "1.2.826.0.1.3680043.10.4714"


def as_patient(instance: dicomgen.GeneratedInstance, folder: Path, patient: tuple[str, str],
               *, sop_uid: str = "") -> Path:
    """A copy of `instance` naming `patient` (and another SOP Instance UID if given)."""
    ds = pydicom.dcmread(instance.path)
    ds.PatientID, ds.PatientName = patient
    if sop_uid:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop_uid or ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def study_patient(server: EdgeServer, study_uid: str) -> tuple[str, str]:
    found = dcmtk.findscu(server.port, {"StudyInstanceUID": study_uid, "PatientID": "",
                                        "PatientName": ""}).check()
    (patient_id,), (name,) = found.values("PatientID"), found.values("PatientName")
    return patient_id, name


def patient_ids(server: EdgeServer) -> list[str]:
    found = dcmtk.findscu(server.port, {"PatientID": "", "NumberOfPatientRelatedStudies": ""},
                          level="PATIENT", model="patient").check()
    return sorted(found.values("PatientID"))


def index_patients(server: EdgeServer) -> list[str]:
    with closing(sqlite3.connect(f"file:{server.home / 'index.sqlite3'}?mode=ro",
                                 uri=True)) as db:
        return [pid for (pid,) in db.execute("SELECT patient_id FROM patients ORDER BY 1")]


def counted(server: EdgeServer) -> float:
    answer = webpeer.curl(server, "/metrics")
    assert answer.status == 200
    return sum(s.value for family in text_string_to_metric_families(answer.body.decode())
               for s in family.samples if s.name == COUNTER)


def test_a_study_sent_again_under_a_corrected_patient_id_moves_once_all_of_it_has(
        tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "made", seed=471, series_per_study=1,
                                instances_per_series=3)
    study_uid = study[0].study_uid
    wrong = [as_patient(i, tmp_path / "wrong", WRONG) for i in study]
    right = [as_patient(i, tmp_path / "right", RIGHT) for i in study]
    with webpeer.running_web_server(tmp_path) as server:
        dcmtk.storescu(server.port, wrong).check()
        assert study_patient(server, study_uid) == WRONG
        assert counted(server) == 0

        dcmtk.storescu(server.port, right[:2]).check()
        assert study_patient(server, study_uid) == WRONG  # a third still names WRONG1
        server.wait_for_log("instance names another patient than its study")
        assert counted(server) == 2

        dcmtk.storescu(server.port, right[2:]).check()
        assert study_patient(server, study_uid) == RIGHT
        assert dcmtk.findscu(server.port, {"PatientID": WRONG[0]}).check().responses == []
        assert patient_ids(server) == [RIGHT[0]]  # the wrong patient had nothing else
        server.wait_for_log("study moved to the patient every one of its instances now names")
        assert counted(server) == 3
        log = server.log()
        assert not any(value in log for value in (*WRONG, *RIGHT, study_uid))


def test_a_stray_instance_of_another_patient_moves_nothing_and_leaves_no_patient_behind(
        tmp_path: Path) -> None:
    study = dicomgen.make_study(tmp_path / "made", seed=472, series_per_study=1,
                                instances_per_series=2)
    study_uid = study[0].study_uid
    stray_uid = dicomgen.make_uid(472, "stray", 1)
    with webpeer.running_web_server(tmp_path) as server:
        dcmtk.storescu(server.port, [as_patient(i, tmp_path / "first", WRONG)
                                     for i in study]).check()
        stray = as_patient(study[0], tmp_path / "stray", STRAY, sop_uid=stray_uid)
        dcmtk.storescu(server.port, [stray]).check()
        assert study_patient(server, study_uid) == WRONG
        found = dcmtk.findscu(server.port, {"StudyInstanceUID": study_uid,
                                            "NumberOfStudyRelatedInstances": ""}).check()
        assert found.values("NumberOfStudyRelatedInstances") == ["3"]
        assert counted(server) == 1
        # C-FIND answers patients by the studies filed under them: STRAY9 has none.
        assert patient_ids(server) == [WRONG[0]]
        assert index_patients(server) == [STRAY[0], WRONG[0]]
        # The stray instance sent again under the study's own patient: nothing names
        # STRAY9 any more, and its row goes.
        dcmtk.storescu(server.port, [as_patient(study[0], tmp_path / "fixed", WRONG,
                                                sop_uid=stray_uid)]).check()
        assert index_patients(server) == [WRONG[0]]
        assert study_patient(server, study_uid) == WRONG
        assert counted(server) == 1


def test_a_study_follows_its_instances_once_the_last_naming_its_patient_leaves_it(
        tmp_path: Path) -> None:
    """Two instances of a study come back naming the corrected patient; the third was
    in the wrong study and is sent again under its own Study Instance UID. Every
    instance left in the study names RIGHT7, yet the study stayed filed under WRONG1:
    only an instance arriving in the study made it follow them."""
    study = dicomgen.make_study(tmp_path / "made", seed=473, series_per_study=1,
                                instances_per_series=3)
    study_uid, own_study_uid = study[0].study_uid, dicomgen.make_uid(473, "own study")
    wrong = [as_patient(i, tmp_path / "wrong", WRONG) for i in study]
    right = [as_patient(i, tmp_path / "right", RIGHT) for i in study[:2]]
    ds = pydicom.dcmread(wrong[2])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = own_study_uid, dicomgen.make_uid(473, "own")
    own_study = tmp_path / "own.dcm"
    ds.save_as(own_study, enforce_file_format=True)
    with webpeer.running_web_server(tmp_path) as server:
        dcmtk.storescu(server.port, [*wrong, *right]).check()
        assert study_patient(server, study_uid) == WRONG
        dcmtk.storescu(server.port, [own_study]).check()
        assert study_patient(server, study_uid) == RIGHT
        assert study_patient(server, own_study_uid) == WRONG
        found = dcmtk.findscu(server.port, {"PatientID": RIGHT[0], "StudyInstanceUID": "",
                                            "NumberOfStudyRelatedInstances": ""}).check()
        assert found.values("NumberOfStudyRelatedInstances") == ["2"]
        assert patient_ids(server) == [RIGHT[0], WRONG[0]]
        server.wait_for_log("study moved to the patient every one of its instances now names")
        assert counted(server) == 2
        log = server.log()
        assert not any(value in log for value in (*WRONG, *RIGHT, study_uid, own_study_uid))


def header(study: str, sop: str, patient_id: str) -> InstanceHeader:
    return InstanceHeader(
        patient_id=patient_id, issuer_of_patient_id="", patient_name=f"{patient_id}^NAME",
        birth_date="", sex="", study_uid=f"{ROOT}.{study}", study_date="20240301",
        study_time="", accession_number="", study_id="", study_description="",
        referring_physician="", character_set="", series_uid=f"{ROOT}.{study}.1",
        modality="CT", series_number=1, series_description="", body_part="", series_date="",
        series_time="", sop_uid=f"{ROOT}.{study}.1.{sop}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=1,
        transfer_syntax="1.2.840.10008.1.2.1")


def test_a_merge_of_the_patient_an_instance_names_is_followed(tmp_path: Path) -> None:
    """ADT^A40 merges: an instance naming the merged-away patient names the surviving
    one, and one that then names its own study's patient is no other patient's."""

    async def scenario() -> tuple[list[tuple[str, str | None]], list[str], list[object]]:
        async with Index(tmp_path / "index.sqlite3") as index:
            writer = index.writer
            assert writer is not None
            for n, (study, sop, patient_id) in enumerate((
                    ("1", "1", "A"), ("1", "2", "X"),  # study 1: A's, one instance names X
                    ("2", "1", "B"), ("2", "2", "Y"),  # study 2: B's, one instance names Y
                    ("3", "1", "C"), ("3", "2", "B"))):  # study 3: C's, one names B
                await index.record_instance(header(study, sop, patient_id),
                                            StoredFile(f"{n}.dcm", 10, 0, str(n), 1.0))
            for prior, surviving in (("X", "A"), ("B", "Y")):
                await writer.submit_sync(lambda conn, p=prior, s=surviving: order_rows.
                                         merge_patient(conn, PatientKey(p), PatientKey(s), 2.0))

            def read(conn: sqlite3.Connection) -> tuple[list[tuple[str, str | None]],
                                                        list[str], list[object]]:
                named = conn.execute(
                    "SELECT i.sop_uid, p.patient_id FROM instances i"
                    " LEFT JOIN patients p ON p.id = i.patient_fk ORDER BY i.sop_uid")
                patients = conn.execute("SELECT patient_id FROM patients ORDER BY 1")
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                return ([(uid.removeprefix(ROOT + "."), pid) for uid, pid in named],
                        [pid for (pid,) in patients], broken)

            return await database.run_sync(index.reader, read)

    named, patients, broken = asyncio.run(scenario())
    assert named == [("1.1.1", None), ("1.1.2", None),  # X merged into A, study 1's own
                     ("2.1.1", None), ("2.1.2", None),  # study 2 moved to Y with B's merge
                     ("3.1.1", None), ("3.1.2", "Y")]  # names B, now Y: still not C
    assert patients == ["A", "C", "Y"]
    assert broken == []


def test_a_restored_box_files_a_moved_study_under_its_newest_versions_patient(
        tmp_path: Path) -> None:
    """Pack version 1 of the study names WRONG1, version 2 (the study sent again under
    RIGHT7, which moved it) RIGHT7. Restore filed a study under its first version's
    patient, so the restored box answered the corrected study under the wrong ID."""
    cloud, old = tmp_path / "cloud", tmp_path / "old"
    run_pacs_edge("init", "--home", str(old), "--dicom-port", "0", "--tls-port", "0",
                  "--cloud", f"file://{cloud}")
    study = dicomgen.make_study(tmp_path / "made", seed=473, series_per_study=1,
                                instances_per_series=2, size=16)
    run_pacs_edge("import", "--home", str(old),
                  *(str(as_patient(i, tmp_path / "wrong", WRONG)) for i in study))
    sync_once(old)
    run_pacs_edge("import", "--home", str(old),
                  *(str(as_patient(i, tmp_path / "right", RIGHT)) for i in study))
    sync_once(old)
    new, restored = restore_elsewhere(old, cloud, tmp_path)
    assert "restored 2 pack version(s) of 1 study(ies)" in restored
    filed = index_rows(new, "SELECT p.patient_id FROM studies st"
                            " JOIN patients p ON p.id = st.patient_fk")
    assert filed == [(RIGHT[0],)]
    assert index_rows(new, "SELECT patient_id FROM patients") == [(RIGHT[0],)]
