"""The patient / study / series / instance rows, as ingest and restore write them.

Both ways a study enters the index go through these upserts: an instance
received (appliance.store.index, one instance at a time, counts kept in the
same transaction) and a pack version restored from the cloud (sync.restore,
instances pointing at their pack, local when the store still holds their file,
counts recomputed after, then `settle_restored_state`). One statement per
table, so a column added to the schema is added once.
Ingest first asks `current_patient` which patient row an instance joins (a
patient merge may have made its Patient ID obsolete).

The attributes come from whatever describes the instance: an InstanceHeader
read from the file, or a restored manifest's attributes; both carry the same
names, which the protocols below spell out.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from typing import Protocol

from appliance.base.errors import InvalidInstance, Rejection
from appliance.store import database, order_rows
from appliance.store.tiering import TierState
from appliance.store.times import time_key


class PatientFields(Protocol):
    @property
    def patient_id(self) -> str: ...
    @property
    def issuer_of_patient_id(self) -> str: ...
    @property
    def patient_name(self) -> str: ...
    @property
    def birth_date(self) -> str: ...
    @property
    def sex(self) -> str: ...


class StudyFields(Protocol):
    @property
    def study_uid(self) -> str: ...
    @property
    def study_date(self) -> str: ...
    @property
    def study_time(self) -> str: ...
    @property
    def accession_number(self) -> str: ...
    @property
    def study_id(self) -> str: ...
    @property
    def study_description(self) -> str: ...
    @property
    def referring_physician(self) -> str: ...
    @property
    def character_set(self) -> str: ...


class SeriesFields(Protocol):
    @property
    def series_uid(self) -> str: ...
    @property
    def modality(self) -> str: ...
    @property
    def series_number(self) -> int | None: ...
    @property
    def series_description(self) -> str: ...
    @property
    def body_part(self) -> str: ...
    @property
    def series_date(self) -> str: ...
    @property
    def series_time(self) -> str: ...


class InstanceFields(Protocol):
    @property
    def sop_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def instance_number(self) -> int | None: ...
    @property
    def transfer_syntax(self) -> str: ...


class InstanceFile(Protocol):
    """Where and what the instance's Part 10 file is (appliance.store.index.StoredFile)."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def dataset_offset(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def received_at(self) -> float: ...
    @property
    def source_ae(self) -> str: ...


@dataclass(frozen=True)
class Patient:
    """Patient attributes not read from a file (PatientFields)."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    sex: str


def current_patient(conn: sqlite3.Connection, p: PatientFields) -> PatientFields:
    """The patient an arriving instance belongs to in the index: `p`, unless ADT^A40
    merged p's ID (and issuer) away; then the surviving patient, named as the RIS
    last named them (their newest order), else as the file does. Only the index
    row is chosen so: the file keeps the ID it was sent with."""
    surviving = order_rows.surviving_patient(
        conn, order_rows.PatientKey(p.patient_id, p.issuer_of_patient_id))
    if surviving is None:
        return p
    known = order_rows.latest_demographics(conn, surviving) or order_rows.Demographics()
    return Patient(surviving.patient_id, surviving.issuer,
                   known.patient_name or p.patient_name, known.birth_date or p.birth_date,
                   known.sex or p.sex)


def study_patient(conn: sqlite3.Connection, study_uid: str) -> tuple[int, Patient] | None:
    """The row id and attributes of the patient a known study is filed under, else None."""
    row = database.query_one(
        conn, "SELECT p.id, p.patient_id, p.issuer, p.patient_name, p.birth_date, p.sex"
        " FROM studies st JOIN patients p ON p.id = st.patient_fk WHERE st.study_uid = ?",
        (study_uid,))
    return None if row is None else (int(row[0]), Patient(*row[1:]))


def same_patient(a: PatientFields, b: PatientFields) -> bool:
    """Whether `a` and `b` are one patient row's key (as upsert_patient finds rows)."""
    if (a.patient_id, a.issuer_of_patient_id) != (b.patient_id, b.issuer_of_patient_id):
        return False
    return bool(a.patient_id) or (a.patient_name, a.birth_date, a.sex) == (
        b.patient_name, b.birth_date, b.sex)


