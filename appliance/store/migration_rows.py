"""Rows of `pacs-edge migrate`: runs, the days they list, the studies they transfer.

Functions of a sqlite3 connection: writes run through `Writer.submit_sync` (one
committed transaction each), reads through `database.run_sync` on the reader.
The walk's decisions (what to query, when to retry) are
appliance/services/legacy_migration.py's; this module only keeps them.

A run's state is a table (RUN_STATES): running -> paused | cancelled | done,
paused -> running | cancelled; a missing pair is refused with MigrationError.
A study or day is pending, done or failed; a failure is retried after a backoff
until max_attempts, then stays failed until `migrate resume --retry-failed`. A
retry set more than the backoff's cap ahead was set before the wall clock
stepped back: it is due at once (store/clock_steps.py).
Besides its days, a run lists the studies without a StudyDate, which no day
matches: a row of migration_days whose day is UNDATED (''), listed after every
day, its studies kept with that day. A listing that could not list everything
is done with a warning (in last_error, error_kind empty) that the summary shows.

The process that drives a run claims it (claim_run: a leases.Holder in the run's
`driver`) and releases it when it stops; one killed leaves a holder that is no
longer alive. So a running run without a live driver was interrupted, and a
second process cannot drive a run another one still drives.
While its driver waits for something outside the run (WAITING: this box's serve,
the legacy PACS) the run's row says what, since when and why (set_waiting), for
`migrate status` in another process; claiming and releasing the run clear it.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.base.errors import MigrationError, MigrationFailure
from appliance.store.clock_steps import due_condition
from appliance.store.leases import Holder


class RunState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    DONE = "done"


class RunTrigger(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    FINISH = "finish"


RUN_STATES: dict[tuple[RunState, RunTrigger], RunState] = {
    (RunState.RUNNING, RunTrigger.PAUSE): RunState.PAUSED,
    (RunState.RUNNING, RunTrigger.CANCEL): RunState.CANCELLED,
    (RunState.RUNNING, RunTrigger.FINISH): RunState.DONE,
    (RunState.RUNNING, RunTrigger.RESUME): RunState.RUNNING,
    (RunState.PAUSED, RunTrigger.RESUME): RunState.RUNNING,
    (RunState.PAUSED, RunTrigger.CANCEL): RunState.CANCELLED,
}
UNFINISHED = (RunState.RUNNING, RunState.PAUSED)
RETRY_CAP_SECONDS = 3600.0
UNDATED = ""  # the day of the studies without a StudyDate: sorts after every day


class Waiting(enum.StrEnum):
    """What the driver of a run waits for, with no study counted meanwhile."""

    SERVE = "serve"  # this box's DICOM port, where a C-MOVE delivers
    LEGACY = "legacy"  # the legacy PACS: no association


def next_run_state(state: RunState, trigger: RunTrigger) -> RunState:
    try:
        return RUN_STATES[(state, trigger)]
    except KeyError:
        raise MigrationError(f"a {state.value} migration cannot {trigger.value}",
                             hint="`pacs-edge migrate status` shows the run's state") from None


@dataclass(frozen=True)
class RunSettings:
    """What `migrate start` was asked for; `migrate resume` runs with the same."""

    peer: str
    via: str
    since_day: str
    until_day: str
    modalities: tuple[str, ...]
    associations: int
    rate_per_hour: int
    time_window: str
    query_limit: int


@dataclass(frozen=True)
class Run:
    id: int
    settings: RunSettings
    state: RunState
    created_at: float
    updated_at: float
    finished_at: float | None
    driver: str = ""  # the claiming process's leases.Holder, '' when none
    waiting_for: str = ""  # a Waiting value while the driver waits, else ''
    waiting_since: float | None = None
    waiting_reason: str = ""
    stop_reason: str = ""  # why the run paused itself ('' for an operator's pause)

    @property
    def driver_pid(self) -> int | None:
        """The pid of the live process that drives the run, None when none does."""
        holder = Holder.parse(self.driver)
        return holder.pid if holder is not None and holder.alive() else None

    @property
    def interrupted(self) -> bool:
        """Running, but no live process drives it: `migrate resume` continues it."""
        return self.state is RunState.RUNNING and self.driver_pid is None

    @property
    def waiting(self) -> Waiting | None:
        """What the live driver of the run waits for now, None when it does not wait."""
        if not self.waiting_for or self.state is not RunState.RUNNING or self.interrupted:
            return None
        return Waiting(self.waiting_for)


@dataclass(frozen=True)
class FoundStudy:
    """A study a day's C-FIND listed, with the instance count it announced (or None)."""

    study_uid: str
    expected_instances: int | None


