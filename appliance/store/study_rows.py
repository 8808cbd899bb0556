"""What the sync agent reads from the index: studies, instances and packs, as typed rows;
and the scrub's writes (its verdict on a pack, and what follows from a damaged one)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import aiosqlite

from appliance.store import database
from appliance.store.index import Index
from appliance.store.tiering import Trigger, apply

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
    pack_etag: str = ""       # as committed and verified at upload ('' before migration 5)
    manifest_etag: str = ""
    manifest_size: int = 0
    scrubbed_at: float | None = None
    scrub_state: str = ""     # '' never scrubbed | ok | damaged


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


_PACK_SQL = (
    "SELECT p.id, p.study_fk, p.version, p.pack_name, p.manifest_name, p.pack_size,"
    " p.pack_sha256, p.state, p.access_tier, p.created_at, p.pack_etag, p.manifest_etag,"
    " p.manifest_size, p.scrubbed_at, p.scrub_state FROM packs p"
)
# A pack the index still needs: some instance row points at it (a version whose
# instances all moved to a later one is history, and not scrubbed).
_IN_USE = "EXISTS (SELECT 1 FROM instances i WHERE i.pack_fk = p.id)"
# When a pack's bytes were last checked: by a scrub, else at upload.
_CHECKED_AT = "COALESCE(p.scrubbed_at, p.verified_at, p.created_at)"


async def packs_of(index: Index, study_id: int, *, verified_only: bool = True) -> list[PackRow]:
    state = "AND p.state = 'verified'" if verified_only else ""
    rows = await index.fetchall(
        f"{_PACK_SQL} WHERE p.study_fk = ? {state} ORDER BY p.version", (study_id,))
    return [PackRow(*row) for row in rows]


# --- scrub ------------------------------------------------------------------------------


async def packs_to_scrub(index: Index, *, limit: int | None = None,
                         checked_before: float | None = None) -> list[PackRow]:
    """Verified packs in use, least recently checked first; at most `limit`, and with
    `checked_before` only those not checked since then."""
    where = f"p.state = 'verified' AND {_IN_USE}"
    params: list[object] = []
    if checked_before is not None:
        where += f" AND {_CHECKED_AT} <= ?"
        params.append(checked_before)
    sql = f"{_PACK_SQL} WHERE {where} ORDER BY {_CHECKED_AT}, p.id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [PackRow(*row) for row in await index.fetchall(sql, tuple(params))]


async def packs_in_use_count(index: Index) -> int:
    row = await index.fetchone(f"SELECT COUNT(*) FROM packs p WHERE p.state = 'verified'"
                               f" AND {_IN_USE}")
    return int(row[0]) if row else 0


async def damaged_packs_in_use(index: Index, study_id: int) -> list[PackRow]:
    """Packs of a study that a scrub found damaged and that still hold instances."""
    rows = await index.fetchall(
        f"{_PACK_SQL} WHERE p.study_fk = ? AND p.scrub_state = 'damaged' AND {_IN_USE}"
        " ORDER BY p.version", (study_id,))
    return [PackRow(*row) for row in rows]


async def record_scrub_ok(conn: aiosqlite.Connection, pack_id: int, *, at: float,
                          pack_etag: str, manifest_etag: str, manifest_size: int) -> None:
    """The pack read back whole and authentic: record when, and the blobs' identities
    (which a copy of the container to new storage changes; the content is the same)."""
    await conn.execute(
        "UPDATE packs SET scrubbed_at = ?, scrub_state = 'ok', scrub_error = '',"
        " pack_etag = ?, manifest_etag = ?, manifest_size = ? WHERE id = ?",
        (at, pack_etag, manifest_etag, manifest_size, pack_id))


@dataclass(frozen=True)
class DamageMarked:
    requeued: int  # instances with a local file: packed again by the next replication
    at_risk: int   # instances whose only copy is the damaged pack


async def record_scrub_damaged(conn: aiosqlite.Connection, pack_id: int, study_id: int, *,
                               at: float, error: str) -> DamageMarked:
    """Mark a pack damaged, in one transaction with what follows from it.

    Instances still on local disk leave the pack (pack_fk NULL), so the next
    replication pass uploads them again as a new version; the study takes the
    `damaged` trigger (replicated -> local). Instances not on local disk stay:
    the damaged pack is their only copy, and the study is at risk.
    """
    await conn.execute(
        "UPDATE packs SET scrubbed_at = ?, scrub_state = 'damaged', scrub_error = ?"
        " WHERE id = ?", (at, error, pack_id))
    async with conn.execute(
        "SELECT COUNT(*) FROM instances WHERE pack_fk = ? AND is_local = 0", (pack_id,)
    ) as cur:
        row = await cur.fetchone()
    at_risk = int(row[0]) if row else 0
    cur = await conn.execute(
        "UPDATE instances SET pack_fk = NULL, pack_offset = NULL, pack_length = NULL"
        " WHERE pack_fk = ? AND is_local = 1", (pack_id,))
    requeued = cur.rowcount
    await cur.close()
    if requeued:
        await apply(conn, study_id, Trigger.DAMAGED)
    return DamageMarked(requeued, at_risk)
