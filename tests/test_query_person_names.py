"""Person names match without their padding (PS3.5 6.2.1), in every query that matches names.

Trailing empty components and component groups are not part of a name:
'Doe^John^^^', 'Doe^John==' and 'Doe^John' are one name, whichever side (the
stored value or the request) carries the padding. Proven on the rule itself
(appliance/store/person_names.py), on the terms the query service makes
(services/query/matching.py), on a real index for Patient's Name (its folded,
indexed column) and Referring Physician's Name (compared through the SQL
function), on an index migrated from before migration 0019, and on the wire:
dcmtk findscu against a real `pacs-edge serve`. The worklist's case is in
test_worklist.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import EdgeServer
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from appliance.services.query.find import QueryModel, find
from appliance.services.query.matching import Match, term
from appliance.store.cfind.conditions import AnyOf, FoldedWildcard
from appliance.store.index import Index, StoredFile
from appliance.store.instance_header import InstanceHeader
from appliance.store.person_names import fold, strip_padding

ROOT = "1.2.826.0.1.3680043.10.4713"

# PatientID -> the name stored (as Patient's Name and as Referring Physician's Name).
STORED = {
    "P1": "DOE^JOHN^^^",
    "P2": "Roe^Jane",
    "P3": "Poe^Ed==",
    "P4": "Moe",
    "P5": "Moe^^^Jr",
    "P6": "Yamada^Tarou=山田^太郎=",
    "P7": "Zoe^Q^^=^",
    "P8": "",
}
NAMED = sorted(pid for pid, name in STORED.items() if name)

# request value -> the PatientIDs it selects.
QUERIES = [
    ("Doe^John", ["P1"]),
    ("doe^john^^^", ["P1"]),
    ("Roe^Jane^^^", ["P2"]),
    ("ROE^JANE==", ["P2"]),
    ("Roe^Jane^=^", ["P2"]),
    ("poe^ed", ["P3"]),
    ("Zoe^Q", ["P7"]),
    ("Yamada^Tarou=山田^太郎", ["P6"]),
    ("Yamada^Tarou=山田^太郎==", ["P6"]),
    ("Moe", ["P4"]),
    ("Moe^^^JR^", ["P5"]),
    ("Doe^J*", ["P1"]),
    ("Doe^John^*", ["P1"]),  # the components after the given name, none included
    ("Moe^*", ["P4", "P5"]),  # 'Moe' is 'Moe^' padded
    ("Yamada^Tarou=*", ["P6"]),
    ("*^*", NAMED),  # any name: 'Moe' is 'Moe^'; an empty name still never matches
    ("^^^", sorted(STORED)),  # padding only is an empty value: universal
    ("Doe^Johnny", []),
    ("Doe", []),
]


@pytest.mark.parametrize(("value", "expected"), [
    ("Doe^John^^^", "Doe^John"),
    ("Doe^John==", "Doe^John"),
    ("Doe^John^^=^^=", "Doe^John"),
    ("Doe^John^=山田^太郎^^=", "Doe^John=山田^太郎"),
    ("Doe^^^Jr^", "Doe^^^Jr"),  # empty components in the middle are kept
    ("Doe==Doe^J", "Doe==Doe^J"),  # and so is an empty group in the middle
    ("=山田^太郎", "=山田^太郎"),
    ("^^=^", ""),
    ("Doe", "Doe"),
    ("", ""),
])
def test_padding_is_trailing_empty_components_and_groups(value: str, expected: str) -> None:
    assert strip_padding(value) == expected
    assert fold(value.upper()) == expected.casefold()


def test_request_values_lose_their_padding_and_padding_only_is_universal() -> None:
    assert term(Match.PERSON_NAME, ["DOE^JOHN^^^"]) == FoldedWildcard("doe^john")
    assert term(Match.PERSON_NAME, ["Doe^John=="]) == FoldedWildcard("doe^john")
    assert term(Match.PERSON_NAME, ["^^", "=="]) is None
    assert term(Match.PERSON_NAME, ["Doe^John^*"]) == AnyOf(
        (FoldedWildcard("doe^john^*"), FoldedWildcard("doe^john")))
    assert term(Match.PERSON_NAME, ["a=b=c=d^*"]) == FoldedWildcard("a=b=c=d^*")


# --- on a real index ------------------------------------------------------------------

BASE = InstanceHeader(
    patient_id="", issuer_of_patient_id="", patient_name="", birth_date="", sex="",
    study_uid="", study_date="20240101", study_time="", accession_number="", study_id="",
    study_description="", referring_physician="", character_set="ISO_IR 192", series_uid="",
    modality="CT", series_number=1, series_description="", body_part="", series_date="",
    series_time="", sop_uid="", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=1,
    transfer_syntax="1.2.840.10008.1.2.1")


def headers(names: dict[str, str]) -> list[InstanceHeader]:
    out = []
    for pid, name in sorted(names.items()):
        study = f"{ROOT}.{pid[1:]}"
        out.append(dataclasses.replace(
            BASE, patient_id=pid, patient_name=name, referring_physician=name,
            study_uid=study, series_uid=f"{study}.1", sop_uid=f"{study}.1.1"))
    return out


async def record(index: Index, names: dict[str, str]) -> None:
    for h in headers(names):
        await index.record_instance(h, StoredFile(f"{h.sop_uid}.dcm", 1, 0, h.sop_uid, 0.0))


def put(ds: Dataset, keyword: str, value: object) -> None:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)


async def patients_named(index: Index, keyword: str, value: str) -> list[str]:
    """The PatientIDs of the studies whose `keyword` matches `value` (STUDY level)."""
    query = Dataset()
    for key, sent in (("QueryRetrieveLevel", "STUDY"), ("PatientID", ""), (keyword, value)):
        put(query, key, sent)
    return sorted(str(ds.PatientID) for ds in await find(index, QueryModel.STUDY_ROOT, query))


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[Index]:
    async with Index(tmp_path / "index.sqlite3") as index:
        await record(index, STORED)
        yield index


@pytest.mark.parametrize(("value", "expected"), QUERIES)
async def test_names_match_whichever_side_is_padded(
        index: Index, value: str, expected: list[str]) -> None:
    assert await patients_named(index, "PatientName", value) == expected
    assert await patients_named(index, "ReferringPhysicianName", value) == expected


async def test_a_renamed_patient_is_kept_without_padding(index: Index) -> None:
    assert index.writer is not None
    await index.writer.submit_sync(lambda conn: conn.execute(
        "UPDATE patients SET patient_name = 'Roe^Janet^^^' WHERE patient_id = 'P2'"))
    assert await patients_named(index, "PatientName", "ROE^JANET") == ["P2"]


async def test_an_index_from_before_migration_0019_is_folded_without_padding(
        tmp_path: Path) -> None:
    """Names folded by migration 0012 (case only, padding kept) are folded again, and the
    triggers fold the names written after it without their padding."""
    db = tmp_path / "index.sqlite3"
    async with Index(db) as index:
        await record(index, STORED)
    with closing(sqlite3.connect(db)) as conn, conn:  # back to schema version 18
        conn.create_function("pacs_fold", 1, str.casefold, deterministic=True)
        conn.executescript("""
            DROP TRIGGER patients_name_folded_insert;
            DROP TRIGGER patients_name_folded_update;
            CREATE TRIGGER patients_name_folded_insert AFTER INSERT ON patients BEGIN
                UPDATE patients SET patient_name_folded = pacs_fold(NEW.patient_name)
                WHERE id = NEW.id;
            END;
            CREATE TRIGGER patients_name_folded_update AFTER UPDATE OF patient_name
                ON patients BEGIN
                UPDATE patients SET patient_name_folded = pacs_fold(NEW.patient_name)
                WHERE id = NEW.id;
            END;
            UPDATE patients SET patient_name_folded = pacs_fold(patient_name);
            DELETE FROM schema_migrations WHERE version = 19;
        """)
        assert conn.execute("SELECT patient_name_folded FROM patients"
                            " WHERE patient_id = 'P1'").fetchone() == ("doe^john^^^",)
    async with Index(db) as index:
        assert await patients_named(index, "PatientName", "Doe^John") == ["P1"]
        assert await patients_named(index, "PatientName", "Poe^Ed") == ["P3"]
        await record(index, {"P9": "Padded^Later^^="})
        assert await patients_named(index, "PatientName", "padded^later") == ["P9"]
    with closing(sqlite3.connect(db)) as conn:
        folded = dict(conn.execute("SELECT patient_id, patient_name_folded FROM patients"))
        version = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
    assert folded == {pid: fold(name) for pid, name in {**STORED, "P9": "Padded^Later^^="}
                      .items()}
    assert version >= 19


# 'ü' composed (U+00FC) and decomposed ('u' and U+0308): one letter to a user.
COMPOSED, DECOMPOSED = "M\u00fcller^Hans", "Mu\u0308ller^Anna"


@pytest.mark.parametrize("keyword", ["PatientName", "ReferringPhysicianName"])
@pytest.mark.parametrize("value", [
    "M\u00fcller*", "Mu\u0308ller*", "M\u00dcLLER*", "MU\u0308LLER*", "M?ller*", "*\u00fc*",
])
async def test_names_match_whether_sent_composed_or_decomposed(
        tmp_path: Path, keyword: str, value: str) -> None:
    """Normalization is not DICOM's, but a user types one name: the index kept each
    form as sent, and a query found only the names in its own form."""
    async with Index(tmp_path / "index.sqlite3") as index:
        await record(index, {"P1": COMPOSED, "P2": DECOMPOSED, "P3": "Mueller^Udo"})
        assert await patients_named(index, keyword, value) == ["P1", "P2"]


async def test_an_index_from_before_migration_0033_is_folded_in_nfc(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    async with Index(db) as index:
        await record(index, {"P1": COMPOSED, "P2": DECOMPOSED})
    with closing(sqlite3.connect(db)) as conn, conn:  # back to schema version 32
        conn.executescript("""
            UPDATE patients SET patient_name_folded = lower(patient_name);
            DELETE FROM schema_migrations WHERE version = 33;
        """)
    async with Index(db) as index:
        assert await patients_named(index, "PatientName", "m\u00fcller*") == ["P1", "P2"]


# --- on the wire: findscu against pacs-edge serve -------------------------------------


async def stored_on(edge: EdgeServer, folder: Path, names: list[str]) -> None:
    paths = [dicomgen.make_non_ascii_instance(folder / str(n), seed=900 + n, name=name).path
             for n, name in enumerate(names)]
    (await asyncio.to_thread(dcmtk.storescu, edge.port, paths)).check()


async def names_found(edge: EdgeServer, value: str, *, model: str = "study") -> list[str]:
    level = "PATIENT" if model == "patient" else "STUDY"
    found = await asyncio.to_thread(dcmtk.findscu, edge.port, {"PatientName": value},
                                    level=level, model=model)
    return sorted(found.check().values("PatientName"))


async def test_a_name_stored_with_trailing_empty_components_matches_the_name_without_them(
        edge_server: EdgeServer, tmp_path: Path) -> None:
    await stored_on(edge_server, tmp_path, ["DOE^JOHN^^^", "Poe^Ed=="])
    assert await names_found(edge_server, "Doe^John") == ["DOE^JOHN^^^"]
    assert await names_found(edge_server, "Doe^John", model="patient") == ["DOE^JOHN^^^"]
    # pydicom leaves the empty groups out of the answer's value: either spelling is right.
    assert [strip_padding(v) for v in await names_found(edge_server, "POE^ED")] == ["Poe^Ed"]
    assert await names_found(edge_server, "Doe^John^*") == ["DOE^JOHN^^^"]


async def test_a_name_asked_for_with_trailing_empty_components_matches_the_name_without_them(
        edge_server: EdgeServer, tmp_path: Path) -> None:
    await stored_on(edge_server, tmp_path, ["Roe^Jane", "Moe"])
    assert await names_found(edge_server, "ROE^JANE^^^") == ["Roe^Jane"]
    assert await names_found(edge_server, "Roe^Jane==", model="patient") == ["Roe^Jane"]
    assert await names_found(edge_server, "Roe^Jane^*") == ["Roe^Jane"]
    assert await names_found(edge_server, "Moe^*") == ["Moe"]


async def test_a_name_sent_decomposed_matches_a_query_typed_composed_and_back(
        edge_server: EdgeServer, tmp_path: Path) -> None:
    await stored_on(edge_server, tmp_path, [COMPOSED, DECOMPOSED])
    for value in ("M\u00fcller*", "Mu\u0308ller*", "M?LLER*"):
        found = await asyncio.to_thread(
            dcmtk.findscu, edge_server.port,
            {"SpecificCharacterSet": "ISO_IR 192", "PatientName": value})
        assert sorted(found.check().values("PatientName")) == sorted([COMPOSED, DECOMPOSED]), value
