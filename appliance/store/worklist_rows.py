"""Modality Worklist reads: orders (migration 0006, store/order_rows.py) as worklist items.

The orders table holds one scheduled procedure step per row with every
attribute a worklist answers, so a worklist query is one SELECT on it with
no join. `COLUMNS` names the column each matching key is compared with.
The service says what a request value means with matching terms
(appliance/services/query/matching.py); this module turns them into SQL with
the same code C-FIND uses (store/cfind/conditions.py): column names never
come from a request, values only travel as parameters.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.store.cfind.conditions import (
    Condition,
    Period,
    Term,
    condition,
    period_condition,
    register_functions,
)

# DICOM keyword -> the orders column a matching key is compared with.
COLUMNS: dict[str, str] = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer",
    "PatientBirthDate": "birth_date",
    "PatientSex": "sex",
    "AccessionNumber": "accession_number",
    "RequestedProcedureID": "requested_procedure_id",
    "RequestedProcedureDescription": "requested_procedure_desc",
    "RequestedProcedurePriority": "priority",
    "StudyInstanceUID": "study_uid",
    "ReferringPhysicianName": "referring_physician",
    "RequestingPhysician": "requesting_physician",
    "ScheduledStationAETitle": "station_ae_title",
    "ScheduledStationName": "station_name",
    "ScheduledProcedureStepLocation": "sps_location",
    "ScheduledProcedureStepStartDate": "sps_start_date",
    "ScheduledProcedureStepStartTime": "sps_start_time_key",
    "Modality": "modality",
    "ScheduledPerformingPhysicianName": "performing_physician",
    "ScheduledProcedureStepDescription": "sps_description",
    "ScheduledProcedureStepID": "sps_id",
    "ScheduledProcedureStepStatus": "status",
}


@dataclass(frozen=True)
class WorklistItem:
    """One order as the worklist answers it (decoded text; '' = unknown)."""

    accession_number: str
    study_uid: str
    requested_procedure_id: str
    requested_procedure_desc: str
    procedure_code_value: str
    procedure_code_scheme: str
    procedure_code_meaning: str
    priority: str
    sps_id: str
    sps_description: str
    modality: str
    station_ae_title: str
    station_name: str
    sps_location: str
    sps_start_date: str
    sps_start_time: str
    performing_physician: str
    referring_physician: str
    requesting_physician: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    status: str


_SELECT = "SELECT " + ", ".join(
    ("accession_number", "study_uid", "requested_procedure_id", "requested_procedure_desc",
     "procedure_code_value", "procedure_code_scheme", "procedure_code_meaning", "priority",
     "sps_id", "sps_description", "modality", "station_ae_title", "station_name",
     "sps_location", "sps_start_date", "sps_start_time", "performing_physician",
     "referring_physician", "requesting_physician", "patient_id", "issuer", "patient_name",
     "birth_date", "sex", "status")) + " FROM orders"


def find_items(conn: sqlite3.Connection, terms: Sequence[tuple[str, Term]],
               statuses: Sequence[str], limit: int,
               start_period: Period | None = None,
               scheduled_from: str = "") -> list[WorklistItem]:
    """Orders whose status is one of `statuses`, that meet every (keyword, term),
    whose scheduled start (date and time read as one moment) lies in `start_period`
    when given, and whose start date is not before `scheduled_from` (YYYYMMDD; orders
    without a date pass) when given; by scheduled start, at most `limit` (+1, so the
    caller can tell that there were more)."""
    register_functions(conn)  # the folded-wildcard matching functions, on this connection
    conditions = [Condition(f"status IN ({','.join('?' * len(statuses))})", tuple(statuses))
                  if statuses else Condition("0", ())]
    conditions += [condition(term, COLUMNS[keyword]) for keyword, term in terms]
    if start_period is not None:
        conditions.append(period_condition(start_period, COLUMNS["ScheduledProcedureStepStartDate"],
                                           COLUMNS["ScheduledProcedureStepStartTime"]))
    if scheduled_from:
        conditions.append(Condition("sps_start_date = '' OR sps_start_date >= ?",
                                    (scheduled_from,)))
    where = " AND ".join(f"({c.sql})" for c in conditions)
    params = [p for c in conditions for p in c.params]
    cur = conn.execute(f"{_SELECT} WHERE {where}"
                       " ORDER BY sps_start_date, sps_start_time_key, id LIMIT ?",
                       (*params, limit + 1))
    try:
        return [WorklistItem(*row) for row in cur.fetchall()]
    finally:
        cur.close()