@dataclass(frozen=True)
class StudyTask:
    id: int
    study_uid: str
    day: str
    expected_instances: int | None
    attempts: int


@dataclass(frozen=True)
class Failure:
    what: str  # "day" or "study"
    day: str
    study_uid: str
    attempts: int
    error_kind: str
    last_error: str
    expected_instances: int | None
    received_instances: int


PACE_WINDOW_SECONDS = 900.0  # the pace is the last quarter hour's, not the run's whole life


@dataclass(frozen=True)
class Pace:
    """Studies (and their instances) finished per hour, done or failed for good."""

    studies_per_hour: float
    instances_per_hour: float


@dataclass(frozen=True)
class RunSummary:
    days_total: int
    days_done: int
    days_failed: int
    studies_found: int
    studies_done: int
    studies_failed: int
    instances_expected: int
    instances_received: int
    shared_instances: int
    next_attempt_at: float | None  # earliest retry waiting, if any
    undated: str  # state of the listing of studies without a StudyDate ('': none, older run)
    undated_found: int  # studies it found (among studies_found)
    warnings: tuple[str, ...]  # what listings could not list, for the operator
    pace: Pace | None = None  # how fast studies finish lately; None: too few to tell
    finished_lately: int = 0  # studies finished in the pace's window (0 or 1 when no pace)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the studies found so far are finished, at the current pace."""
        if self.pace is None or not self.studies_pending:
            return None
        return self.studies_pending * 3600.0 / self.pace.studies_per_hour

    @property
    def days_pending(self) -> int:
        return self.days_total - self.days_done - self.days_failed

    @property
    def studies_pending(self) -> int:
        return self.studies_found - self.studies_done - self.studies_failed

    @property
    def finished(self) -> bool:
        """Nothing left to try: every day (and the studies without a date) listed or
        failed, every study done or failed."""
        return self.days_pending == 0 and self.undated != "pending" and self.studies_pending == 0


def backoff(attempts: int, base_seconds: float) -> float:
    """Seconds before attempt `attempts + 1`: base, doubled per attempt, at most an hour."""
    return float(min(base_seconds * (2 ** max(attempts - 1, 0)), RETRY_CAP_SECONDS))


def _due(now: float) -> tuple[str, tuple[float, float]]:
    """The condition that a day's or study's next attempt is due at `now`. `backoff`
    never waits longer than RETRY_CAP_SECONDS: an attempt set further ahead was set while
    the wall clock was ahead (months, years) and is due now that it has been corrected,
    else the run would sit idle until the clock caught up."""
    return due_condition("next_attempt_at", now, RETRY_CAP_SECONDS)


# --- runs ---------------------------------------------------------------------------

def create_run(conn: sqlite3.Connection, settings: RunSettings, days: Sequence[str], *,
               driver: Holder) -> int:
    """A new running run, claimed by `driver`, with a pending row per day and one for the
    studies without a StudyDate (UNDATED); refused while another is unfinished."""
    unfinished = conn.execute(
        "SELECT id FROM migration_runs WHERE state IN (?, ?)", UNFINISHED).fetchone()
    if unfinished is not None:
        raise MigrationError(
            f"migration run {unfinished[0]} is not finished",
            hint="`pacs-edge migrate resume` continues it; `pacs-edge migrate cancel` ends it")
    now = time.time()
    cur = conn.execute(
        "INSERT INTO migration_runs (peer, via, since_day, until_day, modalities, associations,"
        " rate_per_hour, time_window, query_limit, state, created_at, updated_at, driver)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (settings.peer, settings.via, settings.since_day, settings.until_day,
         ",".join(settings.modalities), settings.associations, settings.rate_per_hour,
         settings.time_window, settings.query_limit, RunState.RUNNING, now, now, str(driver)))
    run_id = int(cur.lastrowid or 0)
    conn.executemany("INSERT INTO migration_days (run_fk, day) VALUES (?, ?)",
                     [(run_id, day) for day in (*days, UNDATED)])
    return run_id


