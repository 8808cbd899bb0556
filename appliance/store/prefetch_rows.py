"""Prefetch requests and their priors (migration 0011): the store's SQL for them.

A request says "make this patient's relevant priors local before `needed_at`";
the prefetch service (appliance/services/prefetch.py) chooses the priors and
records them here with where each one is (`source`). Each prior then moves
through one state table, as a study's tiering does (store/tiering.py):

    pending ──local──────────────────────────────────────────────▶ done
    pending ──recall──▶ recalling ──recalled─────────────────────▶ done
    pending ──rehydrate──▶ rehydrating ──online──▶ recalling
    pending ──move──▶ moving ──moved─────────────────────────────▶ done
    pending | recalling | rehydrating | moving ──fail──▶ failed ──retry──▶ pending
    recalling | rehydrating | moving ──resume──▶ pending   (a process died mid-way)

Retries: a request or prior that failed for a reason that may pass (RETRIED:
the remote archive was down, a C-MOVE or a recall failed) gets a `retry_at`
(`Retries`: `[prefetch] retry_attempts` times, `retry_base_seconds` after the
failure, doubled each time, at most an hour); the serving process's worker
takes those due up again (`retry_due`), and at once those set further ahead
than that hour (before the wall clock stepped back: store/clock_steps.py).
`pacs-edge prefetch retry` takes up every failed one at once and gives it its
attempts again.

Who moves a prior: the sync agent those of source `cloud` (recall, with early
rehydration of archived packs: sync/prefetch_rehydrate.py), the serving
process those of source `remote` (C-MOVE from the remote archive) and
`local` (nothing to fetch: done when chosen). A refused pair raises
PrefetchTransitionError; every applied change is one prefetch_transitions row
in the same transaction.

Holds: a prior that is done stays on local disk until its request's
`hold_until` (sync/evict.py asks `held_study_uids`).

A cancelled order ends its prefetch (`end_for_cancelled_order`): the hold ends,
what has not started (or only waits for the cloud) fails as `order_cancelled`,
which `retry_failed` leaves alone, and a transfer under way (a recall, a C-MOVE)
runs to its end.

Writes are plain functions of a sqlite3 connection run through
`Writer.submit_sync`; reads take any connection (the index's reader through
`database.run_sync`). Nothing here is logged: rows hold patient IDs.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.base.config import PrefetchConfig
from appliance.base.errors import PacsEdgeError, PrefetchFailure
from appliance.store import database
from appliance.store.clock_steps import STEPPED_BACK_SLACK, due_condition
from appliance.store.migration_rows import RETRY_CAP_SECONDS, backoff
from appliance.store.order_rows import PatientKey

_CANCELLED = PrefetchFailure.ORDER_CANCELLED.value
_CANCELLED_TEXT = "the order was cancelled"
# The failed priors `retry_failed` takes up again: all but those of a cancelled order
# (`pacs-edge status` counts them too: store/health_reads.py).
RETRYABLE_PRIORS = ("FROM prefetch_priors p JOIN prefetch_requests r ON r.id = p.request_fk"
                    f" WHERE p.state = 'failed' AND r.error_kind != '{_CANCELLED}'")
# Failures that may pass by themselves, retried automatically; the others (the study
# is gone, no remote archive is configured, the order was cancelled) wait for a person.
RETRIED = frozenset({PrefetchFailure.REMOTE_UNREACHABLE.value,
                     PrefetchFailure.MOVE_FAILED.value, PrefetchFailure.MOVE_INCOMPLETE.value,
                     PrefetchFailure.RECALL_FAILED.value})


@dataclass(frozen=True)
class Retries:
    """Automatic retries of a failure: at most `attempts`, the first `base_seconds` after
    it, then doubled each time (at most an hour)."""

    attempts: int
    base_seconds: float

    @classmethod
    def of(cls, config: PrefetchConfig) -> Retries:
        """The retries `[prefetch] retry_attempts` and `retry_base_seconds` set."""
        return cls(config.retry_attempts, config.retry_base_seconds)

    def due(self, kind: str, attempts_taken: int, now: float) -> float | None:
        """When to retry a failure of `kind` after `attempts_taken` retries; None: never."""
        if kind not in RETRIED or attempts_taken >= self.attempts:
            return None
        return now + backoff(attempts_taken + 1, self.base_seconds)


class PriorState(enum.StrEnum):
    PENDING = "pending"
    RECALLING = "recalling"
    REHYDRATING = "rehydrating"
    MOVING = "moving"
    DONE = "done"
    FAILED = "failed"


class PriorTrigger(enum.StrEnum):
    LOCAL = "local"          # the study is on local disk already
    RECALL = "recall"        # the sync agent starts recalling it from the cloud
    REHYDRATE = "rehydrate"  # an archived pack: early rehydration was requested
    ONLINE = "online"        # every pack of the study is online again
    RECALLED = "recalled"    # the recall finished: the study is local
    MOVE = "move"            # the serving process asks the remote archive to send it
    MOVED = "moved"          # the C-MOVE completed and the instances are in the index
    FAIL = "fail"            # see failure_kind
    RETRY = "retry"          # `pacs-edge prefetch retry`
    RESUME = "resume"        # a process died mid-way; start the step again


class Source(enum.StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"
    REMOTE = "remote"


class RequestTrigger(enum.StrEnum):
    ORDER = "order"
    NIGHTLY = "nightly"
    MANUAL = "manual"


_WORKING = (PriorState.PENDING, PriorState.RECALLING, PriorState.REHYDRATING,
            PriorState.MOVING)
TRANSITIONS: dict[tuple[PriorState, PriorTrigger], PriorState] = {
    (PriorState.PENDING, PriorTrigger.LOCAL): PriorState.DONE,
    (PriorState.PENDING, PriorTrigger.RECALL): PriorState.RECALLING,
    (PriorState.PENDING, PriorTrigger.REHYDRATE): PriorState.REHYDRATING,
    (PriorState.REHYDRATING, PriorTrigger.ONLINE): PriorState.RECALLING,
    (PriorState.RECALLING, PriorTrigger.RECALLED): PriorState.DONE,
    (PriorState.PENDING, PriorTrigger.MOVE): PriorState.MOVING,
    (PriorState.MOVING, PriorTrigger.MOVED): PriorState.DONE,
    # Found local when its turn came (a C-MOVE or an on-demand recall got there first).
    (PriorState.RECALLING, PriorTrigger.LOCAL): PriorState.DONE,
    (PriorState.REHYDRATING, PriorTrigger.LOCAL): PriorState.DONE,
    (PriorState.MOVING, PriorTrigger.LOCAL): PriorState.DONE,
    **{(state, PriorTrigger.FAIL): PriorState.FAILED for state in _WORKING},
    (PriorState.FAILED, PriorTrigger.RETRY): PriorState.PENDING,
    (PriorState.RECALLING, PriorTrigger.RESUME): PriorState.PENDING,
    (PriorState.REHYDRATING, PriorTrigger.RESUME): PriorState.PENDING,
    (PriorState.MOVING, PriorTrigger.RESUME): PriorState.PENDING,
}


class PrefetchTransitionError(PacsEdgeError):
    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"prefetch: {trigger!r} is not allowed for a prior in state {state!r}",
                         hint="another process changed the prior meanwhile; it is retried")
        self.state = state
        self.trigger = trigger


def next_state(state: PriorState | str, trigger: PriorTrigger) -> PriorState:
    try:
        return TRANSITIONS[(PriorState(state), trigger)]
    except (KeyError, ValueError):
        raise PrefetchTransitionError(str(state), trigger.value) from None


@dataclass(frozen=True)
class PrefetchRequest:
    id: int
    patient: PatientKey
    trigger: str
    accession_number: str   # of the order ('' for a manual request)
    exclude_study_uid: str
    modality: str
    procedure: str
    needed_at: float | None
    hold_until: float
    state: str
    error_kind: str
    error: str
    created_at: float
    planned_at: float | None
    attempts: int = 0             # automatic retries taken
    retry_at: float | None = None  # the next one, None when none will be made


@dataclass(frozen=True)
class PrefetchPrior:
    id: int
    request_id: int
    study_uid: str
    study_date: str
    modalities: tuple[str, ...]
    source: str
    state: str
    failure_kind: str
    error: str
    rehydrate_requested_at: float | None
    changed_at: float
    done_at: float | None
    attempts: int = 0             # automatic retries taken
    retry_at: float | None = None  # the next one, None when none will be made


@dataclass(frozen=True)
class NewPrior:
    """A prior the rules chose, as the service hands it over."""

    study_uid: str
    study_date: str
    modalities: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class IndexedStudy:
    """A study of the patient in the index, with what the rules look at."""

    study_uid: str
    study_date: str
    study_description: str
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    tier_state: str


@dataclass(frozen=True)
class ScheduledOrder:
    """A SCHEDULED order as the nightly run reads it."""

    id: int
    accession_number: str
    study_uid: str
    patient: PatientKey
    modality: str
    procedure: str
    sps_start_date: str
    sps_start_time: str


# --- requests ---------------------------------------------------------------------

def insert_request(conn: sqlite3.Connection, patient: PatientKey, trigger: RequestTrigger, *,
                   hold_until: float, order_id: int | None = None,
                   exclude_study_uid: str = "", modality: str = "", procedure: str = "",
                   needed_at: float | None = None, at: float | None = None) -> int | None:
    """A pending request; None when the order has one already (one per order)."""
    row = database.query_one(
        conn,
        "INSERT INTO prefetch_requests (patient_id, issuer, trigger, order_fk,"
        " exclude_study_uid, modality, procedure, needed_at, hold_until, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
        (patient.patient_id, patient.issuer, trigger.value, order_id, exclude_study_uid,
         modality, procedure, needed_at, hold_until, time.time() if at is None else at))
    return int(row[0]) if row is not None else None


def mark_planned(conn: sqlite3.Connection, request_id: int, priors: Sequence[NewPrior], *,
                 limit: int, error_kind: str = "", error: str = "",
                 retries: Retries | None = None, at: float | None = None) -> list[NewPrior]:
    """Record the chosen priors, newest first, and close the choice: `planned`, or
    `failed` with the reason when part of it failed (the remote archive could not be
    asked; retried as `retries` says); the priors found are recorded either way.
    Returns those of `priors` the request holds now.

    A request holds at most `limit` priors (`[prefetch] max_priors`), however often it
    is chosen: a request chosen again (its retry, once the remote archive answers) keeps
    the priors chosen before, with their rows and states (they may be fetched or under
    way), and they count; the new choice fills what is left."""
    if _cancelled(conn, request_id):
        return []  # the order was cancelled while its priors were being chosen
    now = time.time() if at is None else at
    held = {str(r[0]) for r in conn.execute(
        "SELECT study_uid FROM prefetch_priors WHERE request_fk = ?", (request_id,))}
    added = [p for p in priors if p.study_uid not in held][:max(limit - len(held), 0)]
    conn.executemany(
        "INSERT INTO prefetch_priors (request_fk, study_uid, study_date, modalities, source,"
        " changed_at) VALUES (?, ?, ?, ?, ?, ?)",
        [(request_id, p.study_uid, p.study_date, ",".join(p.modalities), p.source.value, now)
         for p in added])
    taken = database.query_one(conn, "SELECT attempts FROM prefetch_requests WHERE id = ?",
                               (request_id,))
    retry_at = (retries.due(error_kind, int(taken[0]) if taken else 0, now)
                if error_kind and retries is not None else None)
    conn.execute(
        "UPDATE prefetch_requests SET state = ?, error_kind = ?, error = ?, planned_at = ?,"
        " retry_at = ? WHERE id = ?", ("failed" if error_kind else "planned", error_kind,
                                       error, now, retry_at, request_id))
    return [p for p in priors if p.study_uid in held or p in added]


_REQUEST_SQL = (
    "SELECT r.id, r.patient_id, r.issuer, r.trigger, COALESCE(o.accession_number, ''),"
    " r.exclude_study_uid, r.modality, r.procedure, r.needed_at, r.hold_until, r.state,"
    " r.error_kind, r.error, r.created_at, r.planned_at, r.attempts, r.retry_at"
    " FROM prefetch_requests r LEFT JOIN orders o ON o.id = r.order_fk"
)


def _request(row: Sequence[object]) -> PrefetchRequest:
    values = list(row)
    return PrefetchRequest(values[0], PatientKey(str(values[1]), str(values[2])),  # type: ignore[arg-type]
                           *values[3:])  # type: ignore[arg-type]


def pending_requests(conn: sqlite3.Connection) -> list[PrefetchRequest]:
    """Requests whose priors are not chosen yet, oldest first."""
    return [_request(r) for r in conn.execute(
        f"{_REQUEST_SQL} WHERE r.state = 'pending' ORDER BY r.id").fetchall()]


def recent_requests(conn: sqlite3.Connection, limit: int = 200) -> list[PrefetchRequest]:
    """The newest requests first (`pacs-edge prefetch status`)."""
    return [_request(r) for r in conn.execute(
        f"{_REQUEST_SQL} ORDER BY r.id DESC LIMIT ?", (limit,)).fetchall()]


def request_by_id(conn: sqlite3.Connection, request_id: int) -> PrefetchRequest | None:
    row = database.query_one(conn, f"{_REQUEST_SQL} WHERE r.id = ?", (request_id,))
    return _request(row) if row is not None else None


# --- priors -----------------------------------------------------------------------

_PRIOR_COLUMNS = ("id", "request_fk", "study_uid", "study_date", "modalities", "source", "state",
                  "failure_kind", "error", "rehydrate_requested_at", "changed_at", "done_at",
                  "attempts", "retry_at")
_PRIOR_SQL = f"SELECT {', '.join('p.' + c for c in _PRIOR_COLUMNS)} FROM prefetch_priors p"


def _prior(row: Sequence[object]) -> PrefetchPrior:
    values = list(row)
    values[4] = tuple(m for m in str(values[4]).split(",") if m)
    return PrefetchPrior(*values)  # type: ignore[arg-type]


def priors_of(conn: sqlite3.Connection, request_ids: Sequence[int]) -> list[PrefetchPrior]:
    marks = ",".join("?" * len(request_ids))
    return [_prior(r) for r in conn.execute(
        f"{_PRIOR_SQL} WHERE p.request_fk IN ({marks})"
        " ORDER BY p.request_fk, p.study_date DESC, p.id",
        tuple(request_ids)).fetchall()]


def priors_to_work(conn: sqlite3.Connection, source: Source) -> list[PrefetchPrior]:
    """Priors of `source` not done or failed, the request needed soonest first."""
    return [_prior(r) for r in conn.execute(
        f"{_PRIOR_SQL} JOIN prefetch_requests r ON r.id = p.request_fk"
        " WHERE p.source = ? AND p.state NOT IN ('done', 'failed')"
        " ORDER BY COALESCE(r.needed_at, r.created_at), p.id", (source.value,)).fetchall()]


def advance(conn: sqlite3.Connection, prior_id: int, trigger: PriorTrigger, *,
            expect: PriorState | None = None, failure_kind: str = "", error: str = "",
            retries: Retries | None = None, at: float | None = None) -> PriorState:
    """Apply `trigger` to a prior in the caller's transaction; returns its new state.
    A failure is retried as `retries` says (none without)."""
    row = database.query_one(conn, "SELECT state, attempts FROM prefetch_priors WHERE id = ?",
                             (prior_id,))
    if row is None:
        raise PacsEdgeError(f"prefetch: no prior with id {prior_id}")
    current = PriorState(row[0])
    if expect is not None and current is not expect:
        raise PrefetchTransitionError(current.value, trigger.value)
    target = next_state(current, trigger)
    now = time.time() if at is None else at
    retry_at = (retries.due(failure_kind, int(row[1]), now)
                if target is PriorState.FAILED and retries is not None else None)
    conn.execute(
        "UPDATE prefetch_priors SET state = ?, changed_at = ?, failure_kind = ?, error = ?,"
        " retry_at = ?, done_at = CASE WHEN ? = 'done' THEN ? ELSE done_at END,"
        " rehydrate_requested_at = CASE WHEN ? = 'rehydrate' THEN ?"
        " ELSE rehydrate_requested_at END WHERE id = ?",
        (target.value, now, failure_kind, error, retry_at, target.value, now, trigger.value,
         now, prior_id))
    conn.execute(
        "INSERT INTO prefetch_transitions (prior_fk, from_state, to_state, trigger, at)"
        " VALUES (?, ?, ?, ?, ?)", (prior_id, current.value, target.value, trigger.value, now))
    return target


def transitions_of(conn: sqlite3.Connection, prior_id: int) -> list[tuple[str, str, str]]:
    """(from, to, trigger) of every change of a prior, in order."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT from_state, to_state, trigger FROM prefetch_transitions WHERE prior_fk = ?"
        " ORDER BY id", (prior_id,)).fetchall()]


