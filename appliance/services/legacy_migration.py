"""`pacs-edge migrate`: walk a legacy PACS day by day and pull every study into the box.

The walk, for one run (store/migration_rows.py keeps every step):
1. List: for each pending day of the range (newest first), C-FIND at STUDY level.
   A query that gets the peer's result limit (`query_limit` answers, or a failure
   status after some answers) may be missing studies, so it is split: the day
   into hours, an hour into halves down to one minute (StudyTime ranges up to
   the last fraction of a second), a minute by modality (with --modality). A
   study without a StudyTime matches no range (PS3.4 C.2.2.2.5): on a day
   that had to be split it is found only if the peer returned it among the
   day's first (limited) answers, and the log says so for that day.
   Every study found, and the day itself, are committed together; a crash
   mid-day lists the day again. A day with no study is logged at DEBUG only
   (a run over decades has thousands).
   Then the studies without a StudyDate, which no day matches (_UndatedWalk):
   the same split over the whole archive, each slice asked with every date
   and with every comparable date; what only the first lists has none. What
   the peer's limit keeps it from listing is a warning in the run's summary.
2. Transfer, `associations` studies at once, each worker on its own association
   (LegacySession) for many studies: count what the study should hold
   (NumberOfStudyRelatedInstances, else the series' NumberOfSeriesRelatedInstances,
   else its image-level answers), skip it when the box already holds every one of
   its SOP Instance UIDs (a resumed run never fetches a complete study again), else
   C-MOVE it to the box's AE (or C-GET it), then verify. The box counts the study's
   instances; if short, the image-level answers say which SOP Instance UIDs the box
   lacks: a UID that another study also uses is held once (with the other copy as a
   prior version) and counts as shared, not missing. A study the box held some of
   before the transfer is always checked by UID: what it held may include instances
   the legacy PACS never had (a note a viewer added to a prefetched prior), and a
   count would take them for the legacy instances it lacks.
3. A failure (no association, a failure status, missing instances) is retried
   after a backoff (`retry_base_seconds`, doubled, at most an hour) up to
   `max_attempts`, then listed by `migrate failures` with its kind and reason.
   Not when the box itself was away: a C-MOVE that failed while this box's own
   DICOM port takes no connection (`pacs-edge serve` stopped, restarting, killed)
   says nothing about the study, so it is not counted; the worker waits, reading
   the run's state, until the port answers, and the study is tried again then.
   The run's row says so meanwhile (migration_rows.set_waiting) for `migrate status`.
   Nor when the legacy PACS is away (stopped, restarting, refusing associations):
   a failure of kind UNREACHABLE (no association, or one aborted mid-request) is
   checked by opening a new association; when none opens either, the worker waits,
   trying again after `legacy_probe_seconds` doubled up to LEGACY_PROBE_CAP_SECONDS,
   and the study or day is tried again once it answers. A study the legacy PACS
   answers with a failure status is the study's and counts. Only for a legacy PACS
   this run has reached before: one it never reached (a wrong host or port in the
   allowlist) fails its days as before, so that a configuration error is listed by
   `migrate failures` instead of hiding behind an endless wait.
   Counted, a restart of serve would burn every study's attempts in seconds.
   An answer every study would get pauses the run at once instead, counting nothing:
   an association rejected for good for an AE title (at any time), a C-FIND refused
   or a retrieve status of legacy_statuses' RUN verdict.

Throttling, so that the old PACS keeps serving its users: `associations` at once,
study starts spaced to at most `rate_per_hour`, and only inside `time_window`
(local time, e.g. 20:00-06:00); outside it the run waits, holding no association
(nor through a wait for the rate of more than IDLE_HOLD_SECONDS). `migrate pause` and
`migrate cancel` change the run's row; workers read it before each study.

The SCU is an edge (appliance/dimse/legacy_scu.py) handed in by the command line
(the LegacySource protocol): this module decides, the edge speaks DICOM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Protocol

from appliance.base import logsafe
from appliance.base.bridge import LoopBridge
from appliance.base.errors import LegacyPeerError, MigrationError, MigrationFailure
from appliance.services.legacy_statuses import StatusRule, Verdict, find_rule, retrieve_rule
from appliance.services.peers import Peer
from appliance.store import database
from appliance.store import migration_rows as rows
from appliance.store.index import Index

log = logging.getLogger(__name__)

_SUCCESS, _WARNING = 0x0000, 0xB000
STATE_CHECK_SECONDS = 5.0  # longest sleep before the run's state is read again
BOX_PROBE_SECONDS = 1.0  # while the box's DICOM port is away: how often to try it
LEGACY_PROBE_CAP_SECONDS = 60.0  # longest wait between two tries of an away legacy PACS
# A worker's association is released before a wait longer than this. Legacy PACSs close
# an idle one themselves (Orthanc after 30 s, dcmtk after 60 s): one kept through a longer
# wait could be closed under the next request, which would then fail the study.
IDLE_HOLD_SECONDS = 10.0
_MINUTES = 24 * 60


@dataclass(frozen=True)
class StudyAnswer:
    study_uid: str
    study_time: str
    modalities: tuple[str, ...]
    instances: int | None  # NumberOfStudyRelatedInstances, when the peer answers it


@dataclass(frozen=True)
class FindResult:
    answers: list[StudyAnswer]
    limited: bool  # the peer's result limit was hit: the answers may be incomplete


@dataclass(frozen=True)
class Listing:
    """What one listing (a day, or the studies without a date) found, the C-FINDs it
    took, and what the peer's limit kept it from listing ('' when nothing)."""

    studies: list[rows.FoundStudy]
    queries: int
    warning: str = ""


