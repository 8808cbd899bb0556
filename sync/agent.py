"""`pacs-edge sync`: the agent process, its scheduled jobs, and one-shot passes.

Jobs (APScheduler, one asyncio loop, never two runs of a job at once; a wall-clock
step makes every job run at once, see sync.steady_scheduler):
- replicate + evict, every `sync.replicate_interval_seconds`;
- recall requests from the appliance, every `sync.recall_poll_seconds`;
- cloud lifecycle, hourly;
- scrub: a share of `sync.scrub_fraction_per_day` of the packs, hourly (sync.scrub);
- prefetch: evicted priors chosen for an order, recalled (archived packs
  rehydrated early), every `sync.recall_poll_seconds` (sync.prefetch_rehydrate).
A job that fails logs the error and runs again at its next time; the agent
itself only stops on SIGTERM/SIGINT. At stop, running jobs are cancelled (each
rolls back its half-done work on the way out, and a pass left half done is
rolled back by the next start's first pass) and awaited before the index and the cloud close,
for at most JOB_STOP_TIMEOUT: then the agent closes them and exits without waiting
for the threads of jobs still running, as systemd's TimeoutStopSec would kill it.
Jobs run concurrently on the loop; a per-study lease (appliance.store.leases)
keeps two of them, or a CLI command, off the same study. Every pass first rolls
back work that died half done (sync.rollback); at start the agent also removes
files an interrupted eviction left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import NoReturn

from appliance.audit.anchor import AnchorJob
from appliance.base import logsafe
from appliance.base.config import Config
from appliance.base.errors import PacsEdgeError
from appliance.base.metrics import SYNC_PASSES
from appliance.base.notify import Notifier
from appliance.store.leases import StudyBusy
from appliance.store.sync_passes import record_pass
from sync.blobstore.base import BlobStoreUnavailable
from sync.container_check import confirm_container
from sync.context import SyncContext, open_context
from sync.evict import evict_study, eviction_candidates
from sync.lifecycle import apply_lifecycle
from sync.prefetch_rehydrate import PrefetchRecalls
from sync.recall import RecallRequests
from sync.replicate import Replicated, replicate_study, replication_candidates
from sync.rollback import recover_stuck, sweep_leftover_files
from sync.scrub import SCRUB_INTERVAL, scheduled_scrub
from sync.steady_scheduler import SteadyScheduler

log = logging.getLogger(__name__)

LIFECYCLE_INTERVAL = 3600.0
JOB_STOP_TIMEOUT = 15.0  # within systemd's TimeoutStopSec=30s for the sync unit
THREAD_STOP_TIMEOUT = 5.0  # then for the threads of jobs that ended (_threads_ended)


@dataclass
class PassReport:
    replicated: list[Replicated] = field(default_factory=list)
    evicted: int = 0
    bytes_freed: int = 0
    busy: int = 0  # studies skipped because another operation held them (next pass)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


async def sync_pass(ctx: SyncContext, *, stable_after: float | None = None,
                    evict: bool = True,
                    on_progress: Callable[[int, int], None] | None = None) -> PassReport:
    """One replicate-then-evict pass; failures of single studies are reported, not raised.
    `on_progress(studies looked at, studies to replicate)` follows the replication.

    A failure saying the cloud cannot be reached or refuses us (BlobStoreUnavailable)
    ends the replication, and the eviction, of this pass: every other study would fail
    alike, each only after its retries and timeouts, and each failed upload leaves an
    unverified version that every later pass tries to delete until the cloud is back.
    The next pass starts over.

    A pass refused before it starts (the cloud holds none of this box's packs: a NAS
    not mounted; a roll-back the cloud refused) is recorded and counted as a failed
    pass too, then raised: `status`, /metrics and the PacsEdgeSyncFailing alert say
    so with the reason, where they said nothing until the agent looked silent."""
    assert ctx.index.writer is not None
    started = time.time()
    report = PassReport()
    try:
        await confirm_container(ctx.index, ctx.store, ctx.config.cloud_url)  # NAS mounted?
        await recover_stuck(ctx)
    except PacsEdgeError as exc:
        report.failures.append(f"start: {exc.message}")
        await _record(ctx, started, report)
        raise
    wait = ctx.config.sync.stable_after_seconds if stable_after is None else stable_after
    studies = await replication_candidates(ctx, wait)
    for looked_at, study in enumerate(studies):
        if on_progress is not None:
            on_progress(looked_at, len(studies))
        try:
            done = await replicate_study(ctx, study)
        except StudyBusy:
            report.busy += 1
            continue
        except PacsEdgeError as exc:
            report.failures.append(f"replicate: {exc.message}")
            if isinstance(exc, BlobStoreUnavailable):
                break
            continue
        if done is not None:
            report.replicated.append(done)
    if on_progress is not None:
        on_progress(len(studies), len(studies))
    if evict:
        for study in await eviction_candidates(ctx):
            try:
                report.bytes_freed += await evict_study(ctx, study)
                report.evicted += 1
            except StudyBusy:
                report.busy += 1
            except PacsEdgeError as exc:
                log.warning("eviction failed study=%s error=%s", logsafe.ref(study.study_uid),
                            exc.message)
                report.failures.append(f"evict: {exc.message}")
                if isinstance(exc, BlobStoreUnavailable):
                    break
    await _record(ctx, started, report)
    return report


async def _record(ctx: SyncContext, started: float, report: PassReport) -> None:
    """The pass's row (what `status` reads) and its count."""
    assert ctx.index.writer is not None
    summary = json.dumps({"replicated": [asdict(r) for r in report.replicated],
                          "evicted": report.evicted, "busy": report.busy,
                          "failures": report.failures})
    await ctx.index.writer.submit_sync(lambda c: record_pass(
        c, started_at=started, finished_at=time.time(), ok=report.ok, summary=summary))
    SYNC_PASSES.labels("ok" if report.ok else "failed").inc()


