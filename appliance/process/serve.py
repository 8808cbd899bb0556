"""`pacs-edge serve`: compose the serving process and run it until SIGTERM/SIGINT.

One asyncio loop (this module's) owns the index; pynetdicom's threads reach
it through the LoopBridge. On a signal the DIMSE server stops accepting,
lets running associations finish for a grace period, and only then is the
index closed, so no acknowledged instance is ever half-recorded.

SIGHUP (`systemctl reload pacs-edge`) loads a renewed node certificate into the
TLS contexts serve already uses (node_tls.py): nothing else is reloaded, and no
connection is dropped. The serve command blocks SIGHUP first
thing (appliance/cli/root.py) and serve unblocks it once its handler is installed,
before anything is loaded: a SIGHUP during start-up is acted on once serve is
ready, never the default action (the end of the process).

The HL7 listener and the web stack (aiohttp and the DICOMweb routes) are
imported only when their port is on: a box that runs without them starts
~0.2 s of CPU sooner and holds less memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import signal
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.audit import Auditor
from appliance.audit.audited_ingest import AuditedIngest
from appliance.base import logsafe
from appliance.base.bridge import LoopBridge
from appliance.base.config import Config, HttpConfig
from appliance.base.notify import Notifier
from appliance.dimse import op_metrics
from appliance.dimse.commitment_report import CommitmentReporter
from appliance.dimse.commitment_scp import attach as attach_commitment
from appliance.dimse.handlers import DimseHandlers, Services
from appliance.dimse.move_get import attach as attach_retrieve
from appliance.dimse.mpps_scp import MppsScp
from appliance.dimse.mpps_scp import event_handlers as mpps_handlers
from appliance.dimse.negotiation import StoredSyntaxes
from appliance.dimse.remote_archive import configured_archive
from appliance.dimse.server import DimseServer, configure_pynetdicom, event_handlers
from appliance.dimse.spooling import SpoolRouter
from appliance.dimse.tls import client_context, server_context
from appliance.dimse.worklist_scp import WorklistScp
from appliance.dropfolder import DropFolderWatcher
from appliance.dropfolder.counts import drop_folder_counts
from appliance.process.node_tls import NodeTls
from appliance.process.ports import probe_ports
from appliance.process.serve_lock import serve_lock
from appliance.services.box_health import DropCounts, HealthSources
from appliance.services.commitment import CommitmentService
from appliance.services.ingest import IngestService
from appliance.services.mpps import MppsService
from appliance.services.orders import OrderService
from appliance.services.peers import Allowlist
from appliance.services.prefetch import PrefetchService, PrefetchWorker
from appliance.services.presented_certs import PresentedCertificates
from appliance.services.retrieve import RetrieveService
from appliance.services.startup_recovery import STARTUP_STATUS, begin_run, end_run, recover
from appliance.services.users import UserService
from appliance.services.worklist import WorklistService
from appliance.store.files import FileStore
from appliance.store.index import Index
from appliance.store.pairing import check_pairing
from provisioning.certs import TlsPaths, load_certificate
from provisioning.home import LOG_KEY, SECRETS_DIR
from provisioning.served_cert import NodeCertificate, record_served, serving_node_certificate

if TYPE_CHECKING:
    from appliance.hl7.listener import Hl7Listener
    from appliance.http.https_server import HttpServer

log = logging.getLogger(__name__)

# What a reload ended with: the certificate now presented (None: refused or none), and
# whether this process presents one at all.
Reloaded = Callable[[NodeCertificate | None, bool], None]
MAINTENANCE_INTERVAL = 30.0
STOP_GRACE_SECONDS = 10.0


def _tls_context(config: Config, tls: NodeTls) -> ssl.SSLContext | None:
    """The DICOM TLS context from the certificates `pacs-edge init` made; None when off."""
    if not config.dicom.tls_port:
        return None
    paths = TlsPaths(config.home)
    _warn_of_clock_outside_validity(paths)
    return tls.track(server_context(cert=paths.node_cert, key=paths.node_key, ca=paths.ca_cert,
                                    require_client_cert=config.dicom.tls_require_client_cert))


def _warn_of_clock_outside_validity(paths: TlsPaths) -> None:
    """A box whose clock is before its certificates' start (a dead RTC battery, NTP not
    synced yet) or past their end refuses every TLS peer's certificate: say so at start,
    not only as one failed handshake per association."""
    now = datetime.datetime.now(datetime.UTC)
    for name, path in (("node", paths.node_cert), ("ca", paths.ca_cert)):
        cert = load_certificate(path)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            log.warning("clock outside the certificate's validity cert=%s now=%s"
                        " not_before=%s not_after=%s: TLS peers will be refused; check the"
                        " clock (timedatectl)", name, f"{now:%Y-%m-%dT%H:%M}Z",
                        f"{cert.not_valid_before_utc:%Y-%m-%d}",
                        f"{cert.not_valid_after_utc:%Y-%m-%d}")


def _tls_client_context(config: Config, tls: NodeTls) -> ssl.SSLContext | None:
    """For C-MOVE destinations and commitment reports to peers marked TLS; None when
    this box has TLS off."""
    if not config.dicom.tls_port:
        return None
    paths = TlsPaths(config.home)
    return tls.track(client_context(cert=paths.node_cert, key=paths.node_key, ca=paths.ca_cert))


def _hl7_tls_context(config: Config, tls: NodeTls) -> ssl.SSLContext | None:
    """MLLP over TLS with the site CA's certificates; None when [hl7] tls is off."""
    if not config.hl7.tls:
        return None
    paths = TlsPaths(config.home)
    return tls.track(server_context(cert=paths.node_cert, key=paths.node_key, ca=paths.ca_cert,
                                    require_client_cert=config.hl7.tls_require_client_cert))


