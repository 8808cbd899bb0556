"""What the sync agent reads from the index: studies, instances and packs, as typed rows."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from appliance.store import database
from appliance.store.index import Index

_INSTANCE_COLUMNS = (
    "i.id, i.sop_uid, i.sop_class_uid, i.instance_number, i.transfer_syntax, i.path, i.size,"
    " i.dataset_offset, i.sha256, i.pack_fk, i.pack_offset, i.pack_length, i.is_local,"
    " se.series_uid, se.modality, se.series_number, se.series_description, se.body_part,"
    " se.series_date, se.series_time"
)


@dataclass(frozen=True)
class StudyRow:
    id: int
    study_uid: str
    tier_state: str
    instance_count: int
    total_bytes: int
    last_received_at: float
    last_access_at: float
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician: str
    character_set: str


@dataclass(frozen=True)
class InstanceRow:
    id: int
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax: str
    path: str
    size: int
    dataset_offset: int
    sha256: str
    pack_fk: int | None
    pack_offset: int | None
    pack_length: int | None
    is_local: bool
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str


@dataclass(frozen=True)
class PackRow:
    id: int
    study_fk: int
    version: int
    pack_name: str
    manifest_name: str
    pack_size: int
    pack_sha256: str
    state: str
    access_tier: str
    created_at: float


_STUDY_SQL = (
    "SELECT st.id, st.study_uid, st.tier_state, st.instance_count, st.total_bytes,"
    " st.last_received_at, st.last_access_at, p.patient_id, p.issuer, p.patient_name,"
    " p.birth_date, p.sex, st.study_date, st.study_time, st.accession_number, st.study_id,"
    " st.study_description, st.referring_physician, st.character_set"
    " FROM studies st JOIN patients p ON st.patient_fk = p.id"
)


async def study_by_uid(index: Index, study_uid: str) -> StudyRow | None:
    row = await index.fetchone(f"{_STUDY_SQL} WHERE st.study_uid = ?", (study_uid,))
    return StudyRow(*row) if row else None


async def study_by_id(index: Index, study_id: int) -> StudyRow | None:
    row = await index.fetchone(f"{_STUDY_SQL} WHERE st.id = ?", (study_id,))
    return StudyRow(*row) if row else None


async def studies_where(index: Index, where: str, params: tuple[object, ...] = (),
                        order: str = "st.id") -> list[StudyRow]:
    rows = await index.fetchall(f"{_STUDY_SQL} WHERE {where} ORDER BY {order}", params)
    return [StudyRow(*row) for row in rows]


async def instances_of(index: Index, study_id: int, where: str = "1",
                       params: tuple[object, ...] = ()) -> list[InstanceRow]:
    return await database.run_sync(index.reader, instance_rows, study_id, where, params)


def instance_rows(conn: sqlite3.Connection, study_id: int, where: str = "1",
                  params: tuple[object, ...] = ()) -> list[InstanceRow]:
    """`instances_of` on a plain connection: inside a writer transaction, the rows the
    transaction sees (a tiering step reads what it is about to change)."""
    rows = conn.execute(
        f"SELECT {_INSTANCE_COLUMNS} FROM instances i JOIN series se ON i.series_fk = se.id"
        f" WHERE se.study_fk = ? AND ({where})"
        " ORDER BY se.series_number, se.series_uid, i.instance_number, i.sop_uid",
        (study_id, *params),
    ).fetchall()
    return [InstanceRow(*row[:12], bool(row[12]), *row[13:]) for row in rows]


async def packs_of(index: Index, study_id: int, *, verified_only: bool = True) -> list[PackRow]:
    state = "AND state = 'verified'" if verified_only else ""
    rows = await index.fetchall(
        "SELECT id, study_fk, version, pack_name, manifest_name, pack_size, pack_sha256, state,"
        f" access_tier, created_at FROM packs WHERE study_fk = ? {state} ORDER BY version",
        (study_id,),
    )
    return [PackRow(*row) for row in rows]
