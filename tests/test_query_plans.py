"""The common C-FIND queries read the index through its indexes, never by a full scan.

A C-FIND's time must grow with its matches, not with the number of studies
(docs/benchmarks.md measures it at 10,000 and 100,000 studies): each query below
is planned by SQLite on a real index (`EXPLAIN QUERY PLAN` of the statement
the store runs), and no step may scan a table. The same holds for the two
statements of a QIDO-RS page, which reads the matches in row id order. The index has no ANALYZE
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
from pydicom.tag import Tag

from appliance.services.query.find import QueryModel, answer, find
from appliance.store import database
from appliance.store.cfind import attributes
from appliance.store.cfind.attributes import Level
from appliance.store.cfind.search import statement, window_statements
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
    assert not table_scans(steps), steps
    assert any(step.startswith("SEARCH") and "USING" in step for step in steps), steps


def table_scans(steps: list[str]) -> list[str]:
    # A SCAN of a subquery's few rows (ModalitiesInStudy's DISTINCT) or of the json_each
    # list of UIDs is no table scan.
    return [step for step in steps if step.startswith("SCAN")
            and not step.startswith("SCAN (subquery") and "VIRTUAL TABLE" not in step]


async def window_plans_of(index: Index, level: str, criteria: dict[str, object]
                          ) -> tuple[list[str], list[str]]:
    """The plans of a QIDO-RS page's two statements, scoped to a referring physician:
    the matches' row ids in order, then the page's rows by id."""
    found = await answer(index, QueryModel.STUDY_ROOT, identifier(level, criteria))
    referring = attributes.lookup(Tag(0x0008, 0x0090), Level[level])
    (ids_sql, params), rows_sql = window_statements(
        Level[level], found.plan.columns, found.plan.criteria, keep=referring)

    def explain(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
        return ([str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {ids_sql}", params)],
                [str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {rows_sql}",
                                                     ["[1, 2]"])])

    return await database.run_sync(index.reader, explain)


def entity_steps(steps: list[str]) -> list[str]:
    """How a plan reaches the patients, studies, series and instances it answers (an
    index that holds every column a statement reads is a COVERING one: the same index)."""
    return [step.replace("COVERING ", "") for step in steps if step.split(" ")[:2] in (
        [verb, alias] for verb in ("SCAN", "SEARCH") for alias in ("p", "st", "se", "i"))]


PAGED = [(level, criteria) for level, criteria in COMMON if level != "PATIENT"]


@pytest.mark.parametrize(("level", "criteria"), PAGED,
                         ids=[f"{lvl}-{'+'.join(c)}-{i}" for i, (lvl, c) in enumerate(PAGED)])
async def test_qido_pages_search_the_indexes_c_find_searches_and_sort_only_row_ids(
        index: Index, level: str, criteria: dict[str, object]) -> None:
    """`ORDER BY id` made SQLite scan the studies in row id order rather than sort what
    an index finds (`StudyDate=20240301-` with `ModalitiesInStudy`)."""
    ids, rows = await window_plans_of(index, level, criteria)
    assert not table_scans(ids), ids
    assert ids[-1] == "USE TEMP B-TREE FOR ORDER BY", ids
    assert entity_steps(ids) == entity_steps(await plan_of(index, level, criteria)), ids
    assert not table_scans(rows) and rows[0].startswith("SEARCH"), rows


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
async def test_a_qido_page_without_criteria_reads_in_row_id_order_and_sorts_nothing(
        index: Index, level: str) -> None:
    """The scan stops at the page's end: page one of a million instances reads a page."""
    ids, _ = await window_plans_of(index, level, {})
    alias = {"STUDY": "st", "SERIES": "se", "IMAGE": "i"}[level]
    assert ids[0] == f"SCAN {alias}", ids
    assert not any("TEMP B-TREE" in step for step in ids), ids


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