def retry_failed(conn: sqlite3.Connection) -> tuple[int, int]:
    """Failed requests back to pending (chosen again), failed priors back to pending,
    each with its automatic retries again; returns (requests, priors). What a cancelled
    order ended stays failed."""
    requests = conn.execute(
        "UPDATE prefetch_requests SET state = 'pending', error_kind = '', error = '',"
        " attempts = 0, retry_at = NULL WHERE state = 'failed' AND error_kind != ?",
        (_CANCELLED,)).rowcount
    failed = [int(r[0]) for r in conn.execute(f"SELECT p.id {RETRYABLE_PRIORS}").fetchall()]
    for prior_id in failed:
        advance(conn, prior_id, PriorTrigger.RETRY)
    conn.executemany("UPDATE prefetch_priors SET attempts = 0 WHERE id = ?",
                     [(prior_id,) for prior_id in failed])
    return requests, len(failed)


def retry_due(conn: sqlite3.Connection, *, at: float | None = None) -> tuple[int, int]:
    """Failed requests and priors whose automatic retry is due (`retry_at` passed) back
    to pending, one attempt more each; returns (requests, priors). A `retry_at` more
    than RETRY_CAP_SECONDS (the longest wait `Retries` sets) ahead was set before the
    wall clock stepped back (a clock corrected after months ahead): it is due too, else
    the prior would wait until the clock caught up, long after it was needed."""
    now = time.time() if at is None else at
    request_due, request_args = due_condition("retry_at", now, RETRY_CAP_SECONDS)
    requests = conn.execute(
        "UPDATE prefetch_requests SET state = 'pending', error_kind = '', error = '',"
        " attempts = attempts + 1, retry_at = NULL"
        f" WHERE state = 'failed' AND {request_due} AND error_kind != ?",
        (*request_args, _CANCELLED)).rowcount
    prior_due, prior_args = due_condition("p.retry_at", now, RETRY_CAP_SECONDS)
    due = [int(r[0]) for r in conn.execute(
        f"SELECT p.id {RETRYABLE_PRIORS} AND {prior_due}", prior_args).fetchall()]
    for prior_id in due:
        advance(conn, prior_id, PriorTrigger.RETRY, at=now)
    conn.executemany("UPDATE prefetch_priors SET attempts = attempts + 1 WHERE id = ?",
                     [(prior_id,) for prior_id in due])
    return requests, len(due)


