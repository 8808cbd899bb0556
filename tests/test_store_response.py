"""C-STORE-RSPs encoded by store_response.py are the bytes pynetdicom would have sent."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from appliance.dimse.store_response import store_response


def _store_rsp(status: int, **extra: Any) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1234567"  # odd length: padded
    rsp.Status = status
    for name, value in extra.items():
        setattr(rsp, name, value)
    return rsp


def _pynetdicoms(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 16384))
    return bytes(pdata.presentation_data_value_list[0][1])


def _ours(primitive: C_STORE, comment: str = "") -> tuple[bytes, Any]:
    return store_response(str(primitive.AffectedSOPClassUID),
                          str(primitive.AffectedSOPInstanceUID),
                          int(primitive.MessageIDBeingRespondedTo), int(primitive.Status),
                          comment)


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0x0124, 0xB000])
def test_a_store_response_is_encoded_as_pynetdicom_encodes_it(status: int) -> None:
    primitive = _store_rsp(status)
    encoded, command = _ours(primitive)
    assert b"\x03" + encoded == _pynetdicoms(primitive)
    assert command.Status == status and command.MessageIDBeingRespondedTo == 7


@pytest.mark.parametrize("comment", ["deflated data set inflates beyond limit", "odd"])
def test_a_response_with_an_error_comment_is_encoded_as_pynetdicom_encodes_it(
        comment: str) -> None:
    primitive = _store_rsp(0xA700, ErrorComment=comment)
    encoded, command = _ours(primitive, comment)
    assert b"\x03" + encoded == _pynetdicoms(primitive)
    assert command.Status == 0xA700
