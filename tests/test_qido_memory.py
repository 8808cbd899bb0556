"""A QIDO-RS page is written one identifier at a time: its Datasets never all live at once.

A page may hold `[http] qido_max_results` (5000) matches. Made all at once, their
pydicom Datasets and JSON dicts took ~12 KB per match (5000 studies: 62 MB of
Python objects for a 3.7 MB answer); made, written and dropped in turn, the page
costs its rows and its text (5000: 12 MB). Measured with tracemalloc on a real
index, through the service and the edge's own JSON writer.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from pydicom.dataset import Dataset

from appliance.http.dicomweb_common import json_array_response
from appliance.http.dicomweb_qido import json_texts
from appliance.services.access import Principal, Role
from appliance.services.web_query import WebQueryService
from appliance.store.index import Index, StoredFile
from appliance.store.instance_header import InstanceHeader

ROOT = "1.2.826.0.1.3680043.10.4713"
STUDIES = 1000
KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
        "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "InstanceAvailability")


def header(n: int) -> InstanceHeader:
    study_uid = f"{ROOT}.{n}"
    return InstanceHeader(
        patient_id=f"P{n:05d}", issuer_of_patient_id="", patient_name=f"DOE^JOHN{n}",
        birth_date="19700101", sex="F", study_uid=study_uid, study_date="20240301",
        study_time="1015", accession_number=f"ACC{n:06d}", study_id=str(n),
        study_description="CT HEAD", referring_physician="WELBY^MARCUS",
        character_set="ISO_IR 192", series_uid=f"{study_uid}.1", modality="CT",
        series_number=1, series_description="", body_part="", series_date="", series_time="",
        sop_uid=f"{study_uid}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=1, transfer_syntax="1.2.840.10008.1.2.1")


def test_a_page_of_studies_holds_one_identifier_at_a_time(tmp_path: Path) -> None:
    async def run() -> tuple[int, int, int]:
        async with Index(tmp_path / "index.sqlite3") as index:
            await asyncio.gather(*(index.record_instance(
                header(n), StoredFile(f"{n}.dcm", 1000, 0, str(n), 0.0))
                for n in range(STUDIES)))
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            for keyword in KEYS:
                setattr(identifier, keyword, "")
            service = WebQueryService(index, max_results=5000)
            tracemalloc.start()
            try:
                page = await service.search(Principal("rad", Role.RADIOLOGIST, ""), identifier)
                body = json_array_response(json_texts(page, "https://box")).body
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert isinstance(body, bytes)
            return len(page), len(body), peak

    matches, size, peak = asyncio.run(run())
    assert matches == STUDIES
    assert peak < 6 * size, f"{peak / 1e6:.1f} MB held for a {size / 1e6:.1f} MB answer"
