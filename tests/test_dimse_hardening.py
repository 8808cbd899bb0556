"""Hostile or broken peers cannot lock modalities out, exhaust memory or hold threads.

Raw-socket reproductions of pynetdicom 3.0.4 weaknesses the appliance must not
inherit: idle connections holding association slots, PDU lengths trusted
without a bound, stalled or trickled PDUs that held an association (and two
threads) for ever, garbage before an association left open after its
A-ABORT, and a peer without store permission spooling a dataset to disk.
For each attack: the attack is refused or bounded (time, sockets, threads,
bytes), a legitimate peer (dcmtk) is served during and after, and instances
acknowledged before are still there.
"""

from __future__ import annotations

import io
import json
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import dcmtk
import dicomgen
import pytest
import rawpdu
from conftest import EdgeServer
from fuzzing import rss_kb, threads, wait_for_threads
from pynetdicom.dimse_primitives import C_ECHO, C_FIND
from rawpdu import Watched

RSS_BUDGET_KB = 50 * 1024
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


# Short limits, so the attacks end within seconds; the defaults are 60 s and 30 s.
NETWORK_TIMEOUT = 2.0
ACSE_TIMEOUT = 2.0
PER_ADDRESS = 4
HOSTILE = "127.0.0.2"  # the attacker's address; legitimate peers call from 127.0.0.1
# How long a test waits for the server to close a hostile connection before
# calling it left open: far beyond the limits above, so a slow machine passes.
CLOSE_DEADLINE = 30.0


def instances(server: EdgeServer) -> int:
    return int(json.loads(server.cli("status", "--json").stdout)["instances"])


@pytest.fixture
def short_timeouts_server(edge_server_factory: Callable[..., EdgeServer],
                          small_study: list[dicomgen.GeneratedInstance]) -> EdgeServer:
    """A server with short network and ACSE timeouts, holding two acknowledged instances."""
    server = edge_server_factory(start=False)
    server.configure(dicom={"network_timeout": NETWORK_TIMEOUT, "acse_timeout": ACSE_TIMEOUT,
                            "connections_per_address": PER_ADDRESS})
    server.start()
    dcmtk.storescu(server.port, [i.path for i in small_study[:2]]).check()
    assert instances(server) == 2
    return server


def echo_ok(server: EdgeServer) -> None:
    result = server.echo()
    assert result.ok, result.output


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_three_hundred_idle_connections_do_not_lock_peers_out(
    edge_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    before = rss_kb(edge_server.pid)
    for _ in range(300):
        sockets.append(socket.create_connection((edge_server.host, edge_server.port),
                                                timeout=10))
    # The echo gets in: the oldest idle connection of its address makes room for it.
    echo_ok(edge_server)
    assert rss_kb(edge_server.pid) - before < RSS_BUDGET_KB
    edge_server.wait_for_log("never asked for an association")


def test_idle_connections_do_not_count_against_max_associations(
    edge_server_factory: Callable[..., EdgeServer], sockets: list[socket.socket]
) -> None:
    server = edge_server_factory(start=False)
    server.configure(dicom={"max_associations": 2})
    server.start()
    # More idle connections than association slots (the guard allows 16 of them).
    sockets.extend(rawpdu.connect(server.port, source=HOSTILE) for _ in range(3))
    time.sleep(0.5)  # each has its acceptor thread by now
    echo_ok(server)
    # Associations still count: two established ones fill the slots.
    sockets.extend(rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title,
                                      source=HOSTILE) for _ in range(2))
    assert not server.echo().ok
    server.wait_for_log("reason=association limit reached")


