"""Orders, the HL7 message log and patient demographics: the store's SQL for them.

Schema contract (migration 0006_orders.sql), for every reader and writer:

``orders``: one row per order = one requested procedure with one scheduled
procedure step (SPS) = one Modality Worklist item. Keyed by
``accession_number`` (unique); ``study_uid`` is fixed when the order is
created (the RIS's, else generated) and never changes, so images, MPPS and
the order share it. Columns and the DICOM attribute each one answers:

=========================  ===========  ===========================================
column                     tag          format
=========================  ===========  ===========================================
accession_number           (0008,0050)  SH
study_uid                  (0020,000D)  UI
requested_procedure_id     (0040,1001)  SH
requested_procedure_desc   (0032,1060)  LO
procedure_code_*           (0032,1064)  code value / scheme / meaning
priority                   (0040,1003)  STAT | HIGH | ROUTINE | MEDIUM | LOW | ''
sps_id                     (0040,0009)  SH
sps_description            (0040,0007)  LO
modality                   (0008,0060)  CS
station_ae_title           (0040,0001)  AE
station_name               (0040,0010)  SH
sps_location               (0040,0011)  SH
sps_start_date             (0040,0002)  DA, YYYYMMDD
sps_start_time             (0040,0003)  TM as received; ``sps_start_time_key`` is
                                        HHMMSS.FFFFFF (store/times.py) for ranges
performing_physician       (0040,0006)  PN
referring_physician        (0008,0090)  PN
requesting_physician       (0032,1032)  PN
patient_id / issuer        (0010,0020) / (0010,0021)
patient_name               (0010,0010)  PN, family^given^middle^prefix^suffix
birth_date / sex           (0010,0030) DA / (0010,0040) M | F | O | ''
status                     (0040,0020)  SCHEDULED | IN PROGRESS | COMPLETED |
                                        DISCONTINUED (a CHECK constraint)
=========================  ===========  ===========================================

Text is stored decoded (any character set); '' means unknown. The patient
columns are a copy of the order's PID kept current by ADT^A08 and ADT^A40,
so a worklist answers from this one table without joins.

Who writes: the order service (appliance/services/orders.py) creates and
changes orders; status changes go only through
appliance/services/order_states.py (its transition table; ``set_status``
here is its compare-and-set), which MPPS uses too. Each change of status is
one ``order_transitions`` row in the same transaction. Readers: the
worklist SCP and ``pacs-edge worklist``.

``hl7_messages``: the decided outcome of each HL7 message by (MSH-3, MSH-4,
MSH-10), no message text. ``patient_merges``: prior -> surviving patient.

Writes are plain functions of a sqlite3 connection, run inside the index's
Writer (``Writer.submit_sync``), so they share its transaction and group
commit; they never commit themselves. Reads take any connection (the
index's reader through ``database.run_sync``).
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields

from appliance.store import amendments, database
from appliance.store.times import time_key


class OrderStatus(enum.StrEnum):
    """The values of ``orders.status`` (Scheduled Procedure Step Status)."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


@dataclass(frozen=True)
class PatientKey:
    """A patient as DICOM identifies one: Patient ID and Issuer of Patient ID."""

    patient_id: str
    issuer: str = ""


@dataclass(frozen=True)
class Demographics:
    """What ADT and PID say about a patient (DICOM formats)."""

    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""


@dataclass(frozen=True)
class OrderDetails:
    """The fields of an order an XO (change) may replace: everything but identity
    (accession, placer/filler numbers, Study Instance UID), patient and status."""

    requested_procedure_id: str = ""
    requested_procedure_desc: str = ""
    procedure_code_value: str = ""
    procedure_code_scheme: str = ""
    procedure_code_meaning: str = ""
    priority: str = ""
    sps_id: str = ""
    sps_description: str = ""
    modality: str = ""
    station_ae_title: str = ""
    station_name: str = ""
    sps_location: str = ""
    sps_start_date: str = ""
    sps_start_time: str = ""
    performing_physician: str = ""
    referring_physician: str = ""
    requesting_physician: str = ""


_DETAIL_COLUMNS = tuple(f.name for f in fields(OrderDetails))


@dataclass(frozen=True)
class Order:
    """One row of ``orders``, with the images linked to it (read-time count)."""

    id: int
    accession_number: str
    placer_order_number: str
    filler_order_number: str
    study_uid: str
    details: OrderDetails
    patient: PatientKey
    demographics: Demographics
    status: OrderStatus
    status_changed_at: float
    created_at: float
    updated_at: float
    images_received: int


@dataclass(frozen=True)
class OrderTransition:
    from_state: str
    to_state: str
    trigger: str
    source: str
    at: float


