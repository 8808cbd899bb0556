"""Socket-level subclasses of pynetdicom's acceptor: the edge's own transport.

- EdgeAssociationServer: TCP_NODELAY on every accepted socket (Nagle plus
  delayed ACK costs ~40 ms per small response), SO_REUSEPORT when several
  worker processes share the port, and our request handler.
- EdgeRequestHandler: gives each association an EdgeAssociationSocket and
  tells the ConnectionGuard when the peer starts negotiating and when it leaves.
- ConnectionGuard: in pynetdicom 3.0.4 a TCP connection that never sends an
  A-ASSOCIATE-RQ holds an association slot until the ARTIM timer expires, so
  a few hundred idle sockets lock every modality out. The guard caps
  connections that have not started negotiating (closing the oldest idle one
  when a new connection needs room) and connections per remote address, so
  a peer that negotiates always finds a free slot.
- EdgeAssociationSocket.recv: pynetdicom 3.0.4 reads a PDU in 4096-byte
  `recv()` calls, each appended to a growing bytearray (128 Python-level calls
  and copies for a 512 KiB CT slice); this reads into one preallocated buffer.
  It also refuses a read longer than any PDU the association may carry:
  pynetdicom trusts the PDU length field, so one P-DATA declaring ~2 GiB made
  it buffer without bound. A refused read closes the connection (pynetdicom
  handles it as Evt17, transport closed, and ends the association).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import ssl
import threading
from collections import Counter, OrderedDict
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from appliance.dimse.negotiation import StoredCounts, order_syntaxes

log = logging.getLogger(__name__)

_RECV_CHUNK = 1 << 20
PRE_ASSOCIATION_POLL = 0.02  # seconds between DUL polls before an A-ASSOCIATE-RQ
ASSOCIATION_POLL = 0.001  # pynetdicom's default, once negotiating
# Association negotiation PDUs are not bound by the negotiated maximum; an
# A-ASSOCIATE-RQ proposing 128 contexts with many transfer syntaxes stays well below.
NEGOTIATION_PDU_LIMIT = 1 << 18


class OversizedPDU(OSError):
    pass


class EdgeAssociationSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly `nr_bytes` (fewer only if the peer closed the connection)."""
        assert self.socket is not None
        limit = max(int(self.assoc.acceptor.maximum_length or 0), NEGOTIATION_PDU_LIMIT)
        if nr_bytes > limit:
            log.warning("aborting association: PDU of %d bytes exceeds the negotiated maximum"
                        " %d address=%s", nr_bytes, limit, self.assoc.requestor.address)
            raise OversizedPDU(f"PDU length {nr_bytes} exceeds {limit}")
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = self.socket.recv_into(view[received:], min(nr_bytes - received, _RECV_CHUNK))
            if count == 0:
                del view
                return buffer[:received]
            received += count
        return buffer


