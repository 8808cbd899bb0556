"""DIMSE command sets and P-DATA-TF framing by hand (PS3.7 6.3.1, PS3.8 9.3.5).

The fixed-layout messages the box sends on its hot paths (C-STORE-RQ and
Pending C-MOVE/C-GET-RSP in the send lane, C-STORE-RSP, C-FIND-RSP) are encoded
here instead of through pydicom Datasets and pynetdicom PDU objects (each
user's tests compare the bytes with pynetdicom's), and received P-DATA-TF PDUs
are split into their PDVs (the DUL's read, compat.read_pdu; the send lane's
responses). Command sets are always Implicit VR Little Endian, group 0000, led
by their group length.
"""

from __future__ import annotations

import struct
from typing import Any

P_DATA_TF = 0x04
PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
PDV_HEADER = struct.Struct(">LBB")  # item length, context ID, message control header
PDV_OVERHEAD = 6  # a PDV's item length (4), context ID and message control header
ELEMENT = struct.Struct("<HHL")  # group, element, value length
COMMAND, LAST = 0x01, 0x02  # message control header bits: command (else data set), last
NO_DATA_SET = 0x0101  # CommandDataSetType: nothing follows; any other value: a data set
# A peer announcing no maximum PDU (0) still gets PDUs of at most this size.
UNLIMITED_PDU = 1 << 22


def command_set(*elements: bytes) -> bytes:
    """A command set of `elements` (in tag order), led by its group length."""
    body = b"".join(elements)
    return element(0x0000, struct.pack("<L", len(body))) + body


def element(number: int, value: bytes) -> bytes:
    return ELEMENT.pack(0, number, len(value)) + value


def ui(uid: str) -> bytes:
    """A UID value, padded with NUL to an even length."""
    raw = uid.encode("ascii")
    return raw + b"\0" * (len(raw) % 2)


def lo(text: str) -> bytes:
    """A short text value (LO, SH), padded with a space to an even length."""
    raw = text.encode("ascii", "replace")
    return raw + b" " * (len(raw) % 2)


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def command_elements(encoded: Any, *, ordered: bool = True) -> dict[int, Any]:
    """The elements of an encoded command set, by element number (group 0000), as
    slices of `encoded`. Raises ValueError for what is not a command set: another
    group, an element cut short or running past the end, and (`ordered`, for the
    requests this side serves) elements out of the ascending order PS3.5 7.1 asks
    for. The send lane reads a peer's responses with `ordered=False`: a response
    that names its status is taken, whatever order its elements come in."""
    elements: dict[int, Any] = {}
    offset, end, last = 0, len(encoded), -1
    while offset < end:
        if end - offset < ELEMENT.size:
            raise ValueError("truncated command element")
        group, number, length = ELEMENT.unpack_from(encoded, offset)
        offset += ELEMENT.size
        if group != 0 or (ordered and number <= last) or offset + length > end:
            raise ValueError("malformed command set")
        elements[number] = encoded[offset:offset + length]
        offset += length
        last = number
    return elements


def pdv_frame(cx_id: int, control: int, length: int) -> bytes:
    """The PDU and PDV headers of a P-DATA-TF holding one PDV of `length` bytes."""
    return (PDU_HEADER.pack(P_DATA_TF, 0, length + PDV_OVERHEAD)
            + PDV_HEADER.pack(length + 2, cx_id, control))


def command_pdu(cx_id: int, command: bytes) -> bytes:
    """A P-DATA-TF holding a whole command set and nothing else."""
    return pdv_frame(cx_id, COMMAND | LAST, len(command)) + command


def command_pdus(cx_id: int, command: bytes, max_pdu: int) -> bytes:
    """P-DATA-TFs holding a command set and nothing else, as many as a peer whose
    maximum PDU length is `max_pdu` (0: none) needs: one for any peer but one that
    announces less than the command set's length (a hundred-odd bytes). `max_pdu` is 0
    or more than PDV_OVERHEAD (the box refuses a request announcing less)."""
    size = max_pdu - PDV_OVERHEAD if max_pdu else len(command)
    if len(command) <= size:
        return command_pdu(cx_id, command)
    chunks = [command[n:n + size] for n in range(0, len(command), size)]
    return b"".join(pdv_frame(cx_id, COMMAND | (LAST if n == len(chunks) else 0), len(chunk))
                    + chunk for n, chunk in enumerate(chunks, 1))


def split_pdvs(body: Any) -> list[tuple[int, Any]]:
    """The PDVs of a P-DATA-TF's body (the bytes after its 6-byte header) as
    (context ID, data), data starting with the message control header byte as in
    pynetdicom's P-DATA primitives; slices of `body` (views, for a memoryview).
    Raises ValueError when a PDV is cut short, shorter than its two header bytes,
    or runs past the end, or when there is none (PS3.8 9.3.5: one or more)."""
    pdvs: list[tuple[int, Any]] = []
    offset, end = 0, len(body)
    if not end:
        raise ValueError("P-DATA-TF without a PDV")
    while offset < end:
        if end - offset < PDV_OVERHEAD:
            raise ValueError("truncated PDV")
        length = int.from_bytes(body[offset:offset + 4], "big")
        if length < 2 or offset + 4 + length > end:
            raise ValueError("PDV length does not fit its PDU")
        pdvs.append((body[offset + 4], body[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return pdvs