def presents_node_certificate(config: Config) -> bool:
    """Whether serve loads the node certificate (the contexts above, and HTTPS's): then it
    records which one at its start, as `status` reports it (provisioning/served_cert.py)."""
    return bool(config.dicom.tls_port or (config.hl7.port and config.hl7.tls)
                or config.http.port)


async def _until_set(*events: asyncio.Event, timeout: float) -> None:
    """Wait until one of `events` is set, at most `timeout` seconds."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _drop_counts(config: Config, index: Index) -> DropCounts:
    async def counts() -> dict[str, int]:
        return dataclasses.asdict(await drop_folder_counts(config, index))

    return counts


def _metrics_listener(config: Config) -> HttpConfig:
    """The metrics listener's bounds: as the web server's, for a handful of scrapers, and
    two connections per address, so that one address cannot hold them all."""
    return dataclasses.replace(config.http, host=config.metrics.host, port=config.metrics.port,
                               max_connections=8, connections_per_address=2)


def _scraper(config: Config) -> Callable[[str], bool]:
    """Whether an address is one of `[metrics] allow`: it has connections kept for it."""
    from appliance.http.auth import address_in

    return lambda address: address_in(address, config.metrics.allow)


async def serve(
    config: Config, *, worker: int | None = None, on_ready: Callable[[int], None] | None = None,
    on_reloaded: Reloaded | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, holding the home's serve lock (serve_lock.py) from
    before the start-up sweep until the end. As one of several workers (`worker` set),
    leave the sweep to the supervisor (the spool folder holds the other workers'
    transfers) and the lock too: the worker holds the supervisor's (workers.py), and
    tells it the outcome of each SIGHUP's reload through `on_reloaded` (the
    certificate now presented, or None when refused; and whether the worker presents
    one at all), since the supervisor records it."""
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    # Held back until here by the serve command (and, in a worker, from its birth): one
    # sent before is delivered now and acted on once serve is ready.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        if worker is not None:
            await _serve(config, worker=worker, on_ready=on_ready,
                         reload_requested=reload_requested, on_reloaded=on_reloaded)
            return
        with serve_lock(config.home), serving_node_certificate(
                config.home, presented=presents_node_certificate(config)):
            probe_ports(config)
            await _serve(config, worker=None, on_ready=on_ready,
                         reload_requested=reload_requested,
                         on_reloaded=on_reloaded or _recorder(config))
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as SIGTERM's below: until the exit


def _recorder(config: Config) -> Reloaded:
    """A single serve process records the certificate a reload loaded itself."""
    def record(served: NodeCertificate | None, _presents: bool) -> None:
        if served is not None:
            record_served(config.home, served)

    return record