_RUN_COLUMNS = ("id, peer, via, since_day, until_day, modalities, associations, rate_per_hour,"
                " time_window, query_limit, state, created_at, updated_at, finished_at, driver,"
                " waiting_for, waiting_since, waiting_reason, stop_reason")


def _run(row: Any) -> Run:
    settings = RunSettings(row[1], row[2], row[3], row[4],
                           tuple(m for m in str(row[5]).split(",") if m), int(row[6]),
                           int(row[7]), row[8], int(row[9]))
    return Run(int(row[0]), settings, RunState(row[10]), float(row[11]), float(row[12]),
               None if row[13] is None else float(row[13]), str(row[14]), str(row[15]),
               None if row[16] is None else float(row[16]), str(row[17]), str(row[18]))


def latest_run(conn: sqlite3.Connection) -> Run | None:
    """The most recent run, finished or not."""
    row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM migration_runs ORDER BY id DESC LIMIT 1"
                       ).fetchone()
    return None if row is None else _run(row)


def run_by_id(conn: sqlite3.Connection, run_id: int) -> Run | None:
    row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM migration_runs WHERE id = ?",
                       (run_id,)).fetchone()
    return None if row is None else _run(row)


def change_run(conn: sqlite3.Connection, run_id: int, trigger: RunTrigger, *,
               reason: str = "") -> RunState:
    """Apply `trigger` to the run (RUN_STATES); returns the new state. `reason`: why the
    run pauses itself (kept until the next change)."""
    run = run_by_id(conn, run_id)
    if run is None:
        raise MigrationError(f"no migration run {run_id}")
    state = next_run_state(run.state, trigger)
    now = time.time()
    finished = now if state in (RunState.DONE, RunState.CANCELLED) else None
    conn.execute("UPDATE migration_runs SET state = ?, updated_at = ?, finished_at = ?,"
                 " stop_reason = ? WHERE id = ?", (state, now, finished, reason[:500], run_id))
    return state


def claim_run(conn: sqlite3.Connection, run_id: int, driver: Holder) -> None:
    """Make `driver` the process that drives the run; refused while another live one does
    (a killed driver's claim is taken over)."""
    run = run_by_id(conn, run_id)
    if run is None:
        raise MigrationError(f"no migration run {run_id}")
    pid = run.driver_pid
    if pid is not None and run.driver != str(driver):
        raise MigrationError(
            f"migration run {run_id} is being driven by process {pid}",
            hint="it goes on by itself: `pacs-edge migrate status` shows its progress")
    conn.execute("UPDATE migration_runs SET driver = ?, waiting_for = '', waiting_since = NULL,"
                 " waiting_reason = '' WHERE id = ?", (str(driver), run_id))


def release_run(conn: sqlite3.Connection, run_id: int, driver: Holder) -> None:
    """`driver` no longer drives the run (it stopped: done, paused, cancelled, Ctrl-C)."""
    conn.execute("UPDATE migration_runs SET driver = '', waiting_for = '', waiting_since = NULL,"
                 " waiting_reason = '' WHERE id = ? AND driver = ?", (run_id, str(driver)))


def set_waiting(conn: sqlite3.Connection, run_id: int, what: Waiting, reason: str) -> None:
    """The run's driver waits for `what` (because of `reason`); since now, or since it
    began waiting for it (several workers wait for the same outage)."""
    conn.execute("UPDATE migration_runs SET waiting_since = CASE WHEN waiting_for = ?"
                 " THEN waiting_since ELSE ? END, waiting_for = ?, waiting_reason = ?"
                 " WHERE id = ?", (what, time.time(), what, reason[:300], run_id))


def clear_waiting(conn: sqlite3.Connection, run_id: int, what: Waiting) -> None:
    """The run's driver no longer waits for `what`."""
    conn.execute("UPDATE migration_runs SET waiting_for = '', waiting_since = NULL,"
                 " waiting_reason = '' WHERE id = ? AND waiting_for = ?", (run_id, what))


