"""Storage Commitment reports on a new association: the pending ones, after a release or a restart.

The reporter is one thread of the serving process (worker 0 when there are
several). It wakes every few seconds, or at once when a report could not be
given on the requesting association, takes the commitments that are due
(appliance/store/commitment_rows.py keeps them durable, so a restart loses none),
decides each report now and sends it to the requesting peer's address and
port from the allowlist, over DICOM TLS if the peer is marked `tls`.

The association it opens proposes the Storage Commitment Push Model with
SCP/SCU role selection, the box in the SCP role (PS3.4 J.3.3: the SCP
initiates the association that carries the N-EVENT-REPORT). A peer that does
not negotiate roles gets the report anyway (roles do not govern
N-EVENT-REPORT, and modalities differ).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role

from appliance.audit import Auditor
from appliance.base import compat
from appliance.base.bridge import LoopBridge
from appliance.base.config import DicomConfig
from appliance.dimse.commitment_scp import (
    STORAGE_COMMITMENT_PUSH,
    report_hold_seconds,
    send_report,
)
from appliance.dimse.move_get import ReactorGate
from appliance.services.commitment import CommitmentService, Report
from appliance.services.peers import Allowlist, Peer
from appliance.store.commitment_rows import Commitment

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # at most this long between looks at the due list
_GATE_WAIT = 1.0  # seconds for the new association's reactor to park


class CommitmentReporter:
    def __init__(self, ae: AE, service: CommitmentService, allowlist: Allowlist,
                 bridge: LoopBridge, audit: Auditor, config: DicomConfig, *,
                 tls_client: ssl.SSLContext | None = None) -> None:
        self.ae = ae
        self.service = service
        self.allowlist = allowlist
        self.bridge = bridge
        self.audit = audit
        self.config = config
        self.tls_client = tls_client
        self.poll = min(POLL_SECONDS, service.config.commit_retry_seconds)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commitment-reporter",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30.0)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._pass()
            except Exception as exc:  # the thread must outlive a bad pass; rows stay pending
                log.error("commitment reporter pass failed error=%s", type(exc).__name__)

    def _pass(self) -> None:
        """Deliver the due reports. A peer that could not be reached is not tried again in
        this pass: each attempt at one that never answers costs an ACSE timeout, and its
        other reports would hold up every other modality's (three of them: 99 s). They
        stay due for the next pass. The due list is read again without that peer's, so
        that however many it has, the others' come next in this pass. Each commitment
        read leaves the due list (answered, rescheduled or claimed), so the pass ends."""
        unreachable: set[str] = set()
        horizon = report_hold_seconds(self.config, self.service)
        while batch := self.bridge.call(self.service.due(horizon=horizon,
                                                         skip_aes=frozenset(unreachable))):
            for commitment in batch:
                if self._stop.is_set():
                    return
                if commitment.calling_ae in unreachable:
                    continue
                if not self._deliver(commitment):
                    unreachable.add(commitment.calling_ae)

    def _deliver(self, commitment: Commitment) -> bool:
        """Decide and send one report; False when the peer could not be reached (no
        association), True otherwise."""
        hold = report_hold_seconds(self.config, self.service)
        if not self.bridge.call(self.service.claim(commitment, hold_seconds=hold)):
            return True  # answered meanwhile, or another attempt holds it
        report = self.service.decide_blocking(commitment, self.bridge)
        if report is None:
            self.bridge.call(self.service.not_decided(commitment))
            return True
        peer = self.allowlist.by_ae_title(commitment.calling_ae)
        error, reached = (("requesting AE title is no longer in the allowlist", True)
                          if peer is None else self._send(peer, report))
        if error is None:
            assert peer is not None
            self.bridge.call(self.service.reported(report))
            self.audit.commitment_answered(peer_ae=peer.ae_title, address=peer.host,
                                           study_uids=report.study_uids,
                                           committed=report.committed, failed=report.failed)
            return True
        gave_up = self.bridge.call(self.service.not_delivered(commitment, error))
        if gave_up:
            self.audit.commitment_answered(
                peer_ae=commitment.calling_ae, address=peer.host if peer else "",
                study_uids=report.study_uids, committed=0, failed=len(report.verdicts),
                reason=f"report undeliverable, gave up: {error}")
        return reached

    def _send(self, peer: Peer, report: Report) -> tuple[str | None, bool]:
        """(why the report was not given, None when it was; whether an association was
        made or refused by the peer)."""
        tls_args = None
        if peer.tls:
            if self.tls_client is None:
                return "peer is marked TLS but this box has TLS off ([dicom] tls_port)", True
            tls_args = (self.tls_client, None)
        contexts = [build_context(STORAGE_COMMITMENT_PUSH,
                                  [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        compat.close_requestor_reactor_race()
        assoc: Any = self.ae.associate(
            peer.host, peer.port, contexts=contexts, ae_title=peer.ae_title,
            max_pdu=self.config.max_pdu, tls_args=tls_args,
            ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)])
        if not assoc.is_established:
            with contextlib.suppress(Exception):  # pynetdicom leaves the socket open here
                if assoc.dul.socket is not None:
                    assoc.dul.socket.close()
            if assoc.is_rejected:
                return "peer rejected the association", True
            return f"no association with {peer.host}:{peer.port}", False
        compat.set_nodelay(assoc)
        # The reactor must be parked before the send, or it may take the response
        # off the queue (the race described in retrieve.py).
        gate = ReactorGate.install(assoc)
        if gate is not None:
            gate.hold(_GATE_WAIT)
        try:
            return send_report(assoc, report, ae_title=self.config.ae_title), True
        finally:
            if assoc.is_established:
                if gate is not None:
                    gate.hold(_GATE_WAIT)
                with contextlib.suppress(Exception):
                    assoc.release()
