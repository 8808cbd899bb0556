"""C-STORE served in the DUL thread: a request's PDUs, its ingest and its response
in the one thread that reads the association's socket.

pynetdicom takes a received C-STORE through two threads and a dozen objects:
the DUL thread turns each P-DATA-TF into a primitive, DIMSEMessage decodes the
command set into a pydicom Dataset and spools the data set, the request goes
as a C_STORE primitive through a queue to the association thread, whose
StorageServiceClass builds an Event for the handler and a response primitive,
which goes back to the DUL thread to be encoded and sent. On a CT slice that
was about a third of the Python time of a C-STORE, and two thread hand-overs
sat between the durable commit of one instance and the arrival of the next
(the peer sends the next request after the response).

Here the DUL offers each P-DATA-TF to its association's StoreReceiver first
(compat.read_pdu). A C-STORE-RQ whose command set comes whole in one PDV, with
a data set, on a presentation context accepted for storage with this box as
SCP, is taken: the command set is parsed (a fixed Implicit VR Little Endian
group: dicom_wire.command_elements), the data set written into a spool file
behind its File Meta as its fragments arrive, and the instance stored by the
call pynetdicom's route ends in too (StoreTarget.store_spooled: permission,
ingest, audit). The C-STORE-RSP is then written by this thread, the socket's
only reader, so on TLS as well.
EVT_DIMSE_RECV and EVT_DIMSE_SENT fire as for pynetdicom's messages: the
operation metrics (op_metrics.py) count these requests like any other.

Everything else stays with pynetdicom: other messages, a command set split
over several PDVs, a context not accepted for storage (spooling.py refuses
it, and the association is aborted), a File Meta value only pydicom encodes,
and every message while pynetdicom's own logging handlers are bound. Within a
taken message, a fragment on another context, a command fragment among the
data set's, or a PDV after the last fragment is a protocol error (PS3.8
9.3.5.1, Annex E): ValueError, on which the DUL aborts the association. A data
set still being received when the association ends is discarded (`close`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import _config, evt

from appliance.base import compat
from appliance.base.dicom_wire import (
    COMMAND,
    LAST,
    NO_DATA_SET,
    command_elements,
    command_pdus,
)
from appliance.dimse.dicom_status import Status
from appliance.dimse.file_meta import encode_file_meta
from appliance.dimse.store_response import C_STORE_RSP, StoreAnswer, store_response
from appliance.services.ingest import ExpectedIdentity
from appliance.store.spool import SpoolFile

log = logging.getLogger(__name__)

_C_STORE_RQ = 0x0001
_PREAMBLE = b"\x00" * 128 + b"DICM"


class StoreTarget(Protocol):
    """Where received instances go (appliance.dimse.handlers.DimseHandlers)."""

    def open_spool(self) -> SpoolFile: ...

    def discard_spool(self, path: Path) -> None: ...

    def store_spooled(self, assoc: Any, expected: ExpectedIdentity,
                      spool: SpoolFile) -> StoreAnswer: ...


@dataclass(frozen=True)
class RequestCommand:
    """The fields of a received C-STORE-RQ that EVT_DIMSE_RECV handlers read."""

    MessageID: int
    AffectedSOPClassUID: str
    AffectedSOPInstanceUID: str


class C_STORE_RQ:  # pynetdicom's message class name, which EVT_DIMSE_RECV handlers read
    """What EVT_DIMSE_RECV handlers get for a request taken here."""

    def __init__(self, command_set: RequestCommand, context_id: int) -> None:
        self.command_set = command_set
        self.context_id = context_id


@dataclass
class _Incoming:
    """A C-STORE-RQ whose data set is being received."""

    context_id: int
    command: RequestCommand
    spool: SpoolFile


class StoreReceiver:
    """The C-STORE requests of one acceptor association (see the module docstring).
    Used by its DUL thread only."""

    def __init__(self, assoc: Any, target: StoreTarget) -> None:
        self.assoc = assoc
        self.target = target
        self._syntaxes: dict[int, str] | None = None  # storage context ID -> transfer syntax
        self._incoming: _Incoming | None = None
        self._max_pdu: int | None = None  # the peer's maximum PDU length (0: none)

    def receive(self, pdvs: list[tuple[int, Any]]) -> bool:
        """Take the PDVs (context ID, control header + fragment) of one P-DATA-TF when
        they carry a C-STORE served here; False leaves them to pynetdicom. Raises
        ValueError for a protocol error within a taken message."""
        if self._incoming is None:
            self._incoming = self._start(*pdvs[0])
            if self._incoming is None:
                return False
            pdvs = pdvs[1:]
        for number, (context_id, data) in enumerate(pdvs, 1):
            incoming = self._incoming
            if incoming is None:
                raise ValueError("a PDV after the last fragment of a C-STORE data set")
            if context_id != incoming.context_id or data[0] & COMMAND:
                raise ValueError("a C-STORE data set fragment out of order")
            incoming.spool.write(data[1:], owned=True)  # each PDU is a buffer of its own
            if data[0] & LAST:
                self._incoming = None
                if number != len(pdvs):
                    incoming.spool.discard()
                    raise ValueError("a PDV after the last fragment of a C-STORE data set")
                self._finish(incoming)
        return True

    @property
    def receiving(self) -> bool:
        """A C-STORE taken here is still arriving: its next PDU is this receiver's too."""
        return self._incoming is not None

    def close(self) -> None:
        """The association has ended: a data set still being received is discarded,
        here or in pynetdicom's DIMSE (whose spool serve's sweep would otherwise remove
        only after twice the network timeout: minutes of disk held by a cut-off
        transfer, as many of them as a peer cared to abort)."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.spool.discard()
        path = compat.unfinished_receive_spool(self.assoc.dimse)
        if path is not None:
            self.target.discard_spool(path)

    def _start(self, context_id: int, data: Any) -> _Incoming | None:
        """The C-STORE-RQ whose command set is the PDV `data`, its spool opened and its
        File Meta written; None for anything this receiver leaves to pynetdicom."""
        if data[0] != COMMAND | LAST or _config.LOG_HANDLER_LEVEL == "standard":
            return None
        try:
            elements = command_elements(data[1:])
        except ValueError:
            return None  # pynetdicom's decoder says what is wrong with it
        if _us(elements.get(0x0100)) != _C_STORE_RQ or _us(elements.get(0x0800)) in (
                None, NO_DATA_SET):
            return None
        syntax = self._storage_syntaxes().get(context_id)
        message_id = _us(elements.get(0x0110))
        if syntax is None or message_id is None:
            return None
        command = RequestCommand(message_id, _uid(elements.get(0x0002)),
                                 _uid(elements.get(0x1000)))
        meta = encode_file_meta(command.AffectedSOPClassUID, command.AffectedSOPInstanceUID,
                                syntax)
        if meta is None:
            return None
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV,
                    {"message": C_STORE_RQ(command, context_id)})
        spool = self.target.open_spool()
        spool.write(_PREAMBLE + meta)
        return _Incoming(context_id, command, spool)

    def _finish(self, incoming: _Incoming) -> None:
        """Store the received instance and answer it."""
        spool, command = incoming.spool, incoming.command
        try:
            answer = self.target.store_spooled(
                self.assoc, ExpectedIdentity(sop_class_uid=command.AffectedSOPClassUID,
                                             sop_uid=command.AffectedSOPInstanceUID), spool)
        except Exception as exc:  # a bug must cost this instance, not the DUL thread
            log.error("store failed unexpectedly error=%s", type(exc).__name__)
            spool.discard()
            answer = StoreAnswer(Status.PROCESSING_FAILURE)
        encoded, sent = store_response(command.AffectedSOPClassUID,
                                       command.AffectedSOPInstanceUID, command.MessageID,
                                       int(answer.status), answer.comment)
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT,
                    {"message": C_STORE_RSP(sent, incoming.context_id)})
        self.assoc.dul.socket.send(command_pdus(incoming.context_id, encoded,
                                                self._peer_max_pdu()))

    def _peer_max_pdu(self) -> int:
        """The maximum PDU length the peer announced, 0 for none (fixed once the
        association is established)."""
        if self._max_pdu is None:
            self._max_pdu = int(self.assoc.requestor.maximum_length or 0)
        return self._max_pdu

    def _storage_syntaxes(self) -> dict[int, str]:
        """Transfer syntax by context ID of the contexts accepted for storage with this
        box as SCP (fixed once the association is established)."""
        if self._syntaxes is None:
            self._syntaxes = {
                int(cx.context_id): str(cx.transfer_syntax[0])
                for cx in self.assoc.accepted_contexts
                if cx.as_scp and str(cx.abstract_syntax) in self.assoc.ae.storage_classes}
        return self._syntaxes


def _us(value: Any) -> int | None:
    """An US value; None when absent or not two bytes."""
    if value is None or len(value) != 2:
        return None
    return int.from_bytes(value, "little")


def _uid(value: Any) -> str:
    """A UI value without its padding; "" when absent or not ASCII."""
    if value is None:
        return ""
    raw = bytes(value).rstrip(b"\x00 ")
    return raw.decode("ascii") if raw.isascii() else ""