@dataclass(frozen=True)
class MessageRecord:
    """The decided outcome of one HL7 message (``hl7_messages``)."""

    sending_application: str
    sending_facility: str
    control_id: str
    message_type: str
    content_sha256: str
    ack_code: str
    ack_text: str = ""
    error_location: str = ""


# Images linked to an order: instances of its study (same Study Instance UID),
# or of a study with its accession number for the same patient (a modality
# that did not use the worklist's UID).
_IMAGES = (
    "(SELECT COALESCE(SUM(st.instance_count), 0) FROM studies st"
    " JOIN patients p ON p.id = st.patient_fk"
    " WHERE st.study_uid = o.study_uid OR (st.accession_number = o.accession_number"
    " AND p.patient_id = o.patient_id AND p.issuer = o.issuer))"
)
_SELECT = (
    "SELECT o.id, o.accession_number, o.placer_order_number, o.filler_order_number,"
    f" o.study_uid, {', '.join('o.' + c for c in _DETAIL_COLUMNS)},"
    " o.patient_id, o.issuer, o.patient_name, o.birth_date, o.sex,"
    f" o.status, o.status_changed_at, o.created_at, o.updated_at, {_IMAGES} FROM orders o"
)


def _order(row: sqlite3.Row | tuple[object, ...]) -> Order:
    values = tuple(row)
    n = len(_DETAIL_COLUMNS)
    details = OrderDetails(*values[5:5 + n])  # type: ignore[arg-type]
    rest = values[5 + n:]
    return Order(
        id=int(values[0]),  # type: ignore[call-overload]
        accession_number=str(values[1]), placer_order_number=str(values[2]),
        filler_order_number=str(values[3]), study_uid=str(values[4]), details=details,
        patient=PatientKey(str(rest[0]), str(rest[1])),
        demographics=Demographics(str(rest[2]), str(rest[3]), str(rest[4])),
        status=OrderStatus(rest[5]), status_changed_at=float(rest[6]),  # type: ignore[arg-type]
        created_at=float(rest[7]), updated_at=float(rest[8]),  # type: ignore[arg-type]
        images_received=int(rest[9]),  # type: ignore[call-overload]
    )


# --- reads ------------------------------------------------------------------------

def find_order(conn: sqlite3.Connection, accession_number: str) -> Order | None:
    row = database.query_one(conn, f"{_SELECT} WHERE o.accession_number = ?",
                             (accession_number,))
    return _order(row) if row is not None else None


def find_order_by_placer(conn: sqlite3.Connection, placer_order_number: str) -> Order | None:
    """The order the RIS numbered so (ORC-2), when the message has no accession."""
    if not placer_order_number:
        return None
    row = database.query_one(conn, f"{_SELECT} WHERE o.placer_order_number = ?"
                             " ORDER BY o.id DESC", (placer_order_number,))
    return _order(row) if row is not None else None


def find_order_by_study(conn: sqlite3.Connection, study_uid: str) -> Order | None:
    row = database.query_one(conn, f"{_SELECT} WHERE o.study_uid = ?", (study_uid,))
    return _order(row) if row is not None else None


def list_orders(conn: sqlite3.Connection, status: OrderStatus | None = None,
                limit: int = 10_000) -> list[Order]:
    """Orders by scheduled start (then arrival), optionally of one status."""
    where, params = ("WHERE o.status = ?", [status.value]) if status else ("", [])
    cur = conn.execute(
        f"{_SELECT} {where} ORDER BY o.sps_start_date, o.sps_start_time_key, o.id LIMIT ?",
        (*params, limit))
    try:
        return [_order(row) for row in cur.fetchall()]
    finally:
        cur.close()


def transitions(conn: sqlite3.Connection, order_id: int) -> list[OrderTransition]:
    cur = conn.execute(
        "SELECT from_state, to_state, trigger, source, at FROM order_transitions"
        " WHERE order_fk = ? ORDER BY id", (order_id,))
    try:
        return [OrderTransition(*row) for row in cur.fetchall()]
    finally:
        cur.close()


def find_message(conn: sqlite3.Connection, sending_application: str, sending_facility: str,
                 control_id: str) -> MessageRecord | None:
    row = database.query_one(
        conn,
        "SELECT sending_application, sending_facility, control_id, message_type,"
        " content_sha256, ack_code, ack_text, error_location FROM hl7_messages"
        " WHERE sending_application = ? AND sending_facility = ? AND control_id = ?",
        (sending_application, sending_facility, control_id))
    return MessageRecord(*row) if row is not None else None