def test_oversized_pdu_aborts_without_buffering(
    edge_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    before = rss_kb(edge_server.pid)
    for pdu_type in (0x01, 0x04):  # an A-ASSOCIATE-RQ and a P-DATA, each "2 GiB" long
        sock = socket.create_connection((edge_server.host, edge_server.port), timeout=10)
        sockets.append(sock)
        sock.sendall(struct.pack(">BBL", pdu_type, 0, 0x7FFFFFF0) + b"\0" * 65536)
        sock.settimeout(10)
        while sock.recv(4096):  # an A-ABORT may come first; then the server closes
            pass
        echo_ok(edge_server)
    assert rss_kb(edge_server.pid) - before < RSS_BUDGET_KB
    edge_server.wait_for_log("exceeds the maximum")


def test_stalled_and_trickled_pdus_are_aborted_and_free_their_slots(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    server = short_timeouts_server
    baseline_threads = threads(server.pid)
    # Established associations from one address: two promise a 1000-byte P-DATA and
    # go silent after 10 bytes, one sends a P-DATA header only, one trickles a byte
    # every 0.2 s into its PDU (a slowloris never silent for long).
    attackers = [rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title,
                                    source=HOSTILE) for _ in range(PER_ADDRESS)]
    sockets.extend(attackers)
    for sock in attackers[:2]:
        sock.sendall(rawpdu.pdu_header(rawpdu.P_DATA, 1000) + b"\0" * 10)
    attackers[2].sendall(rawpdu.pdu_header(rawpdu.P_DATA, 1000))
    attackers[3].sendall(rawpdu.pdu_header(rawpdu.P_DATA, 1000))
    # The per-address cap holds for established associations: one more is refused.
    extra = rawpdu.connect(server.port, source=HOSTILE)
    sockets.append(extra)
    assert rawpdu.read_pdu(extra) == (0, b"")
    # A legitimate peer is served during the attack.
    assert server.echo().ok

    watched = [Watched(sock) for sock in attackers[:3]] + [Watched(attackers[3], trickle=True)]
    rawpdu.watch_until_closed(watched, deadline_seconds=CLOSE_DEADLINE)
    for item in watched:
        assert item.closed_after is not None, "stalled association left open"
        assert item.first_pdu_type == rawpdu.A_ABORT
    server.wait_for_log("aborting association: PDU not complete within network_timeout=2s")
    # Their threads are gone and their slots free: the address may connect again.
    assert wait_for_threads(server.pid, baseline_threads,
                            deadline_seconds=CLOSE_DEADLINE) <= baseline_threads
    sockets.extend(rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title,
                                      source=HOSTILE) for _ in range(PER_ADDRESS))
    assert server.echo().ok
    assert instances(server) == 2


def test_a_silent_established_association_is_aborted_after_network_timeout(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    server = short_timeouts_server
    silent = rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title, source=HOSTILE)
    sockets.append(silent)
    item = Watched(silent)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.closed_after is not None
    assert item.first_pdu_type == rawpdu.A_ABORT
    server.wait_for_log("aborting association: no PDU within network_timeout=2s")
    assert server.echo().ok
    assert instances(server) == 2


def test_a_p_data_without_a_pdv_between_messages_is_aborted_without_a_traceback(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket],
) -> None:
    """An empty P-DATA-TF while no message is under way went to the C-STORE receiver,
    whose first look at its first PDV raised IndexError: the DUL thread ended with a
    traceback (the peer was aborted all the same)."""
    server = short_timeouts_server
    sock = rawpdu.established(server.port, "TESTSCU", server.ae_title)
    sockets.append(sock)
    sock.sendall(rawpdu.pdu_header(rawpdu.P_DATA, 0))
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    server.wait_for_log("invalid P-DATA-TF PDU: P-DATA-TF without a PDV")
    assert "Traceback" not in server.log()
    echo_ok(server)