async def _serve(
    config: Config, *, worker: int | None, on_ready: Callable[[int], None] | None,
    reload_requested: asyncio.Event, on_reloaded: Reloaded | None,
) -> None:
    logsafe.load_key(config.home / SECRETS_DIR / LOG_KEY)  # a spawned worker too
    configure_pynetdicom()
    tls = NodeTls(config.home)
    files = FileStore(config.store.path, reserve_bytes=config.store.reserve_bytes)
    # Workers stay silent: their supervisor speaks for the service (workers.py).
    notifier = Notifier(silent=worker is not None)
    notifier.starting(STARTUP_STATUS)  # migrations and recovery grow with the index
    first_start = not config.index.path.exists()
    clean_start = (begin_run(config.home) or first_start) if worker is None else True
    if worker is None:
        swept = files.prepare()
        if swept:
            log.info("removed temp files left by an earlier crash count=%d", swept)
    async with Index(config.index.path, commit_window_ms=config.index.commit_window_ms) as index:
        if worker is None:
            await check_pairing(index, files)  # before recovery would adopt a lost index's files
        if not clean_start:
            log.info("previous run did not stop cleanly: reconciling store and index")
            # Its own auditor, unstarted: one Import per study adopted, written at close
            # (closing, not `with`: a full disk must not keep the box from starting).
            with contextlib.closing(Auditor.for_home(config, process="serve")) as adoptions:
                await recover(files, index, adoptions)
        spools = SpoolRouter(files)
        spools.install()
        auditor = Auditor.for_home(config, process="serve").start(application=True)
        allowlist = Allowlist(config.peers_path, fail_closed=True)
        bridge = LoopBridge(asyncio.get_running_loop())
        services = Services(
            config=config.dicom,
            allowlist=allowlist,
            index=index,
            ingest=IngestService(files, index, max_inflated=config.store.max_inflated_mb << 20),
            spools=spools,
            bridge=bridge,
            audit=auditor,
            presented=PresentedCertificates(index, bridge),
        )
        worklist = WorklistService(index, allowlist,
                                   past_days=config.workflow.worklist_past_days)
        handlers = DimseHandlers(services, worklist=WorklistScp(worklist, services.bridge,
                                                                auditor))
        server = DimseServer(
            config.dicom, allowlist,
            [*event_handlers(handlers),
             *(op_metrics.event_handlers() if config.metrics.enabled else ()),
             *mpps_handlers(MppsScp(MppsService(index, allowlist), services.bridge, auditor))],
            reuse_port=config.dicom.workers > 1,
            stored_syntaxes=StoredSyntaxes(lambda: services.bridge.call(index.syntax_counts())),
            store_target=handlers,
            tls_context=_tls_context(config, tls),
            on_tls_failure=auditor.node_authentication_failed,
        )
        tls_client = _tls_client_context(config, tls)
        # C-MOVE/C-GET: the appliance's own service class (see appliance/dimse/move_get.py)
        retrieve = RetrieveService(allowlist, index, files,
                                   recall_timeout=config.sync.recall_timeout_seconds)
        attach_retrieve(server.ae, retrieve, services.bridge, config.dicom, audit=auditor,
                        tls_client=tls_client)
        # Storage Commitment: reports a requesting association did not take go out on a
        # new one; one reporter per data home (worker 0), like the drop folder watcher.
        commitment = CommitmentService(index, files, allowlist, config.workflow)
        reporter = CommitmentReporter(server.ae, commitment, allowlist, services.bridge,
                                      auditor, config.dicom,
                                      tls_client=tls_client)
        attach_commitment(server.ae, commitment, services.bridge, auditor, reporter.wake,
                          config.dicom)
        ports = await asyncio.to_thread(server.start)
        # Everything started from here on is stopped in the `finally` below, also when
        # a later start fails (the HTTPS port is taken): nothing outlives the index.
        loop = asyncio.get_running_loop()
        watcher: DropFolderWatcher | None = None
        prefetch: PrefetchWorker | None = None
        hl7: Hl7Listener | None = None
        http: HttpServer | None = None
        try:
            if not worker:
                reporter.start()
            # One watcher per data home: with several workers, worker 0 runs it.
            if config.dropfolder.enabled and not worker:
                watcher = DropFolderWatcher.from_config(
                    config, AuditedIngest(services.ingest, auditor, "dropfolder"))
                await watcher.start()
            # Prefetch of priors: one worker per data home (worker 0), started once the
            # server listens, since the remote archive's C-MOVE sends instances to it.
            if config.prefetch.enabled and not worker:
                prefetch = PrefetchWorker(PrefetchService(
                    index, config.prefetch, archive=configured_archive(config, allowlist),
                    audit=auditor))
                await prefetch.start()
            # One HL7 listener per data home, like the watcher (worker 0 with several).
            if config.hl7.port and not worker:
                from appliance.hl7.listener import Hl7Listener

                service = prefetch.service if prefetch is not None else None
                orders = OrderService(
                    index, auditor,
                    on_new_order=service.on_new_order if service else None,
                    on_cancelled_order=service.on_cancelled_order if service else None)
                hl7 = Hl7Listener(config.hl7, allowlist, orders,
                                  tls_context=_hl7_tls_context(config, tls),
                                  on_refused=auditor.hl7_connection_refused,
                                  on_rejected=auditor.hl7_message_rejected)
                await hl7.start()
            health = HealthSources(config, index, files, listening=lambda: bool(server.ports),
                                   dropfolder=_drop_counts(config, index))
            # One HTTPS server per data home, like the HL7 listener (worker 0 with several).
            if config.http.port and not worker:
                from appliance.http.app import WebServices, build_app
                from appliance.http.https_server import HttpServer, tls_context

                paths = TlsPaths(config.home)
                http = HttpServer(config.http, build_app(WebServices(
                    config=config, users=UserService(index, config, auditor=auditor), index=index,
                    files=files, ingest=services.ingest, retrieve=retrieve, auditor=auditor,
                    health=health)),
                    ssl_context=tls.track(tls_context(cert=paths.node_cert, key=paths.node_key),
                                          trust_ca=False))
                await http.start()
            elif config.metrics.enabled and config.metrics.port and not worker:
                # No web server: /metrics and the probes get a small plain listener of their own.
                from appliance.http.app import build_ops_app
                from appliance.http.https_server import HttpServer

                http = HttpServer(_metrics_listener(config), build_ops_app(health, config.metrics),
                                  ssl_context=None, setting="[metrics] port",
                                  priority=_scraper(config))
                await http.start()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            if on_ready is not None:
                on_ready(ports.get("plain", ports.get("tls", 0)))
            listening = " and ".join(
                f"{'TLS ' if name == 'tls' else ''}port {port}" for name, port in ports.items())
            if worker is None:
                log.info("ready to accept associations ae_title=%s host=%s port=%d tls_port=%d"
                         " peers=%d", config.dicom.ae_title, config.dicom.host,
                         ports.get("plain", 0), ports.get("tls", 0), len(allowlist.peers()))
                notifier.ready(f"accepting associations on {listening}")
            while not stop.is_set():
                if reload_requested.is_set():
                    reload_requested.clear()
                    notifier.reloading()
                    served = await asyncio.to_thread(tls.reload)
                    if on_reloaded is not None:
                        on_reloaded(served, bool(tls.tracked))
                    notifier.ready(f"accepting associations on {listening}")
                await _until_set(stop, reload_requested,
                                 timeout=notifier.interval(MAINTENANCE_INTERVAL))
                notifier.watchdog()
                dropped = spools.sweep(idle_seconds=2 * config.dicom.network_timeout)
                if dropped:
                    log.info("discarded spools of abandoned transfers count=%d", dropped)
        finally:
            notifier.stopping()
            log.info("stopping: no new associations; waiting for open ones to finish")
            if prefetch is not None:
                await prefetch.stop()
            # Every edge stops accepting now and drains in the same grace period: one
            # after the other, DIMSE would take new associations while HTTPS drained,
            # and the graces would add up. All before the index closes: they use it.
            await asyncio.gather(
                asyncio.to_thread(server.stop, STOP_GRACE_SECONDS),
                *(edge.stop() for edge in (hl7, http) if edge is not None))
            await asyncio.to_thread(reporter.stop)
            if watcher is not None:
                await watcher.stop()
            await asyncio.to_thread(auditor.close)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
                # Ignored, not back to the default action, until the process exits: the
                # stop is under way, and a repeated signal would kill the process while
                # the index closes and the run counts as unclean. A worker always gets
                # two: systemd signals every process of the unit, its supervisor too.
                signal.signal(sig, signal.SIG_IGN)
    if worker is None:
        end_run(config.home)
    log.info("stopped")
