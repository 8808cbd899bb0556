"""C-FIND on the wire: Patient and Study Root FIND served with one PDU per match.

pynetdicom's (3.0.4) C-FIND SCP (`ServiceClass._c_find_scp`) encodes every
pending response's identifier with pydicom, builds its command set as a
pydicom Dataset, and queues the two as separate P-DATA-TF PDUs: with the
identifier encoding, ~1 ms of CPU per match. Here the EVT_C_FIND handler
(appliance/dimse/handlers.py, which decides everything) yields identifiers
already encoded (services/query/identifiers.py), and each pending response goes
out as one P-DATA-TF PDU holding the command PDV (framed here, Implicit VR
Little Endian, PS3.7 6.3.1) and the identifier PDV. On a plain TCP socket the
PDUs are written straight to it under the DUL's send lock (compat.share_send_lock,
as the retrieve path writes its pending responses), several per write; an SSL
socket, whose reads the DUL does in its own thread, or a response larger than
the peer's maximum PDU (split into several PDUs) goes through the DUL's queue and
state machine instead, and from then on the rest of that C-FIND too, so the
order of everything the association sends holds. There a PDU is queued only
while the DUL holds fewer than send_queue.SEND_BACKLOG, so the answer held in
memory is bounded however many matches there are or however slowly the peer
reads, and the DUL reads between bursts (a C-CANCEL ends the answer). A handler may still yield a
Dataset; it is encoded by pynetdicom as before.

Final responses (Success, Cancel, failures) go through pynetdicom's
`send_msg`, so EVT_DIMSE_SENT (the operation metrics, appliance/dimse/op_metrics.py)
sees the end of every C-FIND. The Modality Worklist FIND keeps pynetdicom's
class; the seam is compat.route_service_classes, as for C-MOVE/C-GET.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from appliance.base import compat
from appliance.base.dicom_wire import (
    COMMAND,
    LAST,
    P_DATA_TF,
    PDU_HEADER,
    PDV_HEADER,
    PDV_OVERHEAD,
    UNLIMITED_PDU,
    command_set,
    element,
    ui,
    us,
)
from appliance.dimse.dicom_status import PENDING_CODES, Status
from appliance.dimse.direct_writer import DirectWriter
from appliance.dimse.send_queue import wait_for_send_room

log = logging.getLogger(__name__)

ROUTED = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
C_FIND_RSP = 0x8020
_COMMAND_LAST, _DATASET_LAST, _DATASET_MORE = b"\x03", b"\x02", b"\x00"


def install() -> None:
    """Serve Patient and Study Root C-FIND with FindServiceClass in every association."""
    compat.route_service_classes(ROUTED, FindServiceClass)


def c_find_rsp(*, msg_id: int, sop_class: str, status: int) -> bytes:
    """A C-FIND-RSP command set with an identifier to follow (PS3.7 9.3.2.2), encoded as
    pynetdicom encodes it."""
    return command_set(
        element(0x0002, ui(sop_class)),
        element(0x0100, us(C_FIND_RSP)),
        element(0x0120, us(msg_id)),
        element(0x0800, us(0x0001)),  # any value but 0x0101: an identifier follows
        element(0x0900, us(status)),
    )


def pdus(cx_id: int, command: bytes, identifier: bytes, max_pdu: int) -> Iterator[P_DATA]:
    """The P-DATA primitives of one message: its PDVs (each at most `max_pdu` with its
    header), packed into as few PDUs as `max_pdu` allows; one for a typical match."""
    limit = min(max_pdu or UNLIMITED_PDU, UNLIMITED_PDU)
    room = max(limit - PDV_OVERHEAD, 1)
    pdvs = [_COMMAND_LAST + command[i:i + room] if i + room >= len(command)
            else b"\x01" + command[i:i + room] for i in range(0, len(command), room)]
    for i in range(0, len(identifier), room):
        last = i + room >= len(identifier)
        pdvs.append((_DATASET_LAST if last else _DATASET_MORE) + identifier[i:i + room])
    batch: list[tuple[int, bytes]] = []
    size = 0
    for pdv in pdvs:
        length = len(pdv) - 1 + PDV_OVERHEAD
        if batch and size + length > limit:
            yield _p_data(batch)
            batch, size = [], 0
        batch.append((cx_id, pdv))
        size += length
    yield _p_data(batch)


def one_pdu(cx_id: int, command: bytes, identifier: bytes, max_pdu: int) -> bytes | None:
    """The message as one encoded P-DATA-TF PDU (command PDV, then identifier PDV), as
    pynetdicom would encode the single primitive of `pdus()`; None when it exceeds
    `max_pdu` (0: no limit)."""
    length = 2 * PDV_OVERHEAD + len(command) + len(identifier)
    if length > min(max_pdu or UNLIMITED_PDU, UNLIMITED_PDU):
        return None
    return b"".join((
        PDU_HEADER.pack(P_DATA_TF, 0, length),
        PDV_HEADER.pack(len(command) + 2, cx_id, COMMAND | LAST), command,
        PDV_HEADER.pack(len(identifier) + 2, cx_id, LAST), identifier,
    ))


def _p_data(pdvs: list[tuple[int, bytes]]) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list.extend(pdvs)  # as pynetdicom's encode_msg does
    return primitive


class FindServiceClass(QueryRetrieveServiceClass):
    """pynetdicom's Q/R service class with the appliance's C-FIND SCP."""

    def _c_find_scp(self, req: C_FIND, context: PresentationContext) -> None:
        cx_id = int(context.context_id or 0)
        syntax = context.transfer_syntax[0]
        rsp = C_FIND()
        rsp.MessageID = req.MessageID
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        try:
            results = evt.trigger(self.assoc, evt.EVT_C_FIND, {
                "request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled,
            })
        except Exception as exc:
            log.error("c-find handler failed error=%s", type(exc).__name__)
            self._final(rsp, Status.HANDLER_FAILED, cx_id)
            return
        sop_class = str(req.AffectedSOPClassUID)
        msg_id = int(req.MessageID or 0)
        max_pdu = int(self.dimse.maximum_pdu_size or 0)
        acse = self.assoc.acse
        direct = DirectWriter.for_association(self.assoc)
        try:
            for status, identifier in results or ():
                if acse.is_aborted() or acse.is_release_requested() \
                        or not self.assoc.is_established:
                    return  # the association ends; pynetdicom answers the peer
                rsp = self.validate_status(status, rsp)
                code = int(rsp.Status)
                if code not in PENDING_CODES:
                    direct = _flush(direct)
                    self._final(rsp, code, cx_id)
                    return
                encoded = self._encoded(identifier, syntax)
                if encoded is None:
                    direct = _flush(direct)
                    self._final(rsp, Status.IDENTIFIER_NOT_ENCODED, cx_id)
                    return
                command = c_find_rsp(msg_id=msg_id, sop_class=sop_class, status=code)
                framed = one_pdu(cx_id, command, encoded, max_pdu) if direct else None
                if framed is not None and direct is not None:
                    direct.add(framed)
                    continue
                direct = _flush(direct)  # from here on, everything through the DUL
                for pdu in pdus(cx_id, command, encoded, max_pdu):
                    if not wait_for_send_room(self.assoc):
                        return  # the association ended while its DUL was behind
                    self.dimse.dul.send_pdu(pdu)
            direct = _flush(direct)
        except Exception as exc:
            log.error("c-find handler failed error=%s", type(exc).__name__)
            _flush(direct, quiet=True)
            self._final(rsp, Status.HANDLER_FAILED, cx_id)
            return
        if self.assoc.is_established:
            self._final(rsp, Status.SUCCESS, cx_id)

    @staticmethod
    def _encoded(identifier: Any, syntax: Any) -> bytes | None:
        if isinstance(identifier, bytes):
            return identifier
        if not isinstance(identifier, Dataset):
            return None
        return encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian,
                      syntax.is_deflated)

    def _final(self, rsp: C_FIND, status: int, cx_id: int) -> None:
        """The last response, through pynetdicom (its events see the operation end)."""
        rsp.Identifier = None
        rsp.Status = int(status)
        self.dimse.send_msg(rsp, cx_id)


def _flush(direct: DirectWriter | None, *, quiet: bool = False) -> None:
    """Write what `direct` holds; returns None, the writer's place from then on (the
    rest of the C-FIND goes through the DUL). A broken socket is the DUL's to notice."""
    if direct is not None:
        try:
            direct.write()
        except OSError as exc:
            if not quiet:
                log.warning("c-find responses not sent error=%s", type(exc).__name__)
    return None
