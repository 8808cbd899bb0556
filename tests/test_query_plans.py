"""The common C-FIND queries read the index through its indexes, never by a full scan.

A C-FIND's time must grow with its matches, not with the number of studies
(docs/benchmarks.md measures it at 10,000 and 100,000 studies): each query below
is planned by SQLite on a real index (`EXPLAIN QUERY PLAN` of the statement
the store runs), and no step may scan a table. The index has no ANALYZE
statistics, as a box's index has none. The case-folded patient name
that person-name wildcards match on is kept by the schema (migration 0012):
written on insert and on a rename, and filled in for rows that predate it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from appliance.services.query.find import QueryModel, answer, find
from appliance.store import database
from appliance.store.cfind.attributes import Level
from appliance.store.cfind.search import statement
from appliance.store.index import Index, StoredFile
from appliance.store.instance_header import InstanceHeader
from appliance.store.order_rows import Demographics, PatientKey, update_demographics

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = "1.2.826.0.1.3680043.10.4712"
RETURNED = {
    "STUDY": ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyDescription", "StudyID", "ModalitiesInStudy",
              "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"),
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate"),
}
COMMON = [
    ("STUDY", {"PatientID": "P00042"}),
    ("STUDY", {"PatientName": "SMITH^J*"}),
    ("STUDY", {"PatientName": "müller*"}),
    ("STUDY", {"StudyDate": "20240301-20240315"}),
    ("STUDY", {"StudyDate": "20240301"}),
    ("STUDY", {"StudyDate": "20240301-", "ModalitiesInStudy": "CT"}),
    ("STUDY", {"AccessionNumber": "ACC000042"}),
    ("STUDY", {"AccessionNumber": "ACC0000*"}),
    ("STUDY", {"StudyInstanceUID": f"{ROOT}.1"}),
    ("STUDY", {"StudyInstanceUID": [f"{ROOT}.1", f"{ROOT}.2"]}),
    ("STUDY", {"PatientName": "SMITH*", "StudyDate": "20240301-20240315"}),
    ("SERIES", {"StudyInstanceUID": f"{ROOT}.1"}),
    ("IMAGE", {"StudyInstanceUID": f"{ROOT}.1", "SeriesInstanceUID": f"{ROOT}.1.1"}),
    ("PATIENT", {"PatientID": "P00042"}),
    ("PATIENT", {"PatientName": "SMITH^*"}),
]


def header(n: int, name: str) -> InstanceHeader:
    study_uid = f"{ROOT}.{n}"
    return InstanceHeader(
        patient_id=f"P{n // 3:05d}", issuer_of_patient_id="", patient_name=name,
        birth_date="19700101", sex="F", study_uid=study_uid, study_date=f"202403{n % 28 + 1:02d}",
        study_time="1015", accession_number=f"ACC{n:06d}", study_id=str(n),
        study_description="", referring_physician="", character_set="ISO_IR 192",
        series_uid=f"{study_uid}.1", modality="CT", series_number=1, series_description="",
        body_part="", series_date="", series_time="", sop_uid=f"{study_uid}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=1,
        transfer_syntax="1.2.840.10008.1.2.1")


NAMES = ["SMITH^JOHN", "Müller^Jürgen", "MÜLLER^ANNA", "smith^jane", "Doe^J", "ﬀ^Ligature"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def index(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Index]:
    async with Index(tmp_path_factory.mktemp("plans") / "index.sqlite3") as index:
        for n in range(60):
            await index.record_instance(header(n, NAMES[n // 3 % len(NAMES)]),
                                        StoredFile(f"{n}.dcm", 1000, 0, f"{n}", 0.0))
        yield index


def identifier(level: str, criteria: dict[str, object]) -> Dataset:
    ds = Dataset()
    for keyword, value in [("QueryRetrieveLevel", level),
                           *((k, "") for k in RETURNED[level]), *criteria.items()]:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
    return ds


async def plan_of(index: Index, level: str, criteria: dict[str, object]) -> list[str]:
    found = await answer(index, QueryModel.PATIENT_ROOT, identifier(level, criteria))
    sql, params = statement(Level[level], found.plan.columns, found.plan.criteria)

    def explain(conn: sqlite3.Connection) -> list[str]:
        return [str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]

    return await database.run_sync(index.reader, explain)


@pytest.mark.parametrize(("level", "criteria"), COMMON,
                         ids=[f"{lvl}-{'+'.join(c)}-{i}" for i, (lvl, c) in enumerate(COMMON)])
async def test_common_queries_search_indexes_and_scan_no_table(
        index: Index, level: str, criteria: dict[str, object]) -> None:
    steps = await plan_of(index, level, criteria)
    # A SCAN of a subquery's few rows (ModalitiesInStudy's DISTINCT) or of the json_each
    # list of UIDs is no table scan.
    scans = [step for step in steps if step.startswith("SCAN")
             and not step.startswith("SCAN (subquery") and "VIRTUAL TABLE" not in step]
    assert not scans, steps
    assert any(step.startswith("SEARCH") and "USING" in step for step in steps), steps


async def vm_steps_of_image_query(folder: Path, instances: int) -> int:
    """SQLite VM instructions (in hundreds) of an IMAGE query returning SOPClassesInStudy
    over one study of `instances` instances of two SOP classes."""
    query = Dataset()
    for keyword, value in (("QueryRetrieveLevel", "IMAGE"), ("SOPInstanceUID", ""),
                           ("SOPClassesInStudy", "")):
        setattr(query, keyword, value)
    async with Index(folder / "index.sqlite3") as index:
        base = header(0, "SMITH^JOHN")
        await asyncio.gather(*(index.record_instance(
            dataclasses.replace(base, sop_uid=f"{base.series_uid}.{k}",
                                sop_class_uid=f"1.2.840.10008.5.1.4.1.1.{2 + k % 2}"),
            StoredFile(f"{k}.dcm", 1000, 0, str(k), 0.0)) for k in range(instances)))
        found = await answer(index, QueryModel.PATIENT_ROOT, query)
        sql, params = statement(Level.IMAGE, found.plan.columns, found.plan.criteria)

        def steps(conn: sqlite3.Connection) -> int:
            counted = [0]

            def tick() -> int:
                counted[0] += 1
                return 0

            conn.set_progress_handler(tick, 100)
            try:
                rows = conn.execute(sql, params).fetchall()
            finally:
                conn.set_progress_handler(None, 0)
            assert len(rows) == instances
            assert {row[-1] for row in rows} == {
                "1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.3"}
            return counted[0]

        return await database.run_sync(index.reader, steps)


async def test_sop_classes_in_study_cost_each_match_the_same_whatever_the_study_size(
        tmp_path: Path) -> None:
    """SOPClassesInStudy comes from the classes kept per study (migration 0017): an IMAGE
    query over a study twice as large does about twice the work. Computed from the
    instances, each match read the whole study: four times the work (12,000 instances
    of one study took ~110 s)."""
    small = await vm_steps_of_image_query(tmp_path / "small", 300)
    large = await vm_steps_of_image_query(tmp_path / "large", 600)
    assert large < 2.5 * small, (small, large)


async def test_person_name_wildcards_use_the_folded_name_index(index: Index) -> None:
    steps = await plan_of(index, "STUDY", {"PatientName": "SMITH^J*"})
    assert any("patients_name_folded" in step for step in steps), steps


async def names(index: Index, pattern: str) -> dict[str, str]:
    """PatientID -> PatientName of the patients whose name matches `pattern`."""
    found = await find(index, QueryModel.PATIENT_ROOT, identifier("PATIENT", {
        "PatientName": pattern}))
    return {str(ds.PatientID): str(ds.PatientName) for ds in found}


async def test_folded_names_are_written_on_insert_and_rename(index: Index) -> None:
    muellers = await names(index, "müller*")
    assert set(muellers.values()) == {"Müller^Jürgen", "MÜLLER^ANNA"}
    assert set((await names(index, "FF^*")).values()) == {"ﬀ^Ligature"}  # casefold, not lower()
    assert muellers["P00001"] == "Müller^Jürgen"
    assert index.writer is not None
    await index.writer.submit_sync(lambda conn: update_demographics(
        conn, PatientKey("P00001", ""), Demographics(patient_name="Renamed^Smith"), 0.0))
    assert await names(index, "renamed*") == {"P00001": "Renamed^Smith"}
    assert await names(index, "müller*") == {
        pid: name for pid, name in muellers.items() if pid != "P00001"}


async def test_the_migration_folds_names_recorded_before_it(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    async with Index(path) as index:
        await index.record_instance(header(1, "MÜLLER^Old"), StoredFile("1.dcm", 1, 0, "1", 0.0))
    # Back to the schema before 0012, with the name recorded then.
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "DROP TRIGGER patients_name_folded_insert; DROP TRIGGER patients_name_folded_update;"
            " DROP INDEX patients_name_folded;"
            " ALTER TABLE patients DROP COLUMN patient_name_folded;"
            " DELETE FROM schema_migrations WHERE version = 12;")
    conn.close()
    async with Index(path) as index:
        assert await names(index, "müller^o*") == {"P00000": "MÜLLER^Old"}