def retry_failed(conn: sqlite3.Connection, run_id: int) -> int:
    """Make the run's failed days and studies pending again, attempts reset; returns how
    many. A done run becomes running again when there was something to retry."""
    now = time.time()
    changed = 0
    for table in ("migration_days", "migration_studies"):
        changed += conn.execute(
            f"UPDATE {table} SET state = 'pending', attempts = 0, next_attempt_at = 0"
            " WHERE run_fk = ? AND state = 'failed'", (run_id,)).rowcount
    if changed:
        conn.execute("UPDATE migration_runs SET state = ?, updated_at = ?, finished_at = NULL"
                     " WHERE id = ? AND state = ?", (RunState.RUNNING, now, run_id, RunState.DONE))
    return changed


# --- days ---------------------------------------------------------------------------

def due_days(conn: sqlite3.Connection, run_id: int, now: float) -> list[str]:
    """Pending days whose next attempt is due, newest first (recent studies matter most).
    One set more than RETRY_CAP_SECONDS ahead predates a backward step of the wall
    clock: it is due (`_due`)."""
    is_due, due_args = _due(now)
    return [str(r[0]) for r in conn.execute(
        "SELECT day FROM migration_days WHERE run_fk = ? AND state = 'pending'"
        f" AND {is_due} ORDER BY day DESC", (run_id, *due_args)).fetchall()]


def list_day(conn: sqlite3.Connection, run_id: int, day: str, found: Iterable[FoundStudy],
             queries: int, *, warning: str = "") -> None:
    """Record every study of `day` and mark the day done, with `warning` when the legacy
    PACS could not list all of it, in one transaction. A study listed again (a crash
    before this commit, or a retry) keeps its row and state."""
    now = time.time()
    rows = [(run_id, day, s.study_uid, s.expected_instances, now) for s in found]
    conn.executemany(
        "INSERT INTO migration_studies (run_fk, day, study_uid, expected_instances, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_fk, study_uid) DO UPDATE SET"
        " expected_instances = COALESCE(migration_studies.expected_instances,"
        " excluded.expected_instances)", rows)
    conn.execute("UPDATE migration_days SET state = 'done', queries = ?, studies = ?,"
                 " error_kind = '', last_error = ? WHERE run_fk = ? AND day = ?",
                 (queries, len(rows), warning[:500], run_id, day))


def fail_day(conn: sqlite3.Connection, run_id: int, day: str, kind: MigrationFailure,
             error: str, *, max_attempts: int, retry_base_seconds: float) -> bool:
    """Count a failed listing of `day`; True when it is now failed for good."""
    return _fail("migration_days", "run_fk = ? AND day = ?", (run_id, day), conn, kind, error,
                 max_attempts=max_attempts, retry_base_seconds=retry_base_seconds)


# --- studies ------------------------------------------------------------------------

def due_studies(conn: sqlite3.Connection, run_id: int, now: float, limit: int) -> list[StudyTask]:
    """Pending studies whose next attempt is due: newest day first, first tries first.
    One set more than RETRY_CAP_SECONDS ahead predates a backward step of the wall
    clock: it is due (`_due`)."""
    is_due, due_args = _due(now)
    return [StudyTask(int(r[0]), str(r[1]), str(r[2]), None if r[3] is None else int(r[3]),
                      int(r[4])) for r in conn.execute(
        "SELECT id, study_uid, day, expected_instances, attempts FROM migration_studies"
        f" WHERE run_fk = ? AND state = 'pending' AND {is_due}"
        " ORDER BY attempts, day DESC, id LIMIT ?", (run_id, *due_args, limit)).fetchall()]


def study_done(conn: sqlite3.Connection, study_id: int, *, expected: int, received: int,
               shared: int, fetched: bool = True) -> None:
    """The box holds the whole study; `fetched`: by a transfer of this attempt (False:
    it was complete before, and it stays out of the pace)."""
    conn.execute(
        "UPDATE migration_studies SET state = 'done', attempts = attempts + 1,"
        " expected_instances = ?, received_instances = ?, shared_instances = ?,"
        " error_kind = '', last_error = '', updated_at = ?, fetched = ? WHERE id = ?",
        (expected, received, shared, time.time(), int(fetched), study_id))