def drop_patient_if_unused(conn: sqlite3.Connection, patient_fk: int) -> None:
    """Remove the patient row if no study is filed under it and no instance names it:
    nothing answers or finds it any more, and an instance naming the patient again
    makes a new row."""
    conn.execute(
        "DELETE FROM patients WHERE id = ? AND NOT EXISTS"
        " (SELECT 1 FROM studies WHERE patient_fk = ?) AND NOT EXISTS"
        " (SELECT 1 FROM instances WHERE patient_fk = ?)", (patient_fk,) * 3)


def refile_study(conn: sqlite3.Connection, study_fk: int, patient_fk: int) -> None:
    """File the study under `patient_fk`; the patient it leaves goes if nothing else is
    theirs (drop_patient_if_unused)."""
    row = database.query_one(conn, "SELECT patient_fk FROM studies WHERE id = ?", (study_fk,))
    if row is None or row[0] == patient_fk:
        return
    conn.execute("UPDATE studies SET patient_fk = ? WHERE id = ?", (patient_fk, study_fk))
    drop_patient_if_unused(conn, row[0])


def newest_pack_version(conn: sqlite3.Connection, study_fk: int) -> int:
    """The highest pack version the index holds for the study (0: none)."""
    row = database.query_one(
        conn, "SELECT COALESCE(MAX(version), 0) FROM packs WHERE study_fk = ?", (study_fk,))
    return int(row[0]) if row else 0


def state_patient_as_of(conn: sqlite3.Connection, patient_fk: int, p: PatientFields,
                        stated_at: float) -> None:
    """Restore: give the patient the name, birth date and sex `p` states, when no pack of
    any of their studies that the index holds was made after `stated_at` (the lost box
    kept one row per patient, changed by ADT^A08 and merges; each version states it as
    it was then). A patient without an ID is their name, birth date and sex: kept."""
    newest = database.query_one(
        conn, "SELECT MAX(pk.created_at) FROM packs pk JOIN studies st ON st.id = pk.study_fk"
        " WHERE st.patient_fk = ?", (patient_fk,))
    if newest is not None and newest[0] is not None and newest[0] > stated_at:
        return
    conn.execute("UPDATE patients SET patient_name = ?, birth_date = ?, sex = ?"
                 " WHERE id = ? AND patient_id != ''",
                 (p.patient_name, p.birth_date, p.sex, patient_fk))


def upsert_patient(conn: sqlite3.Connection, p: PatientFields) -> int:
    """The patient's row id (PatientID + issuer), inserted if new; a known patient's
    other attributes stay as first recorded. An empty PatientID names nobody: such a
    patient is its issuer, name, birth date and sex (one row each, migration 0029), so
    a study of one is never answered with another's name.

    A known patient is only read: an upsert (ON CONFLICT DO UPDATE) would rewrite its
    row, one page more in every instance's commit to the WAL (9 instead of 8 for an
    instance of a known series). The caller's write transaction keeps the read and
    the insert atomic."""
    key = (p.patient_id, p.issuer_of_patient_id)
    if p.patient_id:
        row = database.query_one(
            conn, "SELECT id FROM patients WHERE patient_id = ? AND issuer = ?", key)
    else:
        row = database.query_one(
            conn, "SELECT id FROM patients WHERE patient_id = '' AND issuer = ?"
            " AND patient_name = ? AND birth_date = ? AND sex = ?",
            (p.issuer_of_patient_id, p.patient_name, p.birth_date, p.sex))
    if row is not None:
        return int(row[0])
    return int(database.query_one(
        conn,
        "INSERT INTO patients (patient_id, issuer, patient_name, birth_date, sex)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (*key, p.patient_name, p.birth_date, p.sex),
    )[0])


