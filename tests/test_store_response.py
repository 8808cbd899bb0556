"""C-STORE-RSPs encoded by EdgeDIMSE are the bytes pynetdicom would have sent."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from appliance.dimse.store_response import EdgeDIMSE, encode_store_response, store_response


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


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0x0124, 0xB000])
def test_a_plain_store_response_is_encoded_as_pynetdicom_encodes_it(status: int) -> None:
    primitive = _store_rsp(status)
    encoded = encode_store_response(primitive)
    assert encoded is not None
    assert b"\x03" + encoded[0] == _pynetdicoms(primitive)
    assert encoded[1].Status == status and encoded[1].MessageIDBeingRespondedTo == 7


def test_responses_with_more_than_a_status_and_other_messages_go_to_pynetdicom() -> None:
    assert encode_store_response(_store_rsp(0xA700, ErrorComment="why")) is None
    assert encode_store_response(C_ECHO()) is None
    request = _store_rsp(0)
    request.MessageIDBeingRespondedTo = None
    assert encode_store_response(request) is None


def test_edge_dimse_queues_the_pdu_and_tells_the_sent_handlers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as configure_pynetdicom
    assoc = Association(AE(), "acceptor")
    assoc.requestor.maximum_length = 16384
    seen: list[Any] = []
    assoc.bind(evt.EVT_DIMSE_SENT, lambda event: seen.append(event.message))
    assoc.dimse.__class__ = EdgeDIMSE
    primitive = _store_rsp(0)
    assoc.dimse.send_msg(primitive, 3)
    pdata = assoc.dul.to_provider_queue.get_nowait()
    assert pdata.presentation_data_value_list[0][0] == 3
    assert pdata.presentation_data_value_list[0][1] == _pynetdicoms(primitive)
    (message,) = seen
    assert type(message).__name__ == "C_STORE_RSP"
    assert message.command_set.Status == 0 and message.command_set.MessageIDBeingRespondedTo == 7


@pytest.mark.parametrize("comment", ["deflated data set inflates beyond limit", "odd"])
def test_a_response_with_an_error_comment_is_encoded_as_pynetdicom_encodes_it(
        comment: str) -> None:
    primitive = _store_rsp(0xA700, ErrorComment=comment)
    encoded, command = store_response(str(primitive.AffectedSOPClassUID),
                                      str(primitive.AffectedSOPInstanceUID), 7, 0xA700, comment)
    assert b"\x03" + encoded == _pynetdicoms(primitive)
    assert command.Status == 0xA700
