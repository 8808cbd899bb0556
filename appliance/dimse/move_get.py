"""C-MOVE and C-GET on the wire: the appliance's own Query/Retrieve service class.

Why not pynetdicom's (3.0.4) built-in C-MOVE/C-GET SCP (`service_class.py`
`_move_scp` / `_get_scp`):
- it wants the handler to yield decoded pydicom Datasets and re-encodes
  them: slow, and not byte-exact. Here the sub-operations go through a
  StoreLane (store_lane.py): the stored dataset bytes go out as they are,
  framed straight from the file, in the transfer syntax they were stored
  in, never transcoded, and the lane reads the C-STORE responses itself;
- it opens the C-MOVE sub-association itself: Nagle left on (about 40 ms
  per instance), no retry, one destination association whatever fails;
- it sets Move Originator AE Title to its own AE title (PS3.7 9.1.1.1:
  it is the AE that *invoked* the C-MOVE).

The seam (one, in appliance/base/compat.py with the other patches of library
internals): `Association._serve_request` picks a service class through the
module-level name `pynetdicom.association.uid_to_service_class`. `attach()`
wraps that name once per process (compat.route_service_classes) so the four
Patient/Study Root Move and Get SOP classes get RetrieveServiceClass; everything else, C-FIND
included, is pynetdicom's as before. The class serves only AEs that were
attached (the serving process's AE, see appliance/process/serve.py) and falls back
to pynetdicom's behaviour for any other AE in the process.

The lost C-STORE response (pynetdicom 3.0.4 as SCU, seen on loopback about
once per thousand sub-operations with `send_c_store()`): an association's
reactor thread parks on `_reactor_checkpoint` while `send_*()` waits for a
response, but `send_c_store()` only spins until `_is_paused` is True, which
the reactor also sets on its way *through* an open checkpoint; when the
sender wins that race the reactor takes the C-STORE-RSP off the queue.
The lane reads its responses off the socket, so they never reach that
queue; the ReactorGate (compat.replace_reactor_checkpoint) still guards the
A-RELEASE of a sub-association, and every requested association's reactor
re-checks the checkpoint (compat.close_requestor_reactor_race). Recovery
stays: a send that gets no Status (timeout, abort, broken connection) is
retried on a fresh sub-association, up to `suboperation_retries` times;
the instance is counted once, completed or failed. The destination may
then hold the instance twice over the wire; storage is idempotent by SOP
Instance UID.

C-GET sends over the requesting association from inside its own reactor
thread; a missing response means that association is unusable: it is
aborted (as pynetdicom's `send_c_store()` does), and the instance counts
failed.

Decisions (permission, destination, which instances) are appliance/services/retrieve.py's.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from appliance.audit import Auditor
from appliance.base import compat, logsafe
from appliance.base.bridge import LoopBridge
from appliance.base.config import DicomConfig
from appliance.base.errors import NotAuthorized, QueryError, RetrieveRefusal, RetrieveRefused
from appliance.dimse.dicom_status import QUERY_STATUS, Status
from appliance.dimse.handlers import peer_label
from appliance.dimse.identifier_decoding import decode_identifier, identifier_bytes
from appliance.dimse.store_lane import (
    C_GET_RSP,
    C_MOVE_RSP,
    StoreLane,
    pending_rsp,
    storage_contexts,
    write_command,
)
from appliance.services.peers import Peer
from appliance.services.retrieve import (
    Action,
    Instance,
    Plan,
    RetrieveModel,
    RetrieveService,
)

log = logging.getLogger(__name__)

_ROUTED = {
    PatientRootQueryRetrieveInformationModelMove: (Action.MOVE, RetrieveModel.PATIENT_ROOT),
    StudyRootQueryRetrieveInformationModelMove: (Action.MOVE, RetrieveModel.STUDY_ROOT),
    PatientRootQueryRetrieveInformationModelGet: (Action.GET, RetrieveModel.PATIENT_ROOT),
    StudyRootQueryRetrieveInformationModelGet: (Action.GET, RetrieveModel.STUDY_ROOT),
}
# 0xA900 is "Identifier does not match SOP Class" for Q/R (PS3.4 C.4.2.1.5).
REFUSAL_STATUS = {
    RetrieveRefusal.UNKNOWN_DESTINATION: Status.MOVE_DESTINATION_UNKNOWN,
    RetrieveRefusal.INVALID_IDENTIFIER: Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RetrieveRefusal.TOO_MANY_MATCHES: Status.OUT_OF_RESOURCES_MATCHES,
}
MAX_CONTEXTS = 128  # presentation contexts per association (odd IDs 1-255, PS3.8 9.3.2.2)
_GATE_WAIT = 1.0  # seconds for a sub-association's reactor to park
RECALL_PENDING_INTERVAL = 2.0  # seconds between Pending responses while a recall runs
# Instances in a row whose every attempt went unanswered: the destination is then taken
# as stopped, and the rest of the move fails at once rather than each instance waiting
# (retries + 1) x suboperation_timeout. Two, not one: a destination may choke on one
# object and take the next.
UNANSWERED_IN_A_ROW = 2


@dataclass(frozen=True)
class _Attachment:
    service: RetrieveService
    bridge: LoopBridge
    config: DicomConfig
    audit: Auditor | None = None
    tls_client: ssl.SSLContext | None = None  # for destinations marked TLS


_attached: weakref.WeakKeyDictionary[AE, _Attachment] = weakref.WeakKeyDictionary()


def attach(ae: AE, service: RetrieveService, bridge: LoopBridge, config: DicomConfig, *,
           audit: Auditor | None = None, tls_client: ssl.SSLContext | None = None) -> None:
    """Serve C-MOVE/C-GET for `ae` with `service` (installs the class seam once)."""
    compat.route_service_classes(_ROUTED, RetrieveServiceClass)
    _attached[ae] = _Attachment(service, bridge, config, audit, tls_client)


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """pynetdicom's Q/R service class with the appliance's C-MOVE and C-GET SCP."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        attached = _attached.get(self.ae)
        if attached is None:
            return super()._move_scp(req, context)
        _Retrieval(self, attached, req, context).move()

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        attached = _attached.get(self.ae)
        if attached is None:
            return super()._get_scp(req, context)
        _Retrieval(self, attached, req, context).get()


