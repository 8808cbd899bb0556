"""Prefetch of priors: make a patient's relevant earlier studies local before they arrive.

Three triggers make a request (appliance/store/prefetch_rows.py holds them):
a new order (the order service calls `on_new_order` after the order is
committed), the nightly run for tomorrow's worklist (`[prefetch] nightly_at`,
local time, once a day: every SCHEDULED order of tomorrow without a request
gets one) and `pacs-edge prefetch --patient-id` (manual).

Then, in the serving process (`PrefetchWorker`, one per data home):

1. choose: the patient's studies in the index and, with `[prefetch]
   remote_archive`, in the remote archive (a C-FIND) are the candidates;
   prefetch_rules.py picks the priors; each is recorded with its source:
   `local` (on disk: done at once), `cloud` (evicted: the sync agent recalls
   it, asking early rehydration for archived packs: sync/prefetch_rehydrate.py,
   because only the agent holds cloud credentials) or `remote`;
2. move: each `remote` prior is C-MOVEd from the remote archive to the box's
   own AE title, `[prefetch] associations` at once (appliance/dimse/remote_archive.py,
   injected here as a RemoteArchivePort so that this floor holds no DICOM networking).

A request that cannot ask the remote archive still records the priors the
index has, and is `failed` with the reason. A failure that may pass (the
remote archive down, a C-MOVE or a recall that failed) is tried again
`[prefetch] retry_attempts` times, `retry_base_seconds` after it and doubled
each time (store/prefetch_rows.py, Retries); `pacs-edge prefetch retry` tries
every failed one again at once. Chosen priors are held on local disk until `hold_until`: the order's
scheduled start (or now) plus `keep_local_days` (sync/evict.py skips them).
A cancelled order ends its prefetch (the order service calls
`on_cancelled_order`): the hold ends and what has not started is not fetched.

Every C-FIND and C-MOVE sent to the remote archive is audited (PrefetchAudit): the
patient asked about, each study moved; the instances arrive as C-STOREs, audited as such.
Logs name requests by id and studies by logsafe refs: never a patient ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from appliance.base import logsafe, metrics
from appliance.base.config import PrefetchConfig
from appliance.base.errors import PacsEdgeError, PrefetchFailure, RemoteArchiveError
from appliance.services.prefetch_rules import Candidate, OrderContext, choose_priors
from appliance.store import database
from appliance.store import prefetch_rows as rows
from appliance.store.index import Index
from appliance.store.order_rows import PatientKey
from appliance.store.prefetch_rows import (
    NewPrior,
    PrefetchRequest,
    PriorState,
    PriorTrigger,
    RequestTrigger,
    ScheduledOrder,
    Source,
)

if TYPE_CHECKING:  # transaction bodies take the writer's connection
    import sqlite3

log = logging.getLogger(__name__)

DAY = 86400.0
# The worker looks this often (three small reads when idle); a new order wakes it at once,
# a request from the command line (another process) waits for the next look.
POLL_SECONDS = 5.0
_IN_INDEX = ("local", "replicating", "replicated")


@dataclass(frozen=True)
class MoveOutcome:
    """The final C-MOVE response's status and sub-operation counts."""

    status: int
    completed: int
    failed: int
    warning: int


class RemoteArchivePort(Protocol):
    """What the prefetch needs of a remote archive (appliance/dimse/remote_archive.py)."""

    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    def find_priors(self, patient: PatientKey) -> list[Candidate]: ...
    def move_study(self, study_uid: str) -> MoveOutcome: ...


class PrefetchAudit(Protocol):
    """The audit trail of what a prefetch asks its remote archive (appliance.audit.Auditor):
    one Query per patient asked, one transfer record per study moved, answered or failed
    (the instances themselves are audited as the C-STOREs that bring them)."""

    def prefetch_queried(self, *, peer_ae: str, address: str, patient_id: str, issuer: str,
                         studies: int, reason: str = "") -> None: ...
    def legacy_retrieved(self, *, peer_ae: str, address: str, action: str, study_uid: str,
                         completed: int = 0, failed: int = 0, reason: str = "",
                         purpose: str = "") -> None: ...


# The configured archive, looked up when needed (the allowlist is edited live); raises
# RemoteArchiveError when it is no usable peer. None: no remote archive configured.
ArchiveFactory = Callable[[], RemoteArchivePort] | None


@dataclass(frozen=True)
class Planned:
    request_id: int
    priors: list[Candidate]
    error: str = ""


