"""The box's health in one report: what `status`, the status page, /metrics and /readyz show.

Everything here is derived when asked, from the index, the data home and the
certificates, never kept in a counter: the serve workers, the sync agent and
the CLI may each have changed it, and a derived figure cannot drift. Warnings
are the conditions an operator must act on (docs/operations.md lists them
with the alert rules that watch the same facts in Prometheus).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from appliance.audit.log import AuditLog, Entry
from appliance.audit.syslog import read_cursor
from appliance.base.config import Config
from appliance.base.errors import PacsEdgeError
from appliance.base.human import human_time
from appliance.services.peers import Allowlist
from appliance.store.disk import DiskState, disk_state
from appliance.store.files import FileStore
from appliance.store.health_reads import Backlog, backlog
from appliance.store.index import Index, IndexTotals
from appliance.store.pairing import pairing_problem
from appliance.store.presented_cert_rows import presented_expiries
from provisioning.certs import TlsPaths, issued_certificates
from provisioning.escrow_state import EscrowStatus, escrow_status
from provisioning.served_cert import NodeCertificate, served_node_certificate

CERT_WARN_DAYS = 30
CERT_FIXES = {  # what the certificate_expiring warning asks for, by certificate
    # serve loads tls/node.pem at its start and on a reload (provisioning/served_cert.py).
    "node": "`pacs-edge certs renew`, then `systemctl reload pacs-edge`",
    "ca": "plan a new site CA with the peers' owners: docs/deployment.md, \"Certificates\"",
    "syslog-client": "renew it with the syslog collector's CA",
}
REPLICATION_LAG_WARN_SECONDS = 6 * 3600.0  # beyond [sync] stable_after_seconds
SYNC_AGENT_SILENT_SECONDS = 3600.0  # beyond three replicate intervals
SYNC_FAILING_PASSES = 3  # replicate intervals without success before a failing pass warns
AUDIT_FORWARD_LATE_SECONDS = 600.0

DropCounts = Callable[[], Awaitable[dict[str, int]]]


@dataclass(frozen=True)
class HealthWarning:
    """A condition to act on: a stable code (alerts, tests) and one line for people."""

    code: str
    message: str


@dataclass(frozen=True)
class CertificateExpiry:
    name: str  # node, ca, syslog-client
    not_after: float  # epoch seconds


@dataclass(frozen=True)
class AuditForwarding:
    """Records in the audit log not yet taken by the syslog collector."""

    backlog: int
    oldest_unsent_at: float | None


@dataclass(frozen=True)
class HealthReport:
    at: float
    totals: IndexTotals
    disk: DiskState  # the store's file system
    sync: dict[str, Any]
    backlog: Backlog
    dropfolder: dict[str, int]
    escrow: EscrowStatus
    certificates: list[CertificateExpiry]
    audit_forwarding: AuditForwarding | None  # None: no syslog collector configured
    # Issued by this box (`certs issue`) to peers on the allowlist, the first to expire first.
    peer_certificates: list[CertificateExpiry] = field(default_factory=list)
    # Presented on a TLS association, as last seen, by the peers on the allowlist
    # (services/presented_certs.py: kept in the index, across restarts).
    presented_certificates: list[CertificateExpiry] = field(default_factory=list)
    # When serve presents another node certificate than tls/node.pem (renewed since serve
    # started, provisioning/served_cert.py): when the one serve presents expires.
    restart_pending_expiry: float | None = None
    allowlist_problem: str = ""  # why peers.toml cannot be read ("" when it can)
    pairing_problem: str = ""  # why the index is not the store's ("" when it is)
    warnings: list[HealthWarning] = field(default_factory=list)

    @property
    def inodes_line(self) -> str:
        """One line on the store's inodes, for `status` and the status page."""
        disk = self.disk
        if not disk.total_inodes:
            return "not limited by this file system"
        return (f"{disk.inodes_used_percent:.0f}% used, {disk.free_inodes:,} free"
                f" of {disk.total_inodes:,}")

    @property
    def peer_certificates_line(self) -> str:
        """One line on the issued peer certificates, for `status` and the status page."""
        if not self.peer_certificates:
            return "none issued to current peers"
        first = self.peer_certificates[0]
        return (f"{len(self.peer_certificates)} issued, the first to expire:"
                f" {first.name} on {human_time(first.not_after)}")

    def as_dict(self, config: Config) -> dict[str, Any]:
        """The JSON of `pacs-edge status --json` (keys kept stable for scripts)."""
        totals = self.totals
        return {
            "home": str(config.home),
            "patients": totals.patients,
            "studies": totals.studies,
            "series": totals.series,
            "instances": totals.instances,
            "prior_versions": totals.versions,
            "bytes_on_disk": totals.local_bytes,
            "disk_free_bytes": self.disk.free_bytes,
            "disk_total_bytes": self.disk.total_bytes,
            "disk_free_inodes": self.disk.free_inodes,
            "disk_total_inodes": self.disk.total_inodes,
            "tier_states": {"local": 0, **totals.tier_states},
            "dropfolder": self.dropfolder,
            "sync": self.sync,
            "backlog": asdict(self.backlog),
            "escrow": {**self.escrow.as_dict(),
                       "evict_without_escrow": config.sync.evict_without_escrow},
            "certificates": {c.name: c.not_after for c in self.certificates},
            "peer_certificates": {c.name: c.not_after for c in self.peer_certificates},
            "presented_certificates": {c.name: c.not_after
                                       for c in self.presented_certificates},
            "audit_forwarding": asdict(self.audit_forwarding)
            if self.audit_forwarding else None,
            "warnings": [asdict(w) for w in self.warnings],
        }