@dataclass
class _Tally:
    """Sub-operation counts as PS3.4 C.4.2.3.1 reports them."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def fail(self, instance: Instance) -> None:
        self.remaining -= 1
        self.failed += 1
        self.failed_uids.append(instance.sop_uid)

    def record(self, instance: Instance, status: int) -> None:
        category = code_to_category(status)
        if category == "Success":
            self.remaining -= 1
            self.completed += 1
        elif category == "Warning":
            self.remaining -= 1
            self.warning += 1
        else:
            self.fail(instance)

    def final_status(self) -> Status:
        if not self.failed and not self.warning:
            return Status.SUCCESS
        if not self.completed and not self.warning:
            return Status.OUT_OF_RESOURCES_SUBOPERATIONS
        return Status.SUBOPERATIONS_COMPLETE_WITH_FAILURES


class _Retrieval:
    """One C-MOVE or C-GET request, from identifier to final response."""

    def __init__(
        self, sc: RetrieveServiceClass, attached: _Attachment, req: Any,
        context: PresentationContext,
    ) -> None:
        self.sc = sc
        self.att = attached
        self.req = req
        self.cx_id = int(context.context_id or 0)
        self.ts = context.transfer_syntax[0]
        self.action, self.model = _ROUTED[str(req.AffectedSOPClassUID)]
        self.label = peer_label(sc.assoc)
        self.calling_ae = str(sc.assoc.requestor.ae_title).strip()
        self.started = time.monotonic()
        self.requestor_gone = False  # the requestor ended the association mid-retrieve
        self.cancelled = False  # a C-CANCEL arrived (see _cancel_requested)
        self.error_comment = ""  # why instances could not be sent, for the final response
        self.in_lane = False  # a C-GET's StoreLane holds the requesting association's reads

    # --- the two services -------------------------------------------------------

    def move(self) -> None:
        destination = str(self.req.MoveDestination)
        plan = self._plan(move_destination=destination)
        if plan is not None and plan.recall_studies:
            plan = self._after_recall(plan, plan.recall_studies, _Tally(remaining=plan.total),
                                      lambda: self._plan(move_destination=destination))
        if plan is None:
            return
        assert plan.destination is not None
        tally = self._start(plan, f"destination={plan.destination.name}")
        cancelled = False
        if plan.instances and self.sc.assoc.is_established:
            gone: list[Instance] = []
            cancelled = self._move_all(plan.instances, plan.destination, tally, gone)
            if gone and not cancelled and self.sc.assoc.is_established:
                again = self._after_gone(plan, gone, tally)
                if again is None:
                    return
                cancelled = self._move_all(again.instances, plan.destination, tally, None)
        self._finish(plan, tally, cancelled)

    def get(self) -> None:
        plan = self._plan()
        if plan is not None and plan.recall_studies:
            plan = self._after_recall(plan, plan.recall_studies, _Tally(remaining=plan.total),
                                      self._plan)
        if plan is None:
            return
        tally = self._start(plan, "")
        msg_ids = _message_ids(int(self.req.MessageID))
        refused: set[_Pair] = set()
        gone: list[Instance] = []
        cancelled = self._get_all(plan.instances, tally, msg_ids, refused, gone)
        if gone and not cancelled and not self.requestor_gone and self.sc.assoc.is_established:
            again = self._after_gone(plan, gone, tally)
            if again is None:
                return
            cancelled = self._get_all(again.instances, tally, msg_ids, refused, None)
        if self.requestor_gone or not self.sc.assoc.is_established:
            log.warning("get stopped: requesting association ended %s", self.label)
        self._finish(plan, tally, cancelled)

    def _get_all(self, instances: tuple[Instance, ...], tally: _Tally, msg_ids: Iterator[int],
                 refused: set[_Pair], gone: list[Instance] | None) -> bool:
        """Send `instances` over the requesting association; True if the requestor
        cancelled. A file gone since the plan is put in `gone` if given, else fails."""
        assoc = self.sc.assoc
        # Contexts the requestor accepted us to use as Storage SCU (role selection).
        contexts = storage_contexts(assoc)
        sendable = [i for i in instances if (i.sop_class_uid, i.transfer_syntax) in contexts]
        upcoming = dict(zip((i.sop_uid for i in sendable),
                            (i.path for i in sendable[1:]), strict=False))
        cancelled = False
        with StoreLane(assoc, contexts, timeout=assoc.dimse_timeout) as lane:
            self.in_lane = True
            for instance in instances:
                if self._cancel_requested():
                    cancelled = True
                    break
                pair = (instance.sop_class_uid, instance.transfer_syntax)
                if pair not in contexts:
                    if pair not in refused:
                        refused.add(pair)
                        log.warning("get sub-operation failed: no storage context with SCP "
                                    "role for the stored transfer syntax (not transcoding) %s %s",
                                    _pair_label(pair), self.label)
                    tally.fail(instance)
                else:
                    try:
                        status = _lane_store(lane, instance, msg_id=next(msg_ids),
                                             upcoming=upcoming.get(instance.sop_uid))
                    except _Unreadable as exc:
                        if exc.gone and gone is not None:
                            gone.append(instance)
                            continue
                        if exc.gone:
                            _log_gone(instance)
                        tally.fail(instance)
                    else:
                        if status is None:
                            tally.fail(instance)
                            log.warning("get sub-operation got no C-STORE response instance=%s"
                                        " %s", logsafe.ref(instance.sop_uid), self.label)
                        else:
                            tally.record(instance, status)
                if lane.broken or not assoc.is_established:
                    break
                self._respond(Status.PENDING, tally)
            self.in_lane = False
        if lane.broken:
            # Ended by the peer: pynetdicom's reactor (this thread, once we return)
            # finishes it, and no final response can go out.
            self.requestor_gone = lane.ended
            if not lane.ended and assoc.is_established:
                assoc.abort()
        return cancelled

    # --- steps ------------------------------------------------------------------

    def _cancel_requested(self) -> bool:
        """Whether the requestor sent a C-CANCEL; kept once seen, since pynetdicom's
        `is_cancelled()` consumes it and a sub-operation's retries ask first."""
        if not self.cancelled:
            self.cancelled = self.sc.is_cancelled(int(self.req.MessageID))
        return self.cancelled

    def _plan(self, *, move_destination: str | None = None) -> Plan | None:
        name = self.action.value
        try:
            identifier = decode_identifier(identifier_bytes(self.req.Identifier), self.ts,
                                           label=self.label)
        except QueryError as exc:
            log.warning("%s refused reason=%s %s", name, exc.message, self.label)
            self._audit_failure(f"refused: {exc.message}")
            self._respond(QUERY_STATUS[exc.kind])
            return None
        try:
            return self.att.bridge.call(self.att.service.plan(
                calling_ae=self.calling_ae, action=self.action, model=self.model,
                identifier=identifier, move_destination=move_destination,
            ))
        except NotAuthorized as exc:
            log.warning("%s refused reason=%s %s", name, exc.message, self.label)
            if self.att.audit is not None:
                self.att.audit.refused(self.sc.assoc, name, exc.message)
            self._respond(Status.REFUSED_NOT_AUTHORIZED)
        except RetrieveRefused as exc:
            log.warning("%s refused reason=%s %s", name, exc.reason, self.label)
            self._audit_refusal(exc)
            self._respond(REFUSAL_STATUS[exc.kind])
        except Exception as exc:
            log.error("%s failed error=%s %s", name, type(exc).__name__, self.label)
            self._audit_failure(f"failed: {type(exc).__name__}")
            self._respond(Status.UNABLE_TO_PROCESS)
        return None

    def _after_recall(self, plan: Plan, studies: Sequence[str], tally: _Tally,
                      replan: Callable[[], Plan | None]) -> Plan | None:
        """Wait for the sync agent to recall the evicted `studies`, sending Pending
        responses with `tally` meanwhile, then `replan` (what is still missing then fails).

        None when the requestor cancelled (answered here with Cancel, `plan` audited) or
        left."""
        service = self.att.service
        log.info("%s waits for a recall studies=%d %s", self.action.value, len(studies),
                 self.label)
        deadline = time.monotonic() + service.recall_timeout
        while True:
            wait = min(RECALL_PENDING_INTERVAL, max(0.0, deadline - time.monotonic()))
            result = self.att.bridge.call(service.await_studies(
                studies, requested_by=self.calling_ae, wait=wait))
            if result.done or result.errors or time.monotonic() >= deadline:
                break
            if self._cancel_requested():
                self._finish(plan, tally, cancelled=True)
                return None
            if not self.sc.assoc.is_established:
                log.warning("%s stopped while waiting for a recall: requesting association "
                            "ended %s", self.action.value, self.label)
                self.requestor_gone = True
                self._finish(plan, tally, cancelled=False)
                return None
            self._respond(Status.PENDING, tally)
        if result.errors:
            log.error("%s: recall failed reason=%s %s", self.action.value,
                      "; ".join(result.errors), self.label)
            self.error_comment = "recall of an evicted study from the cloud failed"
        elif not result.done:
            log.error("%s: recall not finished after %.0f s (the sync agent's log says why;"
                      " is `pacs-edge sync` running?) %s",
                      self.action.value, service.recall_timeout, self.label)
            self.error_comment = "recall of an evicted study from the cloud timed out"
        return replan()

    def _after_gone(self, plan: Plan, gone: list[Instance], tally: _Tally) -> Plan | None:
        """What to send of `gone`, the instances whose file was not there when it was to
        be sent: those of a study evicted since the plan once it is recalled, as for a
        study evicted before (the same wait); the others (a damaged store) fail here.
        None when the requestor cancelled or left while waiting."""
        def replan() -> Plan:
            try:
                return self.att.bridge.call(self.att.service.replan_gone(plan, gone))
            except Exception as exc:
                log.error("%s: instances whose file is gone fail: no new plan error=%s %s",
                          self.action.value, type(exc).__name__, self.label)
                return replace(plan, instances=(), unavailable=tuple(gone), recall_studies=())

        again: Plan | None = replan()
        if again is not None and again.recall_studies:
            again = self._after_recall(plan, again.recall_studies, tally, replan)
        if again is not None:
            for instance in again.unavailable:
                tally.fail(instance)
        return again

    def _start(self, plan: Plan, extra: str) -> _Tally:
        # The studies are in use from now: eviction takes the least recently used first,
        # and a long retrieve stamped only at its end could lose its files under it.
        try:
            self.att.bridge.call(self.att.service.record_access(plan))
        except Exception as exc:  # an access stamp is not worth failing a retrieve for
            log.warning("could not record study access error=%s", type(exc).__name__)
        tally = _Tally(remaining=plan.total)
        for instance in plan.unavailable:
            tally.fail(instance)
        if plan.unavailable:
            log.warning("%s: matched instances not on local disk fail (file missing, or study "
                        "evicted and not recalled) count=%d %s", self.action.value,
                        len(plan.unavailable), self.label)
        log.info("%s started instances=%d unavailable=%d %s %s", self.action.value,
                 len(plan.instances), len(plan.unavailable), extra, self.label)
        return tally

    def _move_all(self, instances: tuple[Instance, ...], destination: Peer, tally: _Tally,
                  gone: list[Instance] | None) -> bool:
        """Send `instances` to the destination; True if the requestor cancelled.
        A file gone since the plan is put in `gone` if given, else fails."""
        retries = self.att.config.suboperation_retries
        for batch, pairs in _batches(instances):
            sub = _SubAssociation(self.sc.ae, destination, pairs, self.att.config, self.label,
                                  tls_client=self.att.tls_client)
            upcoming = dict(zip((i.sop_uid for i in batch), (i.path for i in batch[1:]),
                                strict=False))
            try:
                for instance in batch:
                    if self._cancel_requested():
                        return True
                    if not self.sc.assoc.is_established:
                        log.warning("move stopped: requesting association ended %s", self.label)
                        return False
                    try:
                        status = self._move_one(sub, instance, retries,
                                                upcoming.get(instance.sop_uid))
                    except _Unreadable:  # gone: its study may have been evicted meanwhile
                        if gone is not None:
                            gone.append(instance)
                            continue
                        _log_gone(instance)
                        status = None
                    if status is None:
                        tally.fail(instance)
                    else:
                        tally.record(instance, status)
                    self._respond(Status.PENDING, tally)
            finally:
                sub.close()
        return False

    def _move_one(self, sub: _SubAssociation, instance: Instance, retries: int,
                  upcoming: Path | None) -> int | None:
        """Status of one C-STORE sub-operation, None if it failed without one; raises
        _Unreadable when the stored file is gone (nothing was sent)."""
        for attempt in range(1, retries + 2):
            if attempt > 1 and self._cancel_requested():
                return None  # no retry after a C-CANCEL: the requestor waits for the answer
            if not sub.open() or not sub.accepts(instance):
                return None
            try:
                status = sub.send(instance, originator_aet=self.calling_ae,
                                  originator_id=int(self.req.MessageID), upcoming=upcoming)
            except _Unreadable as exc:
                if exc.gone:
                    raise
                return None
            if status is not None:
                sub.unanswered = 0
                return status
            sub.abort()
            log.warning("move sub-operation got no C-STORE response attempt=%d of %d "
                        "instance=%s destination=%s", attempt, retries + 1,
                        logsafe.ref(instance.sop_uid), sub.peer.name)
        log.error("move sub-operation failed after %d attempts instance=%s destination=%s",
                  retries + 1, logsafe.ref(instance.sop_uid), sub.peer.name)
        sub.unanswered += 1
        if sub.unanswered >= UNANSWERED_IN_A_ROW:
            sub.down = True
            log.error("move destination stopped answering C-STOREs (%d instances in a row): "
                      "the remaining sub-operations fail destination=%s %s",
                      sub.unanswered, sub.peer.name, self.label)
        return None

    def _finish(self, plan: Plan, tally: _Tally, cancelled: bool) -> None:
        self._audit(plan, tally, cancelled)
        if self.requestor_gone or not self.sc.assoc.is_established:
            return
        status = Status.CANCEL if cancelled else tally.final_status()
        log.info("%s finished status=0x%04X completed=%d failed=%d warning=%d remaining=%d "
                 "seconds=%.2f %s", self.action.value, status, tally.completed, tally.failed,
                 tally.warning, tally.remaining, time.monotonic() - self.started, self.label)
        self._respond(status, tally, final=True)

    def _audit(self, plan: Plan, tally: _Tally, cancelled: bool) -> None:
        """One audit record per retrieve: studies, destination, counts (PS3.15 A.5.3.4)."""
        if self.att.audit is None:
            return
        target = plan.destination
        self.att.audit.retrieved(
            self.sc.assoc, action=self.action.value,
            study_uids={i.study_uid for i in (*plan.instances, *plan.unavailable)},
            destination=(target.ae_title, target.host) if target is not None else None,
            completed=tally.completed + tally.warning, failed=tally.failed,
            reason="cancelled by the requestor" if cancelled else "")

    def _audit_failure(self, reason: str) -> None:
        """A retrieve that failed before any study was known: a failed record, the why."""
        if self.att.audit is not None:
            self.att.audit.retrieved(self.sc.assoc, action=self.action.value, study_uids=(),
                                     reason=f"{self.action.value} {reason}")

    def _audit_refusal(self, exc: RetrieveRefused) -> None:
        if self.att.audit is None:
            return
        if exc.kind is RetrieveRefusal.UNKNOWN_DESTINATION:
            self.att.audit.refused(self.sc.assoc, self.action.value, exc.reason)
        else:
            self.att.audit.retrieved(self.sc.assoc, action=self.action.value, study_uids=(),
                                     reason=f"{self.action.value} refused: {exc.reason}")

    def _respond(self, status: Status, tally: _Tally | None = None, *, final: bool = False) -> None:
        """Send one C-MOVE/C-GET response (PS3.4 C.4.2.3.1, C.4.3.3.1).

        The requestor is silent while it waits for these: its network timeout counts from
        the last one, else a retrieve longer than `network_timeout` ends with an A-ABORT
        where the requestor's A-RELEASE-RQ was due."""
        compat.note_transport_activity(self.sc.assoc.dul)
        if status == Status.PENDING and tally is not None and self._pending_direct(tally):
            return
        rsp = C_MOVE() if self.action is Action.MOVE else C_GET()
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = int(status)
        if tally is not None:
            # Remaining is reported while pending and in a Cancel response only.
            if status in (Status.PENDING, Status.CANCEL):
                rsp.NumberOfRemainingSuboperations = tally.remaining
            rsp.NumberOfCompletedSuboperations = tally.completed
            rsp.NumberOfFailedSuboperations = tally.failed
            rsp.NumberOfWarningSuboperations = tally.warning
            if final and status != Status.SUCCESS:
                rsp.Identifier = self._failed_list(tally.failed_uids)
                # The requestor's user sees why (0xA702 alone reads as "destination down").
                if self.error_comment and status != Status.CANCEL:
                    rsp.ErrorComment = self.error_comment
        self.sc.dimse.send_msg(rsp, self.cx_id)

    def _pending_direct(self, tally: _Tally) -> bool:
        """A Pending response encoded here and written to the socket: one per
        sub-operation, and pynetdicom's encoding of it cost more than the C-STORE."""
        command = pending_rsp(
            command_field=C_MOVE_RSP if self.action is Action.MOVE else C_GET_RSP,
            sop_class=str(self.req.AffectedSOPClassUID),
            responding_to=int(self.req.MessageID), remaining=tally.remaining,
            completed=tally.completed, failed=tally.failed, warning=tally.warning)
        try:
            return write_command(self.sc.assoc, self.cx_id, command,
                                 reads_gated=self.action is Action.GET and self.in_lane)
        except OSError as exc:
            log.warning("pending response not sent error=%s %s", type(exc).__name__, self.label)
            return True

    def _failed_list(self, uids: list[str]) -> BytesIO | None:
        ds = Dataset()
        ds.FailedSOPInstanceUIDList = uids
        encoded = encode(ds, self.ts.is_implicit_VR, self.ts.is_little_endian,
                         self.ts.is_deflated)
        if encoded is None:  # e.g. too long for a 2-byte explicit VR length
            log.warning("failed SOP instance list not sent: cannot encode count=%d", len(uids))
            return None
        return BytesIO(encoded)


