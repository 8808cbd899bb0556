"""C-STORE-RSP encoded directly: a few fixed-layout bytes instead of a pydicom Dataset.

pynetdicom sends every response by building a Dataset of the command set from
the primitive, encoding it twice (once to measure the group length) and
splitting it into P-DATA: ~0.5 ms of CPU per C-STORE on the receive path,
more than the index commit. A C-STORE-RSP with a status and nothing else
(Success, and the plain failures) has a fixed layout (PS3.7 9.3.1.2, Implicit VR
Little Endian), so EdgeDIMSE writes it here; a response carrying an Error
Comment or Offending Element, and every other message, goes through pynetdicom
as before. tests/test_store_response.py checks the bytes against pynetdicom's.

On a plain TCP socket the response PDU is written by the association's own
thread (direct_writer.py) instead of being queued for the DUL thread, a
wake-up and a state-machine pass less between the durable commit and the
peer's next request. EVT_DIMSE_SENT still fires before the response is sent,
with a SentResponse whose class name and `command_set` fields are those of
pynetdicom's message (what appliance/dimse/op_metrics.py reads), so every
request still ends in one place with its status. pynetdicom's own logging
handlers know only their own classes: with them bound
(`_config.LOG_HANDLER_LEVEL` "standard"; the server sets "none") every
response goes through pynetdicom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from appliance.base.dicom_wire import (
    COMMAND,
    LAST,
    NO_DATA_SET,
    command_pdu,
    command_set,
    element,
    lo,
    ui,
    us,
)
from appliance.dimse.direct_writer import DirectWriter

log = logging.getLogger(__name__)

_C_STORE_RSP = 0x8001
# Parameters a C-STORE-RSP may carry beyond the ones encoded here.
_EXTRA = ("OffendingElement", "ErrorComment")


@dataclass(frozen=True)
class CommandSet:
    """The fields of a sent C-STORE-RSP, by their DICOM keywords."""

    AffectedSOPClassUID: str
    CommandField: int
    MessageIDBeingRespondedTo: int
    CommandDataSetType: int
    Status: int
    AffectedSOPInstanceUID: str


@dataclass(frozen=True)
class StoreAnswer:
    """How a received instance is answered: its status, and an Error Comment where
    the status alone would mislead the peer's operator."""

    status: int
    comment: str = ""


class C_STORE_RSP:  # pynetdicom's message class name, which EVT_DIMSE_SENT handlers read
    """What EVT_DIMSE_SENT handlers get for a response encoded here."""

    def __init__(self, command_set: CommandSet, context_id: int) -> None:
        self.command_set = command_set
        self.context_id = context_id


def encode_store_response(primitive: Any) -> tuple[bytes, CommandSet] | None:
    """The encoded command set of a plain C-STORE-RSP primitive; None for any other."""
    if type(primitive) is not C_STORE:
        return None
    msg_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if msg_id is None or status is None or not sop_class or not sop_instance:
        return None
    if any(getattr(primitive, name, None) is not None for name in _EXTRA):
        return None
    return store_response(str(sop_class), str(sop_instance), int(msg_id), int(status))


def store_response(sop_class: str, sop_instance: str, msg_id: int, status: int,
                   comment: str = "") -> tuple[bytes, CommandSet]:
    """A C-STORE-RSP command set: the status, and an Error Comment (0000,0902; LO, at
    most 64 characters) when `comment` is given."""
    command = CommandSet(sop_class, _C_STORE_RSP, msg_id, NO_DATA_SET, status, sop_instance)
    extra = [element(0x0902, lo(comment[:64]))] if comment else []
    return command_set(
        element(0x0002, ui(command.AffectedSOPClassUID)),
        element(0x0100, us(_C_STORE_RSP)),
        element(0x0120, us(command.MessageIDBeingRespondedTo)),
        element(0x0800, us(NO_DATA_SET)),
        element(0x0900, us(command.Status)),
        *extra,
        element(0x1000, ui(command.AffectedSOPInstanceUID)),
    ), command


class EdgeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending plain C-STORE-RSPs itself."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = encode_store_response(primitive)
        if encoded is None or _config.LOG_HANDLER_LEVEL == "standard":
            super().send_msg(primitive, context_id)
            return
        command_bytes, command = encoded
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT,
                    {"message": C_STORE_RSP(command, context_id)})
        direct = DirectWriter.for_association(self.assoc)
        if direct is not None:
            direct.add(command_pdu(context_id, command_bytes))
            try:
                direct.write()
            except OSError as exc:  # the peer is gone: the DUL's read will say so
                log.warning("c-store response not sent error=%s", type(exc).__name__)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, bytes([COMMAND | LAST]) + command_bytes]]
        self.dul.send_pdu(pdata)