def _cancelled(conn: sqlite3.Connection, request_id: int) -> bool:
    return database.query_one(
        conn, "SELECT 1 FROM prefetch_requests WHERE id = ? AND error_kind = ?",
        (request_id, _CANCELLED)) is not None


def end_for_cancelled_order(conn: sqlite3.Connection, order_id: int, *,
                            at: float | None = None) -> int | None:
    """The order `order_id` was cancelled: end its prefetch; returns the request's id,
    None when the order had none.

    The hold ends now (eviction may take the priors again). The request is failed
    `order_cancelled` (planned or not: no worker plans it, no `retry` revives it).
    Each prior not started yet (pending) or waiting for the cloud (rehydrating: the
    rehydration asked cannot be taken back, the recall after it can) fails the same
    way, and a failed one takes that kind, so that neither the worker, the sync agent
    nor `retry` takes it up; a worker that read it before finds its next step refused
    and skips it. A prior that is moving or recalling is left to finish: that
    transfer is not taken back, and once done the study is no longer held."""
    now = time.time() if at is None else at
    row = database.query_one(conn, "SELECT id FROM prefetch_requests WHERE order_fk = ?",
                             (order_id,))
    if row is None:
        return None
    request_id = int(row[0])
    conn.execute(
        "UPDATE prefetch_requests SET hold_until = MIN(hold_until, ?), state = 'failed',"
        " error_kind = ?, error = ?, retry_at = NULL WHERE id = ?",
        (now, _CANCELLED, _CANCELLED_TEXT, request_id))
    for prior in priors_of(conn, [request_id]):
        if prior.state in (PriorState.PENDING, PriorState.REHYDRATING):
            advance(conn, prior.id, PriorTrigger.FAIL, failure_kind=_CANCELLED,
                    error=_CANCELLED_TEXT, at=now)
        elif prior.state == PriorState.FAILED:
            conn.execute("UPDATE prefetch_priors SET failure_kind = ?, error = ?, changed_at = ?,"
                         " retry_at = NULL WHERE id = ?",
                         (_CANCELLED, _CANCELLED_TEXT, now, prior.id))
    return request_id


