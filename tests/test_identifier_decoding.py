"""Query and retrieve identifiers that cannot be decoded, or that pydicom remarks on.

pynetdicom sends the bytes given in place of an encoded identifier (its `encode` is
patched for the request), so a real peer sends what no encoder would write. Every
service answers an identifier that is no data set 0xC000 (docs/conformance.md), and
pydicom's remarks on one identifier are one log line, however many elements it holds
(appliance/dimse/identifier_decoding.py).
"""

from __future__ import annotations

import struct
import zlib

import pynetdicom
import pytest
from conftest import HOST, TEST_AE, EdgeServer
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

FIND, MOVE, GET = ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2",
                   "1.2.840.10008.5.1.4.1.2.2.3")
WORKLIST = "1.2.840.10008.5.1.4.31"
UNABLE_TO_PROCESS = 0xC000


def implicit(group: int, number: int, value: bytes, length: int | None = None) -> bytes:
    """One Implicit VR Little Endian element; `length` overrides the length field."""
    return struct.pack("<HHI", group, number, len(value) if length is None else length) + value


LEVEL = implicit(0x0008, 0x0052, b"STUDY ")
STUDY_UID = implicit(0x0020, 0x000D, b"")
UNDECODABLE = {
    # Patient's Name says 100 bytes, 4 come: was read as "Doe^", answered 0x0000.
    "truncated-value": LEVEL + STUDY_UID + implicit(0x0010, 0x0010, b"Doe^", 100),
    # An undefined length on a PN reads to the end: was an empty identifier, 0xA900.
    "undefined-length-pn": LEVEL + STUDY_UID + implicit(0x0010, 0x0010, b"Doe^", 0xFFFFFFFF),
    # Three bytes after the last element: were dropped.
    "trailing-bytes": LEVEL + STUDY_UID + b"\x10\x00\x10",
}


def send_raw(server: EdgeServer, sop_class: str, raw: bytes, monkeypatch: pytest.MonkeyPatch,
             *, aet: str = TEST_AE, syntax: str = ImplicitVRLittleEndian) -> list[int]:
    """The statuses of one C-FIND, C-MOVE or C-GET whose identifier is `raw`."""
    monkeypatch.setattr(pynetdicom.association, "encode", lambda *_: raw)
    ae = AE(ae_title=aet)
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        stand_in = Dataset()  # what pynetdicom is given; `raw` is what it sends
        stand_in.QueryRetrieveLevel = "STUDY"
        responses = (assoc.send_c_find(stand_in, sop_class) if sop_class in (FIND, WORKLIST)
                     else assoc.send_c_move(stand_in, TEST_AE, sop_class) if sop_class == MOVE
                     else assoc.send_c_get(stand_in, sop_class))
        return [int(status.Status) for status, _ in responses]
    finally:
        assoc.release()
        monkeypatch.undo()


def test_an_identifier_that_is_no_data_set_is_unable_to_process_for_every_service(
        edge_server: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    edge_server.add_peer("modality", "MODALITY", 1, allow="worklist")
    answered = {(name, sop_class[-5:]): send_raw(edge_server, sop_class, raw, monkeypatch,
                                                 aet="MODALITY" if sop_class == WORKLIST
                                                 else TEST_AE)
                for name, raw in UNDECODABLE.items()
                for sop_class in (FIND, WORKLIST, MOVE, GET)}
    assert answered == {key: [UNABLE_TO_PROCESS] for key in answered}
    assert edge_server.log().count("the identifier cannot be decoded") == len(answered)


def test_a_deflated_identifier_that_inflates_past_16_mib_is_unable_to_process(
        edge_server: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom inflated a deflated identifier whole, whatever its size."""
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # An unknown private element of 17 MiB after the level: about 17 KB deflated.
    huge = (b"\x08\x00\x52\x00CS\x06\x00STUDY " + b"\x09\x00\x10\x10UN\x00\x00"
            + struct.pack("<I", 17 << 20))
    deflated = squeezer.compress(huge) + squeezer.compress(bytes(17 << 20)) + squeezer.flush()
    assert send_raw(edge_server, FIND, deflated, monkeypatch,
                    syntax=DeflatedExplicitVRLittleEndian) == [UNABLE_TO_PROCESS]
    small = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    level = b"\x08\x00\x52\x00CS\x06\x00STUDY " + b"\x20\x00\x0d\x00UI\x00\x00"
    assert send_raw(edge_server, FIND, small.compress(level) + small.flush(), monkeypatch,
                    syntax=DeflatedExplicitVRLittleEndian) == [0x0000]


def test_ten_thousand_unknown_elements_are_one_log_line_not_ten_thousand(
        edge_server: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """In Implicit VR, pydicom logs "VR lookup failed" and prints a UserWarning for
    each element of a tag its dictionary does not know: 10,000 lines and 20,000 more
    on stderr for one query."""
    unknown = b"".join(implicit(0x00A0, number, b"AB") for number in range(1, 10_001))
    statuses = send_raw(edge_server, FIND, LEVEL + STUDY_UID + unknown, monkeypatch)
    assert statuses == [0x0000]  # an empty box: no match, answered
    log = edge_server.log()
    assert "VR lookup failed" not in log
    assert "UserWarning" not in log
    assert log.count("pydicom remarks not logged count=10000") == 1