def scheduled_time(sps_date: str, sps_time: str) -> float | None:
    """An order's scheduled start (DICOM DA + TM, local time) as epoch seconds."""
    try:
        day = datetime.strptime(sps_date[:8], "%Y%m%d")
    except ValueError:
        return None
    digits = "".join(c for c in sps_time.split(".")[0] if c.isdigit())[:6].ljust(6, "0")
    try:
        return day.replace(hour=int(digits[:2]), minute=int(digits[2:4]),
                           second=int(digits[4:6])).timestamp()
    except ValueError:
        return day.timestamp()


class PrefetchService:
    def __init__(self, index: Index, config: PrefetchConfig, *,
                 archive: ArchiveFactory = None, audit: PrefetchAudit | None = None) -> None:
        self.index = index
        self.config = config
        self.archive = archive
        self.audit = audit
        self.wake = asyncio.Event()
        self.retries = rows.Retries.of(config)

    @property
    def writer(self) -> database.Writer:
        assert self.index.writer is not None
        return self.index.writer

    async def retry_due(self) -> tuple[int, int]:
        """Take up the failed requests and priors whose automatic retry is due; returns
        (requests, priors)."""
        requests, priors = await self.writer.submit_sync(rows.retry_due)
        if requests or priors:
            log.info("prefetch retrying requests=%d priors=%d", requests, priors)
        return requests, priors

    # --- requests -------------------------------------------------------------------

    async def on_new_order(self, accession_number: str) -> int | None:
        """The hook the order service calls after a new order is committed."""
        if not self.config.enabled:
            return None
        order = await database.run_sync(self.index.reader, rows.order_for_prefetch,
                                        accession_number)
        if order is None:
            return None
        request = await self._request_for(order, RequestTrigger.ORDER)
        if request is not None:
            log.info("prefetch requested request=%d trigger=order order=%s", request,
                     logsafe.ref(accession_number))
            self.wake.set()
        return request

    async def on_cancelled_order(self, accession_number: str) -> int | None:
        """The hook the order service calls after an order's cancellation is committed:
        its prefetch ends (rows.end_for_cancelled_order says what that means)."""
        order = await database.run_sync(self.index.reader, rows.order_for_prefetch,
                                        accession_number)
        if order is None:
            return None
        request = await self.writer.submit_sync(
            lambda c: rows.end_for_cancelled_order(c, order.id))
        if request is not None:
            log.info("prefetch ended request=%d reason=order_cancelled order=%s", request,
                     logsafe.ref(accession_number))
        return request

    async def request_manual(self, patient: PatientKey) -> int:
        now = time.time()
        request = await self.writer.submit_sync(lambda c: rows.insert_request(
            c, patient, RequestTrigger.MANUAL, hold_until=now + self.config.keep_local_days * DAY,
            at=now))
        assert request is not None  # only order requests are unique
        log.info("prefetch requested request=%d trigger=manual", request)
        self.wake.set()
        return request

    async def _request_for(self, order: ScheduledOrder, trigger: RequestTrigger) -> int | None:
        now = time.time()
        needed = scheduled_time(order.sps_start_date, order.sps_start_time)
        hold = max(needed or now, now) + self.config.keep_local_days * DAY
        return await self.writer.submit_sync(lambda c: rows.insert_request(
            c, order.patient, trigger, hold_until=hold, order_id=order.id,
            exclude_study_uid=order.study_uid, modality=order.modality,
            procedure=order.procedure, needed_at=needed, at=now))

    async def nightly(self, now: datetime | None = None) -> int | None:
        """Once a day from `nightly_at` on: a request for every SCHEDULED order of
        tomorrow that has none; returns how many, None when it is not time."""
        if not self.config.enabled or not self.config.nightly_at:
            return None
        now = now or datetime.now()
        hours, minutes = (int(v) for v in self.config.nightly_at.split(":"))
        today = now.strftime("%Y%m%d")
        if (now.hour, now.minute) < (hours, minutes) or await database.run_sync(
                self.index.reader, rows.nightly_ran, today):
            return None
        tomorrow = (now.date() + timedelta(days=1)).strftime("%Y%m%d")
        orders = await database.run_sync(self.index.reader, rows.orders_scheduled_on, tomorrow)
        made = 0
        for order in orders:
            if await self._request_for(order, RequestTrigger.NIGHTLY) is not None:
                made += 1
        await self.writer.submit_sync(
            lambda c: rows.record_nightly_run(c, today, made, time.time()))
        log.info("prefetch nightly run day=%s orders=%d requests=%d", tomorrow, len(orders), made)
        return made

    # --- choosing priors ------------------------------------------------------------

    async def plan_pending(self, *, today: date | None = None) -> list[Planned]:
        """Choose the priors of every pending request."""
        pending = await database.run_sync(self.index.reader, rows.pending_requests)
        return [await self.plan(request, today=today) for request in pending]

    async def plan(self, request: PrefetchRequest, *, today: date | None = None) -> Planned:
        indexed = await database.run_sync(self.index.reader, rows.patient_studies,
                                          request.patient)
        candidates = [Candidate(s.study_uid, s.study_date, s.modalities, s.body_parts,
                                s.study_description,
                                Source.LOCAL if s.tier_state in _IN_INDEX else Source.CLOUD)
                      for s in indexed]
        error_kind, error = "", ""
        if self.archive is not None:
            try:
                archive = self.archive()
            except RemoteArchiveError as exc:  # no usable peer: nothing was asked
                error_kind, error = exc.kind.value, exc.message
            else:
                try:
                    found = await asyncio.to_thread(archive.find_priors, request.patient)
                except RemoteArchiveError as exc:
                    found, error_kind, error = [], exc.kind.value, exc.message
                candidates += found
                if self.audit is not None:
                    await asyncio.to_thread(
                        self.audit.prefetch_queried, peer_ae=archive.ae_title,
                        address=archive.host, patient_id=request.patient.patient_id,
                        issuer=request.patient.issuer, studies=len(found), reason=error)
        order = OrderContext(request.modality, request.procedure, request.exclude_study_uid)
        chosen = choose_priors(candidates, order, self.config, today=today or date.today())
        new = [NewPrior(c.study_uid, c.study_date, c.modalities, c.source) for c in chosen]
        held = {p.study_uid for p in await self.writer.submit_sync(lambda c: rows.mark_planned(
            c, request.id, new, limit=self.config.max_priors, error_kind=error_kind,
            error=error, retries=self.retries))}
        chosen = [c for c in chosen if c.study_uid in held]
        await self._finish_local(request.id)
        log.info("prefetch planned request=%d priors=%d local=%d cloud=%d remote=%d%s",
                 request.id, len(chosen), *(sum(c.source is s for c in chosen) for s in Source),
                 f" error={error_kind}" if error_kind else "")
        return Planned(request.id, chosen, error)

    async def _finish_local(self, request_id: int) -> None:
        """Priors found on local disk need no fetching: done, and held from now on."""
        def finish(conn: sqlite3.Connection) -> int:
            done = 0
            for prior in rows.priors_of(conn, [request_id]):
                if prior.source == Source.LOCAL and prior.state == PriorState.PENDING:
                    rows.advance(conn, prior.id, PriorTrigger.LOCAL)
                    done += 1
            return done

        done = await self.writer.submit_sync(finish)
        if done:
            metrics.PREFETCH_PRIORS.labels(source="local", outcome="done").inc(done)

    # --- moving remote priors -------------------------------------------------------

    async def move_remote(self) -> int:
        """C-MOVE every remote prior that waits, `[prefetch] associations` studies at once,
        the priors needed soonest first; returns how many were tried.

        Priors of one study (two orders of a patient want the same prior) are worked one
        after the other by one task: the first moves the study, the next finds it in the
        index. A move that fails unexpectedly lets the others finish, then ends the pass
        with its error."""
        waiting = await database.run_sync(self.index.reader, rows.priors_to_work, Source.REMOTE)
        by_study: dict[str, list[rows.PrefetchPrior]] = {}
        for prior in waiting:
            if prior.state == PriorState.PENDING:  # else another pass of this process runs it
                by_study.setdefault(prior.study_uid, []).append(prior)
        slots = asyncio.Semaphore(self.config.associations)

        async def move_study(priors: list[rows.PrefetchPrior]) -> None:
            async with slots:
                for prior in priors:
                    try:
                        await self._move(prior)
                    except rows.PrefetchTransitionError:  # changed meanwhile (order cancelled)
                        log.info("prefetch prior changed meanwhile prior=%d", prior.id)

        outcomes = await asyncio.gather(*(move_study(p) for p in by_study.values()),
                                        return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for other in failures[1:]:  # the first ends the pass, and its loop logs it
            log.error("prefetch move failed error=%s", type(other).__name__)
        if failures:
            raise failures[0]
        return sum(len(p) for p in by_study.values())

    async def _move(self, prior: rows.PrefetchPrior) -> None:
        state = await database.run_sync(self.index.reader, rows.study_tier_state,
                                        prior.study_uid)
        # In the index meanwhile (sent by a modality, moved for another request): done.
        # Not after a move of its own, incomplete or failed: the instances that came are
        # part of the study, and only a new C-MOVE brings the rest.
        if state in _IN_INDEX and not await database.run_sync(
                self.index.reader, rows.was_moved, prior.id):
            await self._advance(prior.id, PriorTrigger.LOCAL)
            metrics.PREFETCH_PRIORS.labels(source="remote", outcome="done").inc()
            return
        if self.archive is None:
            await self._fail(prior.id, PrefetchFailure.NO_REMOTE_ARCHIVE,
                             "no remote archive is configured ([prefetch] remote_archive)")
            return
        await self._advance(prior.id, PriorTrigger.MOVE)
        try:
            archive = self.archive()
        except RemoteArchiveError as exc:  # no usable peer: nothing was asked
            await self._fail(prior.id, exc.kind, exc.message)
            return
        try:
            outcome = await asyncio.to_thread(archive.move_study, prior.study_uid)
        except RemoteArchiveError as exc:
            await self._audit_move(archive, prior.study_uid, None, exc.message)
            await self._fail(prior.id, exc.kind, exc.message)
            return
        await self._audit_move(archive, prior.study_uid, outcome,
                               "" if outcome.status == 0 else f"status 0x{outcome.status:04X}")
        if outcome.completed == 0:
            await self._fail(prior.id, PrefetchFailure.MOVE_FAILED,
                             "the remote archive sent no instance")
        elif outcome.failed:
            await self._fail(prior.id, PrefetchFailure.MOVE_INCOMPLETE,
                             f"{outcome.failed} of {outcome.completed + outcome.failed}"
                             " instances did not arrive")
        else:
            await self._advance(prior.id, PriorTrigger.MOVED)
            metrics.PREFETCH_PRIORS.labels(source="remote", outcome="done").inc()
            log.info("prefetch moved study=%s instances=%d", logsafe.ref(prior.study_uid),
                     outcome.completed)

    async def _audit_move(self, archive: RemoteArchivePort, study_uid: str,
                          outcome: MoveOutcome | None, reason: str) -> None:
        if self.audit is None:
            return
        await asyncio.to_thread(
            self.audit.legacy_retrieved, peer_ae=archive.ae_title, address=archive.host,
            action="C-MOVE", study_uid=study_uid, purpose="prefetch", reason=reason,
            completed=outcome.completed + outcome.warning if outcome else 0,
            failed=outcome.failed if outcome else 0)

    async def _advance(self, prior_id: int, trigger: PriorTrigger) -> None:
        await self.writer.submit_sync(lambda c: rows.advance(c, prior_id, trigger))

    async def _fail(self, prior_id: int, kind: PrefetchFailure, error: str) -> None:
        log.warning("prefetch prior failed prior=%d kind=%s", prior_id, kind.value)
        await self.writer.submit_sync(lambda c: rows.advance(
            c, prior_id, PriorTrigger.FAIL, failure_kind=kind.value, error=error,
            retries=self.retries))
        metrics.PREFETCH_PRIORS.labels(source="remote", outcome=kind.value).inc()


class PrefetchWorker:
    """The serving process's prefetch: two loops, so that a long C-MOVE never delays
    choosing the priors of the next order. One runs the nightly run and chooses priors
    (woken by a new order), the other moves remote priors (woken when priors were
    chosen); each also looks every `poll` seconds, for requests from the command line."""

    def __init__(self, service: PrefetchService, *, poll: float = POLL_SECONDS) -> None:
        self.service = service
        self.poll = poll
        self._moves = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        writer = self.service.writer
        resumed = await writer.submit_sync(lambda c: rows.resume_interrupted(c, Source.REMOTE))
        if resumed:
            log.info("prefetch moves resumed after a restart count=%d", resumed)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop("choose", self.service.wake, self._choose),
                             name="prefetch-choose"),
            loop.create_task(self._loop("move", self._moves, self.service.move_remote),
                             name="prefetch-move")]

    async def stop(self) -> None:
        # The flag, not the cancel alone, ends the loops: on Python 3.11, a cancel that
        # lands as the loop's wake event fires is swallowed by asyncio.wait_for, and the
        # loop would then run on and this stop would wait for it forever.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _choose(self) -> None:
        _, priors = await self.service.retry_due()
        await self.service.nightly()
        if await self.service.plan_pending() or priors:
            self._moves.set()

    async def _loop(self, name: str, wake: asyncio.Event,
                    step: Callable[[], Awaitable[object]]) -> None:
        while not self._stopping:
            wake.clear()
            try:
                await step()
            except PacsEdgeError as exc:
                log.error("prefetch %s pass failed error=%s", name, exc.message)
            except Exception:
                log.exception("prefetch %s pass crashed", name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.poll)