def resume_interrupted(conn: sqlite3.Connection, source: Source) -> int:
    """At a process start: priors of `source` left mid-step by a process that died go
    back to pending (each step is safe to run again), or fail if their order was
    cancelled meanwhile; returns how many."""
    stuck = conn.execute(
        "SELECT p.id, r.error_kind FROM prefetch_priors p"
        " JOIN prefetch_requests r ON r.id = p.request_fk WHERE p.source = ?"
        " AND p.state IN ('recalling', 'rehydrating', 'moving')", (source.value,)).fetchall()
    for prior_id, request_error in stuck:
        if request_error == _CANCELLED:
            advance(conn, prior_id, PriorTrigger.FAIL, failure_kind=_CANCELLED,
                    error=_CANCELLED_TEXT)
        else:
            advance(conn, prior_id, PriorTrigger.RESUME)
    return len(stuck)


def held_study_uids(conn: sqlite3.Connection, now: float, *,
                    keep_local_seconds: float) -> set[str]:
    """Studies a prefetch keeps on local disk now: chosen (not failed) priors of requests
    whose hold has not ended. A hold ends `keep_local_seconds` after the order's start,
    or after the request when it names none: one ending later than that from now was
    set before the wall clock stepped back (clock_steps), and is over."""
    return {str(r[0]) for r in conn.execute(
        "SELECT DISTINCT p.study_uid FROM prefetch_priors p"
        " JOIN prefetch_requests r ON r.id = p.request_fk"
        " WHERE p.state != 'failed' AND r.hold_until > ?"
        " AND r.hold_until <= MAX(COALESCE(r.needed_at, 0), ?) + ?",
        (now, now, keep_local_seconds + STEPPED_BACK_SLACK)).fetchall()}


