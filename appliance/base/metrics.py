"""The event metrics every process counts, and the text a scrape of /metrics returns.

Events (associations, DIMSE operations, bytes, HL7 messages, replications,
recalls) are counted where they happen, in whichever process they happen
(see metrics_dir.py for how the processes' counts add up). State (studies
per tiering state, disk, bytes waiting, certificate expiry...) is not counted
here: services/state_metrics.py derives it from the index and the data home at
scrape time, so it is right whatever process changed it.

No label carries PHI or a UID: labels are services, outcomes and reasons from
fixed sets, and names of configured peers' roles, never identifiers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from appliance.base import compat
from appliance.base.metrics_dir import ENV, counts_read

# Before any series is made: every process that counts backs its files' pages, not only
# those that call use_metrics_dir. A serve worker is spawned (a new interpreter) and
# inherits $PROMETHEUS_MULTIPROC_DIR but not that patch: its files were sparse again, and
# the first new series on a full disk killed it with SIGBUS (compat.back_metric_pages).
compat.back_metric_pages()

# The classic text format: every name here is a legacy-valid one, and every Prometheus
# release reads it (the library's own default answer without content negotiation).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# DIMSE operations take from a millisecond (C-ECHO) to minutes (C-MOVE of a large study).
_DIMSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0, 300.0)
_SYNC_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 16 * 3600.0)

ASSOCIATIONS = Counter(
    "pacs_edge_associations", "DICOM associations by outcome; rejected ones by reason.",
    ["outcome", "reason"])
ASSOCIATIONS_ACTIVE = Gauge(
    "pacs_edge_associations_active", "DICOM associations open now.",
    multiprocess_mode="livesum")
DIMSE_OPERATIONS = Counter(
    "pacs_edge_dimse_operations", "DIMSE requests answered, by service and status class.",
    ["service", "status"])
DIMSE_SECONDS = Histogram(
    "pacs_edge_dimse_duration_seconds", "Time from a DIMSE request to its final response.",
    ["service"], buckets=_DIMSE_BUCKETS)
RECEIVED_BYTES = Counter(
    "pacs_edge_received_bytes", "Bytes of instances received, by edge.", ["edge"])
SENT_BYTES = Counter(
    "pacs_edge_sent_bytes", "Bytes of instances sent, by edge.", ["edge"])
INGEST_IN_PROGRESS = Gauge(
    "pacs_edge_ingest_in_progress", "Instances being received and made durable right now.",
    multiprocess_mode="livesum")
INSTANCES_OF_ANOTHER_PATIENT = Counter(
    "pacs_edge_instances_of_another_patient",
    "Instances stored that name another patient than the study they belong to is filed"
    " under.")
HL7_MESSAGES = Counter(
    "pacs_edge_hl7_messages", "HL7 messages answered, by acknowledgement code.", ["ack"])
HTTP_REQUESTS = Counter(
    "pacs_edge_http_requests", "HTTP requests answered, by area and status class.",
    ["area", "status"])
REPLICATIONS = Counter(
    "pacs_edge_replications", "Study replications to the cloud, by outcome.", ["outcome"])
REPLICATED_BYTES = Counter(
    "pacs_edge_replicated_bytes", "Bytes of packs uploaded to the cloud.")
REPLICATION_SECONDS = Histogram(
    "pacs_edge_replication_duration_seconds", "Time to pack, upload and verify one study.",
    buckets=_SYNC_BUCKETS)
RECALLS = Counter(
    "pacs_edge_recalls", "Study recalls from the cloud, by outcome.", ["outcome"])
RECALLED_BYTES = Counter(
    "pacs_edge_recalled_bytes", "Bytes of packs downloaded by recalls.")
RECALL_SECONDS = Histogram(
    "pacs_edge_recall_duration_seconds",
    "Time to bring one study back from the cloud, verified (Archive tier: hours).",
    buckets=_SYNC_BUCKETS)
PREFETCH_PRIORS = Counter(
    "pacs_edge_prefetch_priors",
    "Prefetched priors finished, by source (local, cloud, remote) and outcome (done or the"
    " failure kind).", ["source", "outcome"])
AUDIT_WRITE_FAILURES = Counter(
    "pacs_edge_audit_write_failures",
    "Appends of buffered audit records that the audit log refused (each retry counts).")
SYNC_PASSES = Counter(
    "pacs_edge_sync_passes", "Replicate-and-evict passes of the sync agent, by outcome.",
    ["outcome"])


def status_class(status: int) -> str:
    """A DIMSE status as one of a few classes (PS3.7 C): the label of DIMSE_OPERATIONS."""
    if status == 0x0000:
        return "success"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def exposition(state: Iterable[Metric] = ()) -> bytes:
    """The text format of every process's events plus `state` (already derived)."""
    registry = CollectorRegistry(auto_describe=False)
    folder = os.environ.get(ENV)
    if folder:
        multiprocess.MultiProcessCollector(registry)
        with counts_read(Path(folder)):
            text = generate_latest(registry)
    else:
        text = generate_latest(REGISTRY)
    families = list(state)
    if families:
        extra = CollectorRegistry(auto_describe=False)
        extra.register(_Fixed(families))
        text += generate_latest(extra)
    return text


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _declare_series() -> None:
    """Export the everyday series at 0 from the start: an alert on `increase(...)` or a
    dashboard panel then sees a series before the first event, not an absent one."""
    ASSOCIATIONS.labels("accepted", "")
    for reason in ("unknown-calling-ae", "wrong-called-ae", "busy", "peer-refused"):
        ASSOCIATIONS.labels("rejected", reason)
    for service in ("C-ECHO", "C-STORE", "C-FIND", "C-MOVE", "C-GET"):
        DIMSE_OPERATIONS.labels(service, "success")
        DIMSE_OPERATIONS.labels(service, "failure")
    for counter in (REPLICATIONS, RECALLS, SYNC_PASSES):
        counter.labels("ok")
        counter.labels("failed")
    for ack in ("AA", "AE", "AR"):
        HL7_MESSAGES.labels(ack)


_declare_series()
