"""Instances without a Patient ID are not one patient: each study answers with its own name.

Unregistered trauma patients, phantoms and old modalities send no PatientID (0010,0020),
or an empty one. The index keyed patients by PatientID and issuer alone, so every such
instance joined the one row with an empty ID, and C-FIND (dcmtk findscu) and QIDO-RS
(dicomweb-client) answered each of their studies with the name, birth date and sex of
the first one ever stored. Now a patient without an ID is its demographics: one row per
name, birth date and sex (migration 0029, store/hierarchy.py upsert_patient).
"""

from __future__ import annotations

from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import webpeer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# name, birth date, sex, PatientID (None: the element is left out)
PATIENTS = [("SMITH^ANNA", "19800101", "F", None), ("JONES^BOB", "19900202", "M", ""),
            ("SMITH^ANNA", "19800101", "F", ""), ("DOE^JANE", "20010303", "F", "P123")]


def write_instance(folder: Path, number: int, name: str, birth_date: str, sex: str,
                   patient_id: str | None) -> tuple[Path, str]:
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = dicomgen.make_uid(450, "sop", number)
    ds.StudyInstanceUID = dicomgen.make_uid(450, "study", number)
    ds.SeriesInstanceUID = dicomgen.make_uid(450, "series", number)
    ds.PatientName, ds.PatientBirthDate, ds.PatientSex = name, birth_date, sex
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Modality = "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.StudyInstanceUID)


def test_studies_without_a_patient_id_answer_with_their_own_patient(tmp_path: Path) -> None:
    sent = [write_instance(tmp_path, n, *patient) for n, patient in enumerate(PATIENTS)]
    with webpeer.running_web_server(tmp_path) as server:
        dcmtk.storescu(server.port, [path for path, _ in sent]).check()
        studies = webpeer.dicomweb(server, "rad").search_for_studies(
            fields=["PatientBirthDate", "PatientSex"])
        qido = {s["0020000D"]["Value"][0]: (s["00100010"]["Value"][0]["Alphabetic"],
                                            s["00100030"]["Value"][0], s["00100040"]["Value"][0])
                for s in studies}
        for (_, study_uid), (name, birth_date, sex, _) in zip(sent, PATIENTS, strict=True):
            found = dcmtk.findscu(server.port, {"StudyInstanceUID": study_uid, "PatientName": "",
                                                "PatientBirthDate": "", "PatientSex": ""})
            assert found.check().values("PatientName") == [name], study_uid
            assert found.values("PatientBirthDate") == [birth_date]
            assert found.values("PatientSex") == [sex]
            assert qido[study_uid] == (name, birth_date, sex)
        # At PATIENT level: the two studies of SMITH^ANNA without an ID are one patient.
        patients = dcmtk.findscu(server.port, {"PatientName": "", "PatientID": "",
                                               "NumberOfPatientRelatedStudies": ""},
                                 level="PATIENT", model="patient").check()
        assert sorted(zip(patients.values("PatientName"),
                          patients.values("NumberOfPatientRelatedStudies"), strict=True)) == [
            ("DOE^JANE", "1"), ("JONES^BOB", "1"), ("SMITH^ANNA", "2")]
        assert pydicom.dcmread(sent[1][0]).PatientID == ""  # sent as an empty element
