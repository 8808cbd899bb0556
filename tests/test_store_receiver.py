"""C-STOREs served in the DUL thread (appliance/dimse/store_receiver.py), on raw sockets.

dcmtk's and pynetdicom's clients frame every C-STORE the same way (the command
set whole in one PDV, then the data set in PDUs of one PDV each), which the
rest of the suite covers. Here a peer frames it otherwise, as PS3.8 allows:
several data set PDVs in one PDU, a data set in tiny PDUs, a command set in two
fragments (left to pynetdicom's route); or breaks the rules: a fragment on
another context, a command fragment among the data set's, a PDV after the last
fragment, an abort mid-data set. What is stored is byte for byte what was
sent; a broken message aborts the association and leaves nothing behind.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
import rawpdu
from conftest import EdgeServer
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom.dsutils import encode
from rawpdu import Watched

COMMAND, DATA, LAST = 0x01, 0x00, 0x02
# After its A-ABORT the server waits for the peer's close for at most the ACSE
# timeout (ARTIM): short here, so a test does not wait 30 s for it.
ACSE_TIMEOUT = 2.0
CLOSE_DEADLINE = 30.0


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of (context ID, message control header, fragment) PDVs."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, cx, control) + data
                    for cx, control, data in pdvs)
    return rawpdu.pdu_header(rawpdu.P_DATA, len(body)) + body


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[n:n + size] for n in range(0, len(data), size)]


def _response(sock: socket.socket) -> Dataset:
    """The command set of the next PDU, a C-STORE-RSP."""
    pdu_type, body = rawpdu.read_pdu(sock)
    assert pdu_type == rawpdu.P_DATA, f"PDU type {pdu_type:#x}, not a P-DATA-TF"
    length, _, control = struct.unpack(">LBB", body[:6])
    assert control == COMMAND | LAST and len(body) == 4 + length
    return read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)


def _instances(server: EdgeServer) -> int:
    return int(json.loads(server.cli("status", "--json").stdout)["instances"])


def _stored_dataset(server: EdgeServer, sop_instance: str) -> bytes:
    """The dataset bytes of the stored file of `sop_instance` (after its File Meta)."""
    (path,) = (server.home / "store").glob(f"*/*/{sop_instance}.*.dcm")
    with path.open("rb") as fh:
        pydicom.filereader.read_preamble(fh, force=False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.read()


def _spool_files(server: EdgeServer) -> list[Path]:
    return [p for p in (server.home / "store" / ".spool").iterdir() if p.is_file()]


def _spool_files_once_settled(server: EdgeServer) -> list[Path]:
    """The spool folder once it is empty, or at the deadline: a data set cut off by its
    association's end is discarded as the association's reader thread ends, which may
    be a moment after the connection closed."""
    deadline = time.monotonic() + CLOSE_DEADLINE
    while _spool_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _spool_files(server)


@pytest.fixture
def ct_instance(small_study: list[dicomgen.GeneratedInstance]) -> tuple[str, bytes]:
    """A CT image of the small study: its SOP Instance UID and its data set in Implicit
    VR Little Endian (the syntax rawpdu proposes)."""
    ct = next(i for i in small_study if i.sop_class_uid == rawpdu.CT_IMAGE_STORAGE)
    dataset = pydicom.dcmread(ct.path)
    encoded = encode(dataset, True, True)
    assert encoded is not None
    return str(dataset.SOPInstanceUID), encoded


@pytest.fixture
def edge_server(edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    server = edge_server_factory(start=False)
    server.configure(dicom={"acse_timeout": ACSE_TIMEOUT})
    server.start()
    return server


@pytest.fixture
def sock(edge_server: EdgeServer) -> Iterator[socket.socket]:
    sock = rawpdu.established(edge_server.port, "TESTSCU", edge_server.ae_title,
                              contexts=((1, rawpdu.CT_IMAGE_STORAGE),
                                        (3, rawpdu.VERIFICATION)))
    yield sock
    sock.close()


def test_data_set_pdvs_framed_every_which_way_are_stored_byte_for_byte(
        edge_server: EdgeServer, sock: socket.socket, ct_instance: tuple[str, bytes]) -> None:
    uid, data = ct_instance
    pieces = _chunks(data, max(1, len(data) // 7))
    # The command set and the first three fragments in one PDU, then one-byte
    # PDUs for a while, then the rest in one PDU of several PDVs.
    first = _pdu((1, COMMAND | LAST, rawpdu.c_store_command_set(uid)),
                 *[(1, DATA, piece) for piece in pieces[:3]])
    tiny = b"".join(_pdu((1, DATA, pieces[3][n:n + 1])) for n in range(len(pieces[3])))
    rest = _pdu(*[(1, DATA, piece) for piece in pieces[4:-1]], (1, DATA | LAST, pieces[-1]))
    sock.sendall(first + tiny + rest)
    response = _response(sock)
    assert response.Status == 0 and response.MessageIDBeingRespondedTo == 1
    assert response.AffectedSOPInstanceUID == uid
    assert _stored_dataset(edge_server, uid) == data
    assert _spool_files(edge_server) == []


def test_a_command_set_in_two_fragments_is_stored_through_pynetdicom(
        edge_server: EdgeServer, sock: socket.socket, ct_instance: tuple[str, bytes]) -> None:
    uid, data = ct_instance
    command = rawpdu.c_store_command_set(uid, message_id=9)
    sock.sendall(_pdu((1, COMMAND, command[:20]))
                 + _pdu((1, COMMAND | LAST, command[20:]))
                 + b"".join(_pdu((1, DATA, piece)) for piece in _chunks(data, 4000)[:-1])
                 + _pdu((1, DATA | LAST, _chunks(data, 4000)[-1])))
    response = _response(sock)
    assert response.Status == 0 and response.MessageIDBeingRespondedTo == 9
    assert _stored_dataset(edge_server, uid) == data


def _broken(uid: str, data: bytes, how: str) -> bytes:
    half = len(data) // 2
    command = _pdu((1, COMMAND | LAST, rawpdu.c_store_command_set(uid)),
                   (1, DATA, data[:half]))
    if how == "other-context":
        return command + _pdu((3, DATA | LAST, data[half:]))
    if how == "command-among-data":
        return command + _pdu((1, COMMAND | LAST,
                               rawpdu.c_store_command_set(uid, message_id=2)))
    return command + _pdu((1, DATA | LAST, data[half:]), (1, DATA, b"\0\0"))


@pytest.mark.parametrize("how", ["other-context", "command-among-data", "pdv-after-last"])
def test_a_data_set_fragment_out_of_order_aborts_and_leaves_nothing(
        edge_server: EdgeServer, sock: socket.socket, ct_instance: tuple[str, bytes],
        small_study: list[dicomgen.GeneratedInstance], how: str) -> None:
    uid, data = ct_instance
    sock.sendall(_broken(uid, data, how))
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    assert "invalid P-DATA-TF PDU" in edge_server.log()
    assert _instances(edge_server) == 0
    assert _spool_files_once_settled(edge_server) == []
    dcmtk.storescu(edge_server.port, [small_study[0].path]).check()
    assert _instances(edge_server) == 1


def test_a_peer_that_aborts_mid_data_set_leaves_no_spool(
        edge_server: EdgeServer, sock: socket.socket, ct_instance: tuple[str, bytes]) -> None:
    uid, data = ct_instance
    sock.sendall(_pdu((1, COMMAND | LAST, rawpdu.c_store_command_set(uid)),
                      (1, DATA, data[:len(data) // 2])))
    deadline = time.monotonic() + CLOSE_DEADLINE
    while not _spool_files(edge_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _spool_files(edge_server), "the data set was never spooled"
    sock.sendall(rawpdu.pdu_header(rawpdu.A_ABORT, 4) + b"\0\0\0\0")
    assert _spool_files_once_settled(edge_server) == []
    assert _instances(edge_server) == 0


@pytest.mark.parametrize("command", [("import",), ("fsck", "--repair")])
def test_a_command_run_meanwhile_leaves_a_data_set_being_received(
        edge_server: EdgeServer, sock: socket.socket, ct_instance: tuple[str, bytes],
        small_study: list[dicomgen.GeneratedInstance], command: tuple[str, ...]) -> None:
    # `pacs-edge import` and `fsck --repair` swept the store's `*.part` files as crash
    # leftovers, serve's spool files too: the C-STORE being received failed at its commit.
    uid, data = ct_instance
    half = len(data) // 2
    sock.sendall(_pdu((1, COMMAND | LAST, rawpdu.c_store_command_set(uid)),
                      (1, DATA, data[:half])))
    deadline = time.monotonic() + CLOSE_DEADLINE
    while not _spool_files(edge_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _spool_files(edge_server)
    other = next(i for i in small_study if str(i.sop_instance_uid) != uid)
    args = [*command, str(other.path)] if command == ("import",) else list(command)
    edge_server.cli(*args, check=False)
    sock.sendall(_pdu((1, DATA | LAST, data[half:])))
    response = _response(sock)
    assert response.Status == 0
    assert _stored_dataset(edge_server, uid) == data


@pytest.mark.parametrize("end", ["abort", "release", "close"])
def test_a_c_store_left_to_pynetdicom_and_cut_off_leaves_no_spool(
        edge_server: EdgeServer, sock: socket.socket, ct_instance: tuple[str, bytes],
        end: str) -> None:
    # A command set in two fragments goes pynetdicom's way, whose spool outlived the
    # association: serve's sweep removed it only after twice the network timeout.
    uid, data = ct_instance
    command = rawpdu.c_store_command_set(uid)
    sock.sendall(_pdu((1, COMMAND, command[:20])) + _pdu((1, COMMAND | LAST, command[20:]))
                 + _pdu((1, DATA, data[:len(data) // 2])))
    deadline = time.monotonic() + CLOSE_DEADLINE
    while not _spool_files(edge_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _spool_files(edge_server), "the data set was never spooled"
    if end == "abort":
        sock.sendall(rawpdu.abort_pdu())
    elif end == "release":
        sock.sendall(rawpdu.release_rq())
        assert rawpdu.read_pdu(sock)[0] == rawpdu.A_RELEASE_RP
        sock.sendall(_pdu((1, DATA | LAST, data[len(data) // 2:])))  # after the release
    else:
        sock.shutdown(socket.SHUT_WR)
    assert _spool_files_once_settled(edge_server) == []
    assert _instances(edge_server) == 0


def test_a_c_store_response_fits_a_small_maximum_pdu_of_the_peer(
        edge_server: EdgeServer, ct_instance: tuple[str, bytes]) -> None:
    # The response went out as one PDU of ~160 bytes whatever the peer announced.
    uid, data = ct_instance
    max_pdu = 64
    sock = rawpdu.connect(edge_server.port)
    with sock:
        sock.sendall(rawpdu.associate_rq_pdu("TESTSCU", edge_server.ae_title, [
            rawpdu.item(0x10, rawpdu.APPLICATION_CONTEXT.encode()),
            rawpdu.presentation_context_item(1, rawpdu.CT_IMAGE_STORAGE),
            rawpdu.user_information_item(max_pdu=max_pdu)]))
        assert rawpdu.read_pdu(sock)[0] == rawpdu.A_ASSOCIATE_AC
        sock.sendall(_pdu((1, COMMAND | LAST, rawpdu.c_store_command_set(uid)),
                          (1, DATA | LAST, data)))
        command, control = b"", 0
        while not control & LAST:
            pdu_type, body = rawpdu.read_pdu(sock)
            assert pdu_type == rawpdu.P_DATA and len(body) <= max_pdu
            length, _, control = struct.unpack(">LBB", body[:6])
            assert control & COMMAND and len(body) == 4 + length
            command += body[6:]
        response = read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
        assert response.Status == 0x0000 and response.AffectedSOPInstanceUID == uid
    assert _instances(edge_server) == 1