def surviving_patient(conn: sqlite3.Connection, patient: PatientKey) -> PatientKey | None:
    """The patient that ADT^A40 merges made of `patient`, or None if none did.

    Follows the merges in the order they came: from `patient`, the first merge
    of it, then the first later merge of the patient it went to, and so on; ids
    only grow, so this ends. A patient named as the surviving one of a later
    merge is current again (A into B, then B into A: A is current). This is
    where merge_patient put the prior patient's studies, so instances that
    arrive later with an obsolete ID land with them.
    """
    current, since = patient, 0
    while True:
        row = database.query_one(
            conn, "SELECT id, patient_id, issuer FROM patient_merges WHERE prior_patient_id = ?"
            " AND prior_issuer = ? AND id > ? ORDER BY id LIMIT 1",
            (current.patient_id, current.issuer, since))
        if row is None:
            return None if current == patient else current
        since, current = int(row[0]), PatientKey(str(row[1]), str(row[2]))


def latest_demographics(conn: sqlite3.Connection, patient: PatientKey) -> Demographics | None:
    """The patient's demographics as the RIS last sent them: those of their most
    recently changed order (A08 and A40 keep them current); None without orders."""
    row = database.query_one(
        conn, "SELECT patient_name, birth_date, sex FROM orders WHERE patient_id = ?"
        " AND issuer = ? ORDER BY updated_at DESC, id DESC LIMIT 1",
        (patient.patient_id, patient.issuer))
    return Demographics(*map(str, row)) if row is not None else None


# --- writes (inside Writer.submit_sync) -------------------------------------------

@contextlib.contextmanager
def savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """All or nothing inside the writer's transaction: a failure rolls back only what
    ran inside (the caller may still record why, in the same transaction)."""
    conn.execute("SAVEPOINT orders_apply")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO orders_apply")
        conn.execute("RELEASE orders_apply")
        raise
    conn.execute("RELEASE orders_apply")


def insert_order(conn: sqlite3.Connection, *, accession_number: str, placer_order_number: str,
                 filler_order_number: str, study_uid: str, details: OrderDetails,
                 patient: PatientKey, demographics: Demographics, at: float) -> int:
    """A new SCHEDULED order; raises sqlite3.IntegrityError if the accession number or
    Study Instance UID is taken (the service checks first and answers AE)."""
    columns = ("accession_number", "placer_order_number", "filler_order_number", "study_uid",
               *_DETAIL_COLUMNS, "sps_start_time_key", "patient_id", "issuer", "patient_name",
               "birth_date", "sex", "status", "status_changed_at", "created_at", "updated_at")
    values = (accession_number, placer_order_number, filler_order_number, study_uid,
              *astuple(details), time_key(details.sps_start_time), patient.patient_id,
              patient.issuer, *astuple(demographics), OrderStatus.SCHEDULED.value, at, at, at)
    row = database.query_one(
        conn, f"INSERT INTO orders ({', '.join(columns)}) VALUES"
        f" ({', '.join('?' * len(columns))}) RETURNING id", values)
    return int(row[0])


def update_order_details(conn: sqlite3.Connection, order_id: int, details: OrderDetails,
                         at: float) -> None:
    assignments = ", ".join(f"{column} = ?" for column in _DETAIL_COLUMNS)
    conn.execute(
        f"UPDATE orders SET {assignments}, sps_start_time_key = ?, updated_at = ? WHERE id = ?",
        (*astuple(details), time_key(details.sps_start_time), at, order_id))


def set_status(conn: sqlite3.Connection, order_id: int, *, expect: OrderStatus,
               target: OrderStatus, trigger: str, source: str, at: float) -> bool:
    """Compare-and-set of an order's status plus its transition row; False (nothing
    written) if the order is no longer in `expect`. Callers decide `target` with
    services/order_states.py; a self-loop writes nothing and returns True."""
    if target is expect:
        row = database.query_one(conn, "SELECT 1 FROM orders WHERE id = ? AND status = ?",
                                 (order_id, expect.value))
        return row is not None
    cur = conn.execute(
        "UPDATE orders SET status = ?, status_changed_at = ?, updated_at = ?"
        " WHERE id = ? AND status = ?", (target.value, at, at, order_id, expect.value))
    if cur.rowcount != 1:
        return False
    conn.execute(
        "INSERT INTO order_transitions (order_fk, from_state, to_state, trigger, source, at)"
        " VALUES (?, ?, ?, ?, ?, ?)", (order_id, expect.value, target.value, trigger, source, at))
    return True


def record_message(conn: sqlite3.Connection, record: MessageRecord, at: float) -> None:
    """Record a message's outcome; it replaces the outcome of an earlier, different
    message that the sender gave the same control ID."""
    conn.execute(
        "INSERT INTO hl7_messages (sending_application, sending_facility, control_id,"
        " message_type, content_sha256, ack_code, ack_text, error_location, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (sending_application, sending_facility, control_id) DO UPDATE SET"
        " message_type = excluded.message_type, content_sha256 = excluded.content_sha256,"
        " ack_code = excluded.ack_code, ack_text = excluded.ack_text,"
        " error_location = excluded.error_location, received_at = excluded.received_at",
        (*astuple(record), at))


