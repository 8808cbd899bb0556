"""Studies and instances as the sync agent reads them: typed rows, named queries.

Each query is a plain function of a sqlite3 connection, so a tiering step
(appliance.store.tier_steps) can read, inside its writer transaction, the
rows it is about to change; the `Index` forms run the same function on the
index's reader connection, in one hop to its thread. No query takes SQL
from its caller: a new question of the sync agent is a new function here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.store import database
from appliance.store.amendments import STUDIES_WITH_PENDING
from appliance.store.clock_steps import STEPPED_BACK_SLACK
from appliance.store.index import PATHS_PER_QUERY, Index


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


# --- studies ----------------------------------------------------------------------------

_STUDY_SQL = (
    "SELECT st.id, st.study_uid, st.tier_state, st.instance_count, st.total_bytes,"
    " st.last_received_at, st.last_access_at, p.patient_id, p.issuer, p.patient_name,"
    " p.birth_date, p.sex, st.study_date, st.study_time, st.accession_number, st.study_id,"
    " st.study_description, st.referring_physician, st.character_set"
    " FROM studies st JOIN patients p ON st.patient_fk = p.id"
)
# Some instance of the study is on local disk and in no pack: replication has work. The
# studies are found from the unpacked instances (through instances_pack), once: as an
# EXISTS per study, SQLite walked every unpacked instance for each of the studies, and a
# pass over 100,000 studies with one 5,000-instance study waiting took 210 s.
_UNPACKED = ("st.id IN (SELECT se.study_fk FROM instances i JOIN series se"
             " ON i.series_fk = se.id WHERE i.pack_fk IS NULL AND i.is_local = 1)")
# A study's own unpacked instances: through its series (the unary + keeps SQLite off
# instances_pack, which would walk the unpacked instances of every study).
_OWN_UNPACKED = " AND +i.pack_fk IS NULL AND i.is_local = 1"


def _studies(conn: sqlite3.Connection, sql: str, params: tuple[object, ...] = ()
             ) -> list[StudyRow]:
    return [StudyRow(*row) for row in conn.execute(sql, params).fetchall()]


def _study(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> StudyRow | None:
    row = database.query_one(conn, sql, params)
    return StudyRow(*row) if row else None


async def study_by_uid(index: Index, study_uid: str) -> StudyRow | None:
    return await database.run_sync(index.reader, _study,
                                   f"{_STUDY_SQL} WHERE st.study_uid = ?", (study_uid,))


async def study_by_id(index: Index, study_id: int) -> StudyRow | None:
    return await database.run_sync(index.reader, _study,
                                   f"{_STUDY_SQL} WHERE st.id = ?", (study_id,))


async def stable_studies(index: Index, now: float, stable_after: float) -> list[StudyRow]:
    """Studies that received nothing in the `stable_after` seconds before `now` and hold
    local instances not in any pack (an evicted study's late instances too), or
    amendments for the cloud (store/amendments.py), the quietest first. A study last
    received more than STEPPED_BACK_SLACK after `now` was stamped before the wall clock
    stepped back (a clock corrected after months ahead): it counts as quiet, else it
    would wait unreplicated until the clock caught up again."""
    return await database.run_sync(
        index.reader, _studies,
        f"{_STUDY_SQL} WHERE st.tier_state IN ('local', 'replicated', 'evicted')"
        " AND (st.last_received_at <= ? OR st.last_received_at > ?)"
        f" AND ({_UNPACKED} OR {STUDIES_WITH_PENDING}) ORDER BY st.last_received_at",
        (now - stable_after, now + STEPPED_BACK_SLACK))


async def replicated_by_last_access(index: Index) -> list[StudyRow]:
    """Studies whose every instance is in a verified pack and on local disk, least
    recently used first (eviction's order)."""
    return await database.run_sync(
        index.reader, _studies,
        f"{_STUDY_SQL} WHERE st.tier_state = 'replicated' ORDER BY st.last_access_at")


async def studies_in_transient_state(index: Index) -> list[StudyRow]:
    """Studies a tiering operation is working on, or died working on: `replicating`,
    `recalling`, or with a pack row still `uploading`; by id."""
    return await database.run_sync(
        index.reader, _studies,
        f"{_STUDY_SQL} WHERE st.tier_state IN ('replicating', 'recalling')"
        " OR EXISTS (SELECT 1 FROM packs pk WHERE pk.study_fk = st.id"
        " AND pk.state = 'uploading') ORDER BY st.id")


def study_row(conn: sqlite3.Connection, study_id: int) -> StudyRow:
    """The study as the caller's transaction sees it (what a new version states)."""
    return _studies(conn, f"{_STUDY_SQL} WHERE st.id = ?", (study_id,))[0]


# --- instances --------------------------------------------------------------------------

_INSTANCE_SQL = (
    "SELECT i.id, i.sop_uid, i.sop_class_uid, i.instance_number, i.transfer_syntax, i.path,"
    " i.size, i.dataset_offset, i.sha256, i.pack_fk, i.pack_offset, i.pack_length, i.is_local,"
    " se.series_uid, se.modality, se.series_number, se.series_description, se.body_part,"
    " se.series_date, se.series_time"
    " FROM instances i JOIN series se ON i.series_fk = se.id WHERE se.study_fk = ?"
)
_INSTANCE_ORDER = " ORDER BY se.series_number, se.series_uid, i.instance_number, i.sop_uid"


def _instances(conn: sqlite3.Connection, condition: str, params: tuple[object, ...]
               ) -> list[InstanceRow]:
    rows = conn.execute(f"{_INSTANCE_SQL}{condition}{_INSTANCE_ORDER}", params).fetchall()
    return [InstanceRow(*row[:12], bool(row[12]), *row[13:]) for row in rows]


def all_instances(conn: sqlite3.Connection, study_id: int) -> list[InstanceRow]:
    """Every current instance of a study, in series and instance order."""
    return _instances(conn, "", (study_id,))


def instances_to_pack(conn: sqlite3.Connection, study_id: int) -> list[InstanceRow]:
    """Instances on local disk and in no pack: what the next pack version holds."""
    return _instances(conn, _OWN_UNPACKED, (study_id,))


def has_unpacked(conn: sqlite3.Connection, study_id: int) -> bool:
    """Whether some instance of the study is in no pack (local or not)."""
    return database.query_one(
        conn, "SELECT 1 FROM instances i JOIN series se ON i.series_fk = se.id"
        " WHERE se.study_fk = ? AND +i.pack_fk IS NULL LIMIT 1", (study_id,)) is not None


def evicted_instances(conn: sqlite3.Connection, study_id: int) -> list[InstanceRow]:
    """Instances whose file is not on local disk (the index says so): a recall's work."""
    return _instances(conn, " AND i.is_local = 0", (study_id,))


def pack_instances(conn: sqlite3.Connection, study_id: int, pack_id: int) -> list[InstanceRow]:
    """Instances of a study that point at this pack (what a scrub checks it holds)."""
    return _instances(conn, " AND i.pack_fk = ?", (study_id, pack_id))


async def instances_of(index: Index, study_id: int) -> list[InstanceRow]:
    return await database.run_sync(index.reader, all_instances, study_id)


async def instances_in_pack(index: Index, study_id: int, pack_id: int) -> list[InstanceRow]:
    return await database.run_sync(index.reader, pack_instances, study_id, pack_id)


async def evicted_instances_of(index: Index, study_id: int) -> list[InstanceRow]:
    return await database.run_sync(index.reader, evicted_instances, study_id)


def _non_local_among(conn: sqlite3.Connection, paths: Sequence[str]) -> list[tuple[int, str]]:
    marks = ",".join("?" * len(paths))
    rows = conn.execute(
        "SELECT se.study_fk, i.path FROM instances i JOIN series se ON i.series_fk = se.id"
        f" WHERE i.is_local = 0 AND i.path IN ({marks})", tuple(paths)).fetchall()
    return [(int(study_id), str(path)) for study_id, path in rows]


async def non_local_among(index: Index, paths: Sequence[str]) -> list[tuple[int, str]]:
    """(study id, path) of those of `paths` (files found on local disk; at most
    PATHS_PER_QUERY) that an instance row names and says are not on local disk:
    what an interrupted eviction left. One search of the path index per path, so the
    caller's work grows with the files on disk, never with the evicted rows (after a
    year, most of the index)."""
    found: list[tuple[int, str]] = []
    for start in range(0, len(paths), PATHS_PER_QUERY):
        found += await database.run_sync(index.reader, _non_local_among,
                                         paths[start:start + PATHS_PER_QUERY])
    return found
