"""Storage Commitment SCP (push model, PS3.4 Annex J) on the wire: N-ACTION in, N-EVENT-REPORT out.

The order PS3.4 J.3.3 asks for is: the N-ACTION response first, then the
N-EVENT-REPORT. pynetdicom (3.0.4) calls an `EVT_N_ACTION` handler *before*
it sends the response and offers no hook after it, and a report sent from
another thread would race the association's reactor for the response (see
appliance/dimse/move_get.py on the lost C-STORE response). So, as for
C-MOVE/C-GET, the appliance serves the SOP class with its own service class,
through the same seam (`compat.route_service_classes`; every other SOP class
keeps pynetdicom's class).
In the association's reactor thread, in order:

1. permission and request checks (the service decides; statuses here);
2. the request is committed to the index (durable before it is acknowledged);
3. the N-ACTION response;
4. the report, decided now, sent on this association if it is still open and
   the peer has not asked to release it. A report the peer did not take (no
   response, a failure status, association gone) is left pending and the
   reporter (commitment_report.py) delivers it on a new association.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class_n import StorageCommitmentServiceClass
from pynetdicom.status import code_to_category

from appliance.audit import Auditor
from appliance.base import compat
from appliance.base.bridge import LoopBridge
from appliance.base.config import DicomConfig
from appliance.base.errors import OutOfSpace, PacsEdgeError
from appliance.base.uids import normalise_uid
from appliance.dimse.dicom_status import Status
from appliance.dimse.handlers import peer_label
from appliance.services.commitment import (
    CommitmentRefused,
    CommitmentService,
    Refusal,
    Report,
    Verdict,
)
from appliance.store.commitment_rows import Commitment, RequestedItem

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # the one SOP Instance of the push model
REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2.1)
EVENT_ALL_COMMITTED = 1  # Event Type IDs (PS3.4 J.3.3.1)
EVENT_FAILURES_EXIST = 2
SAME_ASSOCIATION_WAIT = 10.0  # seconds for the N-EVENT-REPORT response on the request's association
_REPORT_MESSAGE_IDS = itertools.count()
_RESPONSE_POLL = 0.05  # seconds between looks for the peer's A-RELEASE-RQ meanwhile

FAILURE_REASON = {  # Failure Reason (0008,1197) per verdict, PS3.4 J.3.2.1.1.2.4
    Verdict.UNKNOWN: Status.NO_SUCH_SOP_INSTANCE,
    Verdict.CLASS_MISMATCH: Status.CLASS_INSTANCE_CONFLICT,
    Verdict.DAMAGED: Status.PROCESSING_FAILURE,
    Verdict.NOT_IN_CLOUD: Status.PROCESSING_FAILURE,
}
_REFUSAL_STATUS = {
    Refusal.NOT_PERMITTED: Status.REFUSED_NOT_AUTHORIZED,
    Refusal.INVALID_REQUEST: Status.INVALID_ARGUMENT_VALUE,
    Refusal.TOO_MANY_ITEMS: Status.RESOURCE_LIMITATION,
}


@dataclass(frozen=True)
class _Attachment:
    service: CommitmentService
    bridge: LoopBridge
    audit: Auditor
    wake_reporter: Callable[[], None]  # a report is due on a new association
    hold_seconds: float  # how long the first attempt may take (see report_hold_seconds)


_attached: weakref.WeakKeyDictionary[AE, _Attachment] = weakref.WeakKeyDictionary()


def attach(ae: AE, service: CommitmentService, bridge: LoopBridge, audit: Auditor,
           wake_reporter: Callable[[], None], config: DicomConfig) -> None:
    """Serve Storage Commitment for `ae` (installs the service-class seam once)."""
    install_service_class()
    _attached[ae] = _Attachment(service, bridge, audit, wake_reporter,
                                report_hold_seconds(config, service))


def report_hold_seconds(config: DicomConfig, service: CommitmentService) -> float:
    """An upper bound for one report attempt: association, report and release, plus a
    retry interval for deciding it (hashing the files). Nobody else delivers that
    commitment meanwhile; a crash mid-attempt delays its report by at most this."""
    return (config.connect_timeout + config.acse_timeout + config.dimse_timeout
            + service.config.commit_retry_seconds)


def install_service_class() -> None:
    compat.route_service_classes({STORAGE_COMMITMENT_PUSH}, CommitmentServiceClass)


class CommitmentServiceClass(StorageCommitmentServiceClass):
    def _n_action_scp(self, req: N_ACTION, context: PresentationContext) -> None:
        attached = _attached.get(self.ae)
        if attached is None:
            return super()._n_action_scp(req, context)
        _Request(self, attached, req, context).serve()


class _Request:
    """One N-ACTION Request Storage Commitment, from request to (first) report."""

    def __init__(self, sc: CommitmentServiceClass, attached: _Attachment, req: N_ACTION,
                 context: PresentationContext) -> None:
        self.sc = sc
        self.att = attached
        self.req = req
        self.cx_id = int(context.context_id or 0)
        self.ts = context.transfer_syntax[0]
        self.assoc = sc.assoc
        self.calling_ae = str(sc.assoc.requestor.ae_title).strip()
        self.label = peer_label(sc.assoc)

    def serve(self) -> None:
        accepted = self._accept()
        if isinstance(accepted, Status):
            self._respond(accepted)
            return
        self._respond(Status.SUCCESS)
        self._first_report(accepted)

    def _accept(self) -> Status | Commitment:
        """The committed request, or the status that refuses it."""
        service = self.att.service
        try:
            service.permitted(self.calling_ae)
        except CommitmentRefused as exc:
            log.warning("storage commitment refused reason=%s %s", exc.reason, self.label)
            self.att.audit.refused(self.assoc, "storage commitment", exc.reason)
            return _REFUSAL_STATUS[exc.refusal]
        if self.req.ActionTypeID != REQUEST_COMMITMENT:
            log.warning("storage commitment refused: unknown action type %s", self.label)
            return Status.NO_SUCH_ACTION
        if normalise_uid(self.req.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
            log.warning("storage commitment refused: not the well-known SOP Instance %s",
                        self.label)
            return Status.NO_SUCH_SOP_INSTANCE
        try:
            info = decode(self.req.ActionInformation, self.ts.is_implicit_VR,
                          self.ts.is_little_endian, self.ts.is_deflated)
            transaction_uid, items = _parse(info)
        except Exception as exc:
            log.warning("storage commitment refused: action information cannot be read"
                        " error=%s %s", type(exc).__name__, self.label)
            return Status.INVALID_ARGUMENT_VALUE
        try:
            commitment = self.att.bridge.call(service.request(
                self.calling_ae, transaction_uid, items, hold_seconds=self.att.hold_seconds))
        except CommitmentRefused as exc:
            log.warning("storage commitment refused reason=%s %s", exc.reason, self.label)
            return _REFUSAL_STATUS[exc.refusal]
        except OutOfSpace:
            log.error("storage commitment refused: no space for the index %s", self.label)
            return Status.RESOURCE_LIMITATION
        except PacsEdgeError as exc:
            log.error("storage commitment failed reason=%s %s", exc.message, self.label)
            return Status.PROCESSING_FAILURE
        return commitment

    def _respond(self, status: Status) -> None:
        rsp = N_ACTION()
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.RequestedSOPClassUID
        rsp.AffectedSOPInstanceUID = self.req.RequestedSOPInstanceUID
        if status == Status.SUCCESS:  # Action Type ID only with a success (PS3.7 10.1.4.1.6)
            rsp.ActionTypeID = self.req.ActionTypeID
        rsp.Status = int(status)
        self.sc.dimse.send_msg(rsp, self.cx_id)

    def _first_report(self, commitment: Commitment) -> None:
        service, bridge = self.att.service, self.att.bridge
        try:
            report = service.decide_blocking(commitment, bridge)
            if report is None:
                bridge.call(service.not_decided(commitment))
                log.info("storage commitment waits for verified cloud packs commitment=%d %s",
                         commitment.id, self.label)
                return
            error = self._send_here(report)
            if error is None:
                bridge.call(service.reported(report))
                self.att.audit.commitment_answered(
                    peer_ae=self.calling_ae, address=str(self.assoc.requestor.address),
                    study_uids=report.study_uids, committed=report.committed,
                    failed=report.failed)
                return
            bridge.call(service.not_delivered(commitment, error, retry_now=True))
        except Exception as exc:  # the request is durable: the reporter answers it
            log.error("storage commitment report deferred error=%s commitment=%d %s",
                      type(exc).__name__, commitment.id, self.label)
        self.att.wake_reporter()

    def _send_here(self, report: Report) -> str | None:
        """Send the report on the requesting association; None once the peer took it.

        In the reactor thread, inside the service class: the reactor cannot take the
        response off the queue (pynetdicom marks it paused while SCP() runs), so the
        response is awaited here, in short waits. A modality that released right after
        the N-ACTION response ignores a report that crossed its A-RELEASE-RQ: once that
        request is in, the wait ends and the reactor answers it. pynetdicom's
        send_n_event_report would wait out its timeout and then abort the association
        the modality was releasing."""
        assoc = self.assoc
        if not assoc.is_established:
            return "requesting association closed"
        if isinstance(assoc.dul.peek_next_pdu(), A_RELEASE):
            return "requesting association is being released"
        req = N_EVENT_REPORT()
        # Its own ID, so that a late response to an earlier report on this association
        # (one whose wait ended when the modality's next request came first) is not
        # taken for this one's.
        req.MessageID = next(_REPORT_MESSAGE_IDS) % 0xFFFF + 1
        req.AffectedSOPClassUID = STORAGE_COMMITMENT_PUSH
        req.AffectedSOPInstanceUID = WELL_KNOWN_INSTANCE
        req.EventTypeID = _event_type(report)
        req.EventInformation = BytesIO(encode(
            event_information(report, ae_title=str(assoc.acceptor.ae_title).strip()),
            self.ts.is_implicit_VR, self.ts.is_little_endian, self.ts.is_deflated))
        self.sc.dimse.send_msg(req, self.cx_id)
        deadline = time.monotonic() + min(assoc.dimse_timeout or SAME_ASSOCIATION_WAIT,
                                          SAME_ASSOCIATION_WAIT)
        messages = self.sc.dimse.msg_queue
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                received = messages.get(timeout=_RESPONSE_POLL)
                rsp = received[1]
                if (isinstance(rsp, N_EVENT_REPORT)
                        and rsp.MessageIDBeingRespondedTo == req.MessageID):
                    return _refused(rsp.Status)
                # The modality's next request (its next series' N-ACTION, a C-ECHO) came
                # first: it stays first in line for the reactor, which serves it once this
                # returns, and the report goes again on a new association.
                with messages.mutex:
                    messages.queue.appendleft(received)
                return "peer sent another request before the report's response"
            if isinstance(assoc.dul.peek_next_pdu(), A_RELEASE):
                return "requesting association is being released"
            if assoc.acse.is_aborted():
                return "requesting association ended"
        return "no N-EVENT-REPORT response (timeout)"


def _parse(info: Dataset) -> tuple[str, list[RequestedItem]]:
    transaction_uid = normalise_uid(info.get("TransactionUID", ""))
    items = [RequestedItem(normalise_uid(item.get("ReferencedSOPClassUID", "")),
                           normalise_uid(item.get("ReferencedSOPInstanceUID", "")))
             for item in info.get("ReferencedSOPSequence", [])]
    return transaction_uid, items


def event_information(report: Report, *, ae_title: str) -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 J.3.3.1.1): the success list with
    where to retrieve from, the failure list with each Failure Reason."""
    ds = Dataset()
    ds.TransactionUID = report.commitment.transaction_uid
    ds.RetrieveAETitle = ae_title
    committed, failed = [], []
    for item, verdict in zip(report.commitment.items, report.verdicts, strict=True):
        entry = Dataset()
        entry.ReferencedSOPClassUID = item.sop_class_uid
        entry.ReferencedSOPInstanceUID = item.sop_uid
        if verdict is Verdict.COMMITTED:
            committed.append(entry)
        else:
            entry.FailureReason = int(FAILURE_REASON[verdict])
            failed.append(entry)
    if committed:
        ds.ReferencedSOPSequence = committed
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def send_report(assoc: Any, report: Report, *, ae_title: str, msg_id: int = 1) -> str | None:
    """Send the report over `assoc`; None once the peer answered with a success or
    warning status, else why it was not delivered (PHI-free)."""
    try:
        status, _reply = assoc.send_n_event_report(
            event_information(report, ae_title=ae_title), _event_type(report),
            STORAGE_COMMITMENT_PUSH, WELL_KNOWN_INSTANCE, msg_id=msg_id)
    except Exception as exc:
        return f"sending the report failed ({type(exc).__name__})"
    code = status.get("Status") if isinstance(status, Dataset) else None
    if code is None:
        return "no N-EVENT-REPORT response (timeout or association ended)"
    return _refused(code)


def _event_type(report: Report) -> int:
    return EVENT_FAILURES_EXIST if report.failed else EVENT_ALL_COMMITTED


def _refused(code: Any) -> str | None:
    """Why a response status means the report was not taken; None for a success or
    warning."""
    if code is None:
        return "peer answered the report without a status"
    if code_to_category(int(code)) not in ("Success", "Warning"):
        return f"peer answered the report with status 0x{int(code):04X}"
    return None