def study_failed(conn: sqlite3.Connection, study_id: int, kind: MigrationFailure, error: str,
                 *, received: int, expected: int | None = None, max_attempts: int,
                 retry_base_seconds: float) -> bool:
    """Count a failed attempt, with the instances the study was counted to hold when that
    is known (else the listing's count stays); True when it is now failed for good."""
    conn.execute("UPDATE migration_studies SET received_instances = ?,"
                 " expected_instances = COALESCE(?, expected_instances) WHERE id = ?",
                 (received, expected, study_id))
    return _fail("migration_studies", "id = ?", (study_id,), conn, kind, error,
                 max_attempts=max_attempts, retry_base_seconds=retry_base_seconds)


def _fail(table: str, where: str, key: tuple[object, ...], conn: sqlite3.Connection,
          kind: MigrationFailure, error: str, *, max_attempts: int,
          retry_base_seconds: float) -> bool:
    row = conn.execute(f"SELECT attempts FROM {table} WHERE {where}", key).fetchone()
    attempts = int(row[0]) + 1 if row else 1
    final = attempts >= max_attempts
    now = time.time()
    conn.execute(
        f"UPDATE {table} SET attempts = ?, state = ?, next_attempt_at = ?, error_kind = ?,"
        f" last_error = ?{', updated_at = ?' if table == 'migration_studies' else ''}"
        f" WHERE {where}",
        (attempts, "failed" if final else "pending", now + backoff(attempts, retry_base_seconds),
         kind.value, error[:500], *((now,) if table == "migration_studies" else ()), *key))
    return final


def done_studies(conn: sqlite3.Connection, run_id: int) -> list[StudyTask]:
    """The studies the run migrated (state done), newest day first."""
    return [StudyTask(int(r[0]), str(r[1]), str(r[2]), None if r[3] is None else int(r[3]),
                      int(r[4])) for r in conn.execute(
        "SELECT id, study_uid, day, expected_instances, attempts FROM migration_studies"
        " WHERE run_fk = ? AND state = 'done' ORDER BY day DESC, id", (run_id,)).fetchall()]


def verify_failed(conn: sqlite3.Connection, study_id: int, *, listed: int,
                  missing: int) -> None:
    """A done study of which the box lacks `missing` of the `listed` instances the legacy
    PACS lists now: failed, incomplete, for `migrate resume --retry-failed`. Its
    updated_at stays: the pace counts transfers, not checks."""
    conn.execute(
        "UPDATE migration_studies SET state = 'failed', error_kind = ?, last_error = ?,"
        " expected_instances = ?, received_instances = ? WHERE id = ?",
        (MigrationFailure.INCOMPLETE.value,
         f"verify: {missing} of {listed} instances the legacy PACS lists are not in the box",
         listed, listed - missing, study_id))


# --- reads --------------------------------------------------------------------------

def summary(conn: sqlite3.Connection, run_id: int) -> RunSummary:
    """The run's counts; days are the dated ones, the UNDATED listing is apart."""
    days = conn.execute(
        "SELECT SUM(day != ?), SUM(day != ? AND state = 'done'),"
        " SUM(day != ? AND state = 'failed'),"
        " MIN(CASE WHEN state = 'pending' AND attempts > 0 THEN next_attempt_at END),"
        " MAX(CASE WHEN day = ? THEN state END)"
        " FROM migration_days WHERE run_fk = ?", (*(UNDATED,) * 4, run_id)).fetchone()
    studies = conn.execute(
        "SELECT COUNT(*), SUM(state = 'done'), SUM(state = 'failed'),"
        " SUM(COALESCE(expected_instances, 0)), SUM(received_instances),"
        " SUM(shared_instances),"
        " MIN(CASE WHEN state = 'pending' AND attempts > 0 THEN next_attempt_at END),"
        " SUM(day = ?) FROM migration_studies WHERE run_fk = ?", (UNDATED, run_id)).fetchone()
    warnings = tuple(str(r[0]) for r in conn.execute(
        "SELECT last_error FROM migration_days WHERE run_fk = ? AND state = 'done'"
        " AND last_error != '' ORDER BY day DESC", (run_id,)).fetchall())
    waits = [w for w in (days[3], studies[6]) if w is not None]
    return RunSummary(int(days[0] or 0), int(days[1] or 0), int(days[2] or 0),
                      int(studies[0]), int(studies[1] or 0), int(studies[2] or 0),
                      int(studies[3] or 0), int(studies[4] or 0), int(studies[5] or 0),
                      min(waits) if waits else None, str(days[4] or ""),
                      int(studies[7] or 0), warnings, *pace_and_count(conn, run_id, time.time()))