async def gather(config: Config, index: Index, *,
                 dropfolder: DropCounts | None = None) -> HealthReport:
    """The report for this moment (a handful of indexed reads and stat calls)."""
    totals = await index.totals()
    synced = await index.sync_summary()
    behind = await backlog(index)
    dropped = await dropfolder() if dropfolder is not None else {}
    unpaired = await pairing_problem(index, config.store.path)
    presented = await presented_expiries(index)
    disk, escrow, (certificates, pending), forwarding, (peers, problem, issued) = \
        await asyncio.to_thread(_from_disk, config)
    report = HealthReport(
        at=time.time(), totals=totals, disk=disk, sync=synced, backlog=behind, dropfolder=dropped,
        escrow=escrow, certificates=certificates, audit_forwarding=forwarding,
        peer_certificates=issued, restart_pending_expiry=pending,
        presented_certificates=[CertificateExpiry(name, not_after)
                                for name, not_after in sorted(presented.items())
                                if peers is None or name in peers],
        allowlist_problem=problem, pairing_problem=unpaired)
    return replace(report, warnings=warnings(config, report))


def _from_disk(config: Config) -> tuple[
        DiskState, EscrowStatus, tuple[list[CertificateExpiry], float | None],
        AuditForwarding | None, tuple[set[str] | None, str, list[CertificateExpiry]]]:
    disk = disk_state(config.store.path if config.store.path.exists() else config.home)
    peers, problem = allowlisted(config)
    # serve's unit hides site.key: the key's public id record stands in for it here
    # (a report, not a decision; the eviction gate reads the key itself).
    return (disk, escrow_status(config.home, published_id=True), certificates(config),
            audit_forwarding(config), (peers, problem, issued_to(config.home, peers)))


def certificates(config: Config) -> tuple[list[CertificateExpiry], float | None]:
    """Expiry of the certificates this box presents or trusts (those present on disk),
    and when the node certificate serve presents expires if it is not tls/node.pem
    (None when it is). serve loads node.pem at its start only: the node's expiry is the
    earlier of the two, since peers fail at the first to end."""
    paths = TlsPaths(config.home)
    found = []
    pending = None
    for name, path in (("node", paths.node_cert), ("ca", paths.ca_cert),
                       ("syslog-client", config.audit.syslog_cert_file)):
        if path is None or not Path(path).is_file():
            continue
        try:
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError):
            found.append(CertificateExpiry(name, 0.0))  # unreadable: as good as expired
            continue
        not_after = cert.not_valid_after_utc.timestamp()
        if name == "node":
            served = served_node_certificate(config.home)
            if served is not None and served != NodeCertificate.of(cert):
                pending = served.not_after
                not_after = min(not_after, pending)
        found.append(CertificateExpiry(name, not_after))
    return found, pending


