"""The state half of /metrics: the health report and /readyz's checks as Prometheus gauges.

Derived at scrape time (box_health.gather, box_health.readiness), so these need
no multiprocess bookkeeping and agree with `pacs-edge status` and /readyz. Names
and meanings are listed in docs/operations.md; no label holds PHI or a UID.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from appliance.services.box_health import READY_CHECKS, HealthReport, Readiness
from appliance.store.tiering import TierState


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def state_families(report: HealthReport, ready: Readiness) -> Iterator[Metric]:
    checks = GaugeMetricFamily("pacs_edge_ready_check",
                               "1 when this /readyz check passes, 0 when it fails.",
                               labels=["check"])
    for check in READY_CHECKS:
        checks.add_metric([check], 0.0 if check in ready.failed else 1.0)
    yield checks
    now = report.at
    totals = report.totals
    studies = GaugeMetricFamily("pacs_edge_studies", "Studies by tiering state.",
                                labels=["state"])
    for state in TierState:
        studies.add_metric([state.value], totals.tier_states.get(state.value, 0))
    yield studies
    yield _gauge("pacs_edge_instances", "Instances in the index.", totals.instances)
    yield _gauge("pacs_edge_store_bytes", "Bytes of instance files the index refers to.",
                 totals.bytes)
    yield _gauge("pacs_edge_disk_free_bytes", "Free bytes on the store's file system.",
                 report.disk.free_bytes)
    yield _gauge("pacs_edge_disk_total_bytes", "Size of the store's file system.",
                 report.disk.total_bytes)
    yield _gauge("pacs_edge_disk_free_inodes",
                 "Free inodes on the store's file system (0 of 0: not limited).",
                 report.disk.free_inodes)
    yield _gauge("pacs_edge_disk_total_inodes",
                 "Inodes of the store's file system (0: it has no fixed number).",
                 report.disk.total_inodes)
    yield _gauge("pacs_edge_replication_waiting_bytes",
                 "Bytes of local instances in no cloud pack yet.",
                 report.sync["bytes_waiting_to_replicate"])
    oldest = report.backlog.oldest_unreplicated_at
    yield _gauge("pacs_edge_replication_oldest_waiting_seconds",
                 "Age of the oldest instance not yet in the cloud (0: none waiting).",
                 max(0.0, now - oldest) if oldest is not None else 0.0)
    yield _gauge("pacs_edge_recall_queue_depth", "Recall requests waiting for the sync agent.",
                 report.backlog.recalls_pending)
    requested = report.backlog.oldest_recall_requested_at
    yield _gauge("pacs_edge_recall_oldest_wait_seconds",
                 "How long the oldest waiting recall request has waited (0: none).",
                 max(0.0, now - requested) if requested is not None else 0.0)
    yield _gauge("pacs_edge_recall_failed_requests",
                 "Recall requests whose last recall failed.", report.backlog.recalls_failed)
    last_pass = report.sync.get("last_successful_pass_at")
    yield _gauge("pacs_edge_sync_last_success_timestamp_seconds",
                 "When the last successful sync pass ended (0: never).", last_pass or 0.0)
    yield _gauge("pacs_edge_scrub_last_timestamp_seconds",
                 "When a pack was last read back and verified (0: never).",
                 report.sync.get("last_scrub_at") or 0.0)
    yield _gauge("pacs_edge_studies_at_risk",
                 "Studies with a damaged cloud copy and no local copy.",
                 report.sync.get("studies_at_risk", 0))
    dropped = GaugeMetricFamily("pacs_edge_dropfolder_files",
                                "Drop-folder files by state (ingested counts instances).",
                                labels=["state"])
    for state, count in sorted(report.dropfolder.items()):
        dropped.add_metric([state], count)
    yield dropped
    certs = GaugeMetricFamily("pacs_edge_certificate_expiry_timestamp_seconds",
                              "When each certificate the box uses expires.", labels=["cert"])
    for cert in report.certificates:
        certs.add_metric([cert.name], cert.not_after)
    yield certs
    presented = GaugeMetricFamily("pacs_edge_peer_certificate_expiry_timestamp_seconds",
                                  "When the client certificate each peer on the allowlist"
                                  " last presented on a TLS association expires.",
                                  labels=["peer"])
    for cert in report.presented_certificates:
        presented.add_metric([cert.name], cert.not_after)
    yield presented
    issued = GaugeMetricFamily("pacs_edge_issued_certificate_expiry_timestamp_seconds",
                               "When the certificate this box issued to each peer on the"
                               " allowlist expires.", labels=["peer"])
    for cert in report.peer_certificates:
        issued.add_metric([cert.name], cert.not_after)
    yield issued
    yield _gauge("pacs_edge_escrow_ok", "1 when the current site key is escrowed.",
                 1.0 if report.escrow.ok else 0.0)
    escrowed = report.escrow.escrowed_at
    yield _gauge("pacs_edge_escrow_timestamp_seconds",
                 "When the site key was last escrowed (0: never).",
                 _iso_seconds(escrowed) if escrowed else 0.0)
    if report.audit_forwarding is not None:
        yield _gauge("pacs_edge_audit_syslog_backlog_records",
                     "Audit records not yet taken by the syslog collector.",
                     report.audit_forwarding.backlog)
    warnings = GaugeMetricFamily("pacs_edge_health_warning",
                                 "Warnings `pacs-edge status` shows now, by code.",
                                 labels=["code"])
    for code in sorted({w.code for w in report.warnings}):
        warnings.add_metric([code], sum(1 for w in report.warnings if w.code == code))
    yield warnings


def _iso_seconds(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
