"""Command sets parsed by hand (dicom_wire.command_elements) read what pynetdicom wrote."""

from __future__ import annotations

import struct

import pytest
import rawpdu

from appliance.base.dicom_wire import command_elements


def _store_request() -> bytes:
    return rawpdu.c_store_command_set("1.2.826.0.1.3680043.9.9.1", message_id=513,
                                      move_originator=("MOVER", 7))


def test_a_c_store_request_encoded_by_pynetdicom_is_read_element_by_element() -> None:
    elements = command_elements(memoryview(_store_request()))
    assert bytes(elements[0x0002]) == b"1.2.840.10008.5.1.4.1.1.2\0"
    assert bytes(elements[0x1000]) == b"1.2.826.0.1.3680043.9.9.1\0"
    assert struct.unpack("<H", elements[0x0100]) == (0x0001,)
    assert struct.unpack("<H", elements[0x0110]) == (513,)
    assert bytes(elements[0x1030]).strip() == b"MOVER"
    assert struct.unpack("<L", elements[0x0000]) == (len(_store_request()) - 12,)


@pytest.mark.parametrize("encoded", [
    struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\0",  # not group 0000
    struct.pack("<HHL", 0x0000, 0x0100, 4) + b"\1\0",  # runs past the end
    struct.pack("<HHL", 0x0000, 0x0100, 2) + b"\1\0" + b"\0\0",  # element header cut short
    struct.pack("<HHL", 0x0000, 0x0110, 2) + b"\1\0"
    + struct.pack("<HHL", 0x0000, 0x0100, 2) + b"\1\0",  # out of order
], ids=["other-group", "past-the-end", "header-cut", "out-of-order"])
def test_what_is_not_a_command_set_is_refused(encoded: bytes) -> None:
    with pytest.raises(ValueError):
        command_elements(encoded)


def test_a_peers_response_is_read_whatever_the_order_of_its_elements() -> None:
    status_first = (struct.pack("<HHL", 0x0000, 0x0900, 2) + b"\0\0"
                    + struct.pack("<HHL", 0x0000, 0x0100, 2) + b"\x01\x80")
    elements = command_elements(status_first, ordered=False)
    assert (elements[0x0100], elements[0x0900]) == (b"\x01\x80", b"\0\0")
    with pytest.raises(ValueError):
        command_elements(status_first)