@pytest.mark.parametrize("garbage", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: edge\r\nUser-Agent: scanner\r\n\r\n", id="http"),
    pytest.param(rawpdu.pdu_header(0x09, 100) + b"\0" * 10, id="unknown-pdu-type"),
])
def test_garbage_before_an_association_is_aborted_and_closed_within_artim(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], garbage: bytes
) -> None:
    server = short_timeouts_server
    assert len(garbage) % 6, "a tail shorter than a PDU header is what kept the socket open"
    sock = rawpdu.connect(server.port, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(garbage)  # and keep the connection open, as a scanner does
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    assert item.closed_after is not None, "socket left open after the A-ABORT"
    assert item.received.count(bytes([rawpdu.A_ABORT])) == 1, "one A-ABORT, not one per 6 bytes"
    assert server.echo().ok
    assert instances(server) == 2


def test_a_garbage_flood_is_cut_off_when_artim_expires(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    server = short_timeouts_server
    sock = rawpdu.connect(server.port, source=HOSTILE)
    sockets.append(sock)
    sock.settimeout(1.0)
    deadline = time.monotonic() + CLOSE_DEADLINE
    sent = 0
    while time.monotonic() < deadline:
        try:
            sent += sock.send(b"\xff" * 4096)  # never stops sending
        except TimeoutError:
            continue
        except OSError:
            break  # closed by the server
    else:
        pytest.fail(f"garbage flood still accepted after {CLOSE_DEADLINE}s ({sent} bytes)")
    assert server.echo().ok
    assert instances(server) == 2


def test_an_association_request_over_256_kib_is_refused_before_buffering(
    edge_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    # Below max_pdu (1 MiB), above the pre-negotiation limit: refused at its header.
    sock = rawpdu.connect(edge_server.port)
    sockets.append(sock)
    sock.sendall(rawpdu.pdu_header(0x01, 300 * 1024))
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.closed_after is not None
    edge_server.wait_for_log("PDU of 307200 bytes exceeds the maximum 262144")
    echo_ok(edge_server)


def spool_bytes(server: EdgeServer) -> int:
    return sum(p.stat().st_size for p in (server.home / "store" / ".spool").iterdir()
               if p.is_file())


def test_a_peer_without_store_permission_cannot_spool_a_byte(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    server = short_timeouts_server
    server.add_peer("viewer", "VIEWER", 1, allow="find")
    # The storage context it proposes is refused at negotiation ...
    sock, results = rawpdu.negotiate(
        server.port, "VIEWER", server.ae_title, source=HOSTILE,
        contexts=((1, rawpdu.VERIFICATION), (3, rawpdu.CT_IMAGE_STORAGE)))
    sockets.append(sock)
    assert results == {1: 0, 3: 3}  # 3: abstract syntax not supported
    # ... and a C-STORE of 32 MiB smuggled in on the Verification context is
    # aborted at its first PDU: nothing reaches the spool folder.
    pdus = rawpdu.c_store_pdus(1, 32 << 20)
    sent, largest_spool = 0, 0
    for number, pdu in enumerate(pdus):
        try:
            sock.sendall(pdu)
        except OSError:
            break
        sent += len(pdu)
        if number % 64 == 0:
            largest_spool = max(largest_spool, spool_bytes(server))
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    assert largest_spool == 0 and spool_bytes(server) == 0
    # After its A-ABORT the server reads 64 KiB more at most: the peer is held up by
    # TCP flow control (socket buffers) until the server closes at ARTIM expiry.
    assert sent < 16 << 20, f"{sent} bytes accepted before the abort"
    server.wait_for_log("aborting association: C-STORE on presentation context 1")
    # The peer keeps what it may do; a peer with store permission is served.
    assert dcmtk.findscu(server.port, {"StudyInstanceUID": ""}, aet="VIEWER",
                         aec=server.ae_title).ok
    dcmtk.storescu(server.port, [small_study[2].path]).check()
    assert instances(server) == 3


def _endless_fragments(control: int) -> bytes:
    """A P-DATA-TF of one 256 KiB fragment (context 1) that is never the last one."""
    fragment = b"\0" * (256 << 10)
    pdv = struct.pack(">LBB", len(fragment) + 2, 1, control) + fragment
    return rawpdu.pdu_header(rawpdu.P_DATA, len(pdv)) + pdv


def _echo_announcing_a_data_set() -> bytes:
    """A C-ECHO-RQ command set saying a data set follows (Command Data Set Type 0001)."""
    from appliance.base.dicom_wire import command_pdu, command_set, element, ui, us
    return command_pdu(1, command_set(
        element(0x0002, ui(rawpdu.VERIFICATION)), element(0x0100, us(0x0030)),
        element(0x0110, us(1)), element(0x0800, us(0x0001))))


def _find_command() -> bytes:
    request = C_FIND()
    request.MessageID = 1
    request.AffectedSOPClassUID = STUDY_ROOT_FIND
    request.Priority = 2
    request.Identifier = io.BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    return rawpdu.dimse_pdus(request, 1)[0]  # the command set: its identifier never comes


@pytest.mark.parametrize(("peer", "syntax", "first", "control"), [
    ("TESTSCU", STUDY_ROOT_FIND, _find_command, 0x00),
    ("RISONLY", rawpdu.VERIFICATION, _echo_announcing_a_data_set, 0x00),
    ("TESTSCU", rawpdu.VERIFICATION, lambda: b"", 0x01),
], ids=["c-find-identifier", "c-echo-data-set-of-an-hl7-only-peer", "command-set"])
def test_a_dimse_message_that_never_ends_is_aborted_before_it_fills_memory(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], peer: str, syntax: str,
    first: Callable[[], bytes], control: int, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """pynetdicom appends every fragment of a message other than a C-STORE's data set to
    memory until the last one comes: a peer that never sent it, each PDU within max_pdu
    and the network timeout, made the box hold hundreds of MB (any peer on the
    allowlist: a C-ECHO needs no permission). Now 16 MiB of data set, or 64 KiB of
    command set, is where the association is aborted."""
    server = short_timeouts_server
    server.add_peer("ris", "RISONLY", 1, allow="hl7")
    before = rss_kb(server.pid)
    sock = rawpdu.established(server.port, peer, server.ae_title, contexts=((1, syntax),))
    sockets.append(sock)
    sock.sendall(first())
    flood, sent = _endless_fragments(control), 0
    sock.settimeout(10)
    while sent < 96 << 20 and not select.select([sock], [], [], 0)[0]:  # until it answers
        try:
            sock.sendall(flood)
        except OSError:
            break
        sent += len(flood)
    grown = rss_kb(server.pid) - before
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT, f"{sent >> 20} MiB sent, no A-ABORT"
    assert sent < 48 << 20, f"{sent >> 20} MiB accepted before the abort"
    assert grown < RSS_BUDGET_KB, f"RSS grew by {grown >> 10} MiB"
    server.wait_for_log("DIMSE message larger than the box holds in memory")
    echo_ok(server)
    dcmtk.storescu(server.port, [small_study[2].path]).check()
    assert instances(server) == 3


@pytest.mark.parametrize("pdv", [
    struct.pack(">L", 1) + b"\x01",  # shorter than its context ID and header byte
    struct.pack(">L", 4096) + b"\x01\x03" + b"\0" * 16,  # runs past the end of its PDU
    b"\0\0\0",  # a PDV length field cut short
    b"",  # no PDV at all (PS3.8 9.3.5: one or more): an IndexError ended the DUL thread
], ids=["pdv-too-short", "pdv-past-its-pdu", "pdv-header-cut", "no-pdv"])
def test_a_p_data_whose_pdvs_do_not_fit_is_aborted_and_stores_nothing(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], pdv: bytes,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    server = short_timeouts_server
    sock = rawpdu.established(server.port, "TESTSCU", server.ae_title,
                              contexts=((1, rawpdu.CT_IMAGE_STORAGE),))
    sockets.append(sock)
    command, *_ = rawpdu.c_store_pdus(1, 1024)  # a valid C-STORE-RQ command first
    sock.sendall(command + rawpdu.pdu_header(0x04, len(pdv)) + pdv)
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    server.wait_for_log("invalid P-DATA-TF PDU")
    assert "Traceback" not in server.log()
    assert instances(server) == 2
    dcmtk.storescu(server.port, [small_study[2].path]).check()
    assert instances(server) == 3


@pytest.mark.parametrize("garbage", [
    pytest.param(rawpdu.pdu_header(0x09, 4) + b"\0" * 4, id="unknown-pdu-type"),
    pytest.param(rawpdu.pdu_header(rawpdu.A_RELEASE_RP, 4) + b"\0" * 4, id="unexpected-pdu"),
])
def test_garbage_right_behind_an_association_request_is_aborted_without_a_traceback(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], garbage: bytes
) -> None:
    # The garbage arrives while the association is still deciding to accept: the
    # provider aborts (Sta13), then the acceptance arrives for an association that no
    # longer exists. pynetdicom's state machine raised on it and killed the DUL thread.
    server = short_timeouts_server
    watched = []
    for _ in range(PER_ADDRESS):
        sock = rawpdu.connect(server.port, source=HOSTILE)
        sockets.append(sock)
        sock.sendall(rawpdu.associate_rq(dcmtk.TEST_AE, server.ae_title) + garbage)
        watched.append(Watched(sock))
    rawpdu.watch_until_closed(watched, deadline_seconds=CLOSE_DEADLINE)
    for item in watched:
        assert item.closed_after is not None, "connection left open"
        assert bytes([rawpdu.A_ABORT]) in item.received
    log = server.log()
    assert "Traceback" not in log and "Invalid event" not in log, log[-4000:]
    echo_ok(server)
    assert instances(server) == 2


def test_a_peer_that_resets_mid_pdu_is_logged_as_a_warning_not_an_error(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    """What a peer did wrong is not the box failing: an ERROR line pages an operator
    (the leak audit counted 234 of them for resets of peers alone)."""
    server = short_timeouts_server
    sock = rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(rawpdu.pdu_header(rawpdu.P_DATA, 1000) + b"\0" * 10)
    time.sleep(0.2)  # the reader is inside the PDU's body
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # an RST, not a FIN
    said = "connection closed before the entire PDU was received"
    server.wait_for_log(f"WARNING appliance.base.compat: {said}", timeout=CLOSE_DEADLINE)
    assert " ERROR " not in server.log(), server.log()
    echo_ok(server)


def test_a_pdu_the_edge_cuts_off_is_logged_once_as_a_warning(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    # The edge's socket logs why it aborts; the PDU reader logged the same abort again,
    # as an ERROR ("connection closed before the entire PDU was received").
    server = short_timeouts_server
    sock = rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(rawpdu.pdu_header(rawpdu.P_DATA, 1000) + b"\0" * 10)
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    log = server.log()
    assert log.count("PDU not complete within network_timeout=2s: 10 of 1000 bytes") == 1, log
    assert " ERROR " not in log, log
    echo_ok(server)


def test_a_non_ascii_byte_in_an_association_request_is_one_warning_not_a_traceback(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    # pynetdicom logged a traceback at ERROR for each undecodable AE title or UID.
    server = short_timeouts_server
    sock = rawpdu.connect(server.port, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(rawpdu.associate_rq("TEST?SCU", server.ae_title).replace(
        b"TEST?SCU", b"TEST\xb0SCU"))
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.closed_after is not None
    assert item.first_pdu_type in (rawpdu.A_ABORT, rawpdu.A_ASSOCIATE_RJ)
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "undecodable text from a peer: 'ascii' codec can't decode byte 0xb0" in log
    echo_ok(server)


def test_peer_values_in_association_requests_reach_the_log_cut_and_escaped(
    edge_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    # pynetdicom logged a peer's invalid value whole (the edge the refused PDU's error
    # again), and an odd "UID" as it came: a newline in it forged a log line.
    server = edge_server
    before = len(server.log())
    forged = "1\n2026-01-01 00:00:00,000 INFO forged: line"
    version_name = rawpdu.item(0x55, b"x" * 60000)  # Implementation Version Name, 16 at most
    for abstract_syntax, extra in (("1.2.840.10008.1.1", [version_name]), (forged, [])):
        sock = rawpdu.connect(server.port, source=HOSTILE)
        sockets.append(sock)
        sock.sendall(rawpdu.associate_rq_pdu(dcmtk.TEST_AE, server.ae_title, [
            rawpdu.presentation_context_item(1, abstract_syntax, ["1.2.840.10008.1.2"]),
            rawpdu.user_information_item(extra=extra)]))
        rawpdu.read_pdu(sock)
    echo_ok(server)
    log = server.log()[before:]
    assert "Implementation Version Name" in log and "(cut, " in log
    assert len(log) < 4096, f"{len(log)} characters logged"
    assert "\n2026-01-01" not in log and "'1\\x0a2026-01-01" in log, log


def test_an_association_request_with_an_even_context_id_is_aborted_not_a_dead_thread(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    # pynetdicom decodes the request, then its state machine fails to turn it into a
    # primitive (context IDs are odd): the DUL thread died with a traceback, the peer
    # got no answer and the association waited for its request until the ACSE timeout.
    server = short_timeouts_server
    baseline_threads = threads(server.pid)
    sock = rawpdu.connect(server.port, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(rawpdu.associate_rq(dcmtk.TEST_AE, server.ae_title,
                                     contexts=((2, rawpdu.VERIFICATION),)))
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    assert item.closed_after is not None
    log = server.log()
    assert "Traceback" not in log, log
    assert "invalid PDU from the peer: 'context_id' must be an odd integer" in log
    assert wait_for_threads(server.pid, baseline_threads,
                            deadline_seconds=CLOSE_DEADLINE) <= baseline_threads
    echo_ok(server)


@pytest.mark.parametrize("context", [
    rawpdu.item(0x20, bytes([1, 0, 0, 0]) + rawpdu.item(0x40, b"1.2.840.10008.1.2")),
    rawpdu.item(0x20, bytes([1, 0, 0, 0]) + rawpdu.item(0x30, rawpdu.VERIFICATION.encode())),
], ids=["no-abstract-syntax", "no-transfer-syntax"])
def test_a_presentation_context_without_its_syntaxes_is_aborted_not_a_dead_thread(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], context: bytes,
) -> None:
    # Found by the DICOM fuzz (seed 26): pynetdicom decodes a proposed context without
    # an abstract syntax sub-item, then its negotiation fails on the None: the acceptor
    # thread died with a traceback and the peer waited for an answer.
    server = short_timeouts_server
    baseline_threads = threads(server.pid)
    sock = rawpdu.connect(server.port, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(rawpdu.associate_rq_pdu(dcmtk.TEST_AE, server.ae_title, [
        rawpdu.item(0x10, rawpdu.APPLICATION_CONTEXT.encode()), context,
        rawpdu.user_information_item()]))
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.closed_after is not None
    assert item.first_pdu_type == rawpdu.A_ABORT
    log = server.log()
    assert "Traceback" not in log, log
    assert "invalid PDU from the peer: presentation context 1 proposes no" in log
    assert wait_for_threads(server.pid, baseline_threads,
                            deadline_seconds=CLOSE_DEADLINE) <= baseline_threads
    echo_ok(server)


@pytest.mark.parametrize("established", [False, True], ids=["awaiting-acceptance",
                                                            "established"])
def test_an_a_abort_with_an_invalid_source_ends_the_association_not_its_thread(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], established: bool,
) -> None:
    # Found by the DICOM fuzz (seed 25): pynetdicom decodes an A-ABORT whose source is
    # not 0, 1 or 2, then its state machine's AA-3 fails to make the indication
    # primitive: the association's thread died with a traceback.
    server = short_timeouts_server
    baseline_threads = threads(server.pid)
    if established:
        sock = rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title, source=HOSTILE)
        sock.sendall(rawpdu.abort_pdu(source=0x80))
    else:
        sock = rawpdu.connect(server.port, source=HOSTILE)
        sock.sendall(rawpdu.associate_rq(dcmtk.TEST_AE, server.ae_title)
                     + rawpdu.abort_pdu(source=0x80))
    sockets.append(sock)
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.closed_after is not None
    log = server.log()
    assert "Traceback" not in log, log
    assert "invalid PDU from the peer: Invalid A-ABORT 'Source' value '128'" in log
    assert wait_for_threads(server.pid, baseline_threads,
                            deadline_seconds=CLOSE_DEADLINE) <= baseline_threads
    echo_ok(server)


def test_a_request_its_context_does_not_serve_is_aborted_with_one_warning(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket]
) -> None:
    # A C-ECHO on the Storage Commitment context: pynetdicom's N-service class raised
    # ValueError, which its association logged with a traceback before aborting.
    server = short_timeouts_server
    storage_commitment = "1.2.840.10008.1.20.1"
    sock, results = rawpdu.negotiate(server.port, dcmtk.TEST_AE, server.ae_title,
                                     source=HOSTILE, contexts=((1, storage_commitment),))
    sockets.append(sock)
    assert results == {1: 0}
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = storage_commitment
    for pdu in rawpdu.dimse_pdus(echo, 1):
        sock.sendall(pdu)
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    log = server.log()
    assert "Traceback" not in log, log
    assert ("aborting association: Invalid DIMSE primitive 'C_ECHO' used with Storage"
            " Commitment") in log
    echo_ok(server)


def _ended_left_open(server: EdgeServer, ended: str) -> socket.socket:
    """A connection whose association `ended` ("rejected", "released", "aborted") by
    the box's answer, which the peer keeps open (the box waits for its close, Sta13)."""
    if ended == "rejected":
        sock = rawpdu.connect(server.port, source=HOSTILE)
        sock.sendall(rawpdu.associate_rq("STRANGER", server.ae_title))
        expected = rawpdu.A_ASSOCIATE_RJ
    else:
        sock = rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title, source=HOSTILE)
        # An unknown PDU type: the box answers it with an A-ABORT (AA-8).
        sock.sendall(rawpdu.release_rq() if ended == "released"
                     else rawpdu.pdu_header(0x09, 0))
        expected = rawpdu.A_RELEASE_RP if ended == "released" else rawpdu.A_ABORT
    assert rawpdu.read_pdu(sock)[0] == expected
    return sock


@pytest.mark.parametrize("ended", ["rejected", "released", "aborted"])
def test_associations_that_ended_do_not_count_against_max_associations(
    edge_server_factory: Callable[..., EdgeServer], sockets: list[socket.socket], ended: str,
) -> None:
    # After its A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT the box waits for the peer to
    # close until ARTIM expires, and pynetdicom counted that thread as an association:
    # an unknown AE title calling and never closing had every modality rejected as busy.
    server = edge_server_factory(start=False)
    server.configure(dicom={"max_associations": 2})  # ARTIM: the default 30 s
    server.start()
    sockets.extend(_ended_left_open(server, ended) for _ in range(3))
    assert all(rawpdu.still_open(sock) for sock in sockets)
    echo_ok(server)
    # Associations still count: two established ones fill the slots.
    sockets.extend(rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title,
                                      source=HOSTILE) for _ in range(2))
    assert not server.echo().ok
    server.wait_for_log("reason=association limit reached")


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF of one PDV."""
    return (rawpdu.pdu_header(rawpdu.P_DATA, len(fragment) + 6)
            + struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment)


def _echo_command(context_id: int) -> bytes:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = rawpdu.VERIFICATION
    (pdu,) = rawpdu.dimse_pdus(echo, context_id)
    return pdu


@pytest.mark.parametrize(("pdu", "why"), [
    (_p_data(1, 0x02, b"\0" * 10), "a data set fragment before its command set"),
    (_p_data(1, 0x00, b"\0" * 10), "a data set fragment before its command set"),
    (_echo_command(5), "a message on presentation context 5, which was not accepted"),
    (_p_data(1, 0x03, b"\xff" * 37), "a command set that cannot be decoded"),
    (_p_data(1, 0x03, b""), "a command set that cannot be decoded"),
], ids=["data-set-first", "data-set-first-not-last", "context-not-accepted",
        "command-set-garbage", "command-set-empty"])
def test_a_message_that_does_not_start_with_a_valid_command_set_is_aborted_with_a_warning(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], pdu: bytes, why: str,
) -> None:
    # pynetdicom logged a data set fragment that starts a message as an ERROR with a
    # traceback (or held it, not last, until the network timeout), aborted a message on
    # a context it did not accept with nothing logged, and closed the connection on an
    # undecodable command set without an A-ABORT, logged as the box's ERROR.
    server = short_timeouts_server
    before = len(server.log())
    sock = rawpdu.established(server.port, dcmtk.TEST_AE, server.ae_title, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(pdu)
    item = Watched(sock)
    rawpdu.watch_until_closed([item], deadline_seconds=CLOSE_DEADLINE)
    assert item.first_pdu_type == rawpdu.A_ABORT
    log = server.log()[before:]
    assert f"invalid P-DATA-TF PDU: {why}" in log, log
    assert "Traceback" not in log and " ERROR " not in log, log
    echo_ok(server)


@pytest.mark.parametrize("max_pdu", [1, 6])
def test_a_maximum_pdu_too_small_for_any_p_data_is_aborted_at_the_request(
    short_timeouts_server: EdgeServer, sockets: list[socket.socket], max_pdu: int,
) -> None:
    # Accepted, such a peer's first request failed with a traceback: pynetdicom cannot
    # split the response into PDUs this small.
    server = short_timeouts_server
    before = len(server.log())
    sock = rawpdu.connect(server.port, source=HOSTILE)
    sockets.append(sock)
    sock.sendall(rawpdu.associate_rq_pdu(dcmtk.TEST_AE, server.ae_title, [
        rawpdu.item(0x10, rawpdu.APPLICATION_CONTEXT.encode()),
        rawpdu.presentation_context_item(1, rawpdu.VERIFICATION),
        rawpdu.user_information_item(max_pdu=max_pdu)]))
    assert rawpdu.read_pdu(sock)[0] == rawpdu.A_ABORT
    log = server.log()[before:]
    assert (f"invalid PDU from the peer: a maximum PDU length of {max_pdu} bytes, too"
            " small for any P-DATA-TF") in log, log
    assert "Traceback" not in log, log
    echo_ok(server)