def upsert_study(conn: sqlite3.Connection, patient_fk: int, s: StudyFields, *,
                 instances: int, size: int, first_received_at: float,
                 last_received_at: float, last_access_at: float, tier_state: TierState,
                 tier_changed_at: float) -> int:
    """The study's row id, inserted if new (in `tier_state`, with these counts and
    times); a known study adds `instances` and `size` to its counts and keeps the
    later of its last arrival and this one. Its attributes and state stay."""
    return int(database.query_one(
        conn,
        "INSERT INTO studies (patient_fk, study_uid, study_date, study_time, study_time_key,"
        " accession_number, study_id, study_description, referring_physician, character_set,"
        " instance_count, total_bytes, first_received_at, last_received_at, last_access_at,"
        " tier_state, tier_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (study_uid) DO UPDATE SET"
        " instance_count = instance_count + excluded.instance_count,"
        " total_bytes = total_bytes + excluded.total_bytes,"
        " last_received_at = max(last_received_at, excluded.last_received_at) RETURNING id",
        (patient_fk, s.study_uid, s.study_date, s.study_time, time_key(s.study_time),
         s.accession_number, s.study_id, s.study_description, s.referring_physician,
         s.character_set, instances, size, first_received_at, last_received_at,
         last_access_at, tier_state.value, tier_changed_at),
    )[0])


def upsert_series(conn: sqlite3.Connection, study_fk: int, s: SeriesFields, *,
                  instances: int) -> tuple[int, int]:
    """(row id, instance count after) of the series, inserted if new; a known series
    adds `instances` to its count (an instance count of `instances` says it is new).

    A series belongs to one study: a Series Instance UID the index holds under another
    study is refused (InvalidInstance; the caller's savepoint undoes the count), not
    filed under that other study."""
    row = database.query_one(
        conn,
        "INSERT INTO series (study_fk, series_uid, modality, series_number, series_description,"
        " body_part, series_date, series_time, instance_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (series_uid) DO UPDATE SET"
        " instance_count = instance_count + excluded.instance_count"
        " RETURNING id, instance_count, study_fk",
        (study_fk, s.series_uid, s.modality, s.series_number, s.series_description,
         s.body_part, s.series_date, s.series_time, instances),
    )
    if int(row[2]) != study_fk:
        raise InvalidInstance("its Series Instance UID belongs to another study on this box",
                              kind=Rejection.SERIES_OF_ANOTHER_STUDY)
    return int(row[0]), int(row[1])


def put_instance(conn: sqlite3.Connection, series_fk: int, i: InstanceFields,
                 f: InstanceFile, *, pack_fk: int | None = None, pack_offset: int | None = None,
                 pack_length: int | None = None, is_local: bool = True,
                 other_patient_fk: int | None = None) -> None:
    """Insert the instance row, or replace a row of the same SOP Instance UID in place;
    `other_patient_fk`: the patient the instance names, when not its study's.

    Ingest never replaces: it moves a current row to instance_versions first, in
    the same transaction. Restore does, for an instance that a later version of
    the study holds too (the later content wins; counts are recomputed after)."""
    conn.execute(
        "INSERT INTO instances (series_fk, sop_uid, sop_class_uid, instance_number,"
        " transfer_syntax, path, size, dataset_offset, sha256, received_at, source_ae,"
        " pack_fk, pack_offset, pack_length, is_local, patient_fk)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (sop_uid) DO UPDATE SET series_fk = excluded.series_fk,"
        " sop_class_uid = excluded.sop_class_uid,"
        " instance_number = excluded.instance_number,"
        " transfer_syntax = excluded.transfer_syntax, path = excluded.path,"
        " size = excluded.size, dataset_offset = excluded.dataset_offset,"
        " sha256 = excluded.sha256, received_at = excluded.received_at,"
        " source_ae = excluded.source_ae, pack_fk = excluded.pack_fk,"
        " pack_offset = excluded.pack_offset, pack_length = excluded.pack_length,"
        " is_local = excluded.is_local, patient_fk = excluded.patient_fk",
        (series_fk, i.sop_uid, i.sop_class_uid, i.instance_number, i.transfer_syntax,
         f.path, f.size, f.dataset_offset, f.sha256, f.received_at, f.source_ae,
         pack_fk, pack_offset, pack_length, int(is_local), other_patient_fk),
    )


