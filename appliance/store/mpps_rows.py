"""Modality Performed Procedure Steps as rows, with their state machine (PS3.4 F.7).

    (N-CREATE) ──▶ in_progress ──complete──▶ completed
                     │    ▲
                     │    └─update (N-SET, status unchanged)
                     └──discontinue──▶ discontinued

No transition leaves `completed` or `discontinued`: a step in a final state may
no longer be updated (PS3.4 F.7.2.2). A pair not in the table is refused
(MppsTransitionError), as tiering.py refuses its missing pairs; every
applied transition is a row in `mpps_transitions`, in the same transaction.

Writes are plain functions of the sqlite3 connection for `Writer.submit_sync`;
the state check and the change happen in that one transaction, so two N-SETs
racing on one step cannot both pass the check.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.base.errors import PacsEdgeError
from appliance.store import database


class MppsState(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    DISCONTINUED = "discontinued"


class MppsTrigger(enum.StrEnum):
    UPDATE = "update"            # N-SET that leaves the status IN PROGRESS
    COMPLETE = "complete"        # N-SET to COMPLETED
    DISCONTINUE = "discontinue"  # N-SET to DISCONTINUED


TRANSITIONS: dict[tuple[MppsState, MppsTrigger], MppsState] = {
    (MppsState.IN_PROGRESS, MppsTrigger.UPDATE): MppsState.IN_PROGRESS,
    (MppsState.IN_PROGRESS, MppsTrigger.COMPLETE): MppsState.COMPLETED,
    (MppsState.IN_PROGRESS, MppsTrigger.DISCONTINUE): MppsState.DISCONTINUED,
}


class MppsTransitionError(PacsEdgeError):
    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"procedure step: {trigger!r} is not allowed in state {state!r}",
                         hint="a completed or discontinued step may no longer be updated")
        self.state = state
        self.trigger = trigger


class DuplicateStep(PacsEdgeError):
    """An N-CREATE for an SOP Instance UID that already exists."""


class NoSuchStep(PacsEdgeError):
    """An N-SET for an SOP Instance UID that was never created."""


def next_state(state: MppsState | str, trigger: MppsTrigger) -> MppsState:
    try:
        return TRANSITIONS[(MppsState(state), trigger)]
    except (KeyError, ValueError):
        raise MppsTransitionError(str(state), trigger.value) from None


@dataclass(frozen=True)
class StepRef:
    """One Scheduled Step Attributes Sequence item: the keys that link a step to an order."""

    study_uid: str = ""
    accession_number: str = ""
    requested_procedure_id: str = ""
    scheduled_step_id: str = ""


@dataclass(frozen=True)
class StepFields:
    """The step's attributes kept in columns (for listing and linking)."""

    station_ae: str = ""
    modality: str = ""
    patient_id: str = ""
    step_id: str = ""
    start_date: str = ""
    start_time: str = ""
    end_date: str = ""
    end_time: str = ""


@dataclass(frozen=True)
class Step:
    id: int
    sop_uid: str
    calling_ae: str
    state: MppsState
    fields: StepFields
    dataset: bytes  # Explicit VR Little Endian
    refs: tuple[StepRef, ...]


# --- writes (Writer.submit_sync) ---------------------------------------------------------

def create(conn: sqlite3.Connection, *, sop_uid: str, calling_ae: str, fields: StepFields,
           dataset: bytes, refs: Sequence[StepRef], now: float) -> int:
    """Insert a new IN PROGRESS step; DuplicateStep if the SOP Instance UID exists."""
    try:
        cur = conn.execute(
            "INSERT INTO mpps_steps (sop_uid, calling_ae, state, station_ae, modality,"
            " patient_id, step_id, start_date, start_time, end_date, end_time, dataset,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sop_uid, calling_ae, MppsState.IN_PROGRESS.value, *_columns(fields), dataset,
             now, now))
    except sqlite3.IntegrityError:
        raise DuplicateStep("a procedure step with this SOP Instance UID exists") from None
    step_id = int(cur.lastrowid or 0)
    conn.executemany(
        "INSERT INTO mpps_step_refs (step_fk, position, study_uid, accession_number,"
        " requested_procedure_id, scheduled_step_id) VALUES (?, ?, ?, ?, ?, ?)",
        [(step_id, n, r.study_uid, r.accession_number, r.requested_procedure_id,
          r.scheduled_step_id) for n, r in enumerate(refs)])
    conn.execute("INSERT INTO mpps_transitions (step_fk, from_state, to_state, trigger, at)"
                 " VALUES (?, '', ?, 'create', ?)", (step_id, MppsState.IN_PROGRESS.value, now))
    return step_id


def update(conn: sqlite3.Connection, *, sop_uid: str, expect_dataset: bytes,
           trigger: MppsTrigger, fields: StepFields, dataset: bytes, now: float) -> MppsState:
    """Apply an N-SET: check the transition against the current state and store the
    merged dataset. `expect_dataset` is what the merge started from: if another N-SET
    changed the step meanwhile, MppsTransitionError (the caller merges again)."""
    row = database.query_one(conn, "SELECT id, state, dataset FROM mpps_steps WHERE sop_uid = ?",
                             (sop_uid,))
    if row is None:
        raise NoSuchStep("no procedure step with this SOP Instance UID")
    current = MppsState(row[1])
    target = next_state(current, trigger)
    if bytes(row[2]) != expect_dataset:
        raise MppsTransitionError(current.value, trigger.value)
    conn.execute(
        "UPDATE mpps_steps SET state = ?, station_ae = ?, modality = ?, patient_id = ?,"
        " step_id = ?, start_date = ?, start_time = ?, end_date = ?, end_time = ?,"
        " dataset = ?, updated_at = ? WHERE id = ?",
        (target.value, *_columns(fields), dataset, now, row[0]))
    if target is not current:
        conn.execute("INSERT INTO mpps_transitions (step_fk, from_state, to_state, trigger, at)"
                     " VALUES (?, ?, ?, ?, ?)", (row[0], current.value, target.value,
                                                 trigger.value, now))
    return target


def _columns(f: StepFields) -> tuple[str, ...]:
    return (f.station_ae, f.modality, f.patient_id, f.step_id, f.start_date, f.start_time,
            f.end_date, f.end_time)


# --- reads (run_sync on the reader) ------------------------------------------------------

def load(conn: sqlite3.Connection, sop_uid: str) -> Step | None:
    row = database.query_one(
        conn, "SELECT id, sop_uid, calling_ae, state, station_ae, modality, patient_id,"
        " step_id, start_date, start_time, end_date, end_time, dataset"
        " FROM mpps_steps WHERE sop_uid = ?", (sop_uid,))
    if row is None:
        return None
    refs = conn.execute(
        "SELECT study_uid, accession_number, requested_procedure_id, scheduled_step_id"
        " FROM mpps_step_refs WHERE step_fk = ? ORDER BY position", (row[0],)).fetchall()
    return Step(int(row[0]), row[1], row[2], MppsState(row[3]), StepFields(*row[4:12]),
                bytes(row[12]), tuple(StepRef(*r) for r in refs))