@dataclass(frozen=True)
class RetrieveOutcome:
    status: int
    completed: int
    failed: int
    warning: int
    refused_for_good: int = 0  # C-GET sub-operations this box refused for good

    @property
    def all_refused_for_good(self) -> bool:
        """Nothing arrived and this box refused every sub-operation with a status that
        the same instance would get again (legacy_statuses.PERMANENT_STORE_REFUSALS)."""
        return not self.completed and 0 < self.failed <= self.refused_for_good

    @property
    def ok(self) -> bool:
        return self.status in (_SUCCESS, _WARNING)


class LegacySession(Protocol):
    @property
    def alive(self) -> bool: ...

    def find_studies(self, day: str, *, time_range: str = "", modality: str = "",
                     limit: int) -> FindResult: ...

    def series_of(self, study_uid: str) -> list[tuple[str, int | None]]: ...

    def instances_of(self, study_uid: str) -> list[tuple[str, str]]: ...

    def move_study(self, study_uid: str, destination: str) -> RetrieveOutcome: ...


class LegacySource(Protocol):
    """The legacy PACS as the walk uses it (appliance/dimse/legacy_scu.LegacyPeer)."""

    def session(self) -> AbstractContextManager[LegacySession]: ...

    def get_study(self, study_uid: str, sop_classes: Sequence[str]) -> RetrieveOutcome: ...

    def probe(self) -> None:
        """Open an association and release it; LegacyPeerError when none opens."""


class MigrationAudit(Protocol):
    """The audit trail of the requests the run sends the legacy PACS (cli/migrate_setup
    composes it): one record per listing and per study transferred, never per instance."""

    def listed(self, day: str, *, queries: int, studies: int, reason: str = "") -> None: ...

    def retrieved(self, study_uid: str, outcome: RetrieveOutcome, *, reason: str = "") -> None: ...


def check_peer(peer: Peer, via: str) -> None:
    """Refuse a peer that a migration `via` move or get cannot use, saying what to fix.
    Move needs store too: the legacy PACS's sub-operations are C-STOREs to this box."""
    needed = ("find", "move", "store") if via == "move" else ("find", "get")
    missing = [p for p in needed if not peer.may(p)]
    if not peer.port or missing:
        what = f"permission {','.join(missing)}" if missing else "a port"
        raise MigrationError(
            f"peer {peer.name!r} lacks {what} for a migration via C-{via.upper()}",
            hint=f"pacs-edge peers add {peer.name} --ae-title {peer.ae_title} --host"
                 f" {peer.host} --port PORT --allow {','.join(sorted(set(needed) | peer.allow))}")


EARLIEST_DAY = date(1900, 1, 1)


def days_between(since: str, until: str) -> list[str]:
    """Every day from `since` to `until` (YYYYMMDD, inclusive)."""
    first, last = _day(since, "--since"), _day(until, "--until")
    if first > last:
        raise MigrationError(f"--since {since} is after --until {until}")
    return [(first + timedelta(days=n)).strftime("%Y%m%d") for n in range((last - first).days + 1)]


def _day(value: str, option: str) -> date:
    try:
        day = datetime.strptime(value.replace("-", ""), "%Y%m%d").date()
    except ValueError:
        raise MigrationError(f"{option} {value!r} is not a date",
                             hint="write dates as YYYY-MM-DD or YYYYMMDD") from None
    if day < EARLIEST_DAY:  # one row per day is listed: year 1 would be 740,000 of them
        raise MigrationError(f"{option} {value!r} is before {EARLIEST_DAY:%Y-%m-%d}",
                             hint="no archive holds a study that old")
    return day


