"""Hand-made DICOM upper-layer PDUs on raw sockets, for hostile-peer tests.

A well-behaved peer is a dcmtk tool or a pynetdicom client; these helpers
play the peer that stops mid-PDU, trickles, sends garbage or sends what it
was not allowed to. PDU layouts: PS3.8 9.3.
"""

from __future__ import annotations

import contextlib
import io
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pynetdicom.dimse_messages import (
    C_ECHO_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    N_ACTION_RQ,
    N_EVENT_REPORT_RSP,
    DIMSEMessage,
)
from pynetdicom.dimse_primitives import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    N_ACTION,
    N_EVENT_REPORT,
    DIMSEPrimitive,
)
from pynetdicom.pdu import P_DATA_TF

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
IMPLEMENTATION_CLASS = "1.2.826.0.1.3680043.9.9"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
# The message class for each DIMSE primitive a test peer sends (dimse_pdus): the
# DIMSE-C requests, a Storage Commitment request and its report's response.
_REQUESTS: dict[type, type[DIMSEMessage]] = {
    C_ECHO: C_ECHO_RQ, C_STORE: C_STORE_RQ, C_FIND: C_FIND_RQ, C_MOVE: C_MOVE_RQ,
    C_GET: C_GET_RQ, N_ACTION: N_ACTION_RQ, N_EVENT_REPORT: N_EVENT_REPORT_RSP,
}


def item(item_type: int, payload: bytes) -> bytes:
    """One variable item of an association PDU: type, reserved, 16-bit length, payload."""
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(item_type: int, uid: str) -> bytes:
    return item(item_type, uid.encode("ascii"))


def presentation_context_item(context_id: int, abstract_syntax: str,
                              transfer_syntaxes: Iterable[str] = (IMPLICIT_VR_LE,)) -> bytes:
    """A proposed presentation context (item 0x20)."""
    return item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + _uid(0x30, abstract_syntax)
                + b"".join(_uid(0x40, syntax) for syntax in transfer_syntaxes))


def user_information_item(max_pdu: int = 16384, extra: Iterable[bytes] = ()) -> bytes:
    """User information (item 0x50): maximum length, implementation class UID, and
    `extra` sub-items as they are (role selection, asynchronous operations, ...)."""
    return item(0x50, item(0x51, struct.pack(">L", max_pdu)) + _uid(0x52, IMPLEMENTATION_CLASS)
                + b"".join(extra))