def allowlisted(config: Config) -> tuple[set[str] | None, str]:
    """The names on the allowlist, whose certificates are the box's concern (a removed
    peer's are no one's); None and why, when the allowlist cannot be read (then every
    certificate counts)."""
    try:
        return set(Allowlist(config.peers_path).peers()), ""
    except PacsEdgeError as exc:
        return None, exc.message


def issued_to(home: Path, peers: set[str] | None) -> list[CertificateExpiry]:
    """Expiry of the certificates this box issued to `peers` (None: to anyone), the
    first to expire first."""
    return [CertificateExpiry(cert.name, cert.not_after) for cert in issued_certificates(home)
            if peers is None or cert.name in peers]


def audit_forwarding(config: Config) -> AuditForwarding | None:
    """How far the syslog forwarder's cursor is behind the audit log's head."""
    if not config.audit.syslog_host:
        return None
    log = AuditLog.for_home(config.home)
    seq, offset = read_cursor(log)
    head = log.head()
    oldest = None
    if head.seq > seq:
        for _number, _end, line in log.entries(start=offset):
            try:
                oldest = _entry_time(Entry.parse(line))
            except ValueError:
                oldest = None
            break
    return AuditForwarding(max(0, head.seq - seq), oldest)


def _entry_time(entry: Entry) -> float:
    return datetime.fromisoformat(entry.time).timestamp()