def pace(conn: sqlite3.Connection, run_id: int, now: float,
         window: float = PACE_WINDOW_SECONDS) -> Pace | None:
    """The pace of the studies finished in the `window` seconds before `now`: those after
    the first of them, over the time from the first to `now` (so a stall slows it down).
    None with fewer than two: too early to tell, or nothing finished lately.
    Only studies that took a transfer count (`fetched`): one found complete before it is
    done in no time (after a kill, those the killed process transferred but did not
    record; studies the box held already), and a few of them within a second would
    make thousands an hour. Studies finished before a resume count with the time
    between them and `now`, gap included: they can slow the pace down, never speed it
    up."""
    return pace_and_count(conn, run_id, now, window)[0]


def pace_and_count(conn: sqlite3.Connection, run_id: int, now: float,
                   window: float = PACE_WINDOW_SECONDS) -> tuple[Pace | None, int]:
    """`pace`, and how many fetched studies finished in the window (one is too few for
    a pace, and is not a stall)."""
    finished = conn.execute(
        "SELECT updated_at, received_instances FROM migration_studies WHERE run_fk = ?"
        " AND state IN ('done', 'failed') AND fetched = 1 AND updated_at BETWEEN ? AND ?"
        " ORDER BY updated_at", (run_id, now - window, now)).fetchall()
    if len(finished) < 2 or now <= float(finished[0][0]):
        return None, len(finished)
    hours = (now - float(finished[0][0])) / 3600.0
    return (Pace((len(finished) - 1) / hours, sum(int(r[1]) for r in finished[1:]) / hours),
            len(finished))


def failures(conn: sqlite3.Connection, run_id: int, *, include_retrying: bool = True
             ) -> list[Failure]:
    """Failed days and studies, and (with include_retrying) those waiting for a retry."""
    states = ("failed", "pending") if include_retrying else ("failed", "failed")
    out = [Failure("day", str(r[0]), "", int(r[1]), str(r[2]), str(r[3]), None, 0)
           for r in conn.execute(
               "SELECT day, attempts, error_kind, last_error FROM migration_days"
               " WHERE run_fk = ? AND state IN (?, ?) AND error_kind != '' ORDER BY day DESC",
               (run_id, *states)).fetchall()]
    out += [Failure("study", str(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4]),
                    None if r[5] is None else int(r[5]), int(r[6]))
            for r in conn.execute(
                "SELECT day, study_uid, attempts, error_kind, last_error, expected_instances,"
                " received_instances FROM migration_studies WHERE run_fk = ? AND state IN (?, ?)"
                " AND error_kind != '' ORDER BY day DESC, id", (run_id, *states)).fetchall()]
    return out


def box_instance_count(conn: sqlite3.Connection, study_uid: str) -> int:
    """Instances of the study the box holds now (0 when it holds none)."""
    row = conn.execute("SELECT instance_count FROM studies WHERE study_uid = ?",
                       (study_uid,)).fetchone()
    return int(row[0]) if row else 0


def held_sop_uids(conn: sqlite3.Connection, sop_uids: Sequence[str]) -> set[str]:
    """Which of `sop_uids` the box holds, as a current instance of any study or as a
    prior version (a UID two legacy studies share is held once, plus its versions)."""
    held: set[str] = set()
    for start in range(0, len(sop_uids), 500):
        chunk = list(sop_uids[start:start + 500])
        marks = ",".join("?" * len(chunk))
        held.update(str(r[0]) for r in conn.execute(
            f"SELECT sop_uid FROM instances WHERE sop_uid IN ({marks})"
            f" UNION SELECT sop_uid FROM instance_versions WHERE sop_uid IN ({marks})",
            (*chunk, *chunk)).fetchall())
    return held
