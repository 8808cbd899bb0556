"""DIMSE event handlers: translate pynetdicom events to service calls and results to statuses.

No SQL, file I/O or status integers here: services decide, this module maps.
Who may use a service is the allowlist's decision (`Allowlist.authorize`);
a handler asks it and maps its NotAuthorized to 0x0124.
Each handler runs in its association's thread (a C-STORE in the thread that
reads its socket: store_receiver.py) and reaches the asyncio world only
through the LoopBridge.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt

from appliance.audit import Auditor
from appliance.base.bridge import LoopBridge
from appliance.base.config import DicomConfig
from appliance.base.errors import (
    InflateLimitExceeded,
    NotAuthorized,
    PacsEdgeError,
    QueryError,
    RejectedInstance,
    Rejection,
)
from appliance.base.metrics import ASSOCIATIONS, ASSOCIATIONS_ACTIVE, RECEIVED_BYTES
from appliance.dimse.dicom_status import QUERY_STATUS, Status, status_label
from appliance.dimse.identifier_decoding import read_identifier
from appliance.dimse.negotiation import restrict_storage
from appliance.dimse.query_options import combined_datetime
from appliance.dimse.spooling import SpoolRouter
from appliance.dimse.store_response import StoreAnswer
from appliance.dimse.tls import is_tls, peer_identity
from appliance.dimse.worklist_scp import MODALITY_WORKLIST_FIND, WorklistScp
from appliance.services.ingest import ExpectedIdentity, IngestService
from appliance.services.peers import Allowlist
from appliance.services.presented_certs import PresentedCertificates
from appliance.services.query.find import Answer, QueryModel, Row, answer
from appliance.store.index import Index
from appliance.store.spool import SpoolFile

log = logging.getLogger(__name__)

_SERVICE = {"store": "C-STORE", "find": "C-FIND", "move": "C-MOVE", "get": "C-GET"}
# Ingest's and the query's refusals by kind (PS3.4 B.2.3, C.4.1.1.4), never by message.
REJECTION_STATUS = {
    Rejection.INVALID: Status.CANNOT_UNDERSTAND,
    Rejection.NOT_AS_REQUESTED: Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Rejection.SERIES_OF_ANOTHER_STUDY: Status.CANNOT_UNDERSTAND,
    Rejection.INFLATE_LIMIT: Status.OUT_OF_RESOURCES,
    Rejection.OUT_OF_SPACE: Status.OUT_OF_RESOURCES,
    # Only a Part 10 file's File Meta is refused so (IngestService.start_spool); a
    # C-STORE's syntax is that of a context the box accepted. Here for the table's sake.
    Rejection.TRANSFER_SYNTAX_NOT_SUPPORTED: Status.CANNOT_UNDERSTAND,
}
# Where the status alone would mislead the sender's operator: 0xC000 also says that the
# data set cannot be parsed, and this one is well-formed; its UIDs are what to look at.
_REJECTION_COMMENT = {
    Rejection.SERIES_OF_ANOTHER_STUDY: "Series Instance UID belongs to another study on this box",
}
_UNKNOWN_CALLING_AE = "calling AE title is not in the allowlist (pacs-edge peers add)"
_FIND_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.1": QueryModel.PATIENT_ROOT,
    "1.2.840.10008.5.1.4.1.2.2.1": QueryModel.STUDY_ROOT,
}


@dataclass
class Services:
    """What the handlers may call: the services of one serving process."""

    config: DicomConfig
    allowlist: Allowlist
    index: Index
    ingest: IngestService
    spools: SpoolRouter
    bridge: LoopBridge
    audit: Auditor
    presented: PresentedCertificates  # the expiry of each TLS peer's certificate


def peer_label(assoc: Any) -> str:
    """AE title and address of the association's requestor (not PHI)."""
    return f"calling={assoc.requestor.ae_title!s} address={assoc.requestor.address}"