def warnings(config: Config, report: HealthReport) -> list[HealthWarning]:
    """The conditions to act on, most urgent first."""
    now = report.at
    found: list[HealthWarning] = []
    if report.pairing_problem:
        found.append(HealthWarning("index_not_the_stores", report.pairing_problem))
    if report.allowlist_problem:
        found.append(HealthWarning(
            "allowlist_unreadable", f"the peer allowlist cannot be read, so serve admits no"
            f" peer until it is fixed: {report.allowlist_problem}"))
    if report.sync.get("studies_at_risk"):
        found.append(HealthWarning(
            "studies_at_risk", f"{report.sync['studies_at_risk']} studies have a damaged cloud"
            " copy and no local copy (see `pacs-edge scrub`)"))
    if report.dropfolder.get("unreadable"):
        found.append(HealthWarning(
            "dropfolder_unreadable", f"{report.dropfolder['unreadable']} folder(s) in the drop"
            " folder cannot be listed by this user: their files wait there until the service"
            " user may read them (serve's log names each: `pacs-edge logref`)"))
    floor = free_bytes_floor(config.store.reserve_bytes)
    if report.disk.free_bytes < floor:
        free_mb, reserve_mb = report.disk.free_bytes >> 20, config.store.reserve_mb
        found.append(HealthWarning("disk_below_reserve", (
            f"disk {free_mb} MB free, below the {floor >> 20} MB the store keeps free"
            " ([store] reserve_mb): new instances (C-STORE, STOW-RS, the drop folder) and"
            " recalls are refused with out-of-resources until space is freed (/readyz says"
            " the same)") if report.disk.free_bytes < config.store.reserve_bytes else (
            f"disk {free_mb} MB free, below the {floor >> 20} MB /readyz asks for: it says"
            f" not ready, and with [store] reserve_mb = {reserve_mb} the store takes new"
            f" instances until {reserve_mb} MB are left, with no room then for the index to"
            f" record the eviction that would free space (set reserve_mb ="
            f" {READY_MIN_FREE_BYTES >> 20})")))
    high = config.sync.disk_high_watermark_percent
    if report.disk.used_percent >= high:
        found.append(HealthWarning(
            "disk_high", f"disk {report.disk.used_percent:.0f}% used, above the high watermark"
            f" of {high:.0f}% ([sync] disk_high_watermark_percent)"))
    if report.disk.inodes_used_percent >= high:
        found.append(HealthWarning(
            "inodes_high", f"inodes {report.disk.inodes_used_percent:.0f}% used"
            f" ({report.disk.free_inodes:,} free), above the high watermark of {high:.0f}%:"
            " every instance file takes one, and with none left ingest refuses with"
            " out-of-resources although bytes are free (the sync agent evicts replicated"
            " studies down to the low watermark; if it has none to evict, give the store a"
            " file system with more inodes)"))
    oldest = report.backlog.oldest_unreplicated_at
    lag_limit = config.sync.stable_after_seconds + REPLICATION_LAG_WARN_SECONDS
    if oldest is not None and now - oldest > lag_limit:
        found.append(HealthWarning(
            "replication_lagging", f"the oldest instance not in the cloud arrived"
            f" {_ago(now - oldest)} ago (is `pacs-edge sync` running? see its log)"))
    last_pass = report.sync.get("last_successful_pass_at")
    interval = config.sync.replicate_interval_seconds
    silent = 3 * interval + SYNC_AGENT_SILENT_SECONDS
    if report.totals.studies and (last_pass is None or now - last_pass > silent):
        found.append(HealthWarning(
            "sync_agent_silent", "the sync agent has never completed a pass" if last_pass is None
            else f"the sync agent's last successful pass was {_ago(now - last_pass)} ago"))
    # The agent runs but its passes fail (the cloud unreachable, the key refused): said
    # with the reason as soon as a few passes have failed, not an hour later as "silent".
    error = report.sync.get("last_pass_error")
    if error and (last_pass is None or now - last_pass > SYNC_FAILING_PASSES * interval):
        found.append(HealthWarning(
            "sync_failing", "the sync agent's passes fail"
            + ("" if last_pass is None else f" (none succeeded for {_ago(now - last_pass)})")
            + f": {error} (see the agent's log)"))
    if report.restart_pending_expiry is not None:
        found.append(HealthWarning(
            "certificate_restart_pending", "tls/node.pem was renewed, but serve still presents"
            " the node certificate it loaded before, which "
            + _expiry(report.restart_pending_expiry - now)
            + ": reload pacs-edge (systemctl reload pacs-edge) to present the new one; a"
            " reload that refuses the new files says why in serve's log"))
    for code, cert, what, fix in [
            *[("certificate_expiring", c, f"the {c.name} certificate", CERT_FIXES[c.name])
              for c in report.certificates],
            *[("peer_certificate_expiring", c, f"the certificate issued to peer {c.name}",
               f"`pacs-edge certs issue {c.name} --out DIR`, then install it on the device")
              for c in report.peer_certificates],
            *[("peer_certificate_expiring", c,
               f"the certificate peer {c.name} presented over TLS",
               f"`pacs-edge certs issue {c.name} --out DIR`, then install it on the device")
              for c in device_certificates(report)]]:
        left = cert.not_after - now
        if left < CERT_WARN_DAYS * 86400:
            found.append(HealthWarning(code, f"{what} {_expiry(left)} ({fix})"))
    if report.escrow.problem and config.sync.evict_without_escrow:
        # The lab accepted the risk: eviction goes on, nothing waits on the operator.
        # Still said (a lost box loses its evicted studies), under a code of its own so
        # that the alert on `no_escrow` does not fire for a choice made on purpose.
        found.append(HealthWarning(
            "no_escrow_accepted", f"{report.escrow.problem} (a risk accepted with [sync]"
            " evict_without_escrow = true: evicting anyway; `pacs-edge keys escrow` ends it)"))
    elif report.escrow.problem:
        found.append(HealthWarning("no_escrow", report.escrow.problem))
    forwarding = report.audit_forwarding
    if (forwarding and forwarding.oldest_unsent_at is not None
            and now - forwarding.oldest_unsent_at > AUDIT_FORWARD_LATE_SECONDS):
        found.append(HealthWarning(
            "audit_forwarding_failing", f"{forwarding.backlog} audit records wait for the syslog"
            f" collector, the oldest for {_ago(now - forwarding.oldest_unsent_at)}"))
    return found


def device_certificates(report: HealthReport) -> list[CertificateExpiry]:
    """The certificates peers presented that are not the box's copy of what it issued to
    them: one issued before `certs issue` kept copies (2026-12), or an older one the
    device still uses after a new one was issued. The copy's own warning covers the rest."""
    issued = {c.name: c.not_after for c in report.peer_certificates}
    return [c for c in report.presented_certificates if issued.get(c.name) != c.not_after]