def count_sop_class(conn: sqlite3.Connection, study_fk: int, sop_class_uid: str,
                    delta: int) -> None:
    """Keep the study's SOP classes (study_sop_classes, which SOPClassesInStudy reads)
    in step with one instance row of that class added (+1) or removed (-1)."""
    conn.execute(
        "INSERT INTO study_sop_classes (study_fk, sop_class_uid, instance_count)"
        " VALUES (?, ?, ?) ON CONFLICT (study_fk, sop_class_uid) DO UPDATE SET"
        " instance_count = instance_count + excluded.instance_count",
        (study_fk, sop_class_uid, delta))
    if delta < 0:
        conn.execute("DELETE FROM study_sop_classes WHERE study_fk = ? AND sop_class_uid = ?"
                     " AND instance_count <= 0", (study_fk, sop_class_uid))


def recount_study(conn: sqlite3.Connection, study_fk: int) -> None:
    """Recompute a study's and its series' counts, and its SOP classes, from the instance
    rows; a series left empty (its instances moved to another series UID) goes."""
    conn.execute(
        "UPDATE series SET instance_count = (SELECT COUNT(*) FROM instances i"
        " WHERE i.series_fk = series.id) WHERE study_fk = ?", (study_fk,))
    with contextlib.suppress(sqlite3.IntegrityError):
        conn.execute("DELETE FROM series WHERE study_fk = ? AND instance_count = 0",
                     (study_fk,))
    conn.execute(
        "UPDATE studies SET"
        " series_count = (SELECT COUNT(*) FROM series WHERE study_fk = studies.id),"
        " instance_count = (SELECT COUNT(*) FROM instances i JOIN series se"
        "   ON i.series_fk = se.id WHERE se.study_fk = studies.id),"
        " total_bytes = (SELECT COALESCE(SUM(i.size), 0) FROM instances i JOIN series se"
        "   ON i.series_fk = se.id WHERE se.study_fk = studies.id)"
        " WHERE id = ?", (study_fk,))
    conn.execute("DELETE FROM study_sop_classes WHERE study_fk = ?", (study_fk,))
    conn.execute(
        "INSERT INTO study_sop_classes (study_fk, sop_class_uid, instance_count)"
        " SELECT se.study_fk, i.sop_class_uid, COUNT(*) FROM instances i"
        " JOIN series se ON se.id = i.series_fk WHERE se.study_fk = ?"
        " GROUP BY se.study_fk, i.sop_class_uid", (study_fk,))


def has_tier_history(conn: sqlite3.Connection, study_fk: int) -> bool:
    """Whether the sync agent of this box ever moved the study between tiering states
    (each move is a tier_transitions row; restore records none)."""
    return database.query_one(
        conn, "SELECT 1 FROM tier_transitions WHERE study_fk = ? LIMIT 1", (study_fk,)
    ) is not None


def settle_restored_state(conn: sqlite3.Connection, study_fk: int, *, at: float) -> TierState:
    """Give a study only restore has written (no tier history) the state its rows say:
    `replicated` when it has instances and every one is on local disk (restore's rows
    all point at a verified pack), else `evicted` (a recall brings the others back; the
    local ones stay). Set, not transitioned: nothing happened to the study on this box."""
    row = database.query_one(
        conn,
        "SELECT COUNT(*), COALESCE(SUM(i.is_local = 0), 0) FROM instances i"
        " JOIN series se ON i.series_fk = se.id WHERE se.study_fk = ?", (study_fk,))
    total, remote = (int(row[0]), int(row[1])) if row else (0, 0)
    state = TierState.REPLICATED if total and not remote else TierState.EVICTED
    conn.execute("UPDATE studies SET tier_state = ?, tier_changed_at = ?"
                 " WHERE id = ? AND tier_state != ?", (state.value, at, study_fk, state.value))
    return state
