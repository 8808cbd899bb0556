"""Socket-level subclasses of pynetdicom's acceptor: the edge's own transport.

- EdgeAssociationServer: TCP_NODELAY on every accepted socket (Nagle plus
  delayed ACK costs ~40 ms per small response), SO_REUSEPORT when several
  worker processes share the port, and our request handler.
- EdgeRequestHandler: gives each association an EdgeAssociationSocket.
- EdgeAssociationSocket.recv: pynetdicom 3.0.4 reads a PDU in 4096-byte
  `recv()` calls, each appended to a growing bytearray (128 Python-level calls
  and copies for a 512 KiB CT slice); this reads into one preallocated buffer.
  It also refuses a read longer than any PDU the association may carry:
  pynetdicom trusts the PDU length field, so one P-DATA declaring ~2 GiB made
  it buffer without bound. A refused read closes the connection (pynetdicom
  handles it as Evt17, transport closed, and ends the association).
"""

from __future__ import annotations

import logging
import socket

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

_RECV_CHUNK = 1 << 20
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


class EdgeRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # A second AssociationSocket would queue a second "connection open"
        # event; the subclass only overrides methods, so retype the one made.
        assoc.dul.socket.__class__ = EdgeAssociationSocket
        return assoc


class EdgeAssociationServer(ThreadedAssociationServer):
    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


def set_nodelay(assoc: Association) -> None:
    """TCP_NODELAY on an association we requested (pynetdicom leaves Nagle on)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