@dataclass(frozen=True)
class Window:
    """A local time window HH:MM-HH:MM, which may span midnight; empty = always open."""

    text: str = ""

    def _bounds(self) -> tuple[int, int]:
        start, _, end = self.text.partition("-")
        return _minute(start), _minute(end)

    def seconds_until_open(self, now: datetime) -> float:
        if not self.text:
            return 0.0
        start, end = self._bounds()
        minute = now.hour * 60 + now.minute
        inside = start <= minute < end if start < end else (minute >= start or minute < end)
        if inside:
            return 0.0
        wait = (start - minute) % _MINUTES
        return wait * 60.0 - now.second


def _time_range(first: int, last: int) -> str:
    """A StudyTime range from the start of minute `first` to the end of minute `last`,
    fractions included: an archive compares times as times, and "103059.5" is after
    "103059" (dcmqrscp leaves it out of "103000-103059")."""
    return f"{_clock(first)}00-{_clock(last)}59.999999"


def _clock(minute: int) -> str:
    """HHMM of a minute of the day."""
    return f"{minute // 60:02d}{minute % 60:02d}"


def _minute(text: str) -> int:
    hours, _, minutes = text.partition(":")
    return int(hours) * 60 + int(minutes)


class Throttle:
    """Spaces study starts to at most `rate_per_hour` (0: no spacing) across workers."""

    def __init__(self, rate_per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 3600.0 / rate_per_hour if rate_per_hour else 0.0
        self.clock = clock
        self._next = clock()
        self._lock = threading.Lock()

    def slot(self) -> float:
        """Claim the next start; returns how long to wait for it."""
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
            return start - now


@dataclass
class _Work:
    """The studies one transfer round hands to its workers."""

    tasks: list[rows.StudyTask]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> rows.StudyTask | None:
        with self.lock:
            return self.tasks.pop(0) if self.tasks else None


class Migration:
    """One run of a migration, driven until it is done, paused or cancelled."""

    def __init__(self, index: Index, run: rows.Run, source: LegacySource, *, box_ae: str,
                 max_attempts: int, retry_base_seconds: float,
                 box_listening: Callable[[], bool] | None = None,
                 legacy_probe_seconds: float = 5.0,
                 audit: MigrationAudit | None = None) -> None:
        """`box_listening` says whether this box's DICOM port takes connections (where
        a C-MOVE delivers); None when that cannot be told or does not matter (C-GET).
        `legacy_probe_seconds`: the first wait before an away legacy PACS is tried again."""
        self.index = index
        self.run = run
        self.settings = run.settings
        self.source = source
        self.box_ae = box_ae
        self.max_attempts = max_attempts
        self.retry_base = retry_base_seconds
        self.box_listening = box_listening
        self.legacy_probe = legacy_probe_seconds
        self.audit = audit
        self._legacy_reached = threading.Event()  # an association to it opened in this run
        self.window = Window(run.settings.time_window)
        self.throttle = Throttle(run.settings.rate_per_hour)
        self._bridge: LoopBridge | None = None
        self._stopping = threading.Event()
        self._no_series_counts = threading.Event()  # one C-FIND per study saved
        self.stopped: MigrationError | None = None  # why the run paused itself
        self._stop_lock = threading.Lock()

    # --- the loop ------------------------------------------------------------------

    async def drive(self) -> rows.RunState:
        """List and transfer until nothing is left (the run is then done) or the run is
        paused or cancelled; returns the state it ended in. Cancelled (Ctrl-C), it lets
        the workers finish the studies they are transferring and start no other."""
        try:
            return await self._drive()
        except asyncio.CancelledError:
            self._stopping.set()
            raise

    async def _drive(self) -> rows.RunState:
        self._bridge = LoopBridge(asyncio.get_running_loop())
        log.info("migration running run=%d peer=%s via=%s", self.run.id, self.settings.peer,
                 self.settings.via)
        started = await database.run_sync(self.index.reader, rows.summary, self.run.id)
        if started.days_done or started.undated == "done":  # a resume: it was reached
            self._legacy_reached.set()
        while True:
            state = await self._state()
            if state is not rows.RunState.RUNNING:
                return state
            wait = self.window.seconds_until_open(datetime.now())
            if wait > 0:
                await asyncio.sleep(min(wait, STATE_CHECK_SECONDS))
                continue
            now = time.time()
            days = await database.run_sync(self.index.reader, rows.due_days, self.run.id, now)
            if days:
                await asyncio.to_thread(self._list_days, days)
                continue
            tasks = await database.run_sync(self.index.reader, rows.due_studies, self.run.id,
                                            now, 10_000)
            if tasks:
                work = _Work(tasks)
                workers = min(self.settings.associations, len(tasks))
                await asyncio.gather(*(asyncio.to_thread(self._worker, work)
                                       for _ in range(workers)))
                continue
            summary = await database.run_sync(self.index.reader, rows.summary, self.run.id)
            if summary.finished:
                state = await self._write(rows.change_run, self.run.id, rows.RunTrigger.FINISH)
                log.info("migration finished run=%d studies_done=%d studies_failed=%d"
                         " days_failed=%d", self.run.id, summary.studies_done,
                         summary.studies_failed, summary.days_failed)
                return state
            wait = (summary.next_attempt_at or now) - now
            await asyncio.sleep(max(0.05, min(wait, STATE_CHECK_SECONDS)))

    async def _state(self) -> rows.RunState:
        run = await database.run_sync(self.index.reader, rows.run_by_id, self.run.id)
        if run is None:
            raise MigrationError(f"migration run {self.run.id} vanished from the index")
        return run.state

    async def _write(self, fn: Callable[..., rows.RunState], *args: object) -> rows.RunState:
        assert self.index.writer is not None
        return await self.index.writer.submit_sync(lambda conn: fn(conn, *args))

    def _call(self, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        """A store write from a worker thread, through the loop's writer."""
        assert self._bridge is not None and self.index.writer is not None
        writer = self.index.writer
        return self._bridge.call(writer.submit_sync(lambda conn: fn(conn, *args, **kwargs)))

    def _read(self, fn: Callable[..., object], *args: object) -> object:
        assert self._bridge is not None
        return self._bridge.call(database.run_sync(self.index.reader, fn, *args))

    def _running(self) -> bool:
        if self._stopping.is_set():
            return False
        run = self._read(rows.run_by_id, self.run.id)
        running = isinstance(run, rows.Run) and run.state is rows.RunState.RUNNING
        if not running:
            self._stopping.set()
        return running

    # --- listing -------------------------------------------------------------------

    def _list_days(self, days: Sequence[str]) -> None:
        """List days on one association (in a worker thread), committing each day."""
        try:
            with self.source.session() as session:
                self._legacy_reached.set()
                for day in days:
                    if not self._running():
                        return
                    if not session.alive:
                        return  # the next round opens a new association
                    walk = (_UndatedWalk(session, self.settings) if day == rows.UNDATED
                            else _DayWalk(session, day, self.settings))
                    try:
                        listing = walk.walk()
                    except LegacyPeerError as exc:
                        if self._legacy_was_away(exc):
                            return  # not counted: the next round lists the day again
                        if self.audit is not None:
                            self.audit.listed(day, queries=walk.queries,
                                              studies=len(walk.found), reason=exc.message)
                        if self._refused_for_the_run(exc):
                            return  # not counted: the day is listed once the run resumes
                        self._day_failed(day, exc)
                        continue
                    self._call(rows.list_day, self.run.id, day, listing.studies,
                               listing.queries, warning=listing.warning)
                    if self.audit is not None:
                        self.audit.listed(day, queries=listing.queries,
                                          studies=len(listing.studies))
                    # Thousands of empty days on a terminal would bury the progress bar.
                    log.log(logging.INFO if listing.studies or listing.queries > 1
                            else logging.DEBUG,
                            "migration day listed run=%d day=%s studies=%d queries=%d",
                            self.run.id, day or "undated", len(listing.studies),
                            listing.queries)
                    if listing.warning:
                        log.warning("migration listing incomplete run=%d day=%s reason=%s",
                                    self.run.id, day or "undated", listing.warning)
        except LegacyPeerError as exc:
            if self._refused_for_the_run(exc) or self._legacy_was_away(exc):
                return
            for day in days[:1]:  # no association at all: count it against the first day
                self._day_failed(day, exc)

    def _day_failed(self, day: str, exc: LegacyPeerError) -> None:
        final = self._call(rows.fail_day, self.run.id, day, exc.kind, exc.message,
                           max_attempts=self.max_attempts, retry_base_seconds=self.retry_base)
        log.warning("migration day failed run=%d day=%s kind=%s final=%s reason=%s",
                    self.run.id, day or "undated", exc.kind.value, final, exc.message)

    # --- transfer ------------------------------------------------------------------

    def _worker(self, work: _Work) -> None:
        """Transfer studies from `work` until none is left, on one association kept open
        from study to study. It is opened once the study's slot has come: released before
        a wait for the slot or the window longer than IDLE_HOLD_SECONDS, and opened again
        when the peer (or [dicom] network_timeout) closed it meanwhile."""
        with ExitStack() as opened:
            session: LegacySession | None = None
            while not self._stopping.is_set():
                task = work.take()
                if task is None or not self._wait_for_slot(release=opened.close):
                    return
                if session is None or not session.alive:
                    opened.close()
                    try:
                        session = opened.enter_context(self.source.session())
                    except LegacyPeerError as exc:
                        session = None
                        if not (self._refused_for_the_run(exc)  # paused, or away: the
                                or self._legacy_was_away(exc)):  # next round retries
                            self._study_failed(task, exc,
                                               received=self._box_count(task.study_uid))
                        continue
                    self._legacy_reached.set()
                self._transfer(session, task)

    def _wait_for_slot(self, release: Callable[[], None]) -> bool:
        """Sleep for the throttle and the window; False when the run stopped meanwhile.
        `release` (the worker's association) is called once the wait left is longer than
        IDLE_HOLD_SECONDS: at the start, or when the window closes during the wait.

        The window is asked again after each step, never counted down: its wait is in
        wall-clock minutes, and on the night daylight saving starts a window that opens
        after the skipped hour opens an hour sooner than that count (and the clock may
        be stepped)."""
        slot_at = self.throttle.clock() + self.throttle.slot()
        while True:
            if not self._running():
                return False
            wait = max(slot_at - self.throttle.clock(),
                       self.window.seconds_until_open(datetime.now()))
            if wait <= 0:
                return True
            if wait > IDLE_HOLD_SECONDS:
                release()
            time.sleep(min(wait, STATE_CHECK_SECONDS))

    def _transfer(self, session: LegacySession, task: rows.StudyTask) -> None:
        uid = task.study_uid
        expected: int | None = None  # known once counted: kept with a failure too
        for_good = False  # a retry would get the same answer: fail the study now
        try:
            expected, instances = self._expected(session, task)
            # Already complete (a run killed after the transfer, before its row): no fetch.
            held_before = self._box_count(uid) > 0
            if held_before and self._complete(session, task, expected, instances, by_uid=True,
                                              fetched=False):
                return
            if self.settings.via == "get":
                if instances is None:
                    instances = session.instances_of(uid)
                outcome = self.source.get_study(uid, sorted({c for _, c in instances if c}))
            else:
                outcome = session.move_study(uid, self.box_ae)
            if self.audit is not None:
                self.audit.retrieved(uid, outcome, reason="" if outcome.ok
                                     else f"status 0x{outcome.status:04X}")
            if self._complete(session, task, expected, instances, by_uid=held_before):
                return
            verb = "C-GET" if self.settings.via == "get" else "C-MOVE"
            rule = None if outcome.ok else retrieve_rule(outcome.status)
            if rule is not None and rule.verdict is Verdict.RUN:
                self._stop_run(verb, outcome.status, rule)
                return  # not counted: the study is tried again once the run resumes
            for_good = outcome.all_refused_for_good or (
                rule is not None and rule.verdict is Verdict.STUDY)
            raise LegacyPeerError(
                MigrationFailure.INCOMPLETE if outcome.ok else MigrationFailure.RETRIEVE_FAILED,
                f"{expected - self._box_count(uid)} of {expected} instances not in the box after"
                f" the {verb} (status 0x{outcome.status:04X}"
                + (f" {rule.meaning}" if rule is not None else "")
                + f", completed {outcome.completed}, failed {outcome.failed})"
                + (": not retried, the same instances would be refused again"
                   if outcome.all_refused_for_good
                   else ": not retried, a retry would get the same answer" if for_good
                   else "")
                + (self._failed_hint(verb) if outcome.failed else ""))
        except LegacyPeerError as exc:
            if self._box_was_away() or self._refused_for_the_run(exc) or self._legacy_was_away(exc):
                return  # not counted: the study stays due and is tried again
            self._study_failed(task, exc, received=self._box_count(uid), expected=expected,
                               for_good=for_good)

    def _refused_for_the_run(self, exc: LegacyPeerError) -> bool:
        """Whether `exc` is an answer every study would get: an association rejected for
        good for an AE title, or a C-FIND refusal (legacy_statuses: RUN); if so, the run
        is paused. Checked before _legacy_was_away, which would wait for ever for one."""
        if exc.rejected_for_good:
            self._pause(f"{exc.message}: every study would get the same answer, so the run is"
                        " paused", f"{exc.hint}; then `pacs-edge migrate resume`")
            return True
        if exc.kind is not MigrationFailure.QUERY_FAILED or exc.status is None:
            return False
        rule = find_rule(exc.status)
        if rule.verdict is not Verdict.RUN:
            return False
        self._stop_run("C-FIND", exc.status, rule)
        return True

    def _stop_run(self, verb: str, status: int, rule: StatusRule) -> None:
        """A status every study would get (legacy_statuses: RUN): pause the run at once,
        saying what to fix, instead of burning every study's attempts on it."""
        message = (f"the legacy PACS {self.settings.peer!r} refused a {verb} with status"
                   f" 0x{status:04X} ({rule.meaning}): every study would get the same answer,"
                   " so the run is paused")
        if status == 0xA801:
            hint = (f"on the legacy PACS, add this box as a move destination: AE title"
                    f" {self.box_ae!r} with this box's address and its [dicom] port")
        elif verb == "C-FIND":
            hint = (f"allow this box's AE title {self.box_ae!r} to query (Study Root C-FIND) on"
                    " the legacy PACS; its log says why it refused")
        else:
            hint = ("allow this box's AE title to retrieve on the legacy PACS, or migrate"
                    f" --via {'move' if verb == 'C-GET' else 'get'}")
        self._pause(message, hint + "; then `pacs-edge migrate resume`")

    def _pause(self, message: str, hint: str) -> None:
        """Pause the run (once, whichever worker comes first), saying what to fix."""
        with self._stop_lock:
            if self.stopped is not None:
                return
            self.stopped = MigrationError(message, hint=hint)
            self._stopping.set()
        log.error("migration paused: %s run=%d", message, self.run.id)
        # An operator paused or cancelled it meanwhile: that state stays.
        with contextlib.suppress(MigrationError):
            self._call(rows.change_run, self.run.id, rows.RunTrigger.PAUSE,
                       reason=f"{message}; {hint}")

    def _failed_hint(self, verb: str) -> str:
        """Where the reason for failed sub-operations is: the box logs each instance it
        refuses; what the legacy PACS could not even offer is in its own log."""
        where = ("this command's log (`migrated instance refused`)" if verb == "C-GET"
                 else "pacs-edge serve's log (`store refused`, calling= the legacy PACS)")
        return (f": {where} names each instance the box refused and why (e.g. an invalid"
                " UID); none there: the legacy PACS could not send them (e.g. no presentation"
                " context for a private SOP class not in [dicom] extra_storage_classes),"
                " see its log")

    def _box_was_away(self) -> bool:
        """Whether this box's DICOM port takes no connection now; if so, wait until it
        does (or the run stops), in bounded steps."""
        if self.box_listening is None or self.box_listening():
            return False
        self._call(rows.set_waiting, self.run.id, rows.Waiting.SERVE,
                   "this box's DICOM port takes no connection: is pacs-edge serve running?")
        log.warning("migration waiting for this box's DICOM port to accept connections"
                    " (is pacs-edge serve running?) run=%d", self.run.id)
        try:
            while self._running() and not self.box_listening():
                time.sleep(BOX_PROBE_SECONDS)
        finally:
            self._call(rows.clear_waiting, self.run.id, rows.Waiting.SERVE)
        log.info("migration goes on run=%d", self.run.id)
        return True

    def _legacy_was_away(self, exc: LegacyPeerError) -> bool:
        """Whether `exc` came from a legacy PACS this run reached before and that takes
        no association now; if so, wait until it does (or the run stops), trying it
        after a back-off doubled from `legacy_probe_seconds` up to a minute."""
        if (exc.kind is not MigrationFailure.UNREACHABLE or not self._legacy_reached.is_set()
                or self._legacy_answers()):
            return False
        self._call(rows.set_waiting, self.run.id, rows.Waiting.LEGACY, exc.message)
        log.warning("migration waiting for the legacy PACS to accept associations run=%d"
                    " reason=%s", self.run.id, exc.message)
        began, delay = time.monotonic(), self.legacy_probe
        try:
            while self._sleep_while_running(delay) and not self._legacy_answers():
                delay = min(delay * 2, LEGACY_PROBE_CAP_SECONDS)
        finally:
            self._call(rows.clear_waiting, self.run.id, rows.Waiting.LEGACY)
        log.info("migration goes on: the legacy PACS answers run=%d waited_seconds=%.0f",
                 self.run.id, time.monotonic() - began)
        return True

    def _legacy_answers(self) -> bool:
        try:
            self.source.probe()
        except LegacyPeerError as exc:
            self._refused_for_the_run(exc)  # back, but rejecting this box: pause the run
            return False
        return True

    def _sleep_while_running(self, seconds: float) -> bool:
        """Sleep `seconds` in steps that read the run's state; False once it stopped."""
        while seconds > 0:
            if not self._running():
                return False
            step = min(seconds, STATE_CHECK_SECONDS)
            time.sleep(step)
            seconds -= step
        return self._running()

    def _complete(self, session: LegacySession, task: rows.StudyTask, expected: int,
                  instances: list[tuple[str, str]] | None, *, by_uid: bool,
                  fetched: bool = True) -> bool:
        """Record the study done if the box holds all of it: as many instances as the
        legacy PACS listed (unless `by_uid`: the box held some of the study before the
        transfer), or else every one of its SOP Instance UIDs (some held under another
        study that shares them). `fetched`: after a transfer (False: before any, so it
        stays out of the pace)."""
        received = self._box_count(task.study_uid)
        if received >= expected and not by_uid:
            self._call(rows.study_done, task.id, expected=expected, received=received, shared=0,
                       fetched=fetched)
            return True
        if instances is None:
            instances = session.instances_of(task.study_uid)
        sops = [sop for sop, _ in instances if sop]
        held = self._read(rows.held_sop_uids, sops)
        if not sops or any(sop not in held for sop in sops):  # type: ignore[operator]
            return False
        self._call(rows.study_done, task.id, expected=expected, received=received,
                   shared=max(len(sops) - received, 0), fetched=fetched)
        return True

    def _expected(self, session: LegacySession, task: rows.StudyTask
                  ) -> tuple[int, list[tuple[str, str]] | None]:
        """How many instances the study holds in the legacy PACS, and its image-level
        answers when they had to be asked for that. A count below 1 is no count: some
        archives answer 0 (or -1) where they keep none, and a study expected to hold
        nothing would be done whatever its transfer brought."""
        if task.expected_instances is not None and task.expected_instances > 0:
            return task.expected_instances, None
        if not self._no_series_counts.is_set():
            series = session.series_of(task.study_uid)
            counts = [n for _, n in series if n is not None and n > 0]
            if series and len(counts) == len(series):
                return sum(counts), None
            if series:  # the peer does not count series: ask it at image level from now on
                self._no_series_counts.set()
        instances = session.instances_of(task.study_uid)
        if not instances:
            raise LegacyPeerError(MigrationFailure.NOT_FOUND,
                                  "the legacy PACS lists no instances for the study")
        return len(instances), instances

    def _box_count(self, study_uid: str) -> int:
        return int(self._read(rows.box_instance_count, study_uid))  # type: ignore[call-overload]

    def _study_failed(self, task: rows.StudyTask, exc: LegacyPeerError, *, received: int,
                      expected: int | None = None, for_good: bool = False) -> None:
        """Count a failed attempt; `for_good`: no retry would change it, fail it now."""
        final = self._call(rows.study_failed, task.id, exc.kind, exc.message, received=received,
                           expected=expected,
                           max_attempts=1 if for_good else self.max_attempts,
                           retry_base_seconds=self.retry_base)
        log.warning("migration study failed run=%d study=%s kind=%s final=%s reason=%s",
                    self.run.id, logsafe.ref(task.study_uid), exc.kind.value, final, exc.message)


class _DayWalk:
    """The C-FINDs that list one day, split wherever the peer's limit was hit."""

    def __init__(self, session: LegacySession, day: str, settings: rows.RunSettings) -> None:
        self.session = session
        self.day = day
        self.settings = settings
        self.queries = 0
        self.found: dict[str, StudyAnswer] = {}

    def walk(self) -> Listing:
        result = self._find("")
        self._keep(result.answers)  # when limited, still studies of the day (some untimed)
        if result.limited:
            untimed = sum(not a.study_time for a in result.answers)
            log.warning("migration day listed by StudyTime ranges: it hit the result limit;"
                        " a study of that day without a StudyTime matches no range and is"
                        " found only among the day's first answers day=%s limit=%d"
                        " untimed_found=%d", self.day, self.settings.query_limit, untimed)
            self._hours()
        return Listing(self._studies(), self.queries)

    def _hours(self) -> None:
        for hour in range(24):
            self._range(hour * 60, hour * 60 + 59)

    def _studies(self) -> list[rows.FoundStudy]:
        wanted = {m.upper() for m in self.settings.modalities}
        studies = [a for a in self.found.values() if not wanted or self._has(a, wanted)]
        return [rows.FoundStudy(a.study_uid, a.instances) for a in studies]

    def _range(self, first: int, last: int) -> None:
        when = _time_range(first, last)
        result = self._find(when)
        if not result.limited:
            self._slice(result, when)
        elif last > first:
            middle = (first + last) // 2
            self._range(first, middle)
            self._range(middle + 1, last)
        else:
            self._by_modality(first)

    def _by_modality(self, minute: int) -> None:
        when = _time_range(minute, minute)
        if not self.settings.modalities:
            self._too_many(minute, "", hint="raise --query-limit to the legacy PACS's real"
                           " limit, or run with --modality to split the minute by modality")
            return
        for modality in self.settings.modalities:
            result = self._find(when, modality)
            if result.limited:
                self._too_many(minute, modality,
                               hint="raise --query-limit to the legacy PACS's real limit")
            else:
                self._slice(result, when, modality)

    def _slice(self, result: FindResult, time_range: str, modality: str = "") -> None:
        """Keep the answers of a time range (and modality) the peer listed in full."""
        self._keep(result.answers)

    def _too_many(self, minute: int, modality: str, *, hint: str) -> None:
        """A minute (of a modality) still at the peer's limit: the day cannot be listed."""
        raise LegacyPeerError(
            MigrationFailure.QUERY_FAILED,
            f"the legacy PACS returns its result limit ({self.settings.query_limit}) for"
            f" {modality + ' ' if modality else ''}studies of a single minute on {self.day}",
            hint=hint)

    def _find(self, time_range: str, modality: str = "", day: str | None = None) -> FindResult:
        self.queries += 1
        return self.session.find_studies(self.day if day is None else day,
                                         time_range=time_range, modality=modality,
                                         limit=self.settings.query_limit)

    def _keep(self, answers: Sequence[StudyAnswer]) -> None:
        for answer in answers:
            self.found.setdefault(answer.study_uid, answer)

    def _has(self, answer: StudyAnswer, wanted: set[str]) -> bool:
        """Whether the study has a wanted modality: from ModalitiesInStudy, else from its
        series (many legacy PACS, dcmqrscp among them, do not keep ModalitiesInStudy)."""
        modalities: Iterator[str] | tuple[str, ...] = answer.modalities
        if not modalities:
            modalities = (m for m, _ in self.session.series_of(answer.study_uid))
        return any(m in wanted for m in modalities)


# Every date an archive can compare (PS3.4 C.2.2.2.5 range matching): a study without
# a StudyDate matches no range, as it matches no day.
EVERY_DATE = "00010101-99991231"


class _UndatedWalk(_DayWalk):
    """The C-FINDs that list the studies without a StudyDate, which no day matches.

    No key asks for an empty value (an empty StudyDate is universal matching: it
    matches every study, PS3.4 C.2.2.2.3), and the answers do not say the date; so
    each slice is asked twice, with an empty StudyDate and with EVERY_DATE, and the
    studies only the first lists have no date (or none the peer can compare). The
    slices are a day's, over the whole archive: all of it, else hours, halves down
    to a minute, a minute by modality. That bounds the walk (at most 24 x 119 time
    ranges, each with one more query when listed in full) but on a large archive a
    minute of all dates may still reach the limit: that minute is left out and
    reported, as are studies without a StudyTime either (they match no time range),
    in the warning of the listing, never failing the run over studies that may not
    exist.
    """

    def __init__(self, session: LegacySession, settings: rows.RunSettings) -> None:
        super().__init__(session, rows.UNDATED, settings)
        self.left_out: list[str] = []  # the slices not listed: "10:05", "10:05 CT"

    def walk(self) -> Listing:
        every = self._find("")
        if every.limited:
            self._hours()
        else:
            self._slice(every, "")
        return Listing(self._studies(), self.queries, self._warning(untimed=every.limited))

    def _slice(self, result: FindResult, time_range: str, modality: str = "") -> None:
        dated = self._find(time_range, modality, day=EVERY_DATE)
        if dated.limited:  # fewer studies than `result`: only a failure status after some
            self.left_out.append(_span(time_range) + (f" {modality}" if modality else ""))
            return
        known = {a.study_uid for a in dated.answers}
        self._keep([a for a in result.answers if a.study_uid not in known])

    def _too_many(self, minute: int, modality: str, *, hint: str) -> None:
        self.left_out.append(_span(_time_range(minute, minute)) + (f" {modality}" if modality
                                                                   else ""))

    def _warning(self, *, untimed: bool) -> str:
        limit = self.settings.query_limit
        parts = []
        if untimed:
            parts.append(f"the legacy PACS's answer for all dates reaches the result limit"
                         f" ({limit}): studies with neither a StudyDate nor a StudyTime match"
                         " no time range and were not listed")
        if self.left_out:
            parts.append(f"studies without a StudyDate in {len(self.left_out)} time ranges"
                         f" (first {self.left_out[0]}) were not listed: for all dates the"
                         f" legacy PACS returns its result limit ({limit}) there; raise"
                         " --query-limit to its real limit"
                         + ("" if self.settings.modalities else ", or run with --modality"))
        return "; ".join(parts)


def _span(time_range: str) -> str:
    """HH:MM-HH:MM of a _time_range, HH:MM of a minute's; 'all times' for none."""
    if not time_range:
        return "all times"
    first, last = f"{time_range[:2]}:{time_range[2:4]}", f"{time_range[7:9]}:{time_range[9:11]}"
    return first if first == last else f"{first}-{last}"
