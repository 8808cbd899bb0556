"""Storage Commitment requests as rows: the request, its items, its state machine.

    pending ──reported──▶ answered
       │  ▲                  │
       │  └─requested_again──┘   (a repeated N-ACTION with the same Transaction UID)
       └──gave_up──▶ abandoned ──requested_again──▶ pending

A commitment is `pending` from the committed N-ACTION until a report was
delivered to the peer (`answered`), or until the box gave up delivering it
(`abandoned`, after `[workflow] commit_give_up_hours`). Every transition is one
row in `commitment_transitions`, in the same transaction as the state change.

Writes are plain functions of the sqlite3 connection for the index's
`Writer.submit_sync`; reads are plain functions too, run on the reader
connection (`database.run_sync`), and return typed rows.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from appliance.base.errors import PacsEdgeError
from appliance.store import database
from appliance.store.clock_steps import due_condition

_CHUNK = 500  # SQL variables per IN (...) list


class CommitmentState(enum.StrEnum):
    PENDING = "pending"
    ANSWERED = "answered"
    ABANDONED = "abandoned"


class CommitmentTrigger(enum.StrEnum):
    REPORTED = "reported"                # the peer took the N-EVENT-REPORT (status success)
    REQUESTED_AGAIN = "requested_again"  # the same Transaction UID came again
    GAVE_UP = "gave_up"                  # undeliverable for commit_give_up_hours


TRANSITIONS: dict[tuple[CommitmentState, CommitmentTrigger], CommitmentState] = {
    (CommitmentState.PENDING, CommitmentTrigger.REPORTED): CommitmentState.ANSWERED,
    (CommitmentState.PENDING, CommitmentTrigger.GAVE_UP): CommitmentState.ABANDONED,
    (CommitmentState.PENDING, CommitmentTrigger.REQUESTED_AGAIN): CommitmentState.PENDING,
    (CommitmentState.ANSWERED, CommitmentTrigger.REQUESTED_AGAIN): CommitmentState.PENDING,
    (CommitmentState.ABANDONED, CommitmentTrigger.REQUESTED_AGAIN): CommitmentState.PENDING,
}


class CommitmentTransitionError(PacsEdgeError):
    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"storage commitment: {trigger!r} is not allowed in state {state!r}",
                         hint="another thread or process answered it meanwhile")
        self.state = state
        self.trigger = trigger


def next_state(state: CommitmentState | str, trigger: CommitmentTrigger) -> CommitmentState:
    try:
        return TRANSITIONS[(CommitmentState(state), trigger)]
    except (KeyError, ValueError):
        raise CommitmentTransitionError(str(state), trigger.value) from None


@dataclass(frozen=True)
class RequestedItem:
    """One item of the request's Referenced SOP Sequence."""

    sop_class_uid: str
    sop_uid: str


@dataclass(frozen=True)
class Commitment:
    id: int
    calling_ae: str
    transaction_uid: str
    state: CommitmentState
    requested_at: float
    attempts: int
    items: tuple[RequestedItem, ...]