# --- what the rules choose from ---------------------------------------------------

def patient_studies(conn: sqlite3.Connection, patient: PatientKey) -> list[IndexedStudy]:
    """Every study of the patient (same Patient ID and issuer) in the index."""
    rows = conn.execute(
        "SELECT st.study_uid, st.study_date, st.study_description,"
        " (SELECT group_concat(DISTINCT se.modality) FROM series se WHERE se.study_fk = st.id),"
        " (SELECT group_concat(DISTINCT se.body_part) FROM series se WHERE se.study_fk = st.id),"
        " st.tier_state FROM studies st JOIN patients p ON p.id = st.patient_fk"
        " WHERE p.patient_id = ? AND p.issuer = ? ORDER BY st.study_date DESC, st.id",
        (patient.patient_id, patient.issuer)).fetchall()
    return [IndexedStudy(uid, date, desc, _split(mods), _split(parts), state)
            for uid, date, desc, mods, parts, state in rows]


def was_moved(conn: sqlite3.Connection, prior_id: int) -> bool:
    """Whether a C-MOVE of the prior was ever asked (a `move` transition): what it
    brought may be part of the study only."""
    return database.query_one(conn, "SELECT 1 FROM prefetch_transitions WHERE prior_fk = ?"
                              " AND trigger = ? LIMIT 1",
                              (prior_id, PriorTrigger.MOVE.value)) is not None