class SupportedContexts(list[PresentationContext]):
    """The server's supported contexts, cheap to deep-copy.

    pynetdicom deep-copies the supported contexts for every new connection;
    for 177 contexts with 45 transfer syntaxes each that is ~90 ms of CPU per
    association (a C-ECHO's whole cost, and an easy lever for a connection
    flood). A context holds only immutable UIDs, flags and lists of UIDs, so
    copying each context and its lists is a faithful deep copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            clone = copy.copy(context)
            clone.__dict__ = {key: list(value) if isinstance(value, list) else value
                              for key, value in vars(context).items()}
            copies.append(clone)
        return copies


class ConnectionGuard:
    """Admission control for raw connections; see the module docstring."""

    def __init__(self, *, idle_limit: int, per_address_limit: int) -> None:
        self.idle_limit = idle_limit
        self.per_address_limit = per_address_limit
        self._lock = threading.Lock()
        self._idle: OrderedDict[socket.socket, str] = OrderedDict()
        self._per_address: Counter[str] = Counter()

    def admit(self, sock: socket.socket, address: str) -> bool:
        """Register a new connection; False when it must be refused."""
        evict: list[socket.socket] = []
        with self._lock:
            if self._per_address[address] >= self.per_address_limit:
                oldest = next((s for s, a in self._idle.items() if a == address), None)
                if oldest is None:
                    log.warning("connection refused: too many from one address address=%s"
                                " limit=%d", address, self.per_address_limit)
                    return False
                evict.append(self._forget_idle(oldest))
            while len(self._idle) >= self.idle_limit:
                evict.append(self._forget_idle(next(iter(self._idle))))
            self._idle[sock] = address
            self._per_address[address] += 1
        for idle in evict:
            log.warning("closing a connection that never asked for an association"
                        " to make room address=%s", _peer_ip(idle))
            with contextlib.suppress(OSError):
                idle.shutdown(socket.SHUT_RDWR)
        return True

    def negotiating(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle.pop(sock, None)

    def closed(self, sock: socket.socket, address: str) -> None:
        with self._lock:
            self._idle.pop(sock, None)
            if self._per_address[address] > 0:
                self._per_address[address] -= 1
            if not self._per_address[address]:
                del self._per_address[address]

    def _forget_idle(self, sock: socket.socket) -> socket.socket:
        self._idle.pop(sock, None)
        return sock


def _peer_ip(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


class EdgeRequestHandler(RequestHandler):
    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket) and not self._handshake():
            return
        super().handle()

    def _handshake(self) -> bool:
        """TLS handshake with a deadline, in this connection's thread."""
        sock = self.request
        timeout = getattr(self.server, "handshake_timeout", 10.0)
        address = str(self.client_address[0])
        try:
            sock.settimeout(timeout)
            sock.do_handshake()
            sock.settimeout(self.server.ae.network_timeout)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("TLS handshake failed address=%s reason=%s", address, reason)
            alert = getattr(self.server, "on_tls_failure", None)
            if alert is not None:
                alert(address, str(reason))
            with contextlib.suppress(OSError):
                sock.close()
            guard = getattr(self.server, "guard", None)
            if guard is not None:
                guard.closed(sock, address)
            return False
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # A second AssociationSocket would queue a second "connection open"
        # event; the subclass only overrides methods, so retype the one made.
        assoc.dul.socket.__class__ = EdgeAssociationSocket
        # pynetdicom's DUL polls its socket every millisecond: ~2% of a core per
        # connection. Until the peer asks for an association, poll slowly, so
        # idle or hostile connections cost little; then at full speed.
        dul = assoc.dul
        dul._run_loop_delay = PRE_ASSOCIATION_POLL
        assoc.bind(evt.EVT_REQUESTED, lambda _event: setattr(dul, "_run_loop_delay",
                                                             ASSOCIATION_POLL))
        stored = getattr(self.server, "stored_syntaxes", None)
        assoc.bind(evt.EVT_REQUESTED, lambda event: order_syntaxes(event, stored))
        assoc.bind(evt.EVT_CONN_CLOSE, _release_waiting_acceptor)
        guard = getattr(self.server, "guard", None)
        if guard is not None:
            sock, address = self.request, str(self.client_address[0])
            assoc.bind(evt.EVT_REQUESTED, lambda _event: guard.negotiating(sock))
            assoc.bind(evt.EVT_CONN_CLOSE, lambda _event: guard.closed(sock, address))
        return assoc


def _release_waiting_acceptor(event: Any) -> None:
    """A connection that closes before its A-ASSOCIATE-RQ: end the association now.

    pynetdicom's acceptor thread waits for the request primitive on the DUL's
    user queue for the whole ACSE timeout, even after the transport is gone,
    so the dead connection keeps an association slot. An empty item makes
    that wait return the way its timeout does (the thread cleans up and exits).
    """
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


class EdgeAssociationServer(ThreadedAssociationServer):
    reuse_port = False
    handshake_timeout = 10.0
    on_tls_failure: Any = None
    guard: ConnectionGuard | None = None
    stored_syntaxes: StoredCounts | None = None
    # socketserver's default backlog of 5 drops the SYNs of a burst of
    # connections (each retried after 1 s by the client's kernel).
    request_queue_size = 128

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.guard is None:
            return True
        return self.guard.admit(request, str(client_address[0]))

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            # pynetdicom handshakes here, on the accept loop: one client that never
            # sends a ClientHello blocks every new TLS connection. The handshake runs
            # in the connection's own thread instead (EdgeRequestHandler.handle).
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


def set_nodelay(assoc: Association) -> None:
    """TCP_NODELAY on an association we requested (pynetdicom leaves Nagle on)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