class _SubAssociation:
    """The C-MOVE destination association: opened lazily, re-opened after a failure.

    Requests one presentation context per (SOP class, stored transfer syntax)
    pair and nothing else, so an instance goes out exactly as stored or not
    at all. Once the destination cannot be reached, or has left
    UNANSWERED_IN_A_ROW instances unanswered, the object stays `down`, so the
    remaining sub-operations fail at once instead of each waiting for a
    connect timeout or for every attempt's C-STORE response.
    """

    def __init__(self, ae: AE, peer: Peer, pairs: list[tuple[str, str]], config: DicomConfig,
                 label: str, *, tls_client: ssl.SSLContext | None = None) -> None:
        self.ae = ae
        self.tls_client = tls_client
        self.peer = peer
        self.pairs = pairs
        self.config = config
        self.label = label
        self.assoc: Any = None
        self.gate: ReactorGate | None = None
        self.lane: StoreLane | None = None
        self.accepted: set[tuple[str, str]] = set()
        self.down = False
        self.unanswered = 0  # instances in a row with no C-STORE response at any attempt
        self._refused_logged: set[tuple[str, str]] = set()
        self._msg_ids = _message_ids(0)

    def open(self) -> bool:
        if self.assoc is not None and self.assoc.is_established:
            return True
        if self.down:
            return False
        contexts = [build_context(sop_class, [ts]) for sop_class, ts in self.pairs]
        tls_args = None
        if self.peer.tls:
            if self.tls_client is None:
                self.down = True
                log.error("move destination %s is marked TLS but this box has no TLS context"
                          " (set [dicom] tls_port) %s", self.peer.name, self.label)
                return False
            tls_args = (self.tls_client, None)
        compat.close_requestor_reactor_race()
        try:
            assoc = self.ae.associate(self.peer.host, self.peer.port, contexts=contexts,
                                      ae_title=self.peer.ae_title, max_pdu=self.config.max_pdu,
                                      tls_args=tls_args)
        except OSError as exc:  # pynetdicom resolves the host first: gaierror for an unknown name
            self.down = True
            log.error("move destination host not found: sub-operations fail destination=%s "
                      "host=%s error=%s %s", self.peer.name, self.peer.host,
                      exc.strerror or type(exc).__name__, self.label)
            return False
        if not assoc.is_established:
            self.down = True
            why = _refusal(assoc)
            log.error("move destination %s: sub-operations fail destination=%s host=%s port=%d "
                      "%s", why, self.peer.name, self.peer.host, self.peer.port, self.label)
            with contextlib.suppress(Exception):  # pynetdicom leaves the socket open here
                if assoc.dul.socket is not None:
                    assoc.dul.socket.close()
            return False
        compat.set_nodelay(assoc)
        assoc.dimse_timeout = self.config.suboperation_timeout
        self.gate = ReactorGate.install(assoc)
        self.assoc = assoc
        contexts = storage_contexts(assoc)
        self.accepted = set(contexts)
        self.lane = StoreLane(assoc, contexts, timeout=self.config.suboperation_timeout)
        self.lane.open()
        if self.gate is not None:
            # Park this association's reactor while the lane runs it: no DIMSE message
            # reaches it, and its 1 ms loop would spin for nothing.
            self.gate.hold(_GATE_WAIT)
        return True

    def accepts(self, instance: Instance) -> bool:
        pair = (instance.sop_class_uid, instance.transfer_syntax)
        if pair in self.accepted:
            return True
        if pair not in self._refused_logged:
            self._refused_logged.add(pair)
            log.warning("move sub-operation failed: destination does not accept the stored "
                        "transfer syntax (not transcoding) destination=%s %s",
                        self.peer.name, _pair_label(pair))
        return False

    def send(self, instance: Instance, *, originator_aet: str, originator_id: int,
             upcoming: Path | None = None) -> int | None:
        """The C-STORE's Status; None without one (then abort and retry); raises
        _Unreadable when the stored file cannot be read (nothing was sent)."""
        assert self.lane is not None
        return _lane_store(self.lane, instance, msg_id=next(self._msg_ids),
                           originator_aet=originator_aet, originator_id=originator_id,
                           upcoming=upcoming)

    def _close_lane(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None

    def abort(self) -> None:
        self._close_lane()
        if self.assoc is not None:
            with contextlib.suppress(Exception):
                self.assoc.abort()
        self.assoc = None

    def close(self) -> None:
        self._close_lane()
        if self.assoc is not None and self.assoc.is_established:
            if self.gate is not None:
                self.gate.hold(_GATE_WAIT)
            try:
                self.assoc.release()
            except Exception:
                self.abort()
        self.assoc = None


class ReactorGate:
    """A stand-in for `Association._reactor_checkpoint` (a threading.Event).

    The association's reactor calls `wait()` at the top of every loop; `hold()`
    closes the gate and returns only once the reactor is blocked in `wait()`,
    so it cannot take the next response off the DIMSE queue. pynetdicom's
    `send_c_store()` re-opens it with `set()` when it is done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._parked = False

    @classmethod
    def install(cls, assoc: Any) -> ReactorGate | None:
        gate = cls()
        # False when pynetdicom changed: rely on the retry alone.
        return gate if compat.replace_reactor_checkpoint(assoc, gate) else None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False

    def hold(self, timeout: float) -> bool:
        with self._cond:
            self._open = False
            return self._cond.wait_for(lambda: self._parked, timeout)


class _Unreadable(Exception):
    """A stored file could not be read: nothing was sent, the association is fine.
    `gone`: there was no file (its study may have been evicted since the plan)."""

    def __init__(self, gone: bool) -> None:
        super().__init__()
        self.gone = gone


def _lane_store(lane: StoreLane, instance: Instance, *, msg_id: int,
                originator_aet: str | None = None, originator_id: int | None = None,
                upcoming: Path | None = None) -> int | None:
    """One C-STORE through the lane; its Status, or None when there was none.
    Raises _Unreadable when the file cannot be read (nothing is sent)."""
    try:
        payload = lane.payload(instance.path)
    except FileNotFoundError as exc:
        raise _Unreadable(gone=True) from exc
    except (OSError, ValueError) as exc:
        log.warning("c-store sub-operation failed: stored file unreadable error=%s instance=%s",
                    type(exc).__name__, logsafe.ref(instance.sop_uid))
        raise _Unreadable(gone=False) from exc
    try:
        return lane.store(payload, sop_class=instance.sop_class_uid,
                          transfer_syntax=instance.transfer_syntax,
                          sop_instance=instance.sop_uid, msg_id=msg_id,
                          originator_aet=originator_aet, originator_id=originator_id,
                          upcoming=upcoming)
    except OSError as exc:  # a large file's first read: nothing was sent
        log.warning("c-store sub-operation failed: stored file unreadable error=%s instance=%s",
                    exc.strerror or type(exc).__name__, logsafe.ref(instance.sop_uid))
        raise _Unreadable(gone=False) from exc


def _log_gone(instance: Instance) -> None:
    log.warning("c-store sub-operation failed: stored file gone again after a recall instance=%s",
                logsafe.ref(instance.sop_uid))


_Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)


def _batches(instances: tuple[Instance, ...]) -> Iterator[tuple[list[Instance], list[_Pair]]]:
    """Instances grouped so that each group needs at most MAX_CONTEXTS contexts."""
    pairs = list(dict.fromkeys((i.sop_class_uid, i.transfer_syntax) for i in instances))
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chunk = pairs[start:start + MAX_CONTEXTS]
        wanted = set(chunk)
        yield [i for i in instances if (i.sop_class_uid, i.transfer_syntax) in wanted], chunk


def _refusal(assoc: Any) -> str:
    """Why an association to a C-MOVE destination did not come up, for the log line.
    pynetdicom aborts one whose every presentation context was rejected: that is the
    destination refusing the stored transfer syntaxes, not a network fault."""
    if assoc.is_rejected:
        return "rejected the association"
    if assoc.is_aborted and assoc.rejected_contexts:
        return ("does not accept any stored SOP class and transfer syntax (not "
                "transcoding)")
    return "did not answer (no connection or no association response)"


def _message_ids(after: int) -> Iterator[int]:
    """Message IDs for C-STORE sub-operations: 1-65535, wrapping (US, PS3.7 E.1)."""
    current = after
    while True:
        current = current % 65535 + 1
        yield current


def _pair_label(pair: tuple[str, str]) -> str:
    """Standard SOP class and transfer syntax names (not PHI)."""
    return f"sop_class={UID(pair[0]).name!r} transfer_syntax={UID(pair[1]).name!r}"
