"""Hostile or broken peers cannot lock modalities out or exhaust memory.

Raw-socket reproductions of two pynetdicom 3.0.4 weaknesses the appliance must
not inherit: idle connections holding association slots, and PDU lengths
trusted without a bound. During each attack a legitimate C-ECHO must succeed
within 2 s and the server's RSS must grow by less than 50 MB.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EdgeServer

ECHO_DEADLINE = 2.0
RSS_BUDGET_KB = 50 * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def timed_echo(server: EdgeServer) -> float:
    start = time.monotonic()
    result = server.echo()
    elapsed = time.monotonic() - start
    assert result.ok, result.output
    return elapsed


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
    assert timed_echo(edge_server) < ECHO_DEADLINE
    assert rss_kb(edge_server.pid) - before < RSS_BUDGET_KB
    assert "never asked for an association" in edge_server.log()


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
        assert timed_echo(edge_server) < ECHO_DEADLINE
    assert rss_kb(edge_server.pid) - before < RSS_BUDGET_KB
    assert "exceeds the negotiated maximum" in edge_server.log()
