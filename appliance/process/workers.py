"""Several DIMSE worker processes on one port (SO_REUSEPORT), supervised.

pynetdicom runs every association in a thread of one process, so one GIL
caps a single process at roughly one core however many modalities send at
once. With `[dicom] workers = N` the supervisor starts N `serve` processes
that all accept on the same port; the kernel spreads new connections across
them. Each worker has its own index writer (SQLite serialises them with
BEGIN IMMEDIATE and a busy timeout) and its own spool files.

The supervisor takes the home's serve lock (serve_lock.py; every worker
inherits it) and the DICOM ports, sweeps crash leftovers before any worker
starts, reports ready once every worker is, restarts a worker that dies, and
on SIGTERM passes the signal on and waits for the workers' graceful stop.

SIGHUP (`systemctl reload`, sent to the supervisor alone) is passed on to every
worker: each loads the renewed node certificate into its own TLS contexts
(node_tls.py) and tells the supervisor which certificate it now presents. Only
when every worker presents the same one does the supervisor record it
(provisioning/served_cert.py); a worker that refused the pair, died or did not
answer within RELOAD_TIMEOUT leaves the record, and the restart-pending warning,
as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
from multiprocessing.process import BaseProcess
from typing import Any

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.base.errors import PacsEdgeError
from appliance.base.metrics_dir import process_ended
from appliance.base.notify import Notifier
from appliance.process.ports import reserve_port
from appliance.process.serve import presents_node_certificate
from appliance.process.serve_lock import InheritedLock, serve_lock
from appliance.services.startup_recovery import STARTUP_STATUS, begin_run, end_run, recover
from appliance.store.files import FileStore
from appliance.store.index import Index
from appliance.store.pairing import check_pairing
from provisioning.served_cert import NodeCertificate, record_served, serving_node_certificate

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
RESTART_BACKOFF = 2.0
RELOAD_TIMEOUT = 30.0
_PRESENTS_NONE = "presents none"  # a worker without a TLS context (workers but 0, TLS off)


def _worker_main(config: Config, number: int, ready: Any, reloaded: Any, log_level: str,
                 lock: InheritedLock) -> None:
    import asyncio

    # SIGHUP is blocked from this worker's birth (start() in _supervise) until serve's
    # handler is in place: a reload passed on while the worker starts waits, and is done
    # once it is ready, instead of the default action ending it. (Not SIG_IGN here: the
    # interpreter and the spawn bootstrap run before this line, and a pending SIGHUP
    # would be dropped.)
    from appliance.base.logsetup import setup_logging
    from appliance.process.serve import serve
    from appliance.process.stack_dump import dump_stacks_on_sigusr1
    from appliance.process.undumpable import make_undumpable

    lock.keep()  # the supervisor's serve lock, for as long as this worker lives
    make_undumpable()  # a spawned worker is a new program: dumpable again
    dump_stacks_on_sigusr1()
    setup_logging(log_level)
    try:
        asyncio.run(serve(config, worker=number, on_ready=lambda port: ready.put((number, port)),
                          on_reloaded=lambda served, presents: reloaded.put(
                              (number, served if presents else _PRESENTS_NONE))))
    except PacsEdgeError as exc:
        # An expected failure (worker 0's HTTPS port in use): one line, not the traceback
        # multiprocessing prints; the supervisor then reports the worker's exit.
        log.error("worker stopped worker=%d error=%s hint=%s", number, exc.message, exc.hint)
        sys.exit(2)


def run_workers(config: Config) -> None:
    """Supervise the workers until SIGTERM/SIGINT, holding the home's serve lock
    (serve_lock.py), which every worker inherits, and the DICOM ports; recording the
    node certificate the workers load (provisioning/served_cert.py)."""
    with serve_lock(config.home) as lock, serving_node_certificate(
            config.home, presented=presents_node_certificate(config)), \
            contextlib.ExitStack() as reservations:
        # The ports before the sweep and the reconciliation: one in use fails fast.
        plain = reservations.enter_context(
            reserve_port(config.dicom.host, config.dicom.port, "port"))
        if config.dicom.tls_port:
            reservations.enter_context(
                reserve_port(config.dicom.host, config.dicom.tls_port, "tls_port"))
        port = plain.getsockname()[1]
        _supervise(dataclasses.replace(
            config, dicom=dataclasses.replace(config.dicom, port=port)), lock)


def _supervise(config: Config, lock: InheritedLock) -> None:
    """Sweep, reconcile, then start, watch and stop the workers (`config` has the
    reserved port, so port 0 is the same port for all of them)."""
    reload_wanted = False

    def request_reload(signum: int, _frame: object) -> None:
        nonlocal reload_wanted
        reload_wanted = True

    # First: a reload asked for while the supervisor starts is done once workers run
    # (the serve command held SIGHUP back until this handler: appliance/cli/root.py).
    signal.signal(signal.SIGHUP, request_reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    ctx = multiprocessing.get_context("spawn")
    port = config.dicom.port
    files = FileStore(config.store.path)
    swept = files.prepare()
    if swept:
        log.info("removed temp files left by an earlier crash count=%d", swept)
    notifier = Notifier()
    notifier.starting(STARTUP_STATUS)
    first_start = not config.index.path.exists()
    asyncio.run(_reconcile(config, files, recover_first=not begin_run(config.home)
                           and not first_start))
    ready: Any = ctx.Queue()
    reloaded: Any = ctx.Queue()
    reloading: _ReloadRound | None = None
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def start(number: int) -> BaseProcess:
        process = ctx.Process(target=_worker_main, name=f"pacs-edge-worker-{number}",
                              args=(config, number, ready, reloaded, config.log.level, lock))
        # Born with SIGHUP blocked (a signal mask survives fork and exec; a handler does
        # not): a reload round that reaches a worker still starting, a restarted one say,
        # leaves it pending until the worker's serve handles it (_worker_main).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return process

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    workers = {n: start(n) for n in range(config.dicom.workers)}
    try:
        _wait_ready(workers, ready, lambda: stopping)
        log.info("ready to accept associations ae_title=%s host=%s port=%d workers=%d",
                 config.dicom.ae_title, config.dicom.host, port, len(workers))
        notifier.ready(f"accepting associations on port {port} with {len(workers)} workers")
        next_ping = 0.0
        while not stopping:
            time.sleep(0.5)
            if time.monotonic() >= next_ping:
                notifier.watchdog()
                next_ping = time.monotonic() + notifier.interval(READY_TIMEOUT)
            if reloading is None and reload_wanted:
                reload_wanted = False
                notifier.reloading()
                reloading = _ReloadRound(workers)
            if reloading is not None and reloading.done(reloaded):
                reloading.finish(config)
                reloading = None
                notifier.ready(f"accepting associations on port {port} with {len(workers)}"
                               " workers")
            for number, process in list(workers.items()):
                if not process.is_alive() and not stopping:
                    log.error("worker exited unexpectedly worker=%d exitcode=%s; restarting",
                              number, process.exitcode)
                    if process.pid is not None:
                        process_ended(process.pid)
                    time.sleep(RESTART_BACKOFF)
                    workers[number] = start(number)
    finally:
        notifier.stopping()
        log.info("stopping workers count=%d", len(workers))
        for process in workers.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        if all(p.exitcode == 0 for p in workers.values()):
            end_run(config.home)
        log.info("stopped")


class _ReloadRound:
    """One SIGHUP passed on to the workers, until each answered or RELOAD_TIMEOUT."""

    def __init__(self, workers: dict[int, BaseProcess]) -> None:
        self.workers = {n: p for n, p in workers.items() if p.is_alive() and p.pid is not None}
        self.answers: dict[int, NodeCertificate | str | None] = {}
        self.deadline = time.monotonic() + RELOAD_TIMEOUT
        for process in self.workers.values():
            assert process.pid is not None
            os.kill(process.pid, signal.SIGHUP)

    def done(self, reloaded: Any) -> bool:
        with contextlib.suppress(queue.Empty):
            while True:
                number, served = reloaded.get_nowait()
                if number in self.workers:
                    self.answers[number] = served
        gone = [n for n, p in self.workers.items() if n not in self.answers and not p.is_alive()]
        for number in gone:
            self.answers[number] = None
        return len(self.answers) == len(self.workers) or time.monotonic() > self.deadline

    def finish(self, config: Config) -> None:
        """Record the certificate every worker presents now; else say which did not."""
        served = set(self.answers.values()) - {_PRESENTS_NONE}
        if len(self.answers) == len(self.workers) and len(served) == 1 and None not in served:
            loaded = served.pop()
            assert isinstance(loaded, NodeCertificate)
            record_served(config.home, loaded)
            log.info("node certificate reloaded by every worker count=%d", len(self.workers))
            return
        behind = sorted(n for n in self.workers if self.answers.get(n) is None)
        log.warning("node certificate not reloaded by every worker workers_behind=%s: the"
                    " certificate_restart_pending warning stays; see the log lines above, then"
                    " reload again", ",".join(map(str, behind)) or "none (they differ)")


async def _reconcile(config: Config, files: FileStore, *, recover_first: bool) -> None:
    """Refuse a lost index (appliance.store.pairing); after an unclean stop, reconcile
    the store and the index before any worker starts."""
    async with Index(config.index.path) as index:
        await check_pairing(index, files)
        if recover_first:
            log.info("previous run did not stop cleanly: reconciling store and index")
            # Its own auditor, unstarted: one Import per study adopted, written at close
            # (closing, not `with`: a full disk must not keep the box from starting).
            with contextlib.closing(Auditor.for_home(config, process="serve")) as adoptions:
                await recover(files, index, adoptions)


def _wait_ready(workers: dict[int, BaseProcess], ready: Any, stopping: Any) -> None:
    waiting = set(workers)
    deadline = time.monotonic() + READY_TIMEOUT
    while waiting and not stopping():
        if time.monotonic() > deadline:
            raise PacsEdgeError(f"workers {sorted(waiting)} did not start within "
                                f"{READY_TIMEOUT:.0f} s", hint="see the log lines above")
        dead = [n for n in waiting if not workers[n].is_alive()]
        if dead:
            raise PacsEdgeError(f"worker {dead[0]} exited during start-up",
                                hint="see the log lines above")
        try:
            number, _port = ready.get(timeout=0.2)
        except queue.Empty:
            continue
        waiting.discard(number)