def update_demographics(conn: sqlite3.Connection, patient: PatientKey,
                        demographics: Demographics, at: float, *,
                        cleared: frozenset[str] = frozenset()) -> tuple[int, int]:
    """Set a patient's name, birth date and sex in the index (future C-FIND answers)
    and on every order of theirs. Empty fields leave the stored value as it is
    (HL7: an empty field is "not sent", not "delete"); the fields named in `cleared`
    (sent as HL7's null, which is "delete") are emptied. Returns (patients, orders)
    rows changed; stored files are never rewritten."""
    sets = [(column, value) for column, value in zip(
        ("patient_name", "birth_date", "sex"), astuple(demographics), strict=True)
        if value or column in cleared]
    if not sets:
        return 0, 0
    assignments = ", ".join(f"{column} = ?" for column, _ in sets)
    values = [value for _, value in sets]
    key = (patient.patient_id, patient.issuer)
    changed = database.query_one(
        conn, "SELECT id FROM patients WHERE patient_id = ? AND issuer = ? AND NOT ("
        + " AND ".join(f"{column} IS ?" for column, _ in sets) + ")", (*key, *values))
    patients = conn.execute(f"UPDATE patients SET {assignments} WHERE patient_id = ?"
                            " AND issuer = ?", (*values, *key)).rowcount
    if changed is not None:  # the cloud's copies of their studies state the new values
        amendments.restate(conn, amendments.studies_of(conn, changed[0]), at)
    orders = conn.execute(f"UPDATE orders SET {assignments}, updated_at = ? WHERE patient_id = ?"
                          " AND issuer = ?", (*values, at, *key)).rowcount
    return patients, orders


def _instances_name_their_study(conn: sqlite3.Connection, patient_fk: int) -> None:
    """After a merge into `patient_fk`: an instance naming that patient in a study filed
    under it names its study's patient (migration 0030), so it is marked as no other."""
    conn.execute(
        "UPDATE instances SET patient_fk = NULL WHERE patient_fk = ? AND series_fk IN"
        " (SELECT se.id FROM series se JOIN studies st ON st.id = se.study_fk"
        " WHERE st.patient_fk = ?)", (patient_fk, patient_fk))


def merge_patient(conn: sqlite3.Connection, prior: PatientKey, surviving: PatientKey,
                  at: float) -> tuple[int, int]:
    """Make `prior`'s studies and orders `surviving`'s; returns (studies, orders) moved.

    In the index, the prior patient's studies move to the surviving patient's
    row, which is the prior row renamed when the surviving patient has none;
    the prior row is then removed, so C-FIND answers those studies under the
    surviving ID. The merge is recorded in ``patient_merges``.
    """
    prior_row = database.query_one(
        conn, "SELECT id FROM patients WHERE patient_id = ? AND issuer = ?",
        (prior.patient_id, prior.issuer))
    surviving_row = database.query_one(
        conn, "SELECT id FROM patients WHERE patient_id = ? AND issuer = ?",
        (surviving.patient_id, surviving.issuer))
    moved = amendments.studies_of(conn, prior_row[0]) if prior_row is not None else []
    if prior_row is not None and surviving_row is None:
        conn.execute("UPDATE patients SET patient_id = ?, issuer = ? WHERE id = ?",
                     (surviving.patient_id, surviving.issuer, prior_row[0]))
    elif prior_row is not None and surviving_row is not None:
        conn.execute("UPDATE studies SET patient_fk = ? WHERE patient_fk = ?",
                     (surviving_row[0], prior_row[0]))
        conn.execute("UPDATE instances SET patient_fk = ? WHERE patient_fk = ?",
                     (surviving_row[0], prior_row[0]))
        conn.execute("DELETE FROM patients WHERE id = ?", (prior_row[0],))
        _instances_name_their_study(conn, surviving_row[0])
    orders = conn.execute(
        "UPDATE orders SET patient_id = ?, issuer = ?, updated_at = ? WHERE patient_id = ?"
        " AND issuer = ?", (surviving.patient_id, surviving.issuer, at, prior.patient_id,
                            prior.issuer)).rowcount
    conn.execute(
        "INSERT INTO patient_merges (prior_patient_id, prior_issuer, patient_id, issuer,"
        " merged_at) VALUES (?, ?, ?, ?, ?)",
        (prior.patient_id, prior.issuer, surviving.patient_id, surviving.issuer, at))
    amendments.restate(conn, moved, at)  # the cloud's copies name the surviving patient
    return len(moved), orders
