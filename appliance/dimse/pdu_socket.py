"""EdgeAssociationSocket: how an accepted connection's PDUs are read, and when it gives up.

pynetdicom 3.0.4's DUL thread reads a PDU with blocking `recv()` calls on a
socket that has no timeout (Python's `accept()` returns blocking sockets
whatever the listening socket's timeout is), and its timers cannot help:

- a peer that sends a P-DATA header promising 1000 bytes and goes silent
  blocks the DUL thread in `recv()` for ever. The association's network
  timeout then fires, but the A-ABORT it queues is never sent (only the
  blocked DUL thread sends) and `Association.kill()` spins waiting for the
  DUL to return to Sta1: the association and its two threads live until the
  peer leaves;
- the ARTIM timer is only looked at between PDUs, so garbage before an
  association (an HTTP request, a port scanner's probe) whose tail is
  shorter than a PDU header keeps the socket open for as long as the peer
  likes, after pynetdicom has answered it with an A-ABORT (AA-1, Sta13).

This socket bounds every read, and ends the connection itself, with an
A-ABORT and a log line that says why:

- every PDU must arrive in full within `network_timeout` of its first byte
  (a peer that trickles one byte at a time gains nothing); before the
  A-ASSOCIATE-RQ has arrived (Sta1-2), also within the ARTIM timer;
- a read longer than any PDU this side accepts is refused before buffering:
  256 KiB before negotiation (an A-ASSOCIATE-RQ proposing 128 contexts stays
  far below it), then the negotiated maximum. pynetdicom trusts the length
  field: one P-DATA declaring ~2 GiB made it buffer without bound;
- in Sta13 (an A-ABORT, A-ASSOCIATE-RJ or A-RELEASE-RP sent, waiting for the
  peer to close) nothing more is parsed: up to 64 KiB of incoming bytes are
  discarded, then reading stops, until the peer closes or the ARTIM timer
  expires, and then the socket is closed (PS3.8 AA-1, AR-5). pynetdicom
  instead parses each further 6 bytes as a PDU, answers each with another
  A-ABORT, and blocks on a short tail.

A TLS error after the handshake (a renegotiation the box refuses, a
record that fails its integrity check, an alert) ends it the same way, with the
peer's address and the TLS reason, not as an ERROR without either.

A refused read raises TransportAborted (an OSError): the DUL handles it as
Evt17, transport closed, and the association ends.

The reads also go into one preallocated buffer per PDU (pynetdicom appends
4096-byte `recv()`s to a growing bytearray: 128 Python-level calls and copies
for a 512 KiB CT slice): on plain TCP with `os.readv()` on the socket's
non-blocking descriptor, waiting in poll() only when nothing has arrived (one
system call per read while data flows); on TLS with `recv_into()`. Before it
waits for bytes, it asks for an immediate ACK of what arrives (quick_ack): a
peer with Nagle on otherwise waits 40 ms per C-STORE for our delayed ACK.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from typing import NoReturn

from pynetdicom.transport import AssociationSocket

from appliance.base.errors import TransportAborted

log = logging.getLogger(__name__)

_RECV_CHUNK = 1 << 20
_DRAIN_CHUNK = 1 << 16
_DRAIN_LIMIT = 1 << 16  # bytes read (and dropped) after an A-ABORT before reading stops
# How often a connection waiting for bytes checks whether the server is stopping.
_POLL = 0.5
# Association negotiation PDUs are not bound by the negotiated maximum; an
# A-ASSOCIATE-RQ proposing 128 contexts with several transfer syntaxes each
# stays well below this.
NEGOTIATION_PDU_LIMIT = 1 << 18
# No A-ASSOCIATE-RQ yet. Sta1 too: the DUL may read the first PDU before it has
# processed the "connection open" event that moves it to Sta2.
_BEFORE_REQUEST = ("Sta1", "Sta2")
_NETWORK, _ARTIM = "network", "artim"  # which timeout bounds a PDU read (_deadline)
# A-ABORT PDU (PS3.8 9.3.8): source 2 = service provider, reason 0 = not specified.
_A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, 0)


class EdgeAssociationSocket(AssociationSocket):
    # Set by the request handler for each accepted connection.
    network_timeout: float = 60.0
    stopping: threading.Event | None = None
    _pdu_deadline: float | None = None
    _established_limit: int | None = None

    @property
    def ready(self) -> bool:
        """True when a PDU starts arriving (which starts its deadline), and always in
        Sta13, where recv() waits for the peer's close instead of parsing."""
        if self._closing():
            return self.socket is not None
        if not self.assoc.dul.event_queue.empty():
            # Let the state machine act on what was read before reading on:
            # pynetdicom reads ahead, so one garbage PDU was parsed (and
            # answered with an A-ABORT) after the one that ended the association.
            return False
        ready = bool(super().ready)
        if ready:
            self._pdu_deadline = time.monotonic() + self.network_timeout
        return ready

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly `nr_bytes` within the PDU's deadline (fewer only if the peer
        closed the connection); in Sta13, wait for the close and return nothing."""
        state = self._state()
        if state == "Sta13":
            self._await_close()
            return bytearray()
        sock = self.socket
        assert sock is not None
        limit = self._pdu_limit(state)
        if nr_bytes > limit:
            self._abort(f"PDU of {nr_bytes} bytes exceeds the maximum {limit}")
        deadline, cause = self._deadline(state)
        buffer = bytearray(nr_bytes)
        if not isinstance(sock, ssl.SSLSocket) and sock.gettimeout() is not None:
            return self._read_plain(sock, buffer, deadline, cause)
        view = memoryview(buffer)
        received = 0
        try:
            while received < nr_bytes:
                remaining = self._time_left(deadline, cause, received, nr_bytes)
                # Wait in slices, to notice a stopping server; the socket's own
                # timeout (network_timeout, which also bounds sends) is restored below.
                sock.settimeout(min(remaining, _POLL))
                quick_ack(sock)
                try:
                    count = sock.recv_into(view[received:],
                                           min(nr_bytes - received, _RECV_CHUNK))
                except TimeoutError:
                    continue
                except ssl.SSLError as exc:
                    self._abort(f"TLS error: {exc.reason or type(exc).__name__}")
                if count == 0:
                    return buffer[:received]
                received += count
        finally:
            del view
            with contextlib.suppress(OSError):
                sock.settimeout(self.network_timeout)
        return buffer

    def _read_plain(self, sock: socket.socket, buffer: bytearray, deadline: float,
                    cause: str) -> bytearray:
        """`recv` on plain TCP: fill `buffer` with reads of the descriptor itself.

        A socket with a timeout is non-blocking underneath, so a read returns at once
        with what has arrived, or EAGAIN; only then does this wait, in poll(), in
        slices as `recv` does. Python's recv_into() on such a socket would poll
        before every read and `recv` would set the timeout twice around it: four
        system calls per read instead of one while data is flowing."""
        view = memoryview(buffer)
        fd = sock.fileno()
        wanted = len(buffer)
        received = 0
        try:
            while received < wanted:
                remaining = self._time_left(deadline, cause, received, wanted)
                try:
                    count = os.readv(fd, [view[received:received + _RECV_CHUNK]])
                except BlockingIOError:
                    quick_ack(sock)
                    poller = select.poll()  # not select(): it fails on descriptors >= 1024
                    poller.register(fd, select.POLLIN)
                    poller.poll(min(remaining, _POLL) * 1000)
                    continue
                if count == 0:
                    return buffer[:received]
                received += count
        finally:
            del view
        return buffer

    # --- helpers ---------------------------------------------------------------------

    def _time_left(self, deadline: float, cause: str, received: int, wanted: int) -> float:
        """Seconds left to read the PDU; aborts when the server is stopping or the PDU's
        time is up (its message says how much of it had come)."""
        if self.stopping is not None and self.stopping.is_set():
            self._abort("the server is stopping")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._abort(f"{self._cause(cause)}: {received} of {wanted} bytes received")
        return remaining

    def _state(self) -> str:
        return str(self.assoc.dul.state_machine.current_state)

    def _closing(self) -> bool:
        return self._state() == "Sta13"

    def _pdu_limit(self, state: str) -> int:
        """The largest PDU accepted in `state`: fixed once established (Sta6), so
        looked up once (pynetdicom walks the user information items for it)."""
        if state in _BEFORE_REQUEST:
            return NEGOTIATION_PDU_LIMIT
        if state == "Sta6" and self._established_limit is not None:
            return self._established_limit
        limit = max(int(self.assoc.acceptor.maximum_length or 0), NEGOTIATION_PDU_LIMIT)
        if state == "Sta6":
            self._established_limit = limit
        return limit

    def _deadline(self, state: str) -> tuple[float, str]:
        """When the PDU being read must be complete, and which timeout that is: the
        network timeout, or before the A-ASSOCIATE-RQ (Sta1-2) the ARTIM timer if it
        expires first (see _cause)."""
        deadline = self._pdu_deadline or time.monotonic() + self.network_timeout
        if state in _BEFORE_REQUEST:
            artim = self.assoc.dul.artim_timer
            artim_deadline = time.monotonic() + max(float(artim.remaining), 0.0)
            if artim_deadline < deadline:
                return artim_deadline, _ARTIM
        return deadline, _NETWORK

    def _cause(self, which: str) -> str:
        """Why a PDU read timed out, built only when one does."""
        if which == _ARTIM:
            timeout = self.assoc.dul.artim_timer.timeout
            return f"A-ASSOCIATE-RQ not complete within acse_timeout={timeout:g}s"
        return f"PDU not complete within network_timeout={self.network_timeout:g}s"

    def _abort(self, why: str) -> NoReturn:
        """Send an A-ABORT, log why, and end the connection (raises)."""
        log.warning("aborting association: %s address=%s", why, self._peer_address())
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(min(self.network_timeout, 5.0))
                sock.sendall(_A_ABORT)
        raise TransportAborted(why)

    def _await_close(self) -> None:
        """Sta13: discard what arrives (up to _DRAIN_LIMIT, then stop reading, so a
        peer that sends on is held up by TCP flow control) until the peer closes,
        the ARTIM timer expires or the server stops; the DUL then closes (AR-5)."""
        sock = self.socket
        artim = self.assoc.dul.artim_timer
        drained = 0
        while sock is not None and artim.remaining > 0:
            if self.stopping is not None and self.stopping.is_set():
                return
            wait = max(min(artim.remaining, _POLL), 0.0)
            if drained >= _DRAIN_LIMIT:
                time.sleep(wait)
                continue
            try:
                poller = select.poll()  # not select(): it fails on descriptors >= 1024
                poller.register(sock, select.POLLIN)
                if poller.poll(wait * 1000):
                    sock.settimeout(wait or _POLL)  # a partial TLS record
                    chunk = sock.recv(_DRAIN_CHUNK)
                    if not chunk:
                        return
                    drained += len(chunk)
            except TimeoutError:
                continue
            except (OSError, ValueError):  # closed under us (e.g. after a reject)
                return

    def _peer_address(self) -> str:
        address = getattr(self.assoc.requestor, "address", "") or ""
        if address:
            return str(address)
        try:
            return str(self.socket.getpeername()[0]) if self.socket else "?"
        except OSError:
            return "?"


def quick_ack(sock: socket.socket) -> None:
    """Acknowledge what arrives next at once (TCP_QUICKACK); call it before each wait.

    A peer with Nagle's algorithm on (dcmtk's default, so many modalities and
    workstations) writes a DIMSE message in pieces (a C-STORE-RQ's command, then its
    dataset) and holds the later ones until the first is acknowledged; the kernel
    delays that ACK by 40 ms when it has nothing to send, which is the case while we
    wait for the rest: ~45 ms an instance. Linux leaves quick-ACK mode by itself once
    we send right after receiving, so it is asked for again before each wait."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