def associate_rq_pdu(calling: str, called: str, items: Iterable[bytes]) -> bytes:
    """An A-ASSOCIATE-RQ whose variable items are `items`, as they are."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += b"\0" * 32 + b"".join(items)
    return pdu_header(A_ASSOCIATE_RQ, len(body)) + body


def associate_rq(calling: str, called: str,
                 contexts: Iterable[tuple[int, str]] = ((1, VERIFICATION),)) -> bytes:
    """An A-ASSOCIATE-RQ proposing each (context ID, abstract syntax) in Implicit VR LE."""
    return associate_rq_pdu(calling, called, [
        _uid(0x10, APPLICATION_CONTEXT),
        *(presentation_context_item(cx, syntax) for cx, syntax in contexts),
        user_information_item()])


def release_rq() -> bytes:
    return pdu_header(A_RELEASE_RQ, 4) + b"\0" * 4


def abort_pdu(source: int = 0) -> bytes:
    """An A-ABORT, from the service user unless `source` says otherwise (PS3.8 9.3.8:
    0 user, 2 provider; anything else is invalid)."""
    return pdu_header(A_ABORT, 4) + bytes([0, 0, source, 0])


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def dimse_pdus(request: C_ECHO | C_STORE | C_FIND | C_MOVE | C_GET | N_ACTION
               | N_EVENT_REPORT, context_id: int, *, max_pdu: int = 16384) -> list[bytes]:
    """A DIMSE primitive of `_REQUESTS` (with its data set, if any, as encoded bytes) as
    P-DATA-TF PDUs, by pynetdicom's own encoder."""
    message = _REQUESTS[type(request)]()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def c_store_pdus(context_id: int, dataset_size: int, *, max_pdu: int = 16384) -> list[bytes]:
    """A C-STORE-RQ for a CT image whose dataset is `dataset_size` zero bytes, as encoded
    P-DATA-TF PDUs (pynetdicom's own encoder: the framing is right, the data junk)."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.9.9.1"
    request.Priority = 2
    request.DataSet = io.BytesIO(b"\0" * dataset_size)
    return dimse_pdus(request, context_id, max_pdu=max_pdu)


def c_store_command_set(sop_instance: str, *, message_id: int = 1,
                        move_originator: tuple[str, int] | None = None) -> bytes:
    """The encoded command set of a C-STORE-RQ for a CT image (pynetdicom's encoder);
    `move_originator`: its Move Originator AE title and Message ID."""
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    if move_originator is not None:
        (request.MoveOriginatorApplicationEntityTitle,
         request.MoveOriginatorMessageID) = move_originator
    request.DataSet = io.BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    first = next(iter(message.encode_msg(1, 1 << 20)))
    ((_, fragment),) = first.presentation_data_value_list
    return bytes(fragment[1:])


def context_results(ac_body: bytes) -> dict[int, int]:
    """Presentation context ID -> result (0 = acceptance) from an A-ASSOCIATE-AC body."""
    results, offset = {}, 68  # protocol version, reserved, AE titles, reserved
    while offset + 4 <= len(ac_body):
        item_type, _, length = struct.unpack(">BBH", ac_body[offset:offset + 4])
        if item_type == 0x21:
            results[ac_body[offset + 4]] = ac_body[offset + 6]
        offset += 4 + length
    return results


def connect(port: int, *, source: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection from `source` (any 127.x.y.z works on Linux loopback)."""
    return socket.create_connection((host, port), timeout=30, source_address=(source, 0))


def still_open(sock: socket.socket) -> bool:
    """True while the server has neither closed nor reset the connection (nothing is read:
    the peek sees pending bytes, an end of stream, or that nothing has come yet)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU: (type, body); (0, b"") if the connection closed first."""
    header = _read_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def read_dimse(sock: socket.socket) -> DIMSEPrimitive:
    """The next DIMSE message on an established association, decoded by pynetdicom's
    own decoder (fails the test if anything but P-DATA-TF PDUs comes first)."""
    message = DIMSEMessage()
    while True:
        pdu_type, body = read_pdu(sock)
        assert pdu_type == P_DATA, f"PDU type {pdu_type:#x} instead of a DIMSE message"
        pdu = P_DATA_TF()
        pdu.decode(pdu_header(P_DATA, len(body)) + body)
        if message.decode_msg(pdu.to_primitive()):
            return message.message_to_primitive()


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def established(port: int, calling: str, called: str, *, source: str = "127.0.0.1",
                contexts: Iterable[tuple[int, str]] = ((1, VERIFICATION),)) -> socket.socket:
    """A connection with an accepted association (fails the test otherwise)."""
    return negotiate(port, calling, called, source=source, contexts=contexts)[0]


def negotiate(port: int, calling: str, called: str, *, source: str = "127.0.0.1",
              contexts: Iterable[tuple[int, str]] = ((1, VERIFICATION),)
              ) -> tuple[socket.socket, dict[int, int]]:
    """An accepted association and its context results (fails the test if rejected)."""
    sock = connect(port, source=source)
    sock.sendall(associate_rq(calling, called, contexts))
    pdu_type, body = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_AC, f"association not accepted: PDU type {pdu_type:#x}"
    return sock, context_results(body)


@dataclass
class Watched:
    """What the server sent on one hostile connection, and when it closed it."""

    sock: socket.socket
    trickle: bool = False
    received: bytes = b""
    closed_after: float | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def first_pdu_type(self) -> int:
        return self.received[0] if self.received else 0


def watch_until_closed(watched: list[Watched], *, deadline_seconds: float,
                       trickle_every: float = 0.2) -> None:
    """Poll every connection until the server closes it or the deadline passes; a
    trickling one sends one more byte every `trickle_every` seconds until the server
    answers (sending on after an A-ABORT would draw a reset that can discard it)."""
    deadline = time.monotonic() + deadline_seconds
    for item in watched:
        item.sock.setblocking(False)
    while time.monotonic() < deadline:
        open_ = [w for w in watched if w.closed_after is None]
        if not open_:
            return
        readable, _, _ = select.select([w.sock for w in open_], [], [], trickle_every)
        for item in open_:
            if item.sock in readable:
                try:
                    chunk = item.sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    item.closed_after = time.monotonic() - item.started
                    continue
                item.received += chunk
            if item.trickle and item.closed_after is None and not item.received:
                with contextlib.suppress(OSError):  # gone: the next recv sees the close
                    item.sock.send(b"\0")
