"""Socket-level subclasses of pynetdicom's acceptor: the edge's own transport.

- EdgeAssociationServer: TCP_NODELAY on every accepted socket (Nagle plus
  delayed ACK costs ~40 ms per small response), SO_REUSEPORT when several
  worker processes share the port, and our request handler.
- EdgeRequestHandler: gives each association an EdgeAssociationSocket
  (pdu_socket.py: read deadlines, PDU size limits, the close in Sta13) and an
  EdgeAssociation, and tells the ConnectionGuard when the peer starts
  negotiating and when the association has ended.
- ConnectionGuard: in pynetdicom 3.0.4 a TCP connection that never sends an
  A-ASSOCIATE-RQ holds an association slot until the ARTIM timer expires, so
  a few hundred idle sockets lock every modality out. The guard caps
  connections that have not started negotiating (closing the oldest idle one
  when a new connection needs room) and connections per remote address, so
  a peer that negotiates always finds a free slot. A connection counts
  against its address until its association thread has ended (not merely
  until its socket closed), so established associations count too.
- EdgeAssociation: runs callbacks when the association's thread ends; its
  reactor, and its DUL's, block until there is work (reactors.py); its DUL
  thread serves C-STOREs itself (store_receiver.py).
- Every accepted socket, plain or TLS, has `network_timeout` as its socket
  timeout, so no send or receive blocks for longer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, RequestHandler, ThreadedAssociationServer

from appliance.base import compat
from appliance.dimse.negotiation import StoredCounts, order_syntaxes
from appliance.dimse.pdu_socket import EdgeAssociationSocket
from appliance.dimse.reactors import make_waiting
from appliance.dimse.store_receiver import StoreReceiver, StoreTarget

log = logging.getLogger(__name__)


class EdgeAssociation(Association):
    """An acceptor association that says when its thread has ended, and whose reactor
    blocks until there is work (reactors.py)."""

    on_end: list[Callable[[], None]]
    pacs_edge_wake: threading.Event

    def run(self) -> None:
        try:
            super().run()
        finally:
            for callback in self.on_end:
                callback()

    def _run_reactor(self) -> None:
        compat.run_association_reactor(self, self.pacs_edge_wake)

    def kill(self) -> None:
        self.pacs_edge_wake.set()
        compat.kill_association(self)


class SupportedContexts(list[PresentationContext]):
    """The server's supported contexts, copied per association as a new list of the
    same context objects.

    pynetdicom deep-copies the supported contexts for every new connection, so
    that negotiation may change one association's copy; for 177 contexts with
    45 transfer syntaxes each that is ~90 ms of CPU per association (a field
    by field copy still ~1.5 ms, the largest part of a C-ECHO's set-up). Nothing
    changes a context in place: pynetdicom's negotiation only reads them, and
    the appliance's (negotiation.py) replaces a context by a changed copy. So
    every association shares the context objects, and only the list is its own.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


class ConnectionGuard:
    """Admission control for raw connections; see the module docstring."""

    def __init__(self, *, idle_limit: int, per_address_limit: int) -> None:
        self.idle_limit = idle_limit
        self.per_address_limit = per_address_limit
        self._lock = threading.Lock()
        self._idle: OrderedDict[socket.socket, str] = OrderedDict()
        self._open: dict[socket.socket, str] = {}
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
            self._open[sock] = address
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

    def closed(self, sock: socket.socket) -> None:
        """The connection's association has ended; a second call changes nothing."""
        with self._lock:
            self._idle.pop(sock, None)
            address = self._open.pop(sock, None)
            if address is None:
                return
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
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
    @property
    def local(self) -> AddressInformation:
        """The listening address, worked out once per server: pynetdicom's resolves it
        with getaddrinfo() for every connection (a quarter millisecond of CPU each)."""
        server = self.server
        known: AddressInformation | None = getattr(server, "local_address", None)
        if known is None:
            known = AddressInformation.from_tuple(server.server_address)
            server.local_address = known
        return known

    def handle(self) -> None:
        started = False
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._handshake():
                return
            super().handle()  # creates and starts the association
            started = True
        finally:
            # A started association releases its guard entry when its thread ends.
            guard = getattr(self.server, "guard", None)
            if guard is not None and not started:
                guard.closed(self.request)

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
            # "certificate is not yet valid" / "has expired": often this box's clock.
            verify = getattr(exc, "verify_message", "")
            log.warning("TLS handshake failed address=%s reason=%s%s", address, reason,
                        f" verify={verify!r}" if verify else "")
            alert = getattr(self.server, "on_tls_failure", None)
            if alert is not None:
                alert(address, str(reason))
            with contextlib.suppress(OSError):
                sock.close()
            return False
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # A second AssociationSocket would queue a second "connection open"
        # event, a second Association a second thread; the subclasses only
        # override methods, so retype the objects made.
        assoc.__class__ = EdgeAssociation
        assoc.on_end = []
        dul_socket = assoc.dul.socket
        dul_socket.__class__ = EdgeAssociationSocket
        dul_socket.network_timeout = float(self.server.ae.network_timeout or 60.0)
        dul_socket.stopping = getattr(self.server, "stopping", None)
        target = getattr(self.server, "store_target", None)
        assoc.pacs_edge_wake = make_waiting(
            assoc, StoreReceiver(assoc, target) if target is not None else None)
        stored = getattr(self.server, "stored_syntaxes", None)
        assoc.bind(evt.EVT_REQUESTED, lambda event: order_syntaxes(event, stored))
        assoc.bind(evt.EVT_CONN_CLOSE, _release_waiting_acceptor)
        assoc.bind(evt.EVT_CONN_CLOSE, _log_silent_connection)
        assoc.bind(evt.EVT_ABORTED, _log_network_timeout)
        guard = getattr(self.server, "guard", None)
        if guard is not None:
            sock = self.request
            assoc.bind(evt.EVT_REQUESTED, lambda _event: guard.negotiating(sock))
            assoc.on_end.append(lambda: guard.closed(sock))
        assoc.bind(evt.EVT_REQUESTED, _deliver_refusal)  # last: after every other handler
        return assoc


def _deliver_refusal(event: Any) -> None:
    """A handler of EVT_REQUESTED rejected or aborted the association (the peer
    checks of appliance.dimse.handlers): wait until the DUL has sent it.

    The A-ASSOCIATE-RJ is only queued for the DUL thread; right after the handlers
    return, pynetdicom's acceptor shuts the socket down, so the peer saw the
    connection close with no answer ("peer aborted association") instead of the
    rejection. pynetdicom's own rejections kill the association first, which waits
    for the DUL: the same here (the DUL sends, then waits for the peer's close or
    ARTIM, Sta13)."""
    assoc = event.assoc
    if assoc.is_rejected or assoc.is_aborted:
        assoc.kill()


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


def _log_silent_connection(event: Any) -> None:
    """PS3.8 closes a connection without an A-ASSOCIATE-RQ when ARTIM expires
    (AA-2, no A-ABORT); say so, since pynetdicom does not."""
    assoc = event.assoc
    artim = assoc.dul.artim_timer
    if assoc.requestor.primitive is None and artim.expired:
        log.warning("closing connection: no A-ASSOCIATE-RQ within acse_timeout=%gs address=%s",
                    artim.timeout, assoc.requestor.address)


def _log_network_timeout(event: Any) -> None:
    """pynetdicom aborts an established association after `network_timeout` without a
    PDU, logging only "Network timeout reached": name the peer and the limit."""
    assoc = event.assoc
    if assoc.dul.idle_timer_expired():
        log.warning("aborting association: no PDU within network_timeout=%gs address=%s",
                    assoc.network_timeout, assoc.requestor.address)


class EdgeAssociationServer(ThreadedAssociationServer):
    reuse_port = False
    local_address: AddressInformation | None = None  # EdgeRequestHandler.local
    handshake_timeout = 10.0
    on_tls_failure: Any = None
    guard: ConnectionGuard | None = None
    stored_syntaxes: StoredCounts | None = None
    store_target: StoreTarget | None = None  # who C-STOREs go to (store_receiver.py)
    # Set when the server stops: connections waiting for their peer to close
    # after an A-ABORT (Sta13) close at once instead of at ARTIM expiry.
    stopping: threading.Event | None = None
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
        # accept() returns a blocking socket without a timeout, whatever the
        # listening socket's: without this, a silent peer blocks a send or
        # receive for ever.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            # pynetdicom handshakes here, on the accept loop: one client that never
            # sends a ClientHello blocks every new TLS connection. The handshake runs
            # in the connection's own thread instead (EdgeRequestHandler.handle).
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address