async def run_agent(config: Config) -> None:
    """Start with local work only, then run the jobs until SIGTERM. What needs the cloud
    (the container check, rolling back tiering work a crash left) is the first pass's,
    which runs at once: a cloud that does not answer delays the jobs, not the start."""
    notifier = Notifier()
    # The index's migrations and the sweeps below grow with the box (base/notify.py).
    notifier.starting("starting: index migrations, sweeps of interrupted work")
    async with open_context(config, check_container=False) as ctx:
        ctx.audit.start(application=True)  # open_context closes it (Application Stop)
        await sweep_leftover_files(ctx)
        swept = await asyncio.to_thread(ctx.store.sweep_interrupted_writes)
        if swept:
            log.info("removed temp files of interrupted cloud writes count=%d", swept)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # APScheduler logs every run at INFO: a recall poll every second would flood the log.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("apscheduler.scheduler").addFilter(_not_a_skipped_run)
        scheduler = SteadyScheduler(event_loop=loop)
        running: set[asyncio.Task[None]] = set()
        sync = config.sync
        jobs: list[tuple[str, Callable[[], Awaitable[object]], float]] = [
            ("replicate-evict", lambda: sync_pass(ctx), sync.replicate_interval_seconds),
            ("recall-requests", RecallRequests(ctx).run, sync.recall_poll_seconds),
            ("lifecycle", lambda: apply_lifecycle(ctx), LIFECYCLE_INTERVAL),
            ("scrub", lambda: scheduled_scrub(ctx), SCRUB_INTERVAL),
            ("prefetch", PrefetchRecalls(ctx).run, sync.recall_poll_seconds),
            ("audit-anchor", AnchorJob(config.home, ctx.store).run,
             config.audit.anchor_interval_seconds),
        ]
        for name, job, seconds in jobs:
            scheduler.add_job(_logged(name, job, running), "interval", seconds=seconds, id=name,
                              next_run_time=datetime.now(UTC))
        scheduler.start()
        log.info("sync agent ready cloud=%s", _redacted(config.cloud_url))
        notifier.ready("sync agent running")
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), notifier.interval(LIFECYCLE_INTERVAL))
                notifier.watchdog()
        finally:
            notifier.stopping()
            log.info("sync agent stopping")
            scheduler.shutdown(wait=False)  # cancels the jobs that are running
            left = await _ended(running)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("sync agent stopped")
    if left or not await _threads_ended():
        _exit_leaving_threads()


def _not_a_skipped_run(record: logging.LogRecord) -> bool:
    """APScheduler warns whenever a job's next run is skipped because its last one still
    runs. Here that is the design (never two runs of a job at once), and a long upload or
    recall would put that warning in the journal at every interval."""
    return "maximum number of running instances" not in str(record.msg)


def _logged(name: str, job: Callable[[], Awaitable[object]],
            running: set[asyncio.Task[None]]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await job()
        except asyncio.CancelledError:
            # Only the agent's stop cancels a job; ending quietly here keeps APScheduler
            # from logging the cancellation as a crash.
            log.info("job cancelled by stop job=%s", name)
        except PacsEdgeError as exc:
            log.error("job failed job=%s error=%s", name, exc.message)
        except Exception:
            log.exception("job crashed job=%s", name)
        finally:
            running.discard(task)

    return run


async def _ended(running: set[asyncio.Task[None]]) -> int:
    """Wait for the cancelled jobs to finish rolling back, before the index closes;
    returns how many are still running after JOB_STOP_TIMEOUT."""
    if not running:
        return 0
    _, pending = await asyncio.wait(set(running), timeout=JOB_STOP_TIMEOUT)
    if pending:
        log.warning("jobs still running at stop count=%d (rolled back at the next start)",
                    len(pending))
    return len(pending)


async def _threads_ended() -> bool:
    """Whether the worker threads of `asyncio.to_thread` end within THREAD_STOP_TIMEOUT.
    A job awaiting one ends at once when cancelled, while its thread runs on: a read
    from a cloud that stalls (120 s, retried) held the agent's exit for minutes, since
    asyncio.run waits for those threads."""
    shutdown = asyncio.get_running_loop().shutdown_default_executor()
    try:
        await asyncio.wait_for(asyncio.shield(shutdown), THREAD_STOP_TIMEOUT)
    except TimeoutError:
        log.warning("threads of cancelled jobs still running at stop; exiting without them")
        return False
    return True


def _exit_leaving_threads() -> NoReturn:
    """End the process now, though threads of jobs that outlived JOB_STOP_TIMEOUT run on.

    asyncio.run and then the interpreter would wait for every worker thread, and a
    thread can take minutes to reach its next stop check: an Azure upload first waits
    for its blocks in flight (up to 16 MiB, over a slow uplink). systemd would then kill
    the agent at TimeoutStopSec. The index, the audit log and the cloud are closed by
    now; what those threads leave is what a kill leaves, rolled back at the next start
    (sync.rollback: the `uploading` row, the `recalling` study, temp files)."""
    logging.shutdown()
    os._exit(0)


def _redacted(url: str) -> str:
    """Cloud URLs carry no secrets by design; keep only the scheme and the container."""
    return url.split("?", 1)[0]