@dataclass(frozen=True)
class StoredInstance:
    """What the index says about one instance, for the commitment decision."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    path: str
    dataset_offset: int
    sha256: str
    is_local: bool
    in_verified_pack: bool  # its pack was read back at upload and no scrub found it damaged


# --- writes (Writer.submit_sync) ---------------------------------------------------------

def record_request(conn: sqlite3.Connection, *, calling_ae: str, transaction_uid: str,
                   items: Sequence[RequestedItem], now: float, first_attempt_at: float
                   ) -> tuple[int, bool] | None:
    """Commit a request; (commitment id, True if new). A repeated request (same Transaction
    UID from the same peer, same items) becomes pending again, requested `now`: the
    give-up and cloud-wait clocks start over, or a repeat of a request older than
    `commit_give_up_hours` would be given up at its first undelivered attempt. None, and
    nothing changed, when the peer reuses the Transaction UID for other items."""
    existing = database.query_one(
        conn, "SELECT id, state FROM commitments WHERE calling_ae = ? AND transaction_uid = ?",
        (calling_ae, transaction_uid))
    if existing is not None:
        held = conn.execute("SELECT sop_class_uid, sop_uid FROM commitment_items"
                            " WHERE commitment_fk = ? ORDER BY position", (existing[0],))
        if [tuple(row) for row in held] != [(i.sop_class_uid, i.sop_uid) for i in items]:
            return None
        _apply(conn, existing[0], existing[1], CommitmentTrigger.REQUESTED_AGAIN, now)
        conn.execute("UPDATE commitments SET requested_at = ?, next_attempt_at = ?,"
                     " last_error = '' WHERE id = ?", (now, first_attempt_at, existing[0]))
        return int(existing[0]), False
    cur = conn.execute(
        "INSERT INTO commitments (calling_ae, transaction_uid, requested_at, next_attempt_at)"
        " VALUES (?, ?, ?, ?)", (calling_ae, transaction_uid, now, first_attempt_at))
    commitment_id = int(cur.lastrowid or 0)
    conn.executemany(
        "INSERT INTO commitment_items (commitment_fk, position, sop_class_uid, sop_uid)"
        " VALUES (?, ?, ?, ?)",
        [(commitment_id, n, item.sop_class_uid, item.sop_uid) for n, item in enumerate(items)])
    return commitment_id, True


def claim(conn: sqlite3.Connection, commitment_id: int, *, now: float, until: float) -> bool:
    """Take a due commitment for one delivery attempt: no other thread or process picks
    it up before `until`. False if it is not due (answered, or another one holds it).
    `until - now` is the longest delay the box schedules: see `due` for later attempts."""
    is_due, due_args = due_condition("next_attempt_at", now, until - now)
    cur = conn.execute("UPDATE commitments SET next_attempt_at = ? WHERE id = ?"
                       f" AND state = 'pending' AND {is_due}",
                       (until, commitment_id, *due_args))
    return cur.rowcount == 1


def mark_answered(conn: sqlite3.Connection, commitment_id: int,
                  outcomes: Sequence[str], now: float) -> None:
    """The peer took the report: record what it said of each item, in request order
    ("committed" or why not), and move to `answered`."""
    state = _state(conn, commitment_id)
    _apply(conn, commitment_id, state, CommitmentTrigger.REPORTED, now)
    conn.execute("UPDATE commitments SET answered_at = ?, attempts = attempts + 1,"
                 " last_error = '' WHERE id = ?", (now, commitment_id))
    conn.executemany(
        "UPDATE commitment_items SET outcome = ? WHERE commitment_fk = ? AND position = ?",
        [(outcome, commitment_id, n) for n, outcome in enumerate(outcomes)])


def note_attempt(conn: sqlite3.Connection, commitment_id: int, *, error: str,
                 next_attempt_at: float, counts: bool = True) -> None:
    """A report was not delivered (or not decided yet): try again at `next_attempt_at`."""
    conn.execute("UPDATE commitments SET attempts = attempts + ?, last_error = ?,"
                 " next_attempt_at = ? WHERE id = ? AND state = 'pending'",
                 (1 if counts else 0, error, next_attempt_at, commitment_id))


def abandon(conn: sqlite3.Connection, commitment_id: int, *, error: str, now: float) -> None:
    state = _state(conn, commitment_id)
    _apply(conn, commitment_id, state, CommitmentTrigger.GAVE_UP, now)
    conn.execute("UPDATE commitments SET last_error = ? WHERE id = ?", (error, commitment_id))


def _state(conn: sqlite3.Connection, commitment_id: int) -> str:
    row = database.query_one(conn, "SELECT state FROM commitments WHERE id = ?",
                             (commitment_id,))
    if row is None:
        raise PacsEdgeError(f"storage commitment: no commitment with id {commitment_id}")
    return str(row[0])


def _apply(conn: sqlite3.Connection, commitment_id: int, current: str,
           trigger: CommitmentTrigger, now: float) -> CommitmentState:
    target = next_state(current, trigger)
    if target.value != current:
        conn.execute("UPDATE commitments SET state = ? WHERE id = ?", (target.value, commitment_id))
        conn.execute(
            "INSERT INTO commitment_transitions (commitment_fk, from_state, to_state, trigger, at)"
            " VALUES (?, ?, ?, ?, ?)", (commitment_id, current, target.value, trigger.value, now))
    return target


# --- reads (run_sync on the reader) ------------------------------------------------------

def load(conn: sqlite3.Connection, commitment_id: int) -> Commitment | None:
    row = database.query_one(
        conn, "SELECT id, calling_ae, transaction_uid, state, requested_at, attempts"
        " FROM commitments WHERE id = ?", (commitment_id,))
    return None if row is None else _commitment(conn, row)


def due(conn: sqlite3.Connection, now: float, horizon: float, limit: int = 16,
        skip_aes: Collection[str] = ()) -> list[Commitment]:
    """Pending commitments whose next attempt is due, oldest first, but none requested by
    `skip_aes` (peers found unreachable: the next `limit` are the others'). An attempt set
    for more than `horizon` (the longest delay the box schedules) after `now` was
    scheduled before the wall clock stepped back (a clock corrected after months ahead):
    it is due too (store/clock_steps.py), else the modality would wait for its report
    until the clock caught up."""
    is_due, due_args = due_condition("next_attempt_at", now, horizon)
    skipped = sorted(skip_aes)
    not_skipped = f" AND calling_ae NOT IN ({','.join('?' * len(skipped))})" if skipped else ""
    rows = conn.execute(
        "SELECT id, calling_ae, transaction_uid, state, requested_at, attempts"
        f" FROM commitments WHERE state = 'pending' AND {is_due}{not_skipped}"
        " ORDER BY next_attempt_at, id LIMIT ?", (*due_args, *skipped, limit)).fetchall()
    return [_commitment(conn, row) for row in rows]


def stored_instances(conn: sqlite3.Connection, sop_uids: Sequence[str]
                     ) -> dict[str, StoredInstance]:
    """The current index rows of these SOP Instance UIDs (unknown ones are absent)."""
    found: dict[str, StoredInstance] = {}
    unique = list(dict.fromkeys(sop_uids))
    for start in range(0, len(unique), _CHUNK):
        chunk = unique[start:start + _CHUNK]
        rows = conn.execute(
            "SELECT i.sop_uid, i.sop_class_uid, st.study_uid, i.path, i.dataset_offset,"
            " i.sha256, i.is_local,"
            " COALESCE(p.state = 'verified' AND p.scrub_state != 'damaged', 0)"
            " FROM instances i JOIN series se ON i.series_fk = se.id"
            " JOIN studies st ON se.study_fk = st.id LEFT JOIN packs p ON p.id = i.pack_fk"
            f" WHERE i.sop_uid IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        for row in rows:
            found[row[0]] = StoredInstance(row[0], row[1], row[2], row[3], int(row[4]), row[5],
                                           bool(row[6]), bool(row[7]))
    return found


def _commitment(conn: sqlite3.Connection, row: sqlite3.Row) -> Commitment:
    items = conn.execute(
        "SELECT sop_class_uid, sop_uid FROM commitment_items WHERE commitment_fk = ?"
        " ORDER BY position", (row[0],)).fetchall()
    return Commitment(int(row[0]), row[1], row[2], CommitmentState(row[3]), float(row[4]),
                      int(row[5]), tuple(RequestedItem(c, u) for c, u in items))
