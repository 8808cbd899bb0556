"""C-STORE-RSP encoded directly: a few fixed-layout bytes instead of a pydicom Dataset.

pynetdicom sends every response by building a Dataset of the command set from
the primitive, encoding it twice (once to measure the group length) and
splitting it into P-DATA: ~0.5 ms of CPU per C-STORE on the receive path,
more than the index commit. A C-STORE-RSP has a fixed layout (PS3.7 9.3.1.2,
Implicit VR Little Endian: the status, and an Error Comment where one is
given), so the C-STORE receiver (store_receiver.py) writes it from here.
tests/test_store_response.py checks the bytes against pynetdicom's.

EVT_DIMSE_SENT fires for these responses with a C_STORE_RSP whose class name
and `command_set` fields are those of pynetdicom's message (what
appliance/dimse/op_metrics.py reads), so every request still ends in one place
with its status.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.base.dicom_wire import NO_DATA_SET, command_set, element, lo, ui, us

_C_STORE_RSP = 0x8001


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