class DimseHandlers:
    def __init__(self, services: Services, *, worklist: WorklistScp | None = None) -> None:
        self.s = services
        self.worklist = worklist

    # --- association ---------------------------------------------------------

    def on_requested(self, event: Any) -> None:
        assoc = event.assoc
        # pynetdicom copies the calling AE title (stripped, as peers.toml holds it)
        # to requestor.ae_title only during negotiation, which a reject here skips:
        # copied now, for the log and the audit record of a reject.
        assoc.requestor.ae_title = assoc.requestor.primitive.calling_ae_title
        calling = str(assoc.requestor.ae_title)
        log.debug("association requested calling=%s address=%s", calling,
                  assoc.requestor.address)
        peer = self.s.allowlist.by_ae_title(calling)
        if peer is None:
            # pynetdicom's own check (require_calling_aet) would reject it too, unless
            # it and the allowlist disagree on a title: then it would be accepted
            # without any peer's restrictions (address, transport, permissions).
            self._reject(assoc, "unknown-calling-ae", _UNKNOWN_CALLING_AE)
            return
        sock = assoc.dul.socket.socket
        certificate = peer_identity(sock)
        why = peer.refusal(address=str(assoc.requestor.address), over_tls=is_tls(sock),
                           certificate=certificate)
        if why is not None:
            # Rejected as an unknown calling AE: from this address, over this
            # transport or with this certificate, it is one.
            self._reject(assoc, "peer-refused", why)
            return
        if certificate is not None and certificate.not_after:
            self.s.presented.seen(peer.name, certificate.not_after)
        # Refused at negotiation, before a byte of a dataset is sent: a peer that
        # may not store cannot fill the disk (the C-STORE check comes too late).
        refused = restrict_storage(assoc, may_store=peer.may("store"), may_get=peer.may("get"))
        if refused:
            log.warning("storage contexts refused: peer lacks permission 'store' count=%d"
                        " calling=%s address=%s", refused, calling, assoc.requestor.address)
            # Audited once accepted: an association rejected after all refused nothing.
            why = "storage contexts refused: peer lacks permission 'store'"
            assoc.bind(evt.EVT_ACCEPTED, lambda e: self.s.audit.refused(e.assoc, "store", why))

    def _reject(self, assoc: Any, reason: str, why: str) -> None:
        """Reject the requested association as from an unknown calling AE (permanent,
        calling AE title not recognised); `reason` labels the metric, `why` is logged."""
        # Logged before the peer hears of it, so whoever reads the log on the peer's
        # failure finds the reason there; audited after, so a failing audit write
        # cannot keep the reject from going out.
        ASSOCIATIONS.labels("rejected", reason).inc()
        log.warning("association rejected %s reason=%s", peer_label(assoc), why)
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        self.s.audit.association(assoc, accepted=False, reason=why)

    def on_accepted(self, event: Any) -> None:
        log.info("association accepted %s", peer_label(event.assoc))
        ASSOCIATIONS.labels("accepted", "").inc()
        ASSOCIATIONS_ACTIVE.inc()
        self.s.audit.association(event.assoc, accepted=True)
        event.assoc.bind(evt.EVT_CONN_CLOSE, self._closed)

    def _closed(self, event: Any) -> None:
        """Released, aborted or dropped: the audit writes what the association stored."""
        ASSOCIATIONS_ACTIVE.dec()
        self.s.audit.association_closed(event.assoc)

    def on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        called = str(assoc.requestor.primitive.called_ae_title).strip()
        if self.s.allowlist.by_ae_title(calling) is None:  # removed since on_requested
            reason, why = "unknown-calling-ae", _UNKNOWN_CALLING_AE
        elif called != self.s.config.ae_title:
            reason, why = "wrong-called-ae", (
                f"called AE title {called!r} is not this box's {self.s.config.ae_title!r}")
        else:
            reason, why = "busy", "association limit reached"
        ASSOCIATIONS.labels("rejected", reason).inc()
        log.warning("association rejected %s reason=%s", peer_label(assoc), why)
        self.s.audit.association(assoc, accepted=False, reason=why)

    def _authorized(self, assoc: Any, permission: str) -> bool:
        """Ask the allowlist (the one permission check); a refusal is logged and audited."""
        try:
            self.s.allowlist.authorize(str(assoc.requestor.ae_title), permission)
        except NotAuthorized as exc:
            log.warning("refused %s: %s %s", _SERVICE[exc.permission], exc.message,
                        peer_label(assoc))
            self.s.audit.refused(assoc, exc.permission, exc.message)
            return False
        return True

    # --- services ------------------------------------------------------------

    def on_echo(self, event: Any) -> Status:
        return Status.SUCCESS

    def on_event_report(self, event: Any) -> tuple[Status, None]:
        """An N-EVENT-REPORT from a peer (on the Storage Commitment or an MPPS context:
        pynetdicom's classes take one there). The box sends event reports and takes
        none (MPPS notifications are not supported): an operation none of its services
        has, answered as such, where pynetdicom would log a traceback and say 0x0110."""
        log.warning("n-event-report refused: this box takes no event reports sop_class=%s %s",
                    event.request.AffectedSOPClassUID, peer_label(event.assoc))
        return Status.UNRECOGNIZED_OPERATION, None

    def on_store(self, event: Any) -> int | Dataset:
        """A C-STORE that pynetdicom received (the ones store_receiver.py leaves it)."""
        spool = self.s.spools.claim(event.dataset_path)
        if spool is None:  # refused before a byte was spooled; the association is aborted
            return Status.REFUSED_NOT_AUTHORIZED
        request = event.request
        answer = self.store_spooled(event.assoc, ExpectedIdentity(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_uid=str(request.AffectedSOPInstanceUID),
        ), spool)
        return _failure(answer.status, answer.comment) if answer.comment else answer.status

    def open_spool(self) -> SpoolFile:
        """A spool for a C-STORE data set that store_receiver.py receives."""
        return self.s.ingest.files.new_spool()

    def discard_spool(self, path: Path) -> None:
        """Discard pynetdicom's spool at `path` (a C-STORE data set cut off)."""
        self.s.spools.discard(path)

    def store_spooled(self, assoc: Any, expected: ExpectedIdentity,
                      spool: SpoolFile) -> StoreAnswer:
        """Store a received instance, whichever way it came in; the spool is consumed."""
        RECEIVED_BYTES.labels("dicom").inc(spool.size)
        if not self._authorized(assoc, "store"):
            spool.discard()
            return StoreAnswer(Status.REFUSED_NOT_AUTHORIZED)
        try:
            # In the calling thread, the index calls too (no hop through the loop).
            result = self.s.ingest.ingest_spool_blocking(
                spool, source_ae=str(assoc.requestor.ae_title).strip(), expected=expected)
        except RejectedInstance as exc:
            answer = self._rejected(assoc, exc)
            self._audit_store_failure(assoc, expected, answer.status, exc.reason)
            return answer
        except PacsEdgeError as exc:
            log.error("store failed reason=%s %s", exc.message, peer_label(assoc))
            self._audit_store_failure(assoc, expected, Status.PROCESSING_FAILURE, exc.message)
            return StoreAnswer(Status.PROCESSING_FAILURE)
        except Exception as exc:  # a bug costs this instance, and is in the trail too
            log.error("store failed unexpectedly error=%s %s", type(exc).__name__,
                      peer_label(assoc))
            spool.discard()
            self._audit_store_failure(assoc, expected, Status.PROCESSING_FAILURE,
                                      f"unexpected error: {type(exc).__name__}")
            return StoreAnswer(Status.PROCESSING_FAILURE)
        self.s.audit.stored(assoc, result.header)  # buffered: no I/O per instance
        return StoreAnswer(Status.SUCCESS)

    def _audit_store_failure(self, assoc: Any, expected: ExpectedIdentity, status: Status,
                             reason: str) -> None:
        """Counted per association and status (buffered: a flood of bad instances is one
        record when the association ends)."""
        self.s.audit.store_failed(assoc, status=status_label(status),
                                  sop_class_uid=expected.sop_class_uid, reason=reason)

    def on_find(self, event: Any) -> Iterator[tuple[int, bytes | Dataset | None]]:
        if (self.worklist is not None
                and str(event.request.AffectedSOPClassUID) == MODALITY_WORKLIST_FIND):
            yield from self.worklist.on_find(event, peer_label(event.assoc))
            return
        if not self._authorized(event.assoc, "find"):
            yield Status.REFUSED_NOT_AUTHORIZED, None
            return
        model = _FIND_MODELS.get(str(event.request.AffectedSOPClassUID))
        if model is None:
            yield Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, None
            return
        try:
            identifier = read_identifier(event, peer_label(event.assoc))
            combined = combined_datetime(event.assoc, str(event.context.abstract_syntax))
            matches = self.s.bridge.call(
                answer(self.s.index, model, identifier, retrieve_ae_title=self.s.config.ae_title,
                       combined_datetime=combined)
            )
        except QueryError as exc:
            log.warning("find refused reason=%s %s", exc.message, peer_label(event.assoc))
            self._audit_query(event, None, exc.message)
            yield QUERY_STATUS[exc.kind], None
            return
        except Exception as exc:
            log.error("find failed error=%s %s", type(exc).__name__, peer_label(event.assoc))
            self._audit_query(event, None, f"C-FIND failed: {type(exc).__name__}")
            yield Status.UNABLE_TO_PROCESS, None
            return
        log.info("find answered matches=%d unmatched_keys=%d %s", len(matches),
                 matches.unmatched_keys, peer_label(event.assoc))
        self._audit_query(event, len(matches))
        # PS3.4 C.4.1.1.4: 0xFF00 says every optional key was supported as a required
        # key is; with a key sent with a value the box does not match on, each match
        # goes out with 0xFF01 (the workstation learns its filter was not applied).
        pending = Status.PENDING_WARNING if matches.unmatched_keys else Status.PENDING
        batches = chain([matches.rows], (self.s.bridge.call(matches.read(self.s.index, ids))
                                         for ids in matches.batches()))
        for match in _identifiers(matches, batches, UID(event.context.transfer_syntax)):
            if event.is_cancelled:
                yield Status.CANCEL, None
                return
            yield pending, match

    def _rejected(self, assoc: Any, exc: RejectedInstance) -> StoreAnswer:
        """The C-STORE failure status for ingest's refusal, chosen by its kind."""
        status = REJECTION_STATUS[exc.kind]
        label = peer_label(assoc)
        if isinstance(exc, InflateLimitExceeded):
            log.warning("store refused: deflated dataset inflates beyond the limit"
                        " limit_mb=%d %s", exc.limit >> 20, label)
            return StoreAnswer(status, "deflated data set inflates beyond limit")
        if exc.kind is Rejection.OUT_OF_SPACE:
            log.error("store refused: out of resources reason=%s %s", exc.reason, label)
        else:
            log.warning("store refused: cannot understand reason=%s %s", exc.reason, label)
        return StoreAnswer(status, _REJECTION_COMMENT.get(exc.kind, ""))

    def _audit_query(self, event: Any, matches: int | None, reason: str = "") -> None:
        raw = event.request.Identifier
        self.s.audit.queried(
            event.assoc, sop_class_uid=str(event.request.AffectedSOPClassUID),
            identifier=raw.getvalue() if raw is not None else b"",
            transfer_syntax=str(event.context.transfer_syntax), matches=matches, reason=reason)


def _identifiers(matches: Answer, batches: Iterable[Sequence[Row]],
                 syntax: UID) -> Iterator[bytes | Dataset]:
    """The response identifiers of each batch of rows (read as the answer is sent),
    encoded by the query service in the Little Endian syntaxes (dimse/find_scp.py sends
    them as they are); pynetdicom encodes the others."""
    for rows in batches:
        if syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            yield from matches.encoded(rows, implicit_vr=syntax.is_implicit_VR)
        else:
            yield from matches.datasets(rows)


def _failure(status: int, comment: str) -> Dataset:
    """A failure status with an Error Comment (0000,0902, LO: at most 64 characters) that
    tells the peer's operator why, where the status alone would mislead (0xA700 is also
    a full disk)."""
    response = Dataset()
    response.Status = int(status)
    response.ErrorComment = comment[:64]
    return response