def _expiry(left: float) -> str:
    """ "expires in …" or "expired … ago": a certificate's end, `left` seconds from now."""
    return f"expired {_ago(-left)} ago" if left <= 0 else f"expires in {_ago(left)}"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


READY_MIN_FREE_BYTES = 64 << 20  # below this no study fits, whatever the reserve says
# What 64 MB holds at ext4's default of one inode per 16 KiB: a study of a few
# thousand instances (files, and the study and series folders) fits above it.
READY_MIN_FREE_INODES = 4096
READY_INDEX_TIMEOUT = 5.0


def free_bytes_floor(reserve_bytes: int) -> int:
    """The free bytes below which the box takes no new study: the store's reserve, and
    at least READY_MIN_FREE_BYTES (/readyz and the disk_below_reserve warning)."""
    return max(reserve_bytes, READY_MIN_FREE_BYTES)


READY_CHECKS = ("disk", "inodes", "store", "index", "listeners")


@dataclass(frozen=True)
class Readiness:
    """Whether the box can accept a study now: why not, by check (READY_CHECKS)."""

    failed: dict[str, str]

    @property
    def ready(self) -> bool:
        return not self.failed

    @property
    def problems(self) -> list[str]:
        """One line per failed check, as /readyz answers them."""
        return [f"{check}: {why}" for check, why in self.failed.items()]


async def readiness(index: Index, files: FileStore, *, listening: Callable[[], bool]) -> Readiness:
    """Disk room (bytes above the reserve, inodes), a store that takes files, an index
    that takes a write, listeners bound."""
    failed = {}
    disk = await asyncio.to_thread(files.disk)
    floor = free_bytes_floor(files.reserve_bytes)
    if disk.free_bytes < floor:
        failed["disk"] = (f"{disk.free_bytes >> 20} MB free, below {floor >> 20} MB"
                          f" ([store] reserve_mb, at least {READY_MIN_FREE_BYTES >> 20})")
    if disk.total_inodes and disk.free_inodes < READY_MIN_FREE_INODES:
        failed["inodes"] = (f"{disk.free_inodes} free, below {READY_MIN_FREE_INODES}"
                            " (one per instance file; `df -i` on the store)")
    store = await asyncio.to_thread(_store_problem, files.spool_dir)
    if store:
        failed["store"] = store
    try:
        if index.writer is None:
            raise PacsEdgeError("the index is open read-only")
        await asyncio.wait_for(index.writer.submit_sync(_take_write_lock),
                               READY_INDEX_TIMEOUT)
    except (TimeoutError, PacsEdgeError) as exc:
        failed["index"] = f"not writable ({type(exc).__name__})"
    if not listening():
        failed["listeners"] = "no DICOM port is bound"
    return Readiness(failed)


def _store_problem(spool_dir: Path) -> str:
    """Why the store cannot take a file now ("" when it can). Every instance is first
    created in the spool folder; access(2) asks the kernel whether that would be
    allowed, which also answers no on a read-only mount (ext4 mounted errors=remount-ro
    turns read-only by itself after an I/O error). One system call while all is well, at
    probe time only: nothing is written, and the C-STORE path pays nothing for it."""
    if os.access(spool_dir, os.W_OK | os.X_OK):
        return ""
    try:
        read_only = bool(os.statvfs(spool_dir).f_flag & os.ST_RDONLY)
    except OSError as exc:
        return f"the spool folder cannot be used ({exc.strerror})"
    if read_only:
        return "the file system is read-only"
    return "the spool folder is not writable by this process"


def _take_write_lock(_conn: object) -> None:
    """Nothing to write: the writer's transaction around it proves the lock is ours."""


@dataclass(frozen=True)
class HealthSources:
    """What the web edge and the metrics listener ask for the report and readiness."""

    config: Config
    index: Index
    files: FileStore
    listening: Callable[[], bool]
    dropfolder: DropCounts | None = None

    async def report(self) -> HealthReport:
        return await gather(self.config, self.index, dropfolder=self.dropfolder)

    async def readiness(self) -> Readiness:
        return await readiness(self.index, self.files, listening=self.listening)
