"""MPPS SCP on the wire: N-CREATE and N-SET (Modality Performed Procedure Step SOP Class,
PS3.4 F.7), N-GET (Modality Performed Procedure Step Retrieve SOP Class, F.8; also
taken on the MPPS context, where some SCUs send it).

Thin: decode the attribute list, call the MPPS service through the bridge,
map its refusal kind to a named status (with an Error Comment where PS3.4
asks for one, or where the status alone would not tell the modality's
operator what to fix), audit every step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pynetdicom import evt
from pynetdicom.sop_class import ModalityPerformedProcedureStepRetrieve  # type: ignore[attr-defined]

from appliance.audit import Auditor
from appliance.base.bridge import LoopBridge
from appliance.base.errors import OutOfSpace, PacsEdgeError
from appliance.dimse.dicom_status import Status
from appliance.dimse.handlers import peer_label
from appliance.services.mpps import SOP_CLASS_UID, Kind, MppsRefused, MppsService, StepResult

log = logging.getLogger(__name__)

MPPS_SOP_CLASS = SOP_CLASS_UID
MPPS_RETRIEVE_SOP_CLASS = str(ModalityPerformedProcedureStepRetrieve)  # 1.2.840.10008.3.1.2.3.4

_STATUS = {
    Kind.NOT_PERMITTED: Status.REFUSED_NOT_AUTHORIZED,
    Kind.DUPLICATE: Status.DUPLICATE_SOP_INSTANCE,
    Kind.NO_SUCH_STEP: Status.NO_SUCH_SOP_INSTANCE,
    Kind.FINAL: Status.PROCESSING_FAILURE,
    Kind.MISSING_ATTRIBUTE: Status.MISSING_ATTRIBUTE,
    Kind.MISSING_VALUE: Status.MISSING_ATTRIBUTE_VALUE,
    Kind.INVALID_VALUE: Status.INVALID_ATTRIBUTE_VALUE,
}
# The Error ID (0000,0903) PS3.4 Table F.7.2-2 pairs with a status: 0x0110 for a step
# that is COMPLETED or DISCONTINUED is A710 ("may no longer be updated"); modalities
# tell it from a failure of the box's own by it.
_ERROR_ID = {Kind.FINAL: 0xA710}


class MppsScp:
    def __init__(self, service: MppsService, bridge: LoopBridge, audit: Auditor) -> None:
        self.service = service
        self.bridge = bridge
        self.audit = audit

    def on_n_create(self, event: Any) -> tuple[Status | Dataset, Dataset | None]:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        return self._serve(event, "create", lambda attrs: self.service.create(
            calling, sop_uid, attrs), lambda: event.attribute_list)

    def on_n_set(self, event: Any) -> tuple[Status | Dataset, Dataset | None]:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_uid = str(event.request.RequestedSOPInstanceUID or "")
        return self._serve(event, "set", lambda attrs: self.service.update(
            calling, sop_uid, attrs), lambda: event.modification_list)

    def on_n_get(self, event: Any) -> tuple[Status | Dataset, Dataset | None]:
        label = peer_label(event.assoc)
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        if str(request.RequestedSOPClassUID or "") not in (MPPS_SOP_CLASS,
                                                            MPPS_RETRIEVE_SOP_CLASS):
            return Status.NO_SUCH_SOP_CLASS, None
        try:
            tags = event.attribute_identifiers
            step, found = self.bridge.call(self.service.get(
                calling, str(request.RequestedSOPInstanceUID or ""), tags))
        except MppsRefused as exc:
            log.warning("mpps get refused reason=%s %s", exc.reason, label)
            if exc.kind is Kind.NOT_PERMITTED:
                self.audit.refused(event.assoc, "mpps", exc.reason)
                return Status.REFUSED_NOT_AUTHORIZED, None
            return _failure(_STATUS[exc.kind], exc.reason), None
        except PacsEdgeError as exc:
            log.error("mpps get failed reason=%s %s", exc.message, label)
            return Status.PROCESSING_FAILURE, None
        log.info("mpps get answered step=%d attributes=%d %s", step.id, len(found), label)
        self.audit.procedure_step(
            event.assoc, created=False, read=True, state=step.state.value,
            patient_id=step.fields.patient_id, study_uids=[r.study_uid for r in step.refs],
            accession_numbers=[r.accession_number for r in step.refs])
        return Status.SUCCESS, found

    def _serve(self, event: Any, what: str, call: Any, attributes: Any
               ) -> tuple[Status | Dataset, Dataset | None]:
        label = peer_label(event.assoc)
        request = event.request
        sop_class = (getattr(request, "AffectedSOPClassUID", None)
                     or getattr(request, "RequestedSOPClassUID", None) or "")
        if str(event.context.abstract_syntax) != MPPS_SOP_CLASS:
            # The MPPS Retrieve SOP Class has N-GET only (PS3.4 F.8): an N-CREATE or
            # N-SET there is an operation it does not have, not a failure of ours.
            log.warning("mpps %s refused: not an operation of the MPPS Retrieve SOP class %s",
                        what, label)
            return Status.UNRECOGNIZED_OPERATION, None
        if str(sop_class) != MPPS_SOP_CLASS:
            return Status.NO_SUCH_SOP_CLASS, None
        try:
            self.service.permitted(str(event.assoc.requestor.ae_title).strip())
            try:
                decoded = attributes()
            except Exception as exc:
                log.warning("mpps %s refused: attribute list cannot be decoded error=%s %s",
                            what, type(exc).__name__, label)
                return _failure(Status.INVALID_ATTRIBUTE_VALUE,
                                "attribute list cannot be decoded"), None
            result: StepResult = self.bridge.call(call(decoded))
        except MppsRefused as exc:
            log.warning("mpps %s refused reason=%s %s", what, exc.reason, label)
            if exc.kind is Kind.NOT_PERMITTED:
                self.audit.refused(event.assoc, "mpps", exc.reason)
                return Status.REFUSED_NOT_AUTHORIZED, None
            self.audit.procedure_step(event.assoc, created=what == "create", state="refused",
                                      patient_id="", study_uids=(), reason=exc.reason)
            return _failure(_STATUS[exc.kind], exc.reason, _ERROR_ID.get(exc.kind)), None
        except OutOfSpace:
            log.error("mpps %s refused: no space for the index %s", what, label)
            return Status.RESOURCE_LIMITATION, None
        except PacsEdgeError as exc:
            log.error("mpps %s failed reason=%s %s", what, exc.message, label)
            return Status.PROCESSING_FAILURE, None
        step = result.step
        self.audit.procedure_step(
            event.assoc, created=result.created, state=step.state.value,
            patient_id=step.fields.patient_id, study_uids=[r.study_uid for r in step.refs],
            accession_numbers=[r.accession_number for r in step.refs])
        if result.ignored:
            names = ", ".join(keyword_for_tag(tag) or str(tag) for tag in result.ignored)
            log.warning("mpps set left attributes the N-CREATE set unchanged attributes=%s %s",
                        names, label)
            return _ignored(result.ignored, names), None
        return Status.SUCCESS, None


def event_handlers(scp: MppsScp) -> list[tuple[Any, Any]]:
    return [(evt.EVT_N_CREATE, scp.on_n_create), (evt.EVT_N_SET, scp.on_n_set),
            (evt.EVT_N_GET, scp.on_n_get)]


def _failure(status: Status, comment: str, error_id: int | None = None) -> Dataset:
    """A failure status with an Error Comment (LO: at most 64 characters) and, where
    PS3.4 names one, an Error ID."""
    response = Dataset()
    response.Status = int(status)
    response.ErrorComment = comment[:64]
    if error_id is not None:
        response.ErrorID = error_id
    return response


def _ignored(tags: Sequence[BaseTag], names: str) -> Dataset:
    """Warning 0x0107 Attribute List Error (PS3.7 C.4.3.1.2): the N-SET was applied but
    for the attributes in Attribute Identifier List, which PS3.4 Table F.7.2-1 does not
    allow in N-SET and which it sent with another value than the step holds."""
    response = Dataset()
    response.Status = int(Status.ATTRIBUTE_LIST_ERROR)
    response.AttributeIdentifierList = list(tags)
    response.ErrorComment = f"not changed by N-SET: {names}"[:64]
    return response
