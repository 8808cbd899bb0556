"""HL7 over MLLP from a slow RIS into a real `pacs-edge serve`: the silence before a
message is bounded by `[hl7] idle_timeout`; a message in progress by the same
silence between its reads and by `[hl7] message_timeout` as a whole. The sender is a
real socket pacing its bytes by waiting for the box's answer (or its close)."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable, Iterator

import hl7peer
import pytest
from conftest import EdgeServer

IDLE = 2.0  # [hl7] idle_timeout of these servers, seconds
STEP = 0.25  # seconds between the pieces a steady sender sends


@pytest.fixture
def slow_edge(edge_server_factory: Callable[..., EdgeServer],
              free_port: Callable[[], int]) -> Iterator[tuple[EdgeServer, int]]:
    """The HL7 listener with a short idle timeout and the default message bound."""
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port, idle_timeout=IDLE)
    server.start()
    yield server, port


def _answer_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the box sends within `seconds` (b"" when it closed the connection), or None
    when it stays silent: the pace of a sender that waits for nothing."""
    readable, _, _ = select.select([sock], [], [], seconds)
    if not readable:
        return None
    try:
        return sock.recv(4096)
    except ConnectionResetError:
        return b""


def _pieces(data: bytes, count: int) -> list[bytes]:
    size = -(-len(data) // count)
    return [data[i:i + size] for i in range(0, len(data), size)]


def _accessions(server: EdgeServer) -> set[str]:
    return {o["accession_number"]
            for o in json.loads(server.cli("worklist", "list", "--json").stdout)}


def test_a_message_begun_late_in_the_idle_window_and_sent_steadily_is_accepted(
        slow_edge: tuple[EdgeServer, int]) -> None:
    """The RIS is silent for most of idle_timeout, then sends a message in pieces, each
    well within idle_timeout of the last, for longer than idle_timeout in all: the box
    reads it to its end and answers AA (it cut it off at idle_timeout from the last ACK)."""
    server, port = slow_edge
    order = hl7peer.frame(hl7peer.orm("SLOW1", accession="SLOW1")
                          + "NTE|1||" + "x" * 4000 + "\r")
    sock = hl7peer.raw(port)
    try:
        assert _answer_within(sock, IDLE * 0.75) is None  # silence, late in the window
        *pieces, last = _pieces(order, int(IDLE * 1.5 / STEP))
        for piece in pieces:
            sock.sendall(piece)
            assert _answer_within(sock, STEP) is None, "the box closed or answered mid-message"
        sock.sendall(last)
        ack = hl7peer.read_ack_unless_closed(sock)
    finally:
        sock.close()
    assert ack is not None, "the box closed the connection of a steady sender"
    assert (ack.code, ack.control_id) == ("AA", "SLOW1")
    assert "SLOW1" in _accessions(server)


def test_a_sender_that_stalls_mid_message_is_cut_off_and_nothing_applied(
        slow_edge: tuple[EdgeServer, int]) -> None:
    server, port = slow_edge
    order = hl7peer.frame(hl7peer.orm("STALL1", accession="STALL1"))
    sock = hl7peer.raw(port)
    try:
        sock.sendall(order[: len(order) // 2])
        assert hl7peer.closed_by_peer(sock)
    finally:
        sock.close()
    server.wait_for_log("hl7 message stalled, connection closed")
    assert hl7peer.send(port, hl7peer.orm("AFTER1", accession="AFTER1")).code == "AA"
    assert _accessions(server) == {"AFTER1"}


def test_a_message_trickled_past_message_timeout_is_cut_off_and_nothing_applied(
        edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int]) -> None:
    """Every piece comes within idle_timeout, so only the bound on the whole message
    ends it: a sender trickling bytes holds no connection slot, nor memory, for long."""
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port, idle_timeout=IDLE, message_timeout=IDLE * 2)
    server.start()
    order = hl7peer.frame(hl7peer.orm("TRICKLE1", accession="TRICKLE1")
                          + "NTE|1||" + "x" * 4000 + "\r")
    sock = hl7peer.raw(port)
    answer: bytes | None = None
    try:
        deadline = time.monotonic() + hl7peer.TIMEOUT
        for piece in _pieces(order[:-2], len(order)):  # never its end
            try:
                sock.sendall(piece)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
            else:
                answer = _answer_within(sock, STEP)
            if answer is not None or time.monotonic() > deadline:
                break
    finally:
        sock.close()
    assert answer == b"", "the box kept reading a message that never ends"
    server.wait_for_log("hl7 message not finished within message_timeout, connection closed")
    assert "TRICKLE1" not in _accessions(server)