def study_tier_state(conn: sqlite3.Connection, study_uid: str) -> str:
    """The study's tiering state, '' when the index has no such study."""
    row = database.query_one(conn, "SELECT tier_state FROM studies WHERE study_uid = ?",
                             (study_uid,))
    return str(row[0]) if row is not None else ""


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(sorted({v for v in (text or "").split(",") if v}))


# --- the nightly run --------------------------------------------------------------

def orders_scheduled_on(conn: sqlite3.Connection, day: str) -> list[ScheduledOrder]:
    """SCHEDULED orders whose step starts on `day` (YYYYMMDD), by start time."""
    rows = conn.execute(
        "SELECT id, accession_number, study_uid, patient_id, issuer, modality,"
        " CASE WHEN requested_procedure_desc != '' THEN requested_procedure_desc"
        " ELSE procedure_code_meaning END, sps_start_date, sps_start_time FROM orders"
        " WHERE status = 'SCHEDULED' AND sps_start_date = ? ORDER BY sps_start_time_key, id",
        (day,)).fetchall()
    return [ScheduledOrder(r[0], r[1], r[2], PatientKey(r[3], r[4]), r[5], r[6], r[7], r[8])
            for r in rows]


def order_for_prefetch(conn: sqlite3.Connection, accession_number: str) -> ScheduledOrder | None:
    """An order by accession number, as the prefetch of a new order reads it."""
    row = database.query_one(
        conn,
        "SELECT id, accession_number, study_uid, patient_id, issuer, modality,"
        " CASE WHEN requested_procedure_desc != '' THEN requested_procedure_desc"
        " ELSE procedure_code_meaning END, sps_start_date, sps_start_time FROM orders"
        " WHERE accession_number = ?", (accession_number,))
    if row is None:
        return None
    return ScheduledOrder(row[0], row[1], row[2], PatientKey(row[3], row[4]), row[5], row[6],
                          row[7], row[8])


def nightly_ran(conn: sqlite3.Connection, day: str) -> bool:
    return database.query_one(
        conn, "SELECT 1 FROM prefetch_nightly_runs WHERE day = ?", (day,)) is not None


def record_nightly_run(conn: sqlite3.Connection, day: str, requests: int, at: float) -> None:
    conn.execute("INSERT OR REPLACE INTO prefetch_nightly_runs (day, at, requests)"
                 " VALUES (?, ?, ?)", (day, at, requests))
